//! Operability of `ckpt-shim serve`: its metrics as a scraper reads them, the
//! `CheckpointReady` condition as the kubelet and `crictl info` read it, and
//! SIGTERM with checkpoints in flight.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cri::{checkpoint, container_pid, tracer, wait_seized, Env};
use common::scrape::{free_port, get, value};
use common::PYTHON;
use k8s_cri::v1 as cri;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_checkpoints_failures_and_forwarded_calls() {
    let port = free_port();
    let mut env = Env::start_configured(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "metrics", true).await;
    let id = env.counter(&mut c, &pod, "counter", 8, true).await;
    let (status, before) = get(port, "/metrics");
    assert!(status.ends_with("200 OK"), "{status}");

    for _ in 0..3 {
        c.version(cri::VersionRequest::default()).await.unwrap();
    }
    let missing = c
        .container_status(cri::ContainerStatusRequest {
            container_id: "no-such-container".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let out = common::out_dir();
    let archive = out.path().join("ok.tar");
    checkpoint(&mut c, &id, &archive).await.unwrap();
    let e = checkpoint(&mut c, "no-such-container", &out.path().join("no.tar"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    let (_, after) = get(port, "/metrics");
    let delta = |s: &str| value(&after, s) - value(&before, s);
    let forwarded = "ckpt_shim_forwarded_calls_total";
    assert_eq!(
        delta(&format!("{forwarded}{{method=\"Version\",code=\"OK\"}}")),
        3.0,
        "{after}"
    );
    assert_eq!(
        delta(&format!(
            "{forwarded}{{method=\"ContainerStatus\",code=\"NOT_FOUND\"}}"
        )),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "ckpt_shim_checkpoints_total{code=\"OK\"}"),
        1.0
    );
    assert_eq!(
        value(&after, "ckpt_shim_checkpoints_total{code=\"NOT_FOUND\"}"),
        1.0
    );
    assert_eq!(value(&after, "ckpt_shim_checkpoints_in_flight"), 0.0);
    assert_eq!(
        value(&after, "ckpt_shim_checkpoint_written_bytes_total"),
        std::fs::metadata(&archive).unwrap().len() as f64
    );
    // Only the successful checkpoint is timed; its pause is within its duration.
    assert_eq!(
        value(&after, "ckpt_shim_checkpoint_pause_seconds_count"),
        1.0
    );
    let pause = value(&after, "ckpt_shim_checkpoint_pause_seconds_sum");
    let took = value(&after, "ckpt_shim_checkpoint_duration_seconds_sum");
    assert!(pause > 0.0 && pause < took, "pause {pause} s of {took} s");
    // Each forwarded call crossed the relay both ways.
    let hops = |d: &str| {
        delta(&format!(
            "ckpt_shim_relay_seconds_count{{direction=\"{d}\"}}"
        ))
    };
    assert!(
        hops("to_upstream") >= 4.0 && hops("to_client") >= 4.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "ckpt_shim_upstream_errors_total{kind=\"connect\"}"),
        0.0
    );
    let version = format!(
        "ckpt_shim_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&after, &version), 1.0, "{after}");
    assert!(get(port, "/other").0.contains("404"));
    env.assert_running(&mut c, &id).await;
}

/// The runtime's conditions as gRPC C-core (Python grpcio) decodes them from
/// the shim's `Status`, and the keys of its verbose info.
fn conditions(sock: &Path) -> (Vec<serde_json::Value>, Vec<String>) {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/cri_client.py");
    let out = common::run_ok(Command::new(PYTHON).arg(py).arg(sock).arg("status"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let info = v["info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string());
    (v["conditions"].as_array().unwrap().clone(), info.collect())
}

/// CheckpointReady once the shim's first check is done.
fn checkpoint_ready(sock: &Path) -> (serde_json::Value, Vec<serde_json::Value>, Vec<String>) {
    let t = Instant::now();
    loop {
        let (conds, info) = conditions(sock);
        let ready = conds
            .iter()
            .find(|c| c["type"] == "CheckpointReady")
            .cloned();
        let ready = ready.expect("a CheckpointReady condition");
        if ready["reason"] != "Checking" {
            return (ready, conds, info);
        }
        assert!(t.elapsed() < Duration::from_secs(60), "still checking");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_ready_is_true_here_and_false_with_a_failing_criu() {
    common::require(&[PYTHON]);
    let mut env = Env::start();
    let (ready, conds, info) = checkpoint_ready(&env.shim_sock);
    assert_eq!(ready["status"], true, "{ready}");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("pod checkpoint served"),
        "{ready}"
    );
    // containerd's own conditions and verbose info are all there, unchanged.
    let (direct, direct_info) = conditions(&env.containerd_sock);
    assert_eq!(conds[..conds.len() - 1], direct[..], "{conds:?}");
    assert!(direct.iter().any(|c| c["type"] == "RuntimeReady"));
    assert_eq!((info.clone(), info.is_empty()), (direct_info, false));

    // A CRIU whose `criu check` fails: not ready, and why.
    let stub = common::criu_stub(&env.dir, "Error: stub kernel lacks everything");
    std::fs::write(&env.config, format!("criu = \"{}\"\n", stub.display())).unwrap();
    env.kill_shim();
    env.spawn_shim();
    let (ready, _, _) = checkpoint_ready(&env.shim_sock);
    assert_eq!(
        (ready["status"].as_bool(), ready["reason"].as_str()),
        (Some(false), Some("CriuCheckFailed")),
        "{ready}"
    );
    assert!(ready["message"]
        .as_str()
        .unwrap()
        .contains("stub kernel lacks everything"));

    // The real one back, and SIGHUP runs the checks again without a restart.
    std::fs::write(&stub, "#!/bin/sh\nexec /usr/local/sbin/criu \"$@\"\n").unwrap();
    env.signal_shim(Signal::SIGHUP);
    let t = Instant::now();
    while checkpoint_ready(&env.shim_sock).0["status"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "SIGHUP did not recheck"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(env.shim_log().contains("SIGHUP"));
}

/// Starts a checkpoint of `id` and returns once CRIU holds its process.
async fn checkpoint_while_dumping(
    env: &Env,
    id: &str,
    location: &Path,
) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    let mut c = env.client().await;
    let pid = container_pid(&mut c, id).await;
    let (id2, loc) = (id.to_string(), location.to_path_buf());
    let call = tokio::spawn(async move { checkpoint(&mut c, &id2, &loc).await });
    wait_seized(pid, &call).await;
    call
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_dump_finish_within_the_grace_and_stops_it_after() {
    let mut env = Env::start_configured("shutdown_grace_seconds = 60\n");
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "sigterm", true).await;
    let id = env.counter(&mut c, &pod, "counter", 512, true).await;
    let out = common::out_dir();

    // Within the grace: the socket goes at once, a new checkpoint on a
    // connection still open is refused, the one in flight finishes.
    let mut second = env.client().await;
    let finished = out.path().join("finished.tar");
    let call = checkpoint_while_dumping(&env, &id, &finished).await;
    env.signal_shim(Signal::SIGTERM);
    while env.shim_sock.exists() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let refused = checkpoint(&mut second, &id, &out.path().join("refused.tar")).await;
    let e = refused.expect_err("no new checkpoint while stopping");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");
    assert!(
        !call.is_finished(),
        "the first checkpoint outlasted the refusal"
    );
    call.await
        .unwrap()
        .expect("the checkpoint in flight finishes");
    let status = env.wait_shim(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    let names: Vec<String> = common::members(&finished)
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert!(
        names.iter().any(|n| n == "checkpoint/pages-1.img"),
        "{names:?}"
    );

    // Past the grace (none): the dump is stopped, the container thawed and
    // running, and nothing written is left.
    std::fs::write(&env.config, "shutdown_grace_seconds = 0\n").unwrap();
    env.spawn_shim();
    let stopped = out.path().join("stopped.tar");
    let call = checkpoint_while_dumping(&env, &id, &stopped).await;
    env.signal_shim(Signal::SIGTERM);
    let e = call.await.unwrap().expect_err("the checkpoint is stopped");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");
    let status = env.wait_shim(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    assert_eq!(env.freezer(&id), "THAWED");
    let mut direct = common::cri::connect(&env.containerd_sock).await;
    assert_eq!(
        tracer(container_pid(&mut direct, &id).await),
        0,
        "CRIU let go"
    );
    let left = common::entries(out.path());
    assert_eq!(left, vec!["finished.tar".to_string()], "{}", env.shim_log());
    assert!(
        env.shim_log().contains("grace period over"),
        "{}",
        env.shim_log()
    );
    let journal = env.dir.join("shim/frozen");
    assert!(!journal.exists() || common::entries(&journal).is_empty());
    // The runtime still has it running, and it counts on.
    env.assert_running(&mut direct, &id).await;
}
