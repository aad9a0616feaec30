//! A deliberately slow disk for tests: hack/slowfs (a FUSE passthrough whose
//! writes are throttled) serving `<dir>/backing` on `<dir>/mnt`. Stopped, and
//! its mount removed, on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub struct SlowFs {
    pub backing: PathBuf,
    pub mnt: PathBuf,
    child: Option<Child>,
}

/// hack/slowfs, built (a workspace crate of its own, which `cargo test` of
/// this crate does not build) into the target dir and profile of this test
/// binary.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev",
        other => other,
    };
    let out = Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .args([
            "build",
            "--quiet",
            "--package",
            "slowfs",
            "--profile",
            profile,
        ])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
        .output()
        .expect("cargo build --package slowfs");
    assert!(
        out.status.success(),
        "cargo build --package slowfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    profile_dir.join("slowfs")
}

/// Whether `mnt` is a mount point now.
pub fn mounted(mnt: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mnt.to_string_lossy();
    mi.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

impl SlowFs {
    /// Serves `<dir>/backing` (created) on `<dir>/mnt` with writes at `rate_mb` MB/s.
    pub fn mount(dir: &Path, rate_mb: f64) -> SlowFs {
        let dir = dir.canonicalize().unwrap();
        let (backing, mnt) = (dir.join("backing"), dir.join("mnt"));
        for d in [&backing, &mnt] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut fs = SlowFs {
            backing,
            mnt,
            child: None,
        };
        fs.start(rate_mb);
        fs
    }

    /// Starts slowfs on the mount point, and waits for the mount: a live one.
    /// A stale mount there answers ENOTCONN until slowfs detaches it, so once
    /// the mount point answers, a mount seen after that is the new one.
    pub fn start(&mut self, rate_mb: f64) {
        let child = Command::new(binary())
            .args(["--rate-mb", &rate_mb.to_string()])
            .arg(&self.backing)
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        while !(std::fs::metadata(&self.mnt).is_ok() && mounted(&self.mnt)) {
            let c = self.child.as_mut().unwrap();
            assert!(c.try_wait().unwrap().is_none(), "slowfs exited");
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "slowfs did not mount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills slowfs without letting it unmount, as a crash would.
    pub fn crash(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Stops slowfs with SIGTERM: it exits 0 and the mount is gone.
    pub fn stop(mut self) {
        let mut c = self.child.take().unwrap();
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
        let st = wait(&mut c, Duration::from_secs(20)).expect("slowfs did not stop");
        assert!(st.success(), "slowfs: {st}");
        assert!(
            !mounted(&self.mnt),
            "slowfs left {} mounted",
            self.mnt.display()
        );
    }
}

fn wait(c: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(st) = c.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            if wait(&mut c, Duration::from_secs(5)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if mounted(&self.mnt) {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
