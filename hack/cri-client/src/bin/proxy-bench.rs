//! The proxy's cost, measured (not a test): the same unary CRI calls made straight
//! to containerd and through ckpt-shim, interleaved call by call on one connection
//! each, then throughput with N concurrent clients (one connection each), direct
//! and through the shim in alternating slices.
//!   proxy-bench DIRECT_SOCK SHIM_SOCK [--calls N] [--clients N] [--seconds S]
//! Prints one JSON object.

use std::path::Path;
use std::time::{Duration, Instant};

use cri_client::client::*;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use tonic::transport::Channel;

#[derive(Clone)]
struct Clients {
    rt: Client,
    img: ImageServiceClient<Channel>,
}

async fn clients(sock: &Path) -> Res<Clients> {
    let rt = connect(sock).await?;
    let img = ImageServiceClient::new(channel(sock).await?);
    Ok(Clients { rt, img })
}

const METHODS: [&str; 5] = [
    "Version",
    "Status",
    "ListContainers",
    "ListImages",
    "ContainerStatus",
];

async fn call(c: &mut Clients, method: &str, id: &str) -> Res<()> {
    match method {
        "Version" => drop(c.rt.version(cri::VersionRequest::default()).await?),
        "Status" => drop(c.rt.status(cri::StatusRequest::default()).await?),
        "ListContainers" => drop(
            c.rt.list_containers(cri::ListContainersRequest::default())
                .await?,
        ),
        "ListImages" => drop(c.img.list_images(cri::ListImagesRequest::default()).await?),
        "ContainerStatus" => drop(
            c.rt.container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await?,
        ),
        _ => unreachable!(),
    }
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Latency in µs of each call, direct and through the shim alternating.
async fn latency(direct: &mut Clients, shim: &mut Clients, id: &str, n: usize) -> Res<String> {
    let mut rows = Vec::new();
    for m in METHODS {
        let (mut d, mut s) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n + 50 {
            for (which, c) in [(0, &mut *direct), (1, &mut *shim)] {
                let t = Instant::now();
                call(c, m, id).await?;
                let us = t.elapsed().as_secs_f64() * 1e6;
                if i >= 50 {
                    if which == 0 {
                        d.push(us)
                    } else {
                        s.push(us)
                    }
                }
            }
        }
        let (d50, d99, s50, s99) = (
            pct(&mut d, 0.5),
            pct(&mut d, 0.99),
            pct(&mut s, 0.5),
            pct(&mut s, 0.99),
        );
        rows.push(format!(
            r#"{{"method":"{m}","direct_p50_us":{d50:.1},"direct_p99_us":{d99:.1},"shim_p50_us":{s50:.1},"shim_p99_us":{s99:.1},"added_p50_us":{:.1}}}"#,
            s50 - d50
        ));
    }
    Ok(format!("[{}]", rows.join(",")))
}

/// Tells hack/bench/proxy.py that a phase ended and how many calls went through
/// the shim since the last mark; it reads the shim's CPU time there. The pause
/// keeps the next phase's first calls out of that reading.
async fn mark(phase: &str, shim_calls: u64) {
    println!(r#"{{"mark":"{phase}","shim_calls":{shim_calls}}}"#);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Calls per second from `n` clients, each looping over the methods for `secs`,
/// and how many calls were made.
async fn throughput(sock: &Path, n: usize, secs: f64, id: &str) -> Res<(f64, u64)> {
    let mut cs = Vec::new();
    for _ in 0..n {
        cs.push(clients(sock).await?);
    }
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, mut c) in cs.into_iter().enumerate() {
        let id = id.to_string();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = k;
            while Instant::now() < until {
                call(&mut c, METHODS[i % METHODS.len()], &id).await.unwrap();
                i += 1;
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok((total as f64 / start.elapsed().as_secs_f64(), total))
}

#[tokio::main]
async fn main() -> Res<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 {
        return Err(
            "usage: proxy-bench DIRECT_SOCK SHIM_SOCK [--calls N] [--clients N] [--seconds S]"
                .into(),
        );
    }
    let opt = |name: &str, default: f64| -> f64 {
        a.iter()
            .position(|x| x == name)
            .and_then(|i| a.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (calls, n, secs) = (
        opt("--calls", 2000.0) as usize,
        opt("--clients", 32.0) as usize,
        opt("--seconds", 3.0),
    );
    let (direct_sock, shim_sock) = (Path::new(&a[1]), Path::new(&a[2]));
    let mut direct = clients(direct_sock).await?;
    let mut shim = clients(shim_sock).await?;
    // A container for ContainerStatus: the first one listed, or none.
    let id = direct
        .rt
        .list_containers(cri::ListContainersRequest::default())
        .await?
        .into_inner()
        .containers
        .first()
        .map(|c| c.id.clone())
        .ok_or("no container to ask ContainerStatus about: start one first")?;
    mark("start", 0).await;
    let lat = latency(&mut direct, &mut shim, &id, calls).await?;
    mark("latency", (METHODS.len() * (calls + 50)) as u64).await;
    // Alternating slices, so both see the same background.
    let (mut d, mut s) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        d.push(throughput(direct_sock, n, secs, &id).await?.0);
        mark("direct", 0).await;
        let (rate, count) = throughput(shim_sock, n, secs, &id).await?;
        s.push(rate);
        mark("throughput", count).await;
    }
    let (dm, sm) = (pct(&mut d, 0.5), pct(&mut s, 0.5));
    println!(
        r#"{{"latency":{lat},"clients":{n},"direct_calls_per_s":{dm:.0},"shim_calls_per_s":{sm:.0},"shim_fraction_of_direct":{:.3}}}"#,
        sm / dm
    );
    Ok(())
}
