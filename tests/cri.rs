//! The shim as the CRI endpoint in front of a real containerd, driven with an
//! independent CRI client (k8s-cri): pods, containers, CheckpointContainer,
//! restore, errors, deadlines, parallelism, and transparency of the proxy.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use ckpt_shim::restore::restore;
use common::cri::{Client, Env};
use common::{assert_resumed, entries, out_dir, restore_opts, Overlay, Restored};
use k8s_cri::v1 as cri;
use tonic::Code;

async fn checkpoint(
    c: &mut Client,
    id: &str,
    location: &Path,
    timeout: i64,
) -> Result<(), tonic::Status> {
    c.checkpoint_container(cri::CheckpointContainerRequest {
        container_id: id.into(),
        location: location.to_string_lossy().into_owned(),
        timeout,
    })
    .await
    .map(drop)
}

fn member_names(archive: &Path) -> Vec<String> {
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_checkpointed_through_the_shim_is_restored_and_continues() {
    let mut env = Env::start();
    let mut c = env.client().await;
    // Everything below goes through the shim's socket.
    let v = c
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "containerd", "Version is forwarded");
    let pod = env.run_pod(&mut c, "pod1", false).await;
    let id = env.counter(&mut c, &pod, "counter", 1, true).await;
    let listed = c
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.containers.iter().any(|x| x.id == id));
    let exec = c
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo written > /root/newfile && mkfifo -m 0640 /root/pipe && rm /bin/vi".into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        exec.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&exec.stderr)
    );

    let out = out_dir();
    let archive = out.path().join("checkpoint-pod1_default-counter.tar");
    let before = env.count(&id).unwrap();
    // A short ID, as crictl users type it.
    checkpoint(&mut c, &id[..12], &archive, 30).await.unwrap();
    let after = env.count(&id).unwrap();
    env.assert_running(&mut c, &id).await;

    let meta = std::fs::metadata(&archive).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0));
    let names = member_names(&archive);
    for want in [
        "spec.dump",
        "config.dump",
        "checkpoint/",
        "checkpoint/inventory.img",
        "rootfs-diff.tar",
        "deleted.files",
        "stats-dump",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    let t = std::time::Instant::now();
    while entries(out.path()).len() > 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "staging left: {:?}",
            entries(out.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let summary = ckpt_shim::inspect::inspect(&archive).unwrap();
    let cfg = summary.config.as_ref().unwrap();
    assert_eq!(cfg.id, id);
    assert_eq!(cfg.name, "counter_pod1_default_uid-pod1_0");
    assert_eq!(
        cfg.rootfs_image_name.as_deref(),
        Some("docker.io/library/ckpt-counter:latest")
    );
    assert!(
        cfg.rootfs_image_ref
            .as_deref()
            .unwrap_or("")
            .starts_with("sha256:"),
        "{cfg:?}"
    );
    assert_eq!(summary.deleted_files, vec!["/bin/vi"]);

    // Restore next to the pod: same image layers, a fresh writable layer.
    let spec = env.spec(&id);
    let pid = spec_pid(&id);
    let lower = root_lowerdir(pid);
    let cg = spec["linux"]["cgroupsPath"].as_str().unwrap().to_string();
    // Restore right away, while containerd is still tearing the original down:
    // the restored container gets a cgroup of its own.
    c.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    let target = tempfile::tempdir().unwrap();
    let ov = Overlay::on(&lower, target.path());
    // The new container's config, which the restore is held against: the
    // spec containerd generated for the original.
    std::fs::write(
        target.path().join("config.json"),
        serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    let pid = restore(&restore_opts(
        &archive,
        target.path(),
        "restored",
        Default::default(),
    ))
    .await
    .unwrap();
    let restored = Restored {
        pid,
        cgroup: format!("{}/restored", Path::new(&cg).parent().unwrap().display()),
    };
    restored.assert_in_own_cgroup();
    assert_resumed(&ov.rootfs, before, after);
    assert!(ov.rootfs.join("root/newfile").exists() && !ov.rootfs.join("bin/vi").exists());
    // A FIFO in the writable layer comes back a FIFO, with its mode.
    let pipe = std::fs::symlink_metadata(ov.rootfs.join("root/pipe")).unwrap();
    assert!(pipe.file_type().is_fifo(), "{:?}", pipe.file_type());
    assert_eq!(pipe.mode() & 0o7777, 0o640);
    // The restored process is in the pod's network namespace.
    let pod_net = std::fs::read_link(format!("/proc/{}/ns/net", spec_pause_pid(&spec))).unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        pod_net
    );
    drop(restored);
}

fn spec_pid(id: &str) -> i32 {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("/run/containerd/runc/k8s.io/{id}/state.json")).unwrap(),
    )
    .unwrap();
    state["init_process_pid"].as_i64().unwrap() as i32
}

fn spec_pause_pid(spec: &serde_json::Value) -> String {
    let ns = spec["linux"]["namespaces"].as_array().unwrap();
    let net = ns.iter().find(|n| n["type"] == "network").unwrap()["path"]
        .as_str()
        .unwrap()
        .to_string();
    // "/proc/<pid>/ns/net" or a bind-mounted netns file; both resolve the same.
    net.trim_start_matches("/proc/")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

fn root_lowerdir(pid: i32) -> String {
    let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mi
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    root.split(',')
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn host_network_pod_checkpoints() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "hostnet", true).await;
    let id = env.counter(&mut c, &pod, "counter", 1, true).await;
    let out = out_dir();
    checkpoint(&mut c, &id, &out.path().join("h.tar"), 30)
        .await
        .unwrap();
    env.assert_running(&mut c, &id).await;
    assert!(member_names(&out.path().join("h.tar"))
        .iter()
        .any(|n| n == "checkpoint/inventory.img"));
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_have_the_right_codes_and_leave_the_container_running() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "errs", false).await;
    let id = env.counter(&mut c, &pod, "counter", 1, true).await;
    let created = env.counter(&mut c, &pod, "notstarted", 1, false).await;
    let out = out_dir();
    std::fs::write(out.path().join("exists.tar"), b"x").unwrap();
    let before = entries(out.path());
    let p = |n: &str| out.path().join(n);
    let cases: Vec<(&str, String, std::path::PathBuf, i64, Code)> = vec![
        (
            "unknown container",
            "0123456789abcdef".into(),
            p("a.tar"),
            0,
            Code::NotFound,
        ),
        (
            "empty id",
            String::new(),
            p("a.tar"),
            0,
            Code::InvalidArgument,
        ),
        (
            "relative location",
            id.clone(),
            "rel.tar".into(),
            0,
            Code::InvalidArgument,
        ),
        (
            "missing parent",
            id.clone(),
            p("nodir/a.tar"),
            0,
            Code::InvalidArgument,
        ),
        (
            "negative timeout",
            id.clone(),
            p("a.tar"),
            -1,
            Code::InvalidArgument,
        ),
        (
            "existing file",
            id.clone(),
            p("exists.tar"),
            0,
            Code::AlreadyExists,
        ),
        (
            "not running",
            created.clone(),
            p("a.tar"),
            0,
            Code::FailedPrecondition,
        ),
    ];
    for (what, cid, loc, timeout, code) in cases {
        let err = checkpoint(&mut c, &cid, &loc, timeout).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert_eq!(entries(out.path()), before, "{what}: left something behind");
        env.assert_running(&mut c, &id).await;
    }
    assert_eq!(std::fs::read(p("exists.tar")).unwrap(), b"x");
}

#[tokio::test(flavor = "multi_thread")]
async fn deadline_shorter_than_the_dump_is_deadline_exceeded_with_nothing_left() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "slow", false).await;
    let id = env.counter(&mut c, &pod, "big", 256, true).await;
    let out = out_dir();
    let msg = prost::Message::encode_to_vec(&cri::CheckpointContainerRequest {
        container_id: id.clone(),
        location: out.path().join("d.tar").to_string_lossy().into_owned(),
        timeout: 0,
    });
    let r = env
        .call_with_deadline("CheckpointContainer", "80m", &msg)
        .await;
    assert!(r.message().contains("deadline"), "{}", r.message());
    env.wait_thawed_and_empty(out.path(), &[&id]).await;
    env.assert_running(&mut c, &id).await;
}

/// A client that gives up mid-dump resets its stream (RST_STREAM): the shim
/// stops the checkpoint, and the other calls on the same connection go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_call_stops_the_checkpoint_and_the_connection_goes_on() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "cancel", false).await;
    let id = env.counter(&mut c, &pod, "big", 256, true).await;
    let out = out_dir();
    let location = out.path().join("c.tar");
    let mut c2 = c.clone();
    let call = tokio::spawn({
        let id = id.clone();
        async move { checkpoint(&mut c2, &id, &location, 60).await }
    });
    // Wait until the dump is under way (the staging dir exists), then give up.
    let t = std::time::Instant::now();
    while entries(out.path()).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "checkpoint never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    call.abort();
    let t = std::time::Instant::now();
    while !(entries(out.path()).is_empty() && env.freezer(&id) == "THAWED") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "left: {:?}, freezer {}",
            entries(out.path()),
            env.freezer(&id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        env.shim_log().contains("cancelled by the caller"),
        "{}",
        env.shim_log()
    );
    // The same connection still works.
    env.assert_running(&mut c, &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_checkpoints_of_two_containers_and_of_one_container() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "par", false).await;
    let a = env.counter(&mut c, &pod, "a", 32, true).await;
    let b = env.counter(&mut c, &pod, "b", 32, true).await;
    let out = out_dir();
    let (mut c1, mut c2, mut c3) = (c.clone(), c.clone(), c.clone());
    let (pa, pb, pa2) = (
        out.path().join("a.tar"),
        out.path().join("b.tar"),
        out.path().join("a2.tar"),
    );
    let (ra, rb, ra2) = tokio::join!(
        checkpoint(&mut c1, &a, &pa, 60),
        checkpoint(&mut c2, &b, &pb, 60),
        // The same container again: serialised behind the first, both succeed.
        checkpoint(&mut c3, &a, &pa2, 60),
    );
    ra.unwrap();
    rb.unwrap();
    ra2.unwrap();
    for f in ["a.tar", "b.tar", "a2.tar"] {
        assert!(
            member_names(&out.path().join(f))
                .iter()
                .any(|n| n == "checkpoint/inventory.img"),
            "{f}"
        );
    }
    env.assert_running(&mut c, &a).await;
    env.assert_running(&mut c, &b).await;
    let log = env.shim_log();
    assert_eq!(
        log.matches("checkpointed").count(),
        3,
        "one log line per checkpoint: {log}"
    );
    assert!(log.contains("phases=") && log.contains("bytes="), "{log}");
    // The default: CRIU's images streamed straight into each archive.
    assert_eq!(log.matches("streamed=true").count(), 3, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shim_killed_mid_dump_is_recovered_by_the_next_one() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "crash", false).await;
    let id = env.counter(&mut c, &pod, "big", 512, true).await;
    let out = out_dir();
    let location = out.path().join("k.tar");
    let mut c2 = c.clone();
    let (cid, loc) = (id.clone(), location.clone());
    let pid = common::cri::container_pid(&mut c, &id).await;
    let call = tokio::spawn(async move { checkpoint(&mut c2, &cid, &loc, 60).await });
    // Once CRIU dumps the container the shim froze, kill the shim outright.
    common::cri::wait_seized(pid, &call).await;
    env.kill_shim();
    assert!(call.await.unwrap().is_err());
    // CRIU loses its client, aborts, and puts back the frozen state it found.
    let t = std::time::Instant::now();
    while common::pgrep(&["-x", "criu"]) {
        assert!(t.elapsed() < Duration::from_secs(30), "CRIU did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing thaws it now: without the journal it would stay frozen for good.
    assert_eq!(env.freezer(&id), "FROZEN");
    // The next shim finds the journal entry and thaws the container.
    env.spawn_shim();
    let t = std::time::Instant::now();
    while env.freezer(&id) != "THAWED" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still {} after restart",
            env.freezer(&id)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = env.client().await;
    env.assert_running(&mut c, &id).await;
    // Nothing of the dump is left: no staging, no unfinished archive, no archive.
    assert_eq!(entries(out.path()), Vec::<String>::new());
    assert!(env.shim_log().contains("left frozen"), "{}", env.shim_log());
}
