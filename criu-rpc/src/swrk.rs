//! One `criu swrk` child per request, and the guard that never leaves it behind.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::seqpacket::{self, SeqPacket};
use crate::Error;

/// CRIU runs helpers (`tar` for tmpfs, `iptables` for network locks): give it a
/// fixed PATH instead of inheriting the caller's environment.
const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The fd number CRIU is told to use for its end of the socket.
const CRIU_SOCK_FD: RawFd = 3;
/// Bytes of CRIU's stderr kept for error reports.
const STDERR_KEEP: usize = 4096;

pub(crate) struct Session {
    pub(crate) sock: SeqPacket,
    pub(crate) proc: Proc,
}

impl Session {
    /// Spawns `criu --no-default-config swrk 3`. `inherit[i]` is placed at fd `4 + i`
    /// in the child, for `inherit_fd` entries of a restore.
    pub(crate) fn spawn(
        binary: &Path,
        inherit: &[OwnedFd],
        grace: Duration,
    ) -> Result<Self, Error> {
        let (ours, theirs) = seqpacket::pair()?;
        let mut sources: Vec<RawFd> = vec![theirs.as_raw_fd()];
        sources.extend(inherit.iter().map(|f| f.as_raw_fd()));
        let proc = Proc::spawn(binary, &["swrk".into(), "3".into()], &[], &sources, grace)?;
        drop(theirs);
        Ok(Session {
            sock: SeqPacket::new(ours)?,
            proc,
        })
    }
}

/// One CRIU child: its stderr kept for reports, and never left behind: dropping it
/// gives CRIU `grace` to exit by itself before it is killed and reaped.
pub(crate) struct Proc {
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<u8>>>,
    grace: Duration,
}

impl Proc {
    /// Spawns `criu --no-default-config ARGS` with a cleared environment (plus
    /// `env`), `/` as its cwd and umask 077; `fds[i]` is placed at fd `3 + i`.
    pub(crate) fn spawn(
        binary: &Path,
        args: &[std::ffi::OsString],
        env: &[(&str, &std::ffi::OsStr)],
        fds: &[RawFd],
        grace: Duration,
    ) -> Result<Self, Error> {
        let sources = fds.to_vec();
        let mut cmd = Command::new(binary);
        cmd.arg("--no-default-config")
            .args(args)
            .env_clear()
            .env("PATH", SAFE_PATH)
            .envs(env.iter().copied())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: pre_exec's closure runs in the forked child, where only
        // async-signal-safe calls are sound: place_fds makes only fcntl, dup2
        // and umask calls, allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || place_fds(&sources));
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;

        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let keep = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                    k.extend_from_slice(&buf[..n]);
                    let excess = k.len().saturating_sub(STDERR_KEEP);
                    k.drain(..excess);
                }
            });
        }
        Ok(Proc {
            child: Some(child),
            stderr,
            grace,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner()))
            .trim()
            .to_string()
    }

    /// Waits (without blocking the runtime, and for at most the grace period once
    /// `bounded`) for CRIU to exit; `None` if it could not be reaped.
    pub(crate) async fn wait(&mut self, bounded: bool) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let grace = if bounded { self.grace } else { Duration::MAX };
        tokio::task::spawn_blocking(move || reap(&mut child, grace))
            .await
            .ok()
            .flatten()
    }

    /// Waits for CRIU to exit after EOF on its socket; describes how it ended.
    pub(crate) async fn exit_status(&mut self) -> String {
        if self.child.is_none() {
            return "already reaped".into();
        }
        describe(self.wait(true).await)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // CRIU notices its request is gone (closed socket, closed pipes) and winds
        // down by itself; reap it off the caller's path.
        if let Some(mut child) = self.child.take() {
            let grace = self.grace;
            std::thread::spawn(move || reap(&mut child, grace));
        }
    }
}

/// Waits up to `grace` for CRIU to exit on its own, then kills and reaps it.
fn reap(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now().checked_add(grace);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if deadline.is_none_or(|d| Instant::now() < d) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(None) => {
                tracing::warn!(
                    pid = child.id(),
                    "CRIU did not exit within {grace:?}; killing it"
                );
                let _ = child.kill();
                return child.wait().ok();
            }
            Err(_) => return None,
        }
    }
}

pub(crate) fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) if s.signal().is_some() => {
            format!("killed by signal {}", s.signal().unwrap_or_default())
        }
        Some(s) => format!("exit status {}", s.code().unwrap_or(-1)),
        None => "exit status unknown".into(),
    }
}

/// In the child: move `sources` to fds 3.., umask 077.
fn place_fds(sources: &[RawFd]) -> std::io::Result<()> {
    // First lift every source above the targets so no dup2 clobbers a later source.
    let mut lifted = [0 as RawFd; 64];
    if sources.len() > lifted.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (i, &src) in sources.iter().enumerate() {
        // SAFETY: a raw libc call because nothing between fork and exec may
        // allocate or take a lock, and fcntl is async-signal-safe; `src` is
        // open in the child (an fd of the parent's, kept for the spawn).
        let fd = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 100) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        lifted[i] = fd;
    }
    for (i, &fd) in lifted[..sources.len()].iter().enumerate() {
        // dup2 yields a descriptor without CLOEXEC, so exactly these survive exec.
        // SAFETY: as above: dup2 is async-signal-safe, `fd` is the open copy
        // just made, and the target numbers belong to no one in the child.
        if unsafe { libc::dup2(fd, CRIU_SOCK_FD + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    Ok(())
}
