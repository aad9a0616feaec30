//! Pod checkpoints (KEP-5823) through the shim's socket, in front of a real
//! containerd whose runc is ckpt-runc: CheckpointPod takes one cut of several
//! containers, RestorePod brings them back into a new pod, created and not
//! started, and StartContainer restores each.

mod common;

use cri_client::pods as cri_pods;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cri::{counter_config, create, probe_config, start_container, Client, Env};
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
    let port = common::scrape::free_port();
    let mut env = Env::start_configured(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"));
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
        start_container(&mut c, id).await;
        let log = Path::new(&sb.log_directory).join(format!("{name}.log"));
        let first = first_logged_count(&log);
        assert!(
            common::restore::continues(first, (before[i], after[i])),
            "{name}: restored at {first}, checkpoint saw {}..{}",
            before[i],
            after[i]
        );
        common::wait_count(&env.rootfs(id), |v| v > first + 2);
        assert_eq!(common::cri::exec(&mut c, id, "hostname").await, "dst");
    }
    // The checkpoint is as it was written.
    assert_eq!(entries(&dir).len(), 3);
    // Counted, and the pause and size of the cut observed once.
    let (_, metrics) = common::scrape::get(port, "/metrics");
    let value = |s: &str| common::scrape::value(&metrics, s);
    for series in [
        "ckpt_shim_pod_checkpoints_total{code=\"OK\"}",
        "ckpt_shim_pod_restores_total{code=\"OK\"}",
        "ckpt_shim_pod_checkpoint_pause_seconds_count",
        "ckpt_shim_pod_checkpoint_containers_count",
    ] {
        assert_eq!(value(series), 1.0, "{series}: {metrics}");
    }
    assert_eq!(value("ckpt_shim_pod_checkpoint_containers_sum"), 2.0);
    assert!(value("ckpt_shim_pod_checkpoint_pause_seconds_sum") > 0.0);
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

/// A container running the ticker from `probe` (bind-mounted), logging its
/// gaps to `probe/<name>.gaps`.
async fn ticking(
    c: &mut Client,
    pod: &(String, cri::PodSandboxConfig),
    name: &str,
    probe: &Path,
) -> String {
    let gaps = format!("/probe/{name}.gaps");
    let cfg = probe_config(name, (probe, "ticker"), &[&gaps], false);
    let id = create(c, pod, cfg).await;
    start_container(c, &id).await;
    id
}

fn monotonic_ns() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) },
        0
    );
    t.tv_sec * 1_000_000_000 + t.tv_nsec
}

/// The longest gap `probe/<name>.gaps` shows within `[from, to]`.
fn longest_gap(probe: &Path, name: &str, (from, to): (i64, i64)) -> (i64, i64) {
    let text = std::fs::read_to_string(probe.join(format!("{name}.gaps"))).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (s, e) = l.split_once(' ')?;
            Some((s.parse().ok()?, e.parse().ok()?))
        })
        .filter(|&(s, e): &(i64, i64)| s >= from && e <= to)
        .max_by_key(|(s, e)| e - s)
        .unwrap_or_else(|| panic!("{name} saw no gap within the checkpoint: {text}"))
}

/// Two gaps share an instant.
fn overlap(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0.max(b.0) < a.1.min(b.1)
}

/// The cut is consistent: each container's probe saw a gap (its pause), and
/// one instant lies inside both. The same probes show no such instant when
/// the containers are checkpointed one after the other, so the check can tell.
#[tokio::test(flavor = "multi_thread")]
async fn the_cut_is_consistent_one_instant_lies_inside_every_pause() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = tempfile::tempdir().unwrap();
    common::fixture(probe.path(), "ticker");
    let pod = env.run_pod(&mut c, "cut", false).await;
    let a = ticking(&mut c, &pod, "a", probe.path()).await;
    let b = ticking(&mut c, &pod, "b", probe.path()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let out = out_dir();
    let from = monotonic_ns();
    checkpoint_pod(&env, &pod.0, out.path(), &[&a, &b], &[])
        .await
        .unwrap();
    let to = monotonic_ns();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (ga, gb) = (
        longest_gap(probe.path(), "a", (from, to)),
        longest_gap(probe.path(), "b", (from, to)),
    );
    let ms = |g: (i64, i64)| (g.1 - g.0) as f64 / 1e6;
    eprintln!("pod cut: a paused {:.1} ms, b {:.1} ms", ms(ga), ms(gb));
    assert!(
        overlap(ga, gb),
        "pod cut: the pauses {ga:?} and {gb:?} do not overlap"
    );

    let seq = out_dir();
    let from = monotonic_ns();
    for id in [&a, &b] {
        c.checkpoint_container(cri::CheckpointContainerRequest {
            container_id: id.clone(),
            location: seq
                .path()
                .join(format!("{id}.tar"))
                .to_string_lossy()
                .into_owned(),
            timeout: 60,
        })
        .await
        .unwrap();
    }
    let to = monotonic_ns();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (sa, sb) = (
        longest_gap(probe.path(), "a", (from, to)),
        longest_gap(probe.path(), "b", (from, to)),
    );
    assert!(
        !overlap(sa, sb),
        "one after the other, the pauses {sa:?} and {sb:?} overlap: the probe cannot tell"
    );
    for id in [&a, &b] {
        assert_eq!(
            env.state(&mut c, id).await,
            cri::ContainerState::ContainerRunning
        );
        assert_eq!(env.freezer(id), "THAWED");
    }
}

/// What a bad CheckpointPod case sends, and the code it gets: (what, pod,
/// output dir, containers, options, code).
type BadCheckpoint<'a> = (
    &'a str,
    String,
    PathBuf,
    Vec<&'a str>,
    Vec<(&'a str, &'a str)>,
    Code,
);

/// Every bad CheckpointPod is refused with its code before anything is
/// frozen or written: the output dir stays as it was, the pod runs on.
#[tokio::test(flavor = "multi_thread")]
async fn bad_checkpoint_requests_are_refused_and_leave_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let (pod, [a, b]) = two_counters(&mut env, &mut c, "src").await;
    let other = env.run_pod(&mut c, "other", false).await;
    let x = env.counter(&mut c, &other, "x", 8, true).await;
    let src = (pod.clone(), env.sandbox_config("src", false));
    let s = env.counter(&mut c, &src, "s", 8, true).await;
    c.stop_container(cri::StopContainerRequest {
        container_id: s.clone(),
        timeout: 5,
    })
    .await
    .unwrap();
    let out = out_dir();
    let full = out_dir();
    std::fs::write(full.path().join("keep"), b"x").unwrap();
    let missing = out.path().join("missing");
    let o = out.path().to_path_buf();
    let cases: Vec<BadCheckpoint> = vec![
        (
            "unknown pod",
            "no-such-pod".into(),
            o.clone(),
            vec![&a],
            vec![],
            Code::NotFound,
        ),
        (
            "unknown container",
            pod.clone(),
            o.clone(),
            vec![&a, "ffffffffff"],
            vec![],
            Code::NotFound,
        ),
        (
            "another pod's container",
            pod.clone(),
            o.clone(),
            vec![&a, &x],
            vec![],
            Code::InvalidArgument,
        ),
        (
            "a stopped container",
            pod.clone(),
            o.clone(),
            vec![&a, &s],
            vec![],
            Code::InvalidArgument,
        ),
        (
            "a duplicate",
            pod.clone(),
            o.clone(),
            vec![&a, &b, &a[..10]],
            vec![],
            Code::InvalidArgument,
        ),
        (
            "no containers",
            pod.clone(),
            o.clone(),
            vec![],
            vec![],
            Code::InvalidArgument,
        ),
        (
            "a non-empty dir",
            pod.clone(),
            full.path().into(),
            vec![&a, &b],
            vec![],
            Code::InvalidArgument,
        ),
        (
            "a missing dir",
            pod.clone(),
            missing.clone(),
            vec![&a, &b],
            vec![],
            Code::InvalidArgument,
        ),
        (
            "a relative dir",
            pod.clone(),
            "relative/dir".into(),
            vec![&a, &b],
            vec![],
            Code::InvalidArgument,
        ),
        (
            "an unknown option",
            pod.clone(),
            o.clone(),
            vec![&a, &b],
            vec![("leave-frozen", "true")],
            Code::InvalidArgument,
        ),
        (
            "a bad option value",
            pod.clone(),
            o.clone(),
            vec![&a, &b],
            vec![("tcp-established", "maybe")],
            Code::InvalidArgument,
        ),
    ];
    for (what, pod_id, dir, ids, options, code) in cases {
        let err = checkpoint_pod(&env, &pod_id, &dir, &ids, &options)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            entries(out.path()).is_empty(),
            "{what}: left {:?}",
            entries(out.path())
        );
        assert_eq!(entries(full.path()), ["keep"], "{what}");
        assert!(
            !missing.exists() && !Path::new("relative").exists(),
            "{what}"
        );
        assert_pod_runs(&env, &mut c, &[a.clone(), b.clone()]).await;
    }
    env.assert_running(&mut c, &x).await;
}

/// What the runtime has: pods and containers, to see nothing was left.
async fn census(env: &Env, c: &mut Client) -> (usize, usize, usize) {
    let pods = c
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items
        .len();
    let containers = c
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers
        .len();
    (pods, containers, env.restores().len())
}

/// Every bad RestorePod is refused with its code before anything is created,
/// and the checkpoint is left as it was.
#[tokio::test(flavor = "multi_thread")]
async fn bad_restore_requests_are_refused_and_leave_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let data = tempfile::tempdir().unwrap();
    let pod = env.run_pod(&mut c, "src", false).await;
    let a = env.counter(&mut c, &pod, "a", 8, true).await;
    // `m` has a bind mount, which a restore must declare.
    let mut m_cfg = counter_config("m", false);
    m_cfg.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: data.path().to_string_lossy().into_owned(),
        ..Default::default()
    }];
    let m = create(&mut c, &pod, m_cfg.clone()).await;
    start_container(&mut c, &m).await;
    common::wait_count(&env.rootfs(&m), |v| v >= 2);
    let out = out_dir();
    checkpoint_pod(&env, &pod.0, out.path(), &[&a, &m], &[])
        .await
        .unwrap();
    let dir = out.path().join("pod");
    // A copy with one archive cut short.
    let cut = out_dir();
    for (p, bytes) in snapshot(&dir) {
        let keep = if p.file_name().unwrap() == format!("{a}.tar").as_str() {
            bytes.len() / 2
        } else {
            bytes.len()
        };
        std::fs::write(cut.path().join(p.file_name().unwrap()), &bytes[..keep]).unwrap();
    }
    let before = snapshot(&dir);
    let census0 = census(&env, &mut c).await;

    let cfg = |name: &str| counter_config(name, false);
    let with = |f: &dyn Fn(&mut cri::ContainerConfig)| {
        let mut x = cfg("a");
        f(&mut x);
        x
    };
    let good = || vec![cfg("a"), m_cfg.clone()];
    let undeclared = {
        let mut x = m_cfg.clone();
        x.mounts.clear();
        x
    };
    let image = with(&|x| {
        x.image = Some(cri::ImageSpec {
            image: "docker.io/library/pause:local".into(),
            ..Default::default()
        })
    });
    let command = with(&|x| x.command = vec!["/bin/sh".into()]);
    let o = out.path().to_path_buf();
    let cases: Vec<(&str, PathBuf, Vec<cri::ContainerConfig>, &str, &str)> = vec![
        (
            "a missing config",
            o.clone(),
            vec![cfg("a")],
            "",
            "missing [\"m\"]",
        ),
        (
            "an extra config",
            o.clone(),
            [good(), vec![cfg("z")]].concat(),
            "",
            "\"z\"",
        ),
        (
            "a renamed config",
            o.clone(),
            vec![cfg("a"), cfg("m2")],
            "",
            "m2",
        ),
        ("no configs", o.clone(), vec![], "", "empty"),
        (
            "another image",
            o.clone(),
            vec![image, m_cfg.clone()],
            "",
            "image",
        ),
        (
            "another command",
            o.clone(),
            vec![command, m_cfg.clone()],
            "",
            "command",
        ),
        (
            "an undeclared bind mount",
            o.clone(),
            vec![cfg("a"), undeclared],
            "",
            "/data",
        ),
        (
            "a truncated archive",
            cut.path().into(),
            good(),
            "",
            "not a checkpoint archive",
        ),
        (
            "an unknown runtime handler",
            o.clone(),
            good(),
            "no-such-handler",
            "no-such-handler",
        ),
        ("a relative path", "relative".into(), good(), "", "absolute"),
    ];
    for (what, path, configs, handler, says) in cases {
        let sb = new_sandbox(&env, "dst");
        let err = restore_pod(&env, &path, &sb, configs, handler)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(says), "{what}: {}", err.message());
        assert_eq!(
            census(&env, &mut c).await,
            census0,
            "{what}: left something"
        );
        assert_eq!(snapshot(&dir), before, "{what}: the checkpoint changed");
    }
    // An option RestorePod does not know.
    let req = RestorePodRequest {
        checkpoint_path: o.to_string_lossy().into_owned(),
        config: Some(new_sandbox(&env, "dst")),
        runtime_handler: String::new(),
        options: [("fast".to_string(), "yes".to_string())].into(),
        container_configs: good(),
    };
    let err = cri_pods::restore_pod(env.channel().await, req, MINUTE)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(census(&env, &mut c).await, census0);
    assert_pod_runs(&env, &mut c, &[a, m]).await;
}

/// The deadline passes while CRIU dumps: DEADLINE_EXCEEDED, every container
/// thawed, and the output dir empty again.
#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_in_the_middle_of_the_dumps_thaws_all_and_leaves_nothing() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let pod = env.run_pod(&mut c, "slow", false).await;
    // Big enough that the dumps outlast the deadline's remainder.
    let a = env.counter(&mut c, &pod, "a", 1024, true).await;
    let b = env.counter(&mut c, &pod, "b", 1024, true).await;
    let pids = [
        common::cri::container_pid(&mut c, &a).await,
        common::cri::container_pid(&mut c, &b).await,
    ];
    let out = out_dir();
    let msg = prost::Message::encode_to_vec(&CheckpointPodRequest {
        pod_sandbox_id: pod.0.clone(),
        output_path: out.path().to_string_lossy().into_owned(),
        container_ids: vec![a.clone(), b.clone()],
        options: HashMap::new(),
    });
    // CRIU seizing both (ptrace) while the call runs: the deadline came in
    // the middle of the dumps, not before them.
    let calling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch = {
        let calling = calling.clone();
        std::thread::spawn(move || {
            let mut seized = [false; 2];
            while calling.load(std::sync::atomic::Ordering::SeqCst) {
                for (s, pid) in seized.iter_mut().zip(pids) {
                    *s |= common::cri::tracer(pid) != 0;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            seized
        })
    };
    let r = env.call_with_deadline("CheckpointPod", "500m", &msg).await;
    calling.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        watch.join().unwrap(),
        [true, true],
        "CRIU never seized both"
    );
    assert!(
        r.message().contains("dump"),
        "not during the dumps: {}",
        r.message()
    );
    env.wait_thawed_and_empty(out.path(), &[&a, &b]).await;
    assert_pod_runs(&env, &mut c, &[a, b]).await;
}

/// A CRIU that fails the second dump it is asked for (the first goes through
/// to the real one): the first container's archive goes, both are thawed.
/// (The shim runs `criu --no-default-config dump|swrk …`: the action is `$2`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_second_dump_removes_the_first_archive_and_thaws_both() {
    let stubs = tempfile::tempdir().unwrap();
    let count = stubs.path().join("dumps");
    let stub = stubs.path().join("criu");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\nif [ \"$2\" = dump ] || [ \"$2\" = swrk ]; then\n  n=$(( $(cat {c} 2>/dev/null || echo 0) + 1 ))\n  echo $n > {c}\n  if [ $n -ge 2 ]; then echo 'stub: the second dump fails' >&2; exit 1; fi\nfi\nexec /usr/local/sbin/criu \"$@\"\n",
            c = count.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut env = Env::start_configured(&format!("criu = \"{}\"\n", stub.display()));
    let mut c = env.client().await;
    let (pod, [a, b]) = two_counters(&mut env, &mut c, "src").await;
    let out = out_dir();
    // One dump at a time: the first is whole before the second starts.
    let err = checkpoint_pod(
        &env,
        &pod,
        out.path(),
        &[&a, &b],
        &[("parallel-dumps", "1")],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "2");
    assert!(
        entries(out.path()).is_empty(),
        "left {:?}",
        entries(out.path())
    );
    assert_pod_runs(&env, &mut c, &[a, b]).await;
}

/// With `encrypt-to`, every archive is sealed and the manifest holds no
/// secret; a node without the identity refuses the restore and keeps
/// nothing, and with it restores the pod.
#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_pod_checkpoint_needs_the_identity_to_restore() {
    let keys = out_dir();
    let id = age::x25519::Identity::generate();
    let key_file = keys.path().join("node.key");
    {
        use age::secrecy::ExposeSecret;
        std::fs::write(&key_file, format!("{}\n", id.to_string().expose_secret())).unwrap();
    }
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let recipient = id.to_public().to_string();
    let mut env = Env::start();
    let mut c = env.client().await;
    let (pod, [a, b]) = two_counters(&mut env, &mut c, "src").await;
    let out = out_dir();
    checkpoint_pod(
        &env,
        &pod,
        out.path(),
        &[&a, &b],
        &[("encrypt-to", &recipient)],
    )
    .await
    .unwrap();
    let dir = out.path().join("pod");
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"sealed\": true"), "{manifest}");
    for id in [&a, &b] {
        let ck = ckpt_shim::restore::Checkpoint::open(&dir.join(format!("{id}.tar"))).unwrap();
        assert!(ck.sealed.is_some(), "{id} is not sealed");
    }
    let configs = || vec![counter_config("a", false), counter_config("b", false)];
    let census0 = census(&env, &mut c).await;
    let err = restore_pod(
        &env,
        out.path(),
        &new_sandbox(&env, "no-key"),
        configs(),
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("encrypted"), "{}", err.message());
    assert_eq!(census(&env, &mut c).await, census0);

    env.kill_shim();
    std::fs::write(
        &env.config,
        format!("identities = [\"{}\"]\n", key_file.display()),
    )
    .unwrap();
    env.spawn_shim();
    let mut c = env.client().await;
    let sb = new_sandbox(&env, "with-key");
    let r = restore_pod(&env, out.path(), &sb, configs(), "")
        .await
        .unwrap();
    env.pods.push(r.pod_sandbox_id.clone());
    for x in &r.restored_containers {
        start_container(&mut c, &x.container_id).await;
        let log = Path::new(&sb.log_directory).join(format!("{}.log", x.name));
        let first = first_logged_count(&log);
        common::wait_count(&env.rootfs(&x.container_id), |v| v > first + 2);
    }
}

/// The numbers "pair N port P" lines of a client's log give: (first N, its P).
fn first_pair(log: &Path) -> (u64, String) {
    let t = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains("broken"), "the connection broke: {text}");
        if let Some((n, port)) = text.lines().find_map(|l| {
            let rest = l.split_once("pair ")?.1;
            let (n, port) = rest.split_once(" port ")?;
            Some((n.parse().ok()?, port.trim().to_string()))
        }) {
            return (n, port);
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "nothing in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client with an established TCP connection over the pod's loopback to a
/// server in another container of the pod: checkpointed with
/// `tcp-established`, restored into a new pod, server then client started,
/// the same connection carries on (same port, the next number, no reconnect).
///
/// CRIU 4.1.1 could not dump any AF_INET socket on Linux 6.16 and later (it
/// failed on `getsockopt(SO_PASSCRED)`, checkpoint-restore/criu#2705); 4.2.1
/// asks that only of the families that have it, so the round trip must work.
/// Restored alone, the server's end would be reset by the window probe CRIU's
/// repair-off sends (no client socket yet): the restore holds it meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_loopback_tcp_pair_comes_back_connected_and_carries_the_next_bytes() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let probe = tempfile::tempdir().unwrap();
    common::fixture(probe.path(), "tcppair");
    let server_cfg = probe_config(
        "server",
        (probe.path(), "tcppair"),
        &["server", "7000"],
        false,
    );
    let client_cfg = probe_config(
        "client",
        (probe.path(), "tcppair"),
        &["client", "7000", "/tmp/count"],
        false,
    );
    let pod = env.run_pod(&mut c, "pair", false).await;
    let mut ids = Vec::new();
    for cfg in [&server_cfg, &client_cfg] {
        let id = create(&mut c, &pod, cfg.clone()).await;
        start_container(&mut c, &id).await;
        ids.push(id);
    }
    let (_, port) = first_pair(&Path::new(&pod.1.log_directory).join("client.log"));
    common::wait_count(&env.rootfs(&ids[1]), |v| v >= 3);
    let out = out_dir();
    let before = env.count(&ids[1]).unwrap();
    let ids_ref: Vec<&str> = ids.iter().map(String::as_str).collect();
    checkpoint_pod(
        &env,
        &pod.0,
        out.path(),
        &ids_ref,
        &[("tcp-established", "true")],
    )
    .await
    .unwrap();
    let after = env.count(&ids[1]).unwrap();

    let sb = new_sandbox(&env, "pair2");
    let r = restore_pod(&env, out.path(), &sb, vec![server_cfg, client_cfg], "")
        .await
        .unwrap();
    env.pods.push(r.pod_sandbox_id.clone());
    let (server, client) = (&r.restored_containers[0], &r.restored_containers[1]);
    assert_eq!(
        (server.name.as_str(), client.name.as_str()),
        ("server", "client")
    );
    // The server first. Its end is held (src/restore/tcp_hold.rs) until the
    // client's is back: the pod's namespace drops the connection's packets,
    // or the server's first one would meet no socket and reset it.
    start_container(&mut c, &server.container_id).await;
    let pid = common::cri::container_pid(&mut c, &server.container_id).await;
    let rules = || common::sh(&format!("nsenter --net=/proc/{pid}/ns/net iptables -w -S"));
    let held = rules();
    assert_eq!(
        held.lines()
            .filter(|l| l.contains("--sport 7000") || l.contains("--dport 7000"))
            .count(),
        2,
        "the server's end is not held: {held}"
    );
    start_container(&mut c, &client.container_id).await;
    let released = rules();
    assert!(
        !released.contains("DROP"),
        "both ends are back, still held: {released}"
    );
    let log = Path::new(&sb.log_directory).join("client.log");
    let (first, same_port) = first_pair(&log);
    assert!(
        first > before && first <= after + 1,
        "the client went on at {first}, the checkpoint saw {before}..{after}"
    );
    assert_eq!(same_port, port, "not the same socket");
    common::wait_count(&env.rootfs(&client.container_id), |v| v > first + 5);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("connected") && !text.contains("broken"),
        "the client reconnected or broke: {text}"
    );
    // The restored server echoed those numbers on the connection it had,
    // without accepting a new one.
    let server = std::fs::read_to_string(Path::new(&sb.log_directory).join("server.log")).unwrap();
    assert!(
        server.contains(&format!("echo {first}\n")) && !server.contains("accepted"),
        "the restored server: {server}"
    );
}

/// The runtime refuses the second container after the pod and the first
/// container exist: RestorePod answers with the runtime's refusal and removes
/// the pod, the first container and its restore.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_refused_half_way_removes_all_it_created() {
    let mut env = Env::start();
    let mut c = env.client().await;
    let (pod, [a, b]) = two_counters(&mut env, &mut c, "src").await;
    let out = out_dir();
    checkpoint_pod(&env, &pod, out.path(), &[&a, &b], &[])
        .await
        .unwrap();
    let census0 = census(&env, &mut c).await;
    // A user the image does not have: only the runtime, creating `b`, knows.
    let mut b_cfg = counter_config("b", false);
    let sc = b_cfg
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap();
    sc.run_as_username = "no-such-user".into();
    let sb = new_sandbox(&env, "dst");
    let err = restore_pod(
        &env,
        out.path(),
        &sb,
        vec![counter_config("a", false), b_cfg],
        "",
    )
    .await
    .unwrap_err();
    // containerd's own answer, passed back.
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(err.message().contains("no users found"), "{err:?}");
    assert_eq!(census(&env, &mut c).await, census0, "left something");
    assert!(env.restores().is_empty(), "{:?}", env.restores());
    assert_pod_runs(&env, &mut c, &[a, b]).await;
}
