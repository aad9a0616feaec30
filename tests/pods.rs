//! Pod checkpoints (KEP-5823) through the shim's socket, in front of a real
//! containerd whose runc is ckpt-runc: CheckpointPod takes one cut of several
//! containers, RestorePod brings them back into a new pod, created and not
//! started, and StartContainer restores each.

mod common;

#[path = "../hack/cri_pods.rs"]
mod cri_pods;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cri::{counter_config, Client, Env};
use common::restore::first_logged_count;
use common::{entries, out_dir};
use cri_pods::{CheckpointPodRequest, RestorePodRequest, RestorePodResponse};
use k8s_cri::v1 as cri;
use tonic::Code;

const MINUTE: Duration = Duration::from_secs(60);

async fn checkpoint_pod(
    env: &Env,
    pod: &str,
    out: &Path,
    ids: &[&str],
    options: &[(&str, &str)],
) -> Result<(), tonic::Status> {
    let req = CheckpointPodRequest {
        pod_sandbox_id: pod.into(),
        output_path: out.to_string_lossy().into_owned(),
        container_ids: ids.iter().map(|s| s.to_string()).collect(),
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    cri_pods::checkpoint_pod(env.channel().await, req, MINUTE)
        .await
        .map(drop)
}

async fn restore_pod(
    env: &Env,
    dir: &Path,
    sandbox: &cri::PodSandboxConfig,
    configs: Vec<cri::ContainerConfig>,
    handler: &str,
) -> Result<RestorePodResponse, tonic::Status> {
    let req = RestorePodRequest {
        checkpoint_path: dir.to_string_lossy().into_owned(),
        config: Some(sandbox.clone()),
        runtime_handler: handler.into(),
        options: HashMap::new(),
        container_configs: configs,
    };
    cri_pods::restore_pod(env.channel().await, req, MINUTE).await
}

/// A pod "name" with counters `a` and `b` running: (pod, [a, b]).
async fn two_counters(env: &mut Env, c: &mut Client, name: &str) -> (String, [String; 2]) {
    let pod = env.run_pod(c, name, false).await;
    let a = env.counter(c, &pod, "a", 8, true).await;
    let b = env.counter(c, &pod, "b", 8, true).await;
    (pod.0, [a, b])
}

/// A new pod's config for a restore, with a label of its own.
fn new_sandbox(env: &Env, name: &str) -> cri::PodSandboxConfig {
    let mut sb = env.sandbox_config(name, false);
    sb.labels.insert("restored".into(), "yes".into());
    std::fs::create_dir_all(&sb.log_directory).unwrap();
    sb
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Both containers run, thawed, and count on.
async fn assert_pod_runs(env: &Env, c: &mut Client, ids: &[String]) {
    for id in ids {
        env.assert_running(c, id).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_comes_back_as_a_new_pod_with_its_containers_created() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let (pod, [a, b]) = two_counters(&mut env, &mut c, "src").await;
    let out = out_dir();
    let before = [env.count(&a).unwrap(), env.count(&b).unwrap()];
    // A unique prefix names a container as well as its full ID.
    checkpoint_pod(&env, &pod, out.path(), &[&a[..12], &b], &[])
        .await
        .unwrap();
    let after = [env.count(&a).unwrap(), env.count(&b).unwrap()];
    assert_pod_runs(&env, &mut c, &[a.clone(), b.clone()]).await;

    // One private directory: a manifest and an archive per container, each
    // one a checkpoint as CheckpointContainer writes it.
    assert_eq!(entries(out.path()), ["pod"]);
    let dir = out.path().join("pod");
    assert_eq!(mode(&dir), 0o700);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        (m["kind"].as_str(), m["version"].as_u64()),
        (Some("ckpt-shim.pod-checkpoint"), Some(1))
    );
    assert_eq!(m["sandbox"]["id"], pod.as_str());
    assert_eq!(m["sandbox"]["name"], "src");
    assert_eq!(m["sandbox"]["hostname"], "src");
    assert_eq!(m["sandbox"]["namespaceOptions"]["network"], "POD");
    let names: Vec<&str> = m["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    for (entry, id) in m["containers"].as_array().unwrap().iter().zip([&a, &b]) {
        assert_eq!(entry["id"], id.as_str());
        assert!(entry["image"].as_str().unwrap().contains("ckpt-counter"));
        let archive = dir.join(entry["archive"].as_str().unwrap());
        assert_eq!(mode(&archive), 0o600);
        let summary = ckpt_shim::inspect::inspect(&archive).unwrap();
        assert!(summary.has_checkpoint_dir && summary.pages_bytes > 0);
        assert_eq!(summary.config.unwrap().id, *id);
    }
    let mut files = entries(&dir);
    files.sort();
    let mut want = vec![
        format!("{a}.tar"),
        format!("{b}.tar"),
        "manifest.json".into(),
    ];
    want.sort();
    assert_eq!(files, want);
    assert_eq!(mode(&dir.join("manifest.json")), 0o600);

    // Restored into a new pod: CREATED, nothing run yet.
    let sb = new_sandbox(&env, "dst");
    let configs = vec![counter_config("a", false), counter_config("b", false)];
    let r = restore_pod(&env, out.path(), &sb, configs, "")
        .await
        .unwrap();
    env.pods.push(r.pod_sandbox_id.clone());
    assert_ne!(r.pod_sandbox_id, pod);
    let restored: Vec<(&str, &str)> = r
        .restored_containers
        .iter()
        .map(|x| (x.name.as_str(), x.container_id.as_str()))
        .collect();
    assert_eq!(restored.iter().map(|x| x.0).collect::<Vec<_>>(), ["a", "b"]);
    for (_, id) in &restored {
        assert_eq!(
            env.state(&mut c, id).await,
            cri::ContainerState::ContainerCreated
        );
    }
    let listed = c
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    let new = listed
        .iter()
        .find(|p| p.id == r.pod_sandbox_id)
        .expect("the restored pod is listed");
    assert_eq!(new.metadata.as_ref().unwrap().name, "dst");
    assert_eq!(new.labels.get("restored").map(String::as_str), Some("yes"));

    // Started: each goes on from its checkpointed count, in the new pod.
    for (i, (name, id)) in restored.iter().enumerate() {
        c.start_container(cri::StartContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .unwrap();
        let log = Path::new(&sb.log_directory).join(format!("{name}.log"));
        let first = first_logged_count(&log);
        assert!(
            first > before[i] && first <= after[i] + 1,
            "{name}: restored at {first}, checkpoint saw {}..{}",
            before[i],
            after[i]
        );
        common::wait_count(&env.rootfs(id), |v| v > first + 2);
        assert_eq!(common::cri::exec(&mut c, id, "hostname").await, "dst");
    }
    // The checkpoint is as it was written.
    assert_eq!(entries(&dir).len(), 3);
    assert_pod_runs(&env, &mut c, &[a, b]).await;
}

/// A checkpoint directory's files and their bytes, to see it unchanged.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap_or_default();
            (p, data)
        })
        .collect();
    v.sort();
    v
}
