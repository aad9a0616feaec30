//! Real applications in pods (hack/build-app-images.sh: redis, PostgreSQL,
//! nginx, a JVM service, a Python asyncio service), with the clients Debian
//! ships (redis-cli, psql, curl) or a small line client
//! (tests/fixtures/apps/lineclient.py) run on the host in the pod's network
//! namespace, which holds nothing but loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use super::cri::{Client, Env};

/// The images, built (or found up to date) once per test binary.
pub fn images() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(
            std::env::var("CKPT_SHIM_IMAGES")
                .unwrap_or_else(|_| "/var/cache/ckpt-shim/images".into()),
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/build-app-images.sh");
        super::run_ok(Command::new("bash").arg(script).arg(&dir));
        dir
    })
    .clone()
}

/// `docker.io/library/ckpt-APP:latest` into the environment's containerd.
pub fn import(env: &Env, app: &str) {
    super::run_ok(
        Command::new("ctr")
            .arg("--address")
            .arg(&env.containerd_sock)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(images().join(format!("{app}-oci.tar"))),
    );
}

pub fn image(app: &str) -> String {
    format!("docker.io/library/ckpt-{app}:latest")
}

/// Container `name` running the image's own command (its args, when given,
/// replace the image's), as kubelet would ask for it: the pod's network and
/// IPC, a PID namespace of its own, root as the image says.
pub fn config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    let mut cfg = super::cri::counter_config(name, false);
    cfg.image = Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    });
    cfg.command = command.iter().map(|s| s.to_string()).collect();
    cfg.args = Vec::new();
    cfg
}

/// The network namespace the container runs in (its pod's), from its spec.
pub fn netns(env: &Env, id: &str) -> String {
    env.spec(id)["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .expect("the container joins its pod's network namespace")
        .to_string()
}

/// `sh -c SCRIPT` on the host, in network namespace `net`.
pub fn in_net(net: &str, script: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={net}"))
        .args(["sh", "-c", script])
        .stdin(Stdio::null());
    cmd
}

/// Runs `script` in `net`: its stdout, trimmed; fails the test if it fails.
pub fn sh_in(net: &str, script: &str) -> String {
    super::run_ok(&mut in_net(net, script)).trim().to_string()
}

/// Runs `script` in `net` with `SQL` (or any other) in its environment: its
/// stdout, trimmed; fails the test, with stderr, if it fails.
pub fn sh_in_env(net: &str, script: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = in_net(net, script);
    cmd.envs(env.iter().copied());
    super::run_ok(&mut cmd).trim().to_string()
}

/// Runs `script` in `net`: its stdout, trimmed, if it succeeds.
pub fn try_in(net: &str, script: &str) -> Option<String> {
    let out = in_net(net, script).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Polls `f` every 50 ms until it gives a value (60 s at most; `what` says
/// what was awaited when it never comes).
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "waited for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client running in the background in a pod's network namespace, its
/// output in a file; killed (its whole process group) on drop.
pub struct Background {
    child: Child,
    pub log: PathBuf,
}

impl Background {
    pub fn start(net: &str, script: &str, log: &Path) -> Background {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log).unwrap();
        let child = in_net(net, script)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap();
        Background {
            child,
            log: log.to_path_buf(),
        }
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running (it ends only when its connection breaks).
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn stop(&mut self) {
        let pg = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The line client for hack/apps' services (host python3).
pub fn lineclient() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/apps/lineclient.py")
        .to_string_lossy()
        .into_owned()
}

/// Runs `app`'s image as container `name` in a new pod `pod_name`; returns
/// the pod, the container and its network namespace.
pub async fn run(
    env: &mut Env,
    c: &mut Client,
    pod_name: &str,
    cfg: cri::ContainerConfig,
) -> ((String, cri::PodSandboxConfig), String, String) {
    let pod = env.run_pod(c, pod_name, false).await;
    let id = super::cri::create(c, &pod, cfg).await;
    super::cri::start_container(c, &id).await;
    let net = netns(env, &id);
    (pod, id, net)
}

/// CheckpointContainer of `id` into `archive` through the shim; prints the
/// shim's line for it (its pause and phases).
pub async fn checkpoint(env: &Env, c: &mut Client, id: &str, archive: &Path) {
    c.checkpoint_container(cri::CheckpointContainerRequest {
        container_id: id.into(),
        location: archive.to_string_lossy().into_owned(),
        timeout: 120,
    })
    .await
    .unwrap_or_else(|e| panic!("CheckpointContainer of {id}: {e:?}"));
    let log = env.shim_log();
    if let Some(line) = log
        .lines()
        .rev()
        .find(|l| l.contains("checkpointed") && l.contains(id))
    {
        eprintln!("{line}");
    }
}

/// Stops and removes a pod (the original, once its checkpoint is taken, as
/// when a pod moves).
pub async fn remove_pod(env: &mut Env, c: &mut Client, pod: &str) {
    if let Err(e) = c
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
    {
        let log = std::fs::read_to_string(env.dir.join("containerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "StopPodSandbox: {e:?}; containerd's log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap();
    env.pods.retain(|p| p != pod);
}

/// Restores `archive` through CRI into a new pod `pod_name`: CreateContainer
/// with the archive's path as the image and `cfg` otherwise (the user and
/// capabilities of the checkpointed container), then StartContainer. Returns
/// the container and its network namespace.
pub async fn restore(
    env: &mut Env,
    c: &mut Client,
    pod_name: &str,
    mut cfg: cri::ContainerConfig,
    archive: &Path,
) -> (String, String) {
    let pod = env.run_pod(c, pod_name, false).await;
    cfg.image = Some(cri::ImageSpec {
        image: archive.to_string_lossy().into_owned(),
        ..Default::default()
    });
    let id = c
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.0.clone(),
            config: Some(cfg),
            sandbox_config: Some(pod.1.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer of {}: {e:?}", archive.display()))
        .into_inner()
        .container_id;
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "StartContainer of the restore of {}: {e:?}",
            archive.display()
        )
    });
    let status = super::restore::status(c, &id).await;
    let info = super::restore::restore_info(&status);
    assert_eq!(info["restored"], serde_json::Value::Bool(true), "{info}");
    let net = netns(env, &id);
    (id, net)
}

/// What [`move_under_load`] saw: the progress read just before and just after
/// the checkpoint, the original's client's output when it was stopped, and
/// the restored container with its network namespace.
pub struct Moved<T> {
    pub before: T,
    pub after: T,
    pub output: String,
    pub id: String,
    pub net: String,
}

/// A pod moved while a client works in it: `progress` (given the client)
/// read before and after CheckpointContainer of `id` into `NAME.tar` (NAME
/// the container's, in `cfg`); the original and its client go on, until
/// `went_on(after, now)`, and the client is still running; then the client
/// is stopped, the original pod removed, and the archive restored through
/// CRI with `cfg` into a new pod `NAME-restored`.
pub async fn move_under_load<T>(
    env: &mut Env,
    c: &mut Client,
    (pod, id): (&str, &str),
    cfg: cri::ContainerConfig,
    mut client: Background,
    progress: impl Fn(&Background) -> T,
    went_on: impl Fn(&T, &T) -> bool,
) -> Moved<T> {
    let app = cfg
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let out = super::out_dir();
    let archive = out.path().join(format!("{app}.tar"));
    let before = progress(&client);
    checkpoint(env, c, id, &archive).await;
    let after = progress(&client);
    wait_for("the client to go on", || {
        went_on(&after, &progress(&client)).then_some(())
    });
    assert!(client.running(), "{}", client.output());
    let output = client.output();
    client.stop();
    remove_pod(env, c, pod).await;
    let restored = format!("{app}-restored");
    let (id, net) = restore(env, c, &restored, cfg, &archive).await;
    Moved {
        before,
        after,
        output,
        id,
        net,
    }
}
