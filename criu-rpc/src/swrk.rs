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
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<u8>>>,
    grace: Duration,
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

        let mut cmd = Command::new(binary);
        cmd.args(["--no-default-config", "swrk", "3"])
            .env_clear()
            .env("PATH", SAFE_PATH)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close, umask) between fork and exec.
        unsafe {
            cmd.pre_exec(move || place_fds(&sources));
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
        drop(theirs);

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
        Ok(Session {
            sock: SeqPacket::new(ours)?,
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

    /// Waits (without blocking the runtime) for CRIU to exit after EOF on the socket.
    pub(crate) async fn exit_status(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "already reaped".into();
        };
        let grace = self.grace;
        match tokio::task::spawn_blocking(move || reap(&mut child, grace)).await {
            Ok(status) => describe(status),
            Err(e) => format!("reaper failed: {e}"),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Our socket end closes with `self`; CRIU notices and winds down by itself.
        if let Some(mut child) = self.child.take() {
            let grace = self.grace;
            std::thread::spawn(move || reap(&mut child, grace));
        }
    }
}

/// Waits up to `grace` for CRIU to exit on its own, then kills and reaps it.
fn reap(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
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

fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) if s.signal().is_some() => {
            format!("killed by signal {}", s.signal().unwrap_or_default())
        }
        Some(s) => format!("exit status {}", s.code().unwrap_or(-1)),
        None => "exit status unknown".into(),
    }
}

/// In the child: move the socket to fd 3 and inherited fds to 4.., umask 077.
fn place_fds(sources: &[RawFd]) -> std::io::Result<()> {
    // First lift every source above the targets so no dup2 clobbers a later source.
    let mut lifted = [0 as RawFd; 64];
    if sources.len() > lifted.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (i, &src) in sources.iter().enumerate() {
        // SAFETY: fcntl is async-signal-safe.
        let fd = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 100) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        lifted[i] = fd;
    }
    for (i, &fd) in lifted[..sources.len()].iter().enumerate() {
        // dup2 yields a descriptor without CLOEXEC, so exactly these survive exec.
        // SAFETY: dup2 is async-signal-safe.
        if unsafe { libc::dup2(fd, CRIU_SOCK_FD + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
    Ok(())
}
