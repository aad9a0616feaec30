//! The CRI half of hack/demo.sh: through ckpt-shim's socket, run a counter pod,
//! checkpoint it with CheckpointContainer, inspect the archive, remove the
//! container, restore the archive through CRI into a new pod (CreateContainer
//! with the archive as the image, then StartContainer), and show the count
//! continuing in the runtime's own container.
//! usage: cri-demo SHIM_SOCK CKPT_SHIM_BIN WORK_DIR

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cri_client::client::*;
use k8s_cri::v1 as cri;

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

    let id = run_original(&mut c, &work).await?;
    let (archive, at_checkpoint) = checkpoint(&mut c, &id, &work, &shim).await?;
    remove(&mut c, &id).await?;
    let (id2, logs) = restore(&mut c, &archive, &work).await?;
    show_restored(&mut c, &id2, &logs, at_checkpoint).await?;
    println!("== demo OK");
    Ok(())
}

/// A pod running the counter (64 MiB touched), once it has counted to 5, with
/// a file written and one deleted inside it; returns the container ID.
async fn run_original(c: &mut Client, work: &Path) -> Res<String> {
    let (pod, id) = run_counter(c, "demo", "/ckpt-shim-demo", &work.join("logs"), 64, 200).await?;
    while exec(c, &id, "cat /tmp/count")
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
        exec(c, &id, "cat /tmp/count").await?
    );
    exec(
        c,
        &id,
        "echo written-before-checkpoint > /root/note; rm /bin/vi",
    )
    .await?;
    println!("== inside it (ExecSync): wrote /root/note, deleted /bin/vi");

    Ok(id)
}

/// CheckpointContainer into the work dir while it runs; returns the archive
/// and the count just before.
async fn checkpoint(c: &mut Client, id: &str, work: &Path, shim: &Path) -> Res<(PathBuf, u64)> {
    let out = work.join("checkpoints");
    std::fs::create_dir_all(&out)?;
    let archive = out.join("checkpoint-demo_default-counter.tar");
    let at_checkpoint: u64 = exec(c, id, "cat /tmp/count").await?.parse()?;
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
    let before = exec(c, id, "cat /tmp/count").await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    println!(
        "== the container kept running: {before}, then {}",
        exec(c, id, "cat /tmp/count").await?
    );
    println!(
        "== ckpt-shim inspect\n{}",
        run(Command::new(shim).arg("inspect").arg(&archive))?.trim_end()
    );

    Ok((archive, at_checkpoint))
}

async fn remove(c: &mut Client, id: &str) -> Res<()> {
    c.stop_container(cri::StopContainerRequest {
        container_id: id.into(),
        timeout: 0,
    })
    .await?;
    c.remove_container(cri::RemoveContainerRequest {
        container_id: id.into(),
    })
    .await?;
    println!("== StopContainer, RemoveContainer: the original is gone");

    Ok(())
}

/// The archive restored through CRI into a new pod; returns the new container
/// and its pod's log dir.
async fn restore(c: &mut Client, archive: &Path, work: &Path) -> Res<(String, PathBuf)> {
    // The restore, as CRI-O takes it: a new pod, and CreateContainer with the
    // archive as the image. The runtime (containerd, through ckpt-runc) owns it.
    let logs = work.join("logs-restored");
    let started = Instant::now();
    let pod2 = new_pod(c, "demo-restored", "/ckpt-shim-demo", &logs).await?;
    let pod_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let image = archive.to_string_lossy();
    let id2 = create_counter(c, &pod2, Some(&image), 0, 200).await?;
    c.start_container(cri::StartContainerRequest {
        container_id: id2.clone(),
    })
    .await?;
    println!(
        "== new pod demo-restored ({pod_ms:.0} ms); CreateContainer(image = the archive) + StartContainer: {:.3}s",
        started.elapsed().as_secs_f64()
    );
    Ok((id2, logs))
}

/// What the restored container shows; an error unless its count went on from
/// the checkpoint.
async fn show_restored(c: &mut Client, id2: &str, logs: &Path, at_checkpoint: u64) -> Res<()> {
    let st = c
        .container_status(cri::ContainerStatusRequest {
            container_id: id2.into(),
            verbose: true,
        })
        .await?
        .into_inner();
    let state = st
        .status
        .as_ref()
        .map(|s| s.state().as_str_name())
        .unwrap_or("?");
    // As CRI-O reports it: inside the runtime's `info` JSON object.
    let info: serde_json::Value = serde_json::from_str(st.info.get("info").map_or("{}", |s| s))?;
    let restored = info["restored"] == serde_json::Value::Bool(true);
    println!(
        "== ContainerStatus {}: {state}, info.restored={restored}, info.checkpointedAt={}",
        &id2[..12],
        info["checkpointedAt"]
    );
    let first: u64 = exec(c, id2, "cat /tmp/count").await?.parse()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let then: u64 = exec(c, id2, "cat /tmp/count").await?.parse()?;
    println!("== restored counter (ExecSync): {first}, a second later {then} (resumed from its memory, not from 1)");
    println!(
        "== inside it: /root/note = {:?}, hostname {:?}",
        exec(c, id2, "cat /root/note").await?,
        exec(c, id2, "hostname").await?
    );
    let log = std::fs::read_to_string(logs.join("counter.log"))?;
    println!(
        "== its output goes on in the new pod's log: {}",
        log.lines().last().unwrap_or("")
    );
    // A restarted process would count from 1; a restored one goes on from where it was.
    if !(then > first && first >= at_checkpoint && restored) {
        return Err("the restored counter did not continue".into());
    }
    Ok(())
}
