//! The real crictl (cri-tools 1.34, grpc-go, from ../shared/bin) through the
//! shim, as a node operator uses it: `info`, `runp`, `create` and `start` of
//! the counter, `checkpoint --export`, then `create` with the archive as the
//! image and with a checkpoint image made of it, in new pods, where the count
//! goes on; `inspect` shows the restore where CRI-O shows it, beside
//! containerd's own fields.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::cri::Env;
use common::restore::assert_continues;

/// crictl on the shim's socket, with an empty config (no node's crictl.yaml
/// counts) and a deadline long enough for a checkpoint.
struct Crictl {
    sock: PathBuf,
    config: PathBuf,
}

impl Crictl {
    fn new(env: &Env) -> Crictl {
        let config = env.dir.join("crictl.yaml");
        std::fs::write(&config, "").unwrap();
        Crictl {
            sock: env.shim_sock.clone(),
            config,
        }
    }

    /// Runs `crictl ARGS`; its trimmed stdout. Fails the test, with stderr,
    /// if it does not succeed.
    fn run(&self, args: &[&str]) -> String {
        common::run_ok(
            Command::new(common::shared_bin("crictl"))
                .arg("--config")
                .arg(&self.config)
                .arg(format!("--runtime-endpoint=unix://{}", self.sock.display()))
                .arg("--timeout=60s")
                .args(args),
        )
        .trim()
        .to_string()
    }

    /// `crictl inspect -o go-template --template TEMPLATE ID`.
    fn template(&self, id: &str, template: &str) -> String {
        self.run(&["inspect", "-o", "go-template", "--template", template, id])
    }
}

/// Configs as crictl reads them (the CRI messages in JSON, snake_case), for
/// the counter in pod `name`, with `image` as its image. Namespace modes:
/// POD = 0, CONTAINER = 1.
fn configs(env: &Env, name: &str, image: &str) -> (PathBuf, PathBuf, PathBuf) {
    let logs = env.dir.join("logs").join(name);
    std::fs::create_dir_all(&logs).unwrap();
    let ns = serde_json::json!({"network": 0, "pid": 1, "ipc": 0});
    let pod = serde_json::json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "namespace": "default"},
        "hostname": name,
        "log_directory": logs,
        "linux": {
            "cgroup_parent": format!("{}/{name}", env.cgroup_parent),
            "security_context": {"namespace_options": ns},
        },
    });
    let ctr = serde_json::json!({
        "metadata": {"name": "counter"},
        "image": {"image": image},
        "command": ["/bin/counter"],
        "args": ["/tmp/count", "8", "50"],
        "log_path": "counter.log",
        "linux": {"security_context": {"namespace_options": ns}},
    });
    let (pod_json, ctr_json) = (
        env.dir.join(format!("{name}-pod.json")),
        env.dir.join(format!("{name}-ctr.json")),
    );
    std::fs::write(&pod_json, pod.to_string()).unwrap();
    std::fs::write(&ctr_json, ctr.to_string()).unwrap();
    (pod_json, ctr_json, logs.join("counter.log"))
}

/// `runp`, `create` and `start` of the counter with `image` in a new pod
/// `name`: (pod id, container id, its log).
fn run_counter(
    env: &mut Env,
    crictl: &Crictl,
    name: &str,
    image: &str,
) -> (String, String, PathBuf) {
    let (pod_json, ctr_json, log) = configs(env, name, image);
    let pod = crictl.run(&["runp", pod_json.to_str().unwrap()]);
    env.pods.push(pod.clone());
    let id = crictl.run(&[
        "create",
        &pod,
        ctr_json.to_str().unwrap(),
        pod_json.to_str().unwrap(),
    ]);
    crictl.run(&["start", &id]);
    (pod, id, log)
}

/// The runtime's conditions in `crictl info` as (type, status, reason), once
/// the shim's readiness checks have run (CheckpointReady's reason is
/// `Checking` until then).
fn conditions(crictl: &Crictl) -> Vec<(String, bool, String)> {
    let t = std::time::Instant::now();
    loop {
        let info: serde_json::Value = serde_json::from_str(&crictl.run(&["info"])).unwrap();
        let conds: Vec<(String, bool, String)> = info["status"]["conditions"]
            .as_array()
            .unwrap_or_else(|| panic!("no conditions in crictl info: {info}"))
            .iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("type"), c["status"] == true, s("reason"))
            })
            .collect();
        if !conds.iter().any(|c| c.2 == "Checking") {
            return conds;
        }
        assert!(t.elapsed().as_secs() < 60, "still checking: {conds:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A container restored from `image` in pod `name` continues the count the
/// checkpoint saw, and `crictl inspect` shows it restored from `image`,
/// with containerd's own fields still there.
fn assert_restored(env: &mut Env, crictl: &Crictl, name: &str, image: &str, counts: (u64, u64)) {
    let (pod, id, log) = run_counter(env, crictl, name, image);
    assert_continues(env, &id, &log, counts, image);
    let inspect: serde_json::Value = serde_json::from_str(&crictl.run(&["inspect", &id])).unwrap();
    assert_eq!(inspect["status"]["state"], "CONTAINER_RUNNING", "{inspect}");
    assert_eq!(crictl.template(&id, "{{.info.restored}}"), "true");
    assert_eq!(crictl.template(&id, "{{.info.restoredFrom}}"), image);
    let at = crictl.template(&id, "{{.info.checkpointedAt}}");
    let at = chrono::DateTime::parse_from_rfc3339(&at).unwrap_or_else(|e| panic!("{at}: {e}"));
    let age = chrono::Utc::now().signed_duration_since(at);
    assert!(
        age.num_seconds() >= 0 && age.num_minutes() < 30,
        "checkpointed at {at}"
    );
    assert_eq!(crictl.template(&id, "{{.info.sandboxID}}"), pod);
    let pid: i64 = crictl.template(&id, "{{.info.pid}}").parse().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "pid {pid}");
}

#[test]
fn crictl_checkpoints_and_restores_through_the_shim() {
    let mut env = Env::start();
    let crictl = Crictl::new(&env);
    let conds = conditions(&crictl);
    for want in ["RuntimeReady", "NetworkReady", "CheckpointReady"] {
        assert!(
            conds.iter().any(|c| c.0 == want && c.1),
            "{want} in {conds:?}"
        );
    }

    let (_, id, _) = run_counter(
        &mut env,
        &crictl,
        "orig",
        "docker.io/library/ckpt-counter:latest",
    );
    common::wait_count(&env.rootfs(&id), |v| v >= 3);
    // An ordinary container says nothing of restores.
    let inspect: serde_json::Value = serde_json::from_str(&crictl.run(&["inspect", &id])).unwrap();
    let info = inspect["info"].as_object().expect("containerd's info");
    assert!(
        info.contains_key("pid") && !info.contains_key("restored"),
        "{info:?}"
    );

    let out = common::out_dir();
    let archive = out.path().join("counter.tar");
    let before = env.count(&id).unwrap();
    crictl.run(&[
        "checkpoint",
        &format!("--export={}", archive.display()),
        &id,
    ]);
    let after = env.count(&id).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&archive).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // The original keeps running.
    common::wait_count(&env.rootfs(&id), |v| v > after + 2);

    let path = archive.to_str().unwrap();
    assert_restored(&mut env, &crictl, "from-archive", path, (before, after));

    let sock = env.containerd_sock.to_string_lossy().into_owned();
    let imported = common::run_ok(Command::new(env!("CARGO_BIN_EXE_ckpt-shim")).args([
        "image",
        path,
        "counter-ckpt:crictl",
        "--import",
        &sock,
    ]));
    let name = imported.split_whitespace().next().unwrap().to_string();
    assert_eq!(name, "localhost/counter-ckpt:crictl");
    assert_restored(&mut env, &crictl, "from-image", &name, (before, after));
}
