//! slowfs: a deliberately slow disk. A FUSE passthrough of BACKING on
//! MOUNTPOINT whose writes are throttled to a rate (reads are not), for tests
//! and benchmarks that need the archive on a slow device where this kernel has
//! no device-mapper, NBD, ublk or null_blk to make one.
//!
//!     slowfs [--rate-mb 50] [--burst-kib 1024] [--threads 4] BACKING MOUNTPOINT
//!
//! Runs as root in the foreground (fuser mounts with mount(2) itself, no
//! libfuse or fusermount). SIGTERM or SIGINT unmounts and exits; if the mount
//! is busy it is detached (`umount -l`) and served until the last user goes,
//! and a second signal exits at once. A mount left by a killed slowfs answers
//! ENOTCONN; slowfs detaches such a mount at MOUNTPOINT before mounting.

#![deny(clippy::undocumented_unsafe_blocks)]

mod fs;
mod inodes;
mod ops;
mod sys;
mod throttle;

use std::path::{Path, PathBuf};

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(about = "A FUSE passthrough whose writes are throttled")]
struct Args {
    /// Write rate in MB/s (10^6 bytes)
    #[arg(long, default_value_t = 50.0)]
    rate_mb: f64,
    /// Bytes that may pass at once before the rate applies, in KiB
    #[arg(long, default_value_t = 1024)]
    burst_kib: u64,
    /// Threads serving requests (a throttled write holds one)
    #[arg(long, default_value_t = 4)]
    threads: usize,
    backing: PathBuf,
    mountpoint: PathBuf,
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("slowfs: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> std::io::Result<()> {
    if a.rate_mb <= 0.0 || a.threads == 0 {
        return Err(std::io::Error::other(
            "--rate-mb and --threads must be positive",
        ));
    }
    // Modes reach the backing files as the callers asked (the kernel applied
    // their umask already).
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    // Blocked before fuser starts its threads, so only sigtimedwait below sees them.
    let signals = stop_signals();
    signals.thread_block()?;
    detach_stale(&a.mountpoint);
    let throttle = throttle::Throttle::new(a.rate_mb * 1e6, a.burst_kib * 1024);
    let fs = fs::SlowFs::new(&a.backing, throttle)?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("slowfs:{}", a.backing.display())),
        fuser::MountOption::Subtype("slowfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(a.threads);
    config.clone_fd = true;
    let session = fuser::spawn_mount(fs, &a.mountpoint, &config)?;
    eprintln!(
        "slowfs: {} on {}, writes at {} MB/s",
        a.backing.display(),
        a.mountpoint.display(),
        a.rate_mb
    );
    if wait_signal(&signals, || session.guard.is_finished()) {
        unmount(&a.mountpoint);
        if wait_signal(&signals, || session.guard.is_finished()) {
            eprintln!("slowfs: second signal, exiting while still in use");
            std::process::exit(1);
        }
    }
    session.join()
}

fn stop_signals() -> SigSet {
    let mut s = SigSet::empty();
    s.add(Signal::SIGTERM);
    s.add(Signal::SIGINT);
    s
}

/// Waits for a signal of `set` (true) or for `done` (false).
fn wait_signal(set: &SigSet, done: impl Fn() -> bool) -> bool {
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    while !done() {
        // SAFETY: a valid, blocked signal set and a timespec; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            return true;
        }
    }
    false
}

/// Unmounts; detaches instead while files are open, and the session goes on
/// serving them until the kernel ends it.
fn unmount(mnt: &Path) {
    use nix::mount::{umount2, MntFlags};
    match umount2(mnt, MntFlags::empty()) {
        Ok(()) => {}
        Err(nix::errno::Errno::EBUSY) => {
            eprintln!("slowfs: {} is busy, detaching it", mnt.display());
            if let Err(e) = umount2(mnt, MntFlags::MNT_DETACH) {
                eprintln!("slowfs: detach {}: {e}", mnt.display());
            }
        }
        Err(e) => eprintln!("slowfs: unmount {}: {e}", mnt.display()),
    }
}

/// A FUSE mount whose server died answers every call with ENOTCONN; detach it.
fn detach_stale(mnt: &Path) {
    if let Err(e) = std::fs::metadata(mnt) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            eprintln!("slowfs: detaching the stale mount at {}", mnt.display());
            let _ = nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
