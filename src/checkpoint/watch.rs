//! Part of step 2 (freeze): the watch on CRIU that outlives a freeze's
//! guard. The CRIU working on a cgroup is registered as a pidfd, so that a
//! guard dropped while CRIU still runs can thaw again once it has exited
//! (CRIU writes FROZEN back as it ends, also when it aborts).

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// A pidfd of the CRIU working on this cgroup, set once it is spawned.
pub type CriuWatch = Arc<Mutex<Option<OwnedFd>>>;

/// Registers `pid` (CRIU) in a watch slot, as a pidfd.
pub fn watch_pid(slot: &CriuWatch, pid: u32) {
    if let Some(fd) = pidfd_open(pid as i32) {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
    }
}

/// A pidfd for `pid`, or `None` once it is gone. Neither std (whose `PidFd`
/// only comes from its own spawns) nor nix wraps pidfd_open.
pub fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh descriptor, installed for us alone, owned from here on.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits (blocking) up to `timeout` for the process behind `pidfd` to exit:
/// a pidfd polls readable once it has.
pub fn wait_exit(pidfd: &OwnedFd, timeout: Duration) {
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let _ = poll(
        &mut [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)],
        timeout,
    );
}
