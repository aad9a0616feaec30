//! What restore tests share: a counter checkpointed through the shim, and the
//! CreateContainer of a checkpoint, as the kubelet sends it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cri::{Client, Env};
use k8s_cri::v1 as cri;

/// A counter running in pod `pod_name`, checkpointed through the shim: (its
/// id, the archive, the counts just before and after the checkpoint).
pub async fn checkpointed_counter(
    env: &mut Env,
    c: &mut Client,
    pod_name: &str,
    dir: &Path,
) -> (String, PathBuf, u64, u64) {
    let pod = env.run_pod(c, pod_name, false).await;
    let id = env.counter(c, &pod, "counter", 8, true).await;
    let out = super::cri::exec(
        c,
        &id,
        "echo written > /root/newfile && rm /bin/vi && echo ok",
    )
    .await;
    assert_eq!(out, "ok");
    let archive = dir.join(format!("checkpoint-{pod_name}.tar"));
    let (before, after) = checkpoint_to(env, c, &id, &archive).await;
    (id, archive, before, after)
}

/// CheckpointContainer of counter `id` into `archive`: the counts just before
/// and just after.
pub async fn checkpoint_to(env: &Env, c: &mut Client, id: &str, archive: &Path) -> (u64, u64) {
    let before = env.count(id).unwrap();
    c.checkpoint_container(cri::CheckpointContainerRequest {
        container_id: id.into(),
        location: archive.to_string_lossy().into_owned(),
        timeout: 60,
    })
    .await
    .unwrap();
    (before, env.count(id).unwrap())
}

/// The counter's config for a new pod, with `image` (the archive) as its image.
pub fn restore_config(env: &Env, name: &str, image: &str) -> cri::ContainerConfig {
    let mut cfg = super::cri::counter_config(name, false);
    cfg.image = Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    });
    // What the process runs comes from the checkpoint, not from here.
    cfg.command = vec!["/bin/false".into()];
    cfg.args = vec![];
    let _ = env;
    cfg
}

pub async fn create(
    c: &mut Client,
    pod: &(String, cri::PodSandboxConfig),
    cfg: cri::ContainerConfig,
) -> Result<String, tonic::Status> {
    c.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.0.clone(),
        config: Some(cfg),
        sandbox_config: Some(pod.1.clone()),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

/// The first count the restored process logged in its new log file.
pub fn first_logged_count(log: &Path) -> u64 {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(n) = text.lines().find_map(|l| {
            l.rsplit_once("counter ")
                .and_then(|(_, n)| n.trim().parse().ok())
        }) {
            return n;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nothing logged in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `first`, the first count a restored counter logs, goes on from
/// a checkpoint that read `counts` from its count file just before and just
/// after. The counter writes its count file before it prints the line, so a
/// checkpoint between the two restores a process that prints the count read
/// just before: `counts.0` itself (CI saw it once).
pub fn continues(first: u64, counts: (u64, u64)) -> bool {
    first >= counts.0 && first <= counts.1 + 1
}

/// The restored container `id` goes on from the count its checkpoint saw
/// ([`continues`]): its first line in `log`, then counting on in its root.
pub fn assert_continues(env: &Env, id: &str, log: &Path, counts: (u64, u64), what: &str) {
    let first = first_logged_count(log);
    assert!(
        continues(first, counts),
        "{what}: restored at {first}, the checkpoint saw {}..{}",
        counts.0,
        counts.1
    );
    super::wait_count(&env.rootfs(id), |v| v > first + 2);
}

pub fn ns(pid: i64, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

pub async fn status(c: &mut Client, id: &str) -> cri::ContainerStatusResponse {
    c.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: true,
    })
    .await
    .unwrap()
    .into_inner()
}

/// `id` is RUNNING in the runtime's `ListContainers`.
pub async fn assert_listed_running(c: &mut Client, id: &str) {
    let listed = c
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .containers
            .iter()
            .any(|x| x.id == id && x.state() == cri::ContainerState::ContainerRunning),
        "{id} is not listed as running"
    );
}

/// Restores `image` into a new pod `pod_name`: the process goes on from the
/// count the checkpoint saw (`before..=after`), and the runtime lists it as
/// running. Returns its `restoredFrom`.
pub async fn restore_from(
    env: &mut Env,
    c: &mut Client,
    pod_name: &str,
    image: &str,
    counts: (u64, u64),
) -> String {
    let pod = env.run_pod(c, pod_name, false).await;
    let id = create(c, &pod, restore_config(env, "restored", image))
        .await
        .unwrap_or_else(|e| panic!("CreateContainer of {image}: {e:?}"));
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer of {image}: {e:?}"));
    let log = Path::new(&pod.1.log_directory).join("restored.log");
    assert_continues(env, &id, &log, counts, image);
    assert_listed_running(c, &id).await;
    let info = restore_info(&status(c, &id).await);
    assert_eq!(info["restored"], serde_json::Value::Bool(true), "{info}");
    info["restoredFrom"].as_str().unwrap().to_string()
}

/// The JSON object under `info` in a verbose ContainerStatus, where the
/// runtime's fields and (as CRI-O puts them) the restore's are.
pub fn restore_info(st: &cri::ContainerStatusResponse) -> serde_json::Value {
    let raw = st.info.get("info").expect("a verbose status has `info`");
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("info is not JSON ({e}): {raw}"))
}
