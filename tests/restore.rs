//! Restore through CRI: CreateContainer with a checkpoint archive as the image,
//! then StartContainer, through the shim's socket with the independent k8s-cri
//! client, in front of a real containerd whose runc is ckpt-runc. The restored
//! container is the runtime's own, in the new pod, and its process continues
//! from where it was checkpointed.

mod common;

use std::path::{Path, PathBuf};

use common::cri::{Client, Env};
use common::out_dir;
use common::restore::{
    assert_listed_running, checkpointed_counter, create, first_logged_count, ns, restore_config,
    restore_from, restore_info, status,
};
use k8s_cri::v1 as cri;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_comes_back_as_a_container_the_runtime_manages() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (orig, archive, before, after) =
        checkpointed_counter(&mut env, &mut c, "orig", out.path()).await;

    let pod = env.run_pod(&mut c, "moved", false).await;
    let cfg = restore_config(&env, "restored", &archive.to_string_lossy());
    let id = create(&mut c, &pod, cfg).await.unwrap();
    assert_eq!(
        env.state(&mut c, &id).await,
        cri::ContainerState::ContainerCreated
    );
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();

    // The runtime reports it as the new request made it, and restored.
    let st = status(&mut c, &id).await;
    let s = st.status.clone().unwrap();
    assert_eq!(
        (s.state(), s.metadata.as_ref().unwrap().name.as_str()),
        (cri::ContainerState::ContainerRunning, "restored")
    );
    assert!(s.log_path.ends_with("restored.log"), "{}", s.log_path);
    let info = restore_info(&st);
    assert_eq!(info["restored"], serde_json::Value::Bool(true), "{info}");
    assert_eq!(
        info["restoredFrom"].as_str().map(PathBuf::from),
        Some(archive.clone())
    );
    // containerd's own fields are still there.
    assert_eq!(info["sandboxID"].as_str(), Some(pod.0.as_str()), "{info}");
    assert!(info["pid"].as_i64().unwrap_or(0) > 0, "{info}");
    assert_listed_running(&mut c, &id).await;

    // The process continues from its checkpointed memory, into the new log.
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    let first = first_logged_count(&log);
    assert!(
        common::restore::continues(first, (before, after)),
        "restored at {first}, checkpoint saw {before}..{after}"
    );
    common::wait_count(&env.rootfs(&id), |v| v > first + 2);
    // Its file changes came along; exec works; it is in the new pod.
    let seen = common::cri::exec(
        &mut c,
        &id,
        "cat /root/newfile; ls /bin/vi 2>/dev/null || echo no-vi; hostname",
    )
    .await;
    assert_eq!(seen, "written\nno-vi\nmoved");
    let info: serde_json::Value = serde_json::from_str(&st.info["info"]).unwrap();
    let pid = info["pid"].as_i64().unwrap();
    let pause = env.pause_pid(&id);
    for kind in ["net", "ipc", "uts"] {
        assert_eq!(ns(pid, kind), ns(pause, kind), "{kind} namespace");
    }
    // The pod keeps its own hostname (CRIU would restore the old one into it).
    assert_eq!(
        common::sh(&format!("nsenter -t {pause} -u hostname")).trim(),
        "moved"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .all(|l| l.contains(&format!("{}/moved/", env.cgroup_parent))),
        "{cgroups}"
    );
    // The original runs on.
    env.assert_running(&mut c, &orig).await;

    // Stop: the exit is reported. Remove: gone, and its restore with it.
    c.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 5,
    })
    .await
    .unwrap();
    let s = status(&mut c, &id).await.status.unwrap();
    assert_eq!(s.state(), cri::ContainerState::ContainerExited);
    assert_ne!(s.finished_at, 0);
    c.remove_container(cri::RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    assert!(c
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false
        })
        .await
        .is_err());
    assert!(env.restores().is_empty(), "{:?}", env.restores());
}

/// Two containerds, each behind its own shim, stand for two nodes.
#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_from_one_node_is_restored_on_another() {
    let mut a = Env::start();
    let mut b = Env::start();
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let out = out_dir();
    let (orig, archive, before, after) =
        checkpointed_counter(&mut a, &mut ca, "on-a", out.path()).await;
    // The archive travels (here, a copy into node B's own directory).
    let copied = b.dir.join("from-a.tar");
    std::fs::copy(&archive, &copied).unwrap();

    let from = restore_from(
        &mut b,
        &mut cb,
        "on-b",
        &copied.to_string_lossy(),
        (before, after),
    )
    .await;
    assert_eq!(PathBuf::from(from), copied);
    // Node A's original is untouched and still counting.
    a.assert_running(&mut ca, &orig).await;
}

/// Every refusal has its code, and leaves no container and no staging behind.
#[tokio::test(flavor = "multi_thread")]
async fn bad_checkpoints_are_refused_and_leave_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let out = out_dir();
    let (_, archive, _, _) = checkpointed_counter(&mut env, &mut c, "src", out.path()).await;
    let pod = env.run_pod(&mut c, "dst", false).await;
    let count = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.list_containers(cri::ListContainersRequest { filter: None })
                .await
                .unwrap()
                .into_inner()
                .containers
                .len()
        }
    };
    let containers = count(&mut c).await;

    let not_tar = out.path().join("not.tar");
    std::fs::write(&not_tar, vec![1u8; 4096]).unwrap();
    let truncated = out.path().join("truncated.tar");
    let bytes = std::fs::read(&archive).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let with_link = common::archive::rewrite(
        &archive,
        &out.path().join("link.tar"),
        |_, _| None,
        Some(("checkpoint/evil", "/etc/passwd")),
    );
    // A device node in the rootfs diff: refused at create, as every rule of
    // docs/security-archive.md is (tests/archive_hostile.rs has the others).
    let with_device = common::archive::rewrite(
        &archive,
        &out.path().join("device.tar"),
        |name, data| (name == "rootfs-diff.tar").then(|| with_device_node(data, "dev/evil")),
        None,
    );
    let missing_image = common::archive::rewrite(
        &archive,
        &out.path().join("image.tar"),
        |name, data| {
            (name == "config.dump").then(|| {
                let mut v: serde_json::Value = serde_json::from_slice(data).unwrap();
                v["rootfsImageName"] = "docker.io/library/not-on-this-node:1".into();
                v["rootfsImage"] = v["rootfsImageName"].clone();
                v["rootfsImageRef"] =
                    "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                        .into();
                serde_json::to_vec(&v).unwrap()
            })
        },
        None,
    );
    for (path, code, says) in [
        (
            out.path().join("absent.tar"),
            Code::InvalidArgument,
            "no such file",
        ),
        (not_tar, Code::InvalidArgument, "not a checkpoint archive"),
        (truncated, Code::InvalidArgument, "not a checkpoint archive"),
        (with_link, Code::InvalidArgument, "checkpoint/evil"),
        (
            with_device,
            Code::InvalidArgument,
            "rootfs-diff.tar: dev/evil (a device node",
        ),
        (
            missing_image,
            Code::NotFound,
            "docker.io/library/not-on-this-node:1",
        ),
    ] {
        let err = create(
            &mut c,
            &pod,
            restore_config(&env, "bad", &path.to_string_lossy()),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), code, "{}: {err:?}", path.display());
        assert!(
            err.message().contains(says),
            "{}: {}",
            path.display(),
            err.message()
        );
        assert_eq!(
            count(&mut c).await,
            containers,
            "{}: a container was left",
            path.display()
        );
        assert!(env.restores().is_empty(), "staging left");
    }

    // CRIU fails at StartContainer: the error says why, from CRIU's log; the
    // container ends exited, and nothing of it runs. The image cut is one
    // CreateContainer does not read (a cut core image is refused there).
    let broken = common::archive::rewrite(
        &archive,
        &out.path().join("broken.tar"),
        |name, data| {
            name.starts_with("checkpoint/mm-")
                .then(|| data[..data.len() / 2].to_vec())
        },
        None,
    );
    let id = create(
        &mut c,
        &pod,
        restore_config(&env, "broken", &broken.to_string_lossy()),
    )
    .await
    .unwrap();
    let err = c
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("CRIU's restore log ends"),
        "{}",
        err.message()
    );
    let s = status(&mut c, &id).await.status.unwrap();
    assert_eq!(s.state(), cri::ContainerState::ContainerExited, "{s:?}");
    let procs = format!(
        "/sys/fs/cgroup/pids{}/dst/{id}/cgroup.procs",
        env.cgroup_parent
    );
    assert!(
        std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .trim()
            .is_empty(),
        "{procs} has processes"
    );
    c.remove_container(cri::RemoveContainerRequest { container_id: id })
        .await
        .unwrap();
    assert!(env.restores().is_empty());
}

/// A rootfs diff with a character device `name` appended, written raw.
fn with_device_node(diff: &[u8], name: &str) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    for e in tar::Archive::new(diff).entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        out.append(&h, &mut e).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o666);
    h.set_size(0);
    h.set_cksum();
    out.append(&h, std::io::empty()).unwrap();
    out.into_inner().unwrap()
}
