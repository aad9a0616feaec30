//! CRI harness: a private containerd (hack/containerd.sh), `ckpt-shim serve` in
//! front of it, and an independent CRI client (the k8s-cri crate) on the shim's
//! socket. Pods, containers, containerd and the shim are removed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use super::{sh, wait_count};

use cri_client::client as cri_common;

pub type Client = cri_common::Client;
pub type Images = cri::image_service_client::ImageServiceClient<tonic::transport::Channel>;

/// Runs `script` in the container with ExecSync; its stdout.
pub async fn exec(c: &mut Client, id: &str, script: &str) -> String {
    cri_common::exec(c, id, script).await.expect("ExecSync")
}

/// The counter workload's config (8 MiB, counting every 50 ms).
pub fn counter_config(name: &str, host_network: bool) -> cri::ContainerConfig {
    cri_common::counter(name, 8, 50, host_network)
}

/// Container `name` running `/probe/<bin> args…` in the counter's image, with
/// `probe` (a dir holding [`super::fixture`]'s binaries) mounted at /probe.
pub fn probe_config(
    name: &str,
    (probe, bin): (&Path, &str),
    args: &[&str],
    host_network: bool,
) -> cri::ContainerConfig {
    let mut cfg = counter_config(name, host_network);
    cfg.command = vec![format!("/probe/{bin}")];
    cfg.args = args.iter().map(|s| s.to_string()).collect();
    cfg.mounts = vec![cri::Mount {
        container_path: "/probe".into(),
        host_path: probe.to_string_lossy().into_owned(),
        ..Default::default()
    }];
    cfg
}

/// CheckpointContainer of `id` into `location`, with no timeout of its own.
pub async fn checkpoint(c: &mut Client, id: &str, location: &Path) -> Result<(), tonic::Status> {
    c.checkpoint_container(cri::CheckpointContainerRequest {
        container_id: id.into(),
        location: location.to_string_lossy().into_owned(),
        timeout: 0,
    })
    .await
    .map(drop)
}

pub async fn connect(sock: &Path) -> Client {
    cri_common::connect(sock)
        .await
        .expect("connect to CRI socket")
}

fn wait_socket(p: &Path, what: &str, log: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what} did not come up: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What containerd's runc runtime runs.
#[derive(Clone, Copy, PartialEq)]
pub enum Runc {
    /// ckpt-runc (the built ckpt-shim, linked under that name), which
    /// restores; the node set-up docs/restore.md describes.
    CkptRunc,
    /// runc itself, as on a node without the shim.
    Plain,
}

/// A private containerd whose runc runtime is `runc`, with its restores in
/// `<dir>/restore`.
pub fn start_containerd(dir: &Path, runc: Runc) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let runc_bin = match runc {
        Runc::CkptRunc => {
            let link = bin.join("ckpt-runc");
            // A restarted containerd finds the link already there.
            match std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ckpt-shim"), &link) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    panic!("ckpt-runc link: {e}")
                }
                _ => {}
            }
            link
        }
        Runc::Plain => PathBuf::from(sh("command -v runc").trim()),
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/containerd.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("start")
        .arg(dir)
        .env("CKPT_RUNC", runc_bin)
        .env("CKPT_SHIM_RESTORE_DIR", dir.join("restore"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "containerd.sh start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// containerd + the shim, with clients for both sockets.
pub struct Env {
    pub dir: PathBuf,
    pub shim_sock: PathBuf,
    pub containerd_sock: PathBuf,
    upstream: PathBuf,
    /// The shim's TOML settings.
    pub config: PathBuf,
    shim: Option<Child>,
    pub pods: Vec<String>,
    pub cgroup_parent: String,
    /// What containerd runs as runc (a restart runs the same).
    runc: Runc,
}

impl Env {
    pub fn start() -> Env {
        Self::start_with_upstream(None)
    }

    /// containerd running plain runc (no restores), with the shim in front.
    pub fn start_plain_runc() -> Env {
        Self::start_full(None, "", Runc::Plain)
    }

    /// The shim in front of `upstream` instead of containerd (for proxy tests).
    /// With these lines of TOML as the shim's settings.
    pub fn start_configured(toml: &str) -> Env {
        Self::start_full(None, toml, Runc::CkptRunc)
    }

    pub fn start_with_upstream(upstream: Option<&Path>) -> Env {
        Self::start_full(upstream, "", Runc::CkptRunc)
    }

    /// In front of a stand-in upstream, with these lines of TOML as settings.
    pub fn start_faked(upstream: &Path, toml: &str) -> Env {
        Self::start_full(Some(upstream), toml, Runc::CkptRunc)
    }

    /// SIGKILL to containerd (its shims and containers live on); returns once
    /// its socket refuses connections.
    pub fn kill_containerd(&self) {
        let pid = std::fs::read_to_string(self.dir.join("containerd.pid")).unwrap();
        let pid = nix::unistd::Pid::from_raw(pid.trim().parse().unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.containerd_sock).is_ok() {
            assert!(t.elapsed() < Duration::from_secs(10), "containerd lives on");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// containerd again, on the same socket, state and root.
    pub fn restart_containerd(&self) {
        start_containerd(&self.dir, self.runc);
    }

    /// How many threads the shim runs.
    pub fn shim_threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.shim_pid()))
            .unwrap()
            .count()
    }

    fn start_full(upstream: Option<&Path>, toml: &str, runc: Runc) -> Env {
        super::require(&[
            "runc",
            "criu",
            "containerd",
            "ctr",
            "umoci",
            "skopeo",
            "nsenter",
        ]);
        let dir = PathBuf::from(sh("mktemp -d /tmp/ckpt-cri.XXXXXX").trim());
        let containerd_sock = dir.join("containerd.sock");
        if upstream.is_none() {
            start_containerd(&dir, runc);
        }
        let shim_sock = dir.join("shim/ckpt-shim.sock");
        let up = upstream
            .map(Path::to_path_buf)
            .unwrap_or_else(|| containerd_sock.clone());
        // One parent per environment: a finished one's clean-up removes its
        // parent, which must not be another running environment's too.
        let cgroup_parent = format!(
            "/ckpt-shim-test-pods-{}",
            dir.file_name().unwrap().to_string_lossy().replace('.', "-")
        );
        let config = dir.join("shim.toml");
        std::fs::write(&config, toml).unwrap();
        let mut env = Env {
            config,
            dir,
            shim_sock,
            containerd_sock,
            upstream: up,
            shim: None,
            pods: Vec::new(),
            cgroup_parent,
            runc,
        };
        env.spawn_shim();
        env
    }

    /// Starts `ckpt-shim serve` in front of the upstream; its log is appended.
    pub fn spawn_shim(&mut self) {
        let log = self.dir.join("shim.log");
        let shim = Command::new(env!("CARGO_BIN_EXE_ckpt-shim"))
            .arg("serve")
            .arg("--listen")
            .arg(&self.shim_sock)
            .arg("--upstream")
            .arg(format!("unix://{}", self.upstream.display()))
            .arg("--config")
            .arg(&self.config)
            .arg("--restore-dir")
            .arg(self.dir.join("restore"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.shim = Some(shim);
        wait_socket(&self.shim_sock, "ckpt-shim", &log);
    }

    /// SIGKILL: the shim dies without running any of its guards.
    pub fn kill_shim(&mut self) {
        if let Some(mut s) = self.shim.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    /// Sends the shim `sig` (SIGTERM, SIGHUP) and leaves it running.
    pub fn signal_shim(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.shim_pid() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// Waits up to `limit` for the shim to exit; its exit status.
    pub fn wait_shim(&mut self, limit: Duration) -> std::process::ExitStatus {
        let s = self.shim.as_mut().expect("shim running");
        let t = Instant::now();
        loop {
            if let Some(st) = s.try_wait().unwrap() {
                self.shim = None;
                return st;
            }
            assert!(
                t.elapsed() < limit,
                "the shim did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the shim keeps of restores (none once their containers are gone).
    /// The restore dirs under the restore root; not the node's own dot dirs
    /// there (push slots, working sets), which no restore owns.
    pub fn restores(&self) -> Vec<String> {
        let d = self.dir.join("restore");
        if d.exists() {
            let mut v = super::entries(&d);
            v.retain(|n| !n.starts_with('.'));
            v
        } else {
            Vec::new()
        }
    }

    pub fn shim_pid(&self) -> u32 {
        self.shim.as_ref().expect("shim running").id()
    }

    /// How many fds the shim holds (one per client connection, among others).
    pub fn shim_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.shim_pid()))
            .unwrap()
            .count()
    }

    pub async fn client(&self) -> Client {
        connect(&self.shim_sock).await
    }

    /// A channel to the shim's socket, for calls k8s-cri does not have.
    pub async fn channel(&self) -> tonic::transport::Channel {
        cri_common::channel(&self.shim_sock).await.unwrap()
    }

    /// CRI's image service on the shim's socket.
    pub async fn images(&self) -> Images {
        Images::new(cri_common::channel(&self.shim_sock).await.unwrap())
    }

    pub fn shim_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("shim.log")).unwrap_or_default()
    }

    pub fn sandbox_config(&self, name: &str, host_network: bool) -> cri::PodSandboxConfig {
        cri_common::sandbox(
            name,
            &self.cgroup_parent,
            &self.dir.join("logs").join(name),
            host_network,
        )
    }

    pub async fn run_pod(
        &mut self,
        c: &mut Client,
        name: &str,
        host_network: bool,
    ) -> (String, cri::PodSandboxConfig) {
        let cfg = self.sandbox_config(name, host_network);
        std::fs::create_dir_all(&cfg.log_directory).unwrap();
        let id = c
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        self.pods.push(id.clone());
        (id, cfg)
    }

    /// Creates (and optionally starts) the counter workload touching `mib` MiB.
    pub async fn counter(
        &self,
        c: &mut Client,
        pod: &(String, cri::PodSandboxConfig),
        name: &str,
        mib: u32,
        start: bool,
    ) -> String {
        let host_network = pod.1.hostname.is_empty();
        let cfg = cri_common::counter(name, mib, 50, host_network);
        let id = create(c, pod, cfg).await;
        if start {
            start_container(c, &id).await;
            wait_count(&self.rootfs(&id), |v| v >= 3);
        }
        id
    }

    /// What critest needs offline: busybox under the name it pulls
    /// (hack/build-oci-images.sh), and pulls from registry.k8s.io refused at
    /// once (a host in containerd's certs.d that nothing listens on), so specs
    /// that need other images fail the same way with or without a network.
    pub fn prepare_for_critest(&self) {
        let images = std::env::var("CKPT_SHIM_IMAGES")
            .unwrap_or_else(|_| "/var/cache/ckpt-shim/images".into());
        super::run_ok(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.containerd_sock)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(Path::new(&images).join("busybox-oci.tar")),
        );
        let host = self.dir.join("certs.d/registry.k8s.io");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(
            host.join("hosts.toml"),
            "server = \"http://127.0.0.1:9\"\n[host.\"http://127.0.0.1:9\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        )
        .unwrap();
    }

    /// The container's root as the host sees it (containerd's task bundle).
    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task/k8s.io")
            .join(id)
            .join("rootfs")
    }

    pub fn count(&self, id: &str) -> Option<u64> {
        super::read_count(&self.rootfs(id))
    }

    pub fn spec(&self, id: &str) -> serde_json::Value {
        let p = self
            .dir
            .join("state/io.containerd.runtime.v2.task/k8s.io")
            .join(id)
            .join("config.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    /// The pod's pause process, from the container's spec (it joins its IPC
    /// namespace by `/proc/<pid>/ns/ipc`).
    pub fn pause_pid(&self, id: &str) -> i64 {
        let spec = self.spec(id);
        let ipc = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "ipc")
            .and_then(|n| n["path"].as_str())
            .expect("the container joins its pod's IPC namespace")
            .to_string();
        ipc.trim_start_matches("/proc/")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn freezer(&self, id: &str) -> String {
        let cg = self.spec(id)["linux"]["cgroupsPath"]
            .as_str()
            .unwrap()
            .to_string();
        std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{cg}/freezer.state"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    pub async fn state(&self, c: &mut Client, id: &str) -> cri::ContainerState {
        let s = c
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        s.status.unwrap().state()
    }

    /// Calls `method` (request `msg`) on the shim's socket with a raw client,
    /// which sends `grpc-timeout` and waits for the server's own answer
    /// (tonic's client would give up locally at the same moment); the answer
    /// must be DEADLINE_EXCEEDED.
    pub async fn call_with_deadline(
        &self,
        method: &str,
        timeout: &str,
        msg: &[u8],
    ) -> super::raw::Reply {
        let r = super::raw::call(
            &self.shim_sock,
            &format!("/runtime.v1.RuntimeService/{method}"),
            &[("grpc-timeout", timeout)],
            super::raw::frame(msg),
        )
        .await;
        assert_eq!(
            r.status(),
            Some(tonic::Code::DeadlineExceeded as i32),
            "{}",
            r.message()
        );
        r
    }

    /// Waits (20 s at most) for a stopped checkpoint to have thawed `ids` and
    /// emptied `dir`: the server lets CRIU end and removes staging first.
    pub async fn wait_thawed_and_empty(&self, dir: &Path, ids: &[&str]) {
        let t = Instant::now();
        while !(super::entries(dir).is_empty() && ids.iter().all(|id| self.freezer(id) == "THAWED"))
        {
            let freezers: Vec<String> = ids.iter().map(|id| self.freezer(id)).collect();
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "left: {:?}, freezers {freezers:?}",
                super::entries(dir)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// RUNNING through CRI, thawed, and still counting.
    pub async fn assert_running(&self, c: &mut Client, id: &str) {
        assert_eq!(
            self.state(c, id).await,
            cri::ContainerState::ContainerRunning
        );
        assert_eq!(self.freezer(id), "THAWED");
        let now = self.count(id).unwrap();
        wait_count(&self.rootfs(id), |v| v > now + 1);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut s) = self.shim.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(s.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t = Instant::now();
            while s.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = s.kill();
            let _ = s.wait();
        }
        if self.containerd_sock.exists() {
            // Remove pods through containerd itself so its shims exit cleanly.
            let sock = self.containerd_sock.clone();
            let pods = std::mem::take(&mut self.pods);
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut c = connect(&sock).await;
                    for p in pods {
                        let _ = c
                            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                                pod_sandbox_id: p.clone(),
                            })
                            .await;
                        let _ = c
                            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: p })
                            .await;
                    }
                });
            })
            .join();
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/containerd.sh");
        let _ = Command::new("bash")
            .arg(script)
            .arg("stop")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let base = h.path().join(self.cgroup_parent.trim_start_matches('/'));
            if base.exists() {
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "find {} -depth -type d -exec rmdir {{}} \\; 2>/dev/null",
                        base.display()
                    ))
                    .status();
            }
        }
    }
}

/// CreateContainer of `cfg` in `pod`: its ID.
pub async fn create(
    c: &mut Client,
    pod: &(String, cri::PodSandboxConfig),
    cfg: cri::ContainerConfig,
) -> String {
    c.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.0.clone(),
        config: Some(cfg),
        sandbox_config: Some(pod.1.clone()),
    })
    .await
    .expect("CreateContainer")
    .into_inner()
    .container_id
}

pub async fn start_container(c: &mut Client, id: &str) {
    c.start_container(cri::StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .expect("StartContainer");
}

/// The container's process, as the runtime reports it.
pub async fn container_pid(c: &mut Client, id: &str) -> i32 {
    let s = c
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&s.info["info"]).unwrap();
    info["pid"].as_i64().unwrap() as i32
}

/// Who ptraces `pid` (0: nobody).
pub fn tracer(pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .unwrap();
    line.trim().parse().unwrap()
}

/// Waits until CRIU has seized `pid` for the dump `call` runs. The freezer is
/// no sign of a dump under way: CRIU thaws the cgroup as soon as it has seized
/// the tasks, which stay stopped under ptrace for the rest of the dump.
pub async fn wait_seized<T: std::fmt::Debug>(pid: i32, call: &tokio::task::JoinHandle<T>) {
    let t = Instant::now();
    while tracer(pid) == 0 {
        assert!(
            !call.is_finished(),
            "the checkpoint ended before CRIU was seen"
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "CRIU never seized {pid}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
