//! The CRI half of hack/demo.sh: through ckpt-shim's socket, run a counter pod,
//! checkpoint it with CheckpointContainer, inspect the archive, stop the
//! container, restore the archive into a fresh rootfs of the same image (beside
//! the pod, in its network namespace), and show the count continuing.
//! usage: cri-demo SHIM_SOCK CKPT_SHIM_BIN WORK_DIR

#[path = "cri_common.rs"]
mod cri_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cri_common::*;
use k8s_cri::v1 as cri;

fn count(rootfs: &Path) -> u64 {
    std::fs::read_to_string(rootfs.join("tmp/count"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn run(cmd: &mut Command) -> Res<String> {
    let o = cmd.output()?;
    if !o.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let (sock, shim, work) = (
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
        PathBuf::from(&args[3]),
    );
    let mut c = connect(&sock).await?;
    let v = c
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();
    println!(
        "== CRI endpoint {}: {} {} (forwarded by ckpt-shim)",
        sock.display(),
        v.runtime_name,
        v.runtime_version
    );

    let (pod, id) = run_counter(
        &mut c,
        "demo",
        "/ckpt-shim-demo",
        &work.join("logs"),
        64,
        200,
    )
    .await?;
    while exec(&mut c, &id, "cat /tmp/count")
        .await?
        .parse::<u64>()
        .unwrap_or(0)
        < 5
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "== pod demo {}: container counter {} counts (64 MiB touched): {}",
        &pod[..12],
        &id[..12],
        exec(&mut c, &id, "cat /tmp/count").await?
    );
    exec(
        &mut c,
        &id,
        "echo written-before-checkpoint > /root/note; rm /bin/vi",
    )
    .await?;
    println!("== inside it (ExecSync): wrote /root/note, deleted /bin/vi");

    let out = work.join("checkpoints");
    std::fs::create_dir_all(&out)?;
    let archive = out.join("checkpoint-demo_default-counter.tar");
    let at_checkpoint: u64 = exec(&mut c, &id, "cat /tmp/count").await?.parse()?;
    let started = Instant::now();
    c.checkpoint_container(cri::CheckpointContainerRequest {
        container_id: id[..12].into(),
        location: archive.to_string_lossy().into_owned(),
        timeout: 60,
    })
    .await?;
    println!(
        "== CheckpointContainer({}, {}) answered OK in {:.3}s",
        &id[..12],
        archive.display(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        run(Command::new("ls").arg("-l").arg(&archive))?.trim()
    );
    let before = exec(&mut c, &id, "cat /tmp/count").await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    println!(
        "== the container kept running: {before}, then {}",
        exec(&mut c, &id, "cat /tmp/count").await?
    );
    println!(
        "== ckpt-shim inspect\n{}",
        run(Command::new(&shim).arg("inspect").arg(&archive))?.trim_end()
    );

    // A fresh writable layer over the same image layers, next to the live pod.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(format!(
        "/run/containerd/runc/k8s.io/{id}/state.json"
    ))?)?;
    let pid = state["init_process_pid"].as_i64().ok_or("no pid")?;
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .ok_or("no root mount")?;
    let lower = root
        .split(',')
        .find_map(|o| o.strip_prefix("lowerdir="))
        .ok_or("root is not an overlay")?
        .to_string();
    c.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await?;
    c.remove_container(cri::RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    println!("== StopContainer, RemoveContainer: the original is gone; restoring the archive into a fresh rootfs");
    let bundle = work.join("restored");
    for d in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(bundle.join(d))?;
    }
    let b = bundle.display();
    run(Command::new("mount")
        .args([
            "-t",
            "overlay",
            "overlay",
            "-o",
            &format!("lowerdir={lower},upperdir={b}/upper,workdir={b}/work"),
        ])
        .arg(bundle.join("rootfs")))?;
    let log = std::fs::File::create(work.join("restored.log"))?;
    let status = Command::new(&shim)
        .arg("restore")
        .arg(&archive)
        .arg("--bundle")
        .arg(&bundle)
        .args(["--id", "counter-restored"])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    let said = std::fs::read_to_string(work.join("restored.log"))?;
    let line = said
        .lines()
        .find(|l| l.starts_with("restored") || l.starts_with("ckpt-shim:"))
        .unwrap_or("")
        .to_string();
    println!("== ckpt-shim restore: {line}");
    if !status.success() {
        return Err(said.into());
    }
    let rootfs = bundle.join("rootfs");
    let first = count(&rootfs);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let then = count(&rootfs);
    println!(
        "== restored counter: {first}, a second later {then} (resumed from its memory, not from 1)"
    );
    println!(
        "== restored rootfs: /root/note = {:?}, /bin/vi present: {}",
        std::fs::read_to_string(rootfs.join("root/note"))?.trim(),
        rootfs.join("bin/vi").exists()
    );
    if let Some(p) = line.split("pid ").nth(1) {
        std::fs::write(work.join("restored.pid"), p.trim())?;
        let net = std::fs::read_link(format!("/proc/{}/ns/net", p.trim()))
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        println!("== restored process network namespace {net} (the pod's)");
    }
    // A restarted process would count from 1; a restored one goes on from where it was.
    if !(then > first && first >= at_checkpoint) {
        return Err("the restored counter did not continue".into());
    }
    println!("== demo OK");
    Ok(())
}
