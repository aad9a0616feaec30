//! Test harness: real runc containers from a busybox-static rootfs, on overlayfs
//! like containerd's, with pipes for stdio. Everything a test starts is stopped
//! and removed by `Drop`, also when the test fails.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const SETUP_HINT: &str = "run `hack/setup.sh` as root first";

/// Fails loudly (never skips) when a part the tests need is missing.
pub fn require(tools: &[&str]) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "integration tests need root: {SETUP_HINT}"
    );
    for t in tools {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "`{t}` is not installed: {SETUP_HINT}");
    }
    let v = Command::new("criu")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        v.contains("Version: 4.2.1"),
        "CRIU 4.2.1 must be the `criu` in PATH (found {v:?}): {SETUP_HINT}"
    );
}

pub fn sh(cmd: &str) -> String {
    run_ok(Command::new("sh").arg("-c").arg(cmd))
}

/// A fresh random number (a run's salt for data that must come back).
pub fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    u64::from_le_bytes(b)
}

/// The static workload tests/fixtures/workloads/<name>.c, built into `dir`.
pub fn fixture(dir: &Path, name: &str) -> PathBuf {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/workloads/{name}.c"));
    let bin = dir.join(name);
    run_ok(
        Command::new("cc")
            .args(["-O2", "-static", "-o"])
            .arg(&bin)
            .arg(src),
    );
    bin
}

/// Runs `cmd` to its end; its stdout. Fails the test, with the command and
/// its stderr, if it does not succeed.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `criu` that reports 4.2.1 and whose `criu check` fails with `why`.
pub fn criu_stub(dir: &Path, why: &str) -> PathBuf {
    let stub = dir.join("criu-stub");
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in\n  --version) echo 'Version: 4.2.1' ;;\n  check) echo '{why}' >&2; exit 1 ;;\nesac\n"
    );
    std::fs::write(&stub, script).unwrap();
    let exec = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&stub, exec).unwrap();
    stub
}

/// A real CRI client of cri-tools (`crictl`, `critest`): `../shared/bin/NAME`
/// beside the repository, where CI keeps the same copy.
pub fn shared_bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/bin")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: the cri-tools binaries (crictl, critest 1.34) belong in ../shared/bin beside the repository",
        p.display()
    );
    p
}

/// The image: busybox-static plus the counter workload (hack/build-image.sh).
pub fn image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("busybox-image");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/build-image.sh");
        sh(&format!("bash {} {}", script.display(), dir.display()));
        dir
    })
    .clone()
}

/// A fresh overlay on top of the image, mounted at `<dir>/rootfs`.
pub struct Overlay {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
}

impl Overlay {
    pub fn new(dir: &Path) -> Overlay {
        Self::on(&image().to_string_lossy(), dir)
    }

    /// A fresh writable layer over `lower` (colon-separated layers).
    pub fn on(lower: &str, dir: &Path) -> Overlay {
        let rootfs = dir.join("rootfs");
        for d in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let d = dir.display();
        sh(&format!(
            "mount -t overlay overlay -o lowerdir={lower},upperdir={d}/upper,workdir={d}/work {}",
            rootfs.display()
        ));
        Overlay {
            dir: dir.to_path_buf(),
            rootfs,
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.rootfs, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A container run by runc in its own state root, counting into /tmp/count.
pub struct Runc {
    pub id: String,
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub overlay: Overlay,
    pub output: Arc<Mutex<Vec<u8>>>,
    pub cgroup: String,
    _tmp: tempfile::TempDir,
}

pub struct Spec {
    pub mib: u32,
    /// Send the container's stdout to this host file instead of a pipe.
    pub stdout_file: bool,
    /// More arguments for the counter (which ignores them) and more
    /// environment: both in the process's memory and in its spec.
    pub extra_args: Vec<String>,
    pub env: Vec<String>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            mib: 1,
            stdout_file: false,
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl Runc {
    pub fn start(id: &str) -> Runc {
        Self::start_with(id, Spec::default())
    }

    pub fn start_with(id: &str, spec: Spec) -> Runc {
        let tmp = tempfile::Builder::new()
            .prefix("ckpt-test-")
            .tempdir()
            .unwrap();
        let root = tmp.path().join("state");
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let overlay = Overlay::new(&bundle);
        // A parent of its own: the Drop of a container removes its parent when
        // empty, and a parent shared with tests running beside it would go
        // between runc's making of the parent and of the leaf under it.
        let cgroup = format!("/ckpt-shim-test-{id}-{}/{id}", std::process::id());
        let mib = spec.mib.to_string();
        let mut args = vec!["/bin/counter", "/tmp/count", &mib, "50"];
        args.extend(spec.extra_args.iter().map(String::as_str));
        write_config(&bundle, &cgroup, &args);
        if !spec.env.is_empty() {
            let p = bundle.join("config.json");
            let mut c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            c["process"]["env"]
                .as_array_mut()
                .unwrap()
                .extend(spec.env.iter().map(|e| e.as_str().into()));
            std::fs::write(&p, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
        }
        let mut c = Runc {
            id: id.to_string(),
            root,
            bundle,
            overlay,
            output: Default::default(),
            cgroup,
            _tmp: tmp,
        };
        c.run(spec.stdout_file);
        c.wait_count(|v| v >= 3);
        c
    }

    fn run(&mut self, stdout_file: bool) {
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(&self.root)
            .args(["run", "-d", &self.id])
            .current_dir(&self.bundle)
            .stdin(Stdio::null());
        if stdout_file {
            let f = std::fs::File::create(self.bundle.join("stdout.log")).unwrap();
            cmd.stdout(f.try_clone().unwrap()).stderr(f);
            assert!(cmd.status().unwrap().success(), "runc run {}", self.id);
            return;
        }
        // CRIU cannot dump an fd to a host file outside the container: use a pipe,
        // one for stdout and stderr, drained by a thread for as long as it lives.
        let (r, w) = nix::unistd::pipe().unwrap();
        cmd.stdout(w.try_clone().unwrap()).stderr(w);
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let sink = self.output.clone();
        let mut pipe = std::fs::File::from(r);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let st = child.wait().unwrap();
        assert!(
            st.success(),
            "runc run {}: {}",
            self.id,
            String::from_utf8_lossy(&self.output.lock().unwrap())
        );
    }

    pub fn state(&self) -> serde_json::Value {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.root)
            .args(["state", &self.id])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    pub fn status(&self) -> String {
        self.state()["status"]
            .as_str()
            .unwrap_or("gone")
            .to_string()
    }

    pub fn pid(&self) -> i32 {
        self.state()["pid"].as_i64().unwrap_or(0) as i32
    }

    pub fn count(&self) -> Option<u64> {
        read_count(&self.overlay.rootfs)
    }

    pub fn wait_count(&self, pred: impl Fn(u64) -> bool) -> u64 {
        wait_count(&self.overlay.rootfs, pred)
    }

    /// The container's v1 freezer state.
    pub fn freezer(&self) -> String {
        std::fs::read_to_string(format!(
            "/sys/fs/cgroup/freezer{}/freezer.state",
            self.cgroup
        ))
        .unwrap_or_default()
        .trim()
        .to_string()
    }

    /// Running, counting, and not frozen.
    pub fn assert_running(&self) {
        assert_eq!(self.status(), "running");
        assert_eq!(self.freezer(), "THAWED");
        let now = self.count().unwrap();
        self.wait_count(|v| v > now + 1);
    }

    pub fn exec(&self, cmd: &str) {
        let st = Command::new("runc")
            .arg("--root")
            .arg(&self.root)
            .args(["exec", &self.id, "/bin/sh", "-c", cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "runc exec {cmd}");
    }

    pub fn kill(&self) {
        let r = self.root.display();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "runc --root {r} kill {id} KILL; sleep 0.2; runc --root {r} delete -f {id}",
                id = self.id
            ))
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        self.kill();
        remove_cgroup(&self.cgroup);
    }
}

pub fn remove_cgroup(path: &str) {
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = h.path().join(path.trim_start_matches('/'));
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(dir.parent().unwrap());
    }
}

pub fn write_config(bundle: &Path, cgroup: &str, args: &[&str]) {
    let _ = std::fs::remove_file(bundle.join("config.json"));
    sh(&format!("runc spec --bundle {}", bundle.display()));
    let p = bundle.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    c["process"]["terminal"] = false.into();
    c["process"]["args"] = serde_json::json!(args);
    c["root"]["readonly"] = false.into();
    c["linux"]["cgroupsPath"] = cgroup.into();
    std::fs::write(&p, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
}

pub fn read_count(rootfs: &Path) -> Option<u64> {
    std::fs::read_to_string(rootfs.join("tmp/count"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn wait_count(rootfs: &Path, pred: impl Fn(u64) -> bool) -> u64 {
    let t = Instant::now();
    loop {
        if let Some(v) = read_count(rootfs).filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "counter in {} stuck at {:?}",
            rootfs.display(),
            read_count(rootfs)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a process matches `pgrep ARGS` (e.g. `["-x", "criu"]`).
pub fn pgrep(args: &[&str]) -> bool {
    Command::new("pgrep")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Names in `dir`, to check that nothing was left behind.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A private 0700 output dir for archives.
pub fn out_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("ckpt-out-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}
pub mod apps;
pub mod cri;
pub mod raw;
pub mod registry;
pub mod restore;
pub mod scrape;
pub mod security;
pub mod slowfs;

/// stdin, stdout and stderr for a restored process: /dev/null and a pipe drained
/// by a thread for as long as the process lives.
pub fn drained_pipe() -> [std::os::fd::OwnedFd; 3] {
    let (r, w) = nix::unistd::pipe().unwrap();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(r);
        let mut buf = [0u8; 4096];
        while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
    });
    [
        std::fs::File::open("/dev/null").unwrap().into(),
        w.try_clone().unwrap(),
        w,
    ]
}

/// A restored tree, which is no child of ours: killed, and its cgroup removed, on drop.
pub struct Restored {
    pub pid: i32,
    pub cgroup: String,
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        std::thread::sleep(Duration::from_millis(100));
        remove_cgroup(&self.cgroup);
    }
}

impl Restored {
    /// Asserts the restored process is in its own cgroup in every hierarchy.
    pub fn assert_in_own_cgroup(&self) {
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid)).unwrap();
        assert!(
            cgroups.lines().all(|l| l.ends_with(&self.cgroup)),
            "not all in {}: {cgroups}",
            self.cgroup
        );
    }
}

/// Waits for a restored counter in `rootfs` and asserts it resumed from its memory
/// at dump time (the dump saw `before..after`), not from 1, and keeps counting.
pub fn assert_resumed(rootfs: &Path, before: u64, after: u64) -> u64 {
    let first = wait_count(rootfs, |_| true);
    assert!(
        first > before && first <= after + 3,
        "restored count {first}, dump saw {before}..{after}"
    );
    wait_count(rootfs, |v| v >= first + 3);
    first
}

/// An archive's members: names and types.
pub fn members(archive: &Path) -> Vec<(String, tar::EntryType)> {
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
            )
        })
        .collect()
}

pub fn member_bytes(archive: &Path, name: &str) -> Vec<u8> {
    use std::io::Read;
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == name {
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            return b;
        }
    }
    panic!("{name} not in {}", archive.display());
}

/// Archives made from a real one, changed on the way.
pub mod archive {
    use std::io::Read;
    use std::path::{Path, PathBuf};

    /// Copies `src` to `dst` member by member; `change(name, data)` may replace
    /// a regular file's data. `link` adds a symlink member (name, target) at the
    /// end, written raw, as a hostile archive would have it.
    /// Copies `src` to `dst` without member `drop`.
    pub fn rewrite_without(src: &Path, dst: &Path, drop: &str) -> PathBuf {
        let mut input = tar::Archive::new(std::fs::File::open(src).unwrap());
        let mut out = tar::Builder::new(std::fs::File::create(dst).unwrap());
        for e in input.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name != drop {
                let mut h = e.header().clone();
                out.append_data(&mut h, &name, &mut e).unwrap();
            }
        }
        out.finish().unwrap();
        dst.to_path_buf()
    }

    pub fn rewrite(
        src: &Path,
        dst: &Path,
        change: impl Fn(&str, &[u8]) -> Option<Vec<u8>>,
        link: Option<(&str, &str)>,
    ) -> PathBuf {
        let mut input = tar::Archive::new(std::fs::File::open(src).unwrap());
        let mut out = tar::Builder::new(std::fs::File::create(dst).unwrap());
        for e in input.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut h = e.header().clone();
            if h.entry_type().is_dir() {
                out.append_data(&mut h, &name, std::io::empty()).unwrap();
                continue;
            }
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            let data = change(&name, &data).unwrap_or(data);
            h.set_size(data.len() as u64);
            out.append_data(&mut h, &name, data.as_slice()).unwrap();
        }
        if let Some((name, target)) = link {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            h.set_cksum();
            out.append(&h, std::io::empty()).unwrap();
        }
        out.finish().unwrap();
        dst.to_path_buf()
    }
}

/// The engine's checkpoint options for tests: staged, durable, plain, pages
/// held as the server holds them by default.
pub fn checkpoint_opts(location: &Path) -> ckpt_shim::checkpoint::Options {
    ckpt_shim::checkpoint::Options {
        location: location.to_path_buf(),
        deadline: None,
        criu: criu_rpc::Criu::new("criu"),
        settings: Default::default(),
        staging_dir: None,
        freeze_journal: None,
        durable: true,
        stream: false,
        hold: ckpt_shim::checkpoint::hold::Budget::new(Default::default()),
        hold_cap: None,
        seal: None,
        restore_dir: None,
    }
}

/// `ckpt-shim restore` of `archive` into `bundle` as container `id`, its stdio
/// on drained pipes, with `identities` for a sealed archive.
pub fn restore_opts(
    archive: &Path,
    bundle: &Path,
    id: &str,
    identities: std::sync::Arc<ckpt_shim::seal::Identities>,
) -> ckpt_shim::restore::RestoreOptions {
    ckpt_shim::restore::RestoreOptions {
        archive: archive.to_path_buf(),
        bundle: bundle.to_path_buf(),
        id: id.into(),
        criu: criu_rpc::Criu::new("criu"),
        settings: Default::default(),
        stdio: Some(drained_pipe()),
        identities,
        policy: Default::default(),
    }
}

/// The venv with grpcio and h2 (hack/setup.sh).
pub const PYTHON: &str = "/var/cache/ckpt-shim/venv/bin/python3";

/// The Go CRI client (tests/fixtures/go-cri), built once per test binary.
pub fn go_client() -> PathBuf {
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-cri");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/go-cri");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env(
            "GOCACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-cache"),
        )
        .output()
        .expect("go: run hack/setup.sh");
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}
