//! `ckpt-shim lazy-serve DIR`: the page source of one served restore, a
//! process of its own so that it outlives the shim and the runtime's `create`
//! call. For a full restore it is the lazy-pages daemon itself and puts every
//! page in at once ([`super::push`]); `ckpt-runc` waits for it. For a lazy
//! one, described here, it runs on after the restore.
//!
//! It starts CRIU's lazy-pages daemon on the staged images (`DIR/checkpoint`,
//! work dir `DIR/work`, where the restore finds `lazy-pages.socket`), hands it
//! one end of a socket pair as its page server (`--ps-socket`: no TCP port
//! another local user could ask for the container's memory on), says `ready`
//! on stdout once the daemon listens, and serves pages until the daemon ends
//! the session: when every page is in (the daemon pushes what was not
//! touched in the background), or when the restored processes are gone.
//!
//! If the daemon fails, or the pages cannot be served, the restored process
//! would fault forever or, its userfaultfd closed, read zeros where its
//! memory was. So then its init (from the runtime's pid file) is killed: the
//! container is reported exited, never running with wrong memory.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::page_server;
use super::source::Source;
use crate::error::{Context, Error, Result};

/// The daemon's fds in its own table: the page server socket, its status pipe.
const PS_FD: i32 = 3;
const STATUS_FD: i32 = 4;

pub struct Options {
    pub dir: PathBuf,
    pub criu: PathBuf,
    /// The restored init's pid file, to kill it if its pages cannot be served.
    pub pid_file: Option<PathBuf>,
}

/// Runs the page source to its end; `Err` when the pages were not all served.
pub fn run(o: &Options) -> Result<()> {
    let full = super::source::Plan::read(&o.dir)?.is_some_and(|p| p.full);
    match full {
        true => push(o),
        false => serve(o),
    }
}

/// A full restore: the shim is the lazy-pages daemon and puts every page in
/// at once ([`super::push`]).
fn push(o: &Options) -> Result<()> {
    let started = Instant::now();
    let restored = Restored::watch(o.pid_file.clone());
    let pushed = super::push::run(&o.dir, say_ready);
    eprintln!(
        "lazy-serve: pushed {pushed:?} after {} ms",
        started.elapsed().as_millis()
    );
    pushed.map(drop).inspect_err(|_| restored.kill())
}

/// A lazy restore: CRIU's lazy-pages daemon, fed by our page server.
fn serve(o: &Options) -> Result<()> {
    let started = Instant::now();
    let src = Source::open(&o.dir)?;
    let (mut ours, theirs) = UnixStream::pair().ctx(|| "socket pair".into())?;
    let (status_r, status_w) = nix::unistd::pipe().ctx(|| "pipe".into())?;
    let restored = Restored::watch(o.pid_file.clone());
    let mut daemon = spawn_daemon(o, theirs.into(), status_w)?;
    wait_ready(status_r, &mut daemon)?;
    say_ready()?;
    eprintln!(
        "lazy-serve: daemon listening after {} ms",
        started.elapsed().as_millis()
    );
    let served = page_server::serve(&mut ours, &src);
    drop(ours);
    let status = daemon.wait().ctx(|| "wait for criu lazy-pages".into())?;
    eprintln!(
        "lazy-serve: {:?} after {} ms; daemon {status}; {} lazy pages in the checkpoint",
        served,
        started.elapsed().as_millis(),
        src.lazy_pages()
    );
    let failed = match (&served, status.success()) {
        (Ok(_), true) => return Ok(()),
        (Err(e), _) => e.to_string(),
        (Ok(_), false) => format!("criu lazy-pages {status}"),
    };
    restored.kill();
    Err(Error::Other(format!(
        "lazy restore's pages: {failed}; see {}",
        o.dir.join("work/lazy-pages.log").display()
    )))
}

fn spawn_daemon(o: &Options, ps: OwnedFd, status: OwnedFd) -> Result<Child> {
    let mut cmd = Command::new(&o.criu);
    cmd.arg("lazy-pages")
        .arg("--images-dir")
        .arg(o.dir.join("checkpoint"))
        .arg("--work-dir")
        .arg(o.dir.join("work"))
        .args(["--page-server", "--ps-socket", "3", "--status-fd", "4"])
        .args(["--log-file", "lazy-pages.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let (ps_raw, status_raw) = (ps.as_raw_fd(), status.as_raw_fd());
    // SAFETY: pre_exec's closure runs in the forked child, where only
    // async-signal-safe calls are sound: it makes only dup2 and close_range
    // calls, on fds open in the child, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in [(ps_raw, PS_FD + 100), (status_raw, STATUS_FD + 100)] {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (from, to) in [(PS_FD + 100, PS_FD), (STATUS_FD + 100, STATUS_FD)] {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            mark_cloexec_from(STATUS_FD + 1);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .ctx(|| format!("run {} lazy-pages", o.criu.display()))?;
    drop((ps, status));
    Ok(child)
}

/// Marks every fd from `first` on close-on-exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`, Linux 5.11), so that a child keeps only what it is given.
pub fn mark_cloexec_from(first: i32) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: no safe wrapper exists (neither libc nor nix has
    // close_range); it takes plain integers, reads no memory of ours, and
    // only sets CLOEXEC, so no fd anything owns is closed or changed in use.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Waits for the daemon's status byte: it listens on `lazy-pages.socket`.
fn wait_ready(status: OwnedFd, daemon: &mut Child) -> Result<()> {
    let mut b = [0u8; 1];
    let n = nix::unistd::read(&status, &mut b).unwrap_or(0);
    if n == 1 {
        return Ok(());
    }
    let st = daemon.wait().ctx(|| "wait for criu lazy-pages".into())?;
    Err(Error::Other(format!(
        "criu lazy-pages did not start ({st})"
    )))
}

/// Tells the caller the daemon is listening, and lets go of its pipe.
fn say_ready() -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")
        .and_then(|()| out.flush())
        .ctx(|| "stdout".into())?;
    let null = std::fs::File::options()
        .write(true)
        .open("/dev/null")
        .ctx(|| "open /dev/null".into())?;
    nix::unistd::dup2_stdout(&null).ctx(|| "dup2".into())?;
    Ok(())
}

/// The restored init, held by a pidfd taken as soon as the runtime's pid file
/// names it (while the restore is still being answered), so that a kill
/// never reaches another process that got the number later.
struct Restored {
    pidfd: std::sync::Arc<std::sync::Mutex<Option<OwnedFd>>>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Restored {
    fn watch(pid_file: Option<PathBuf>) -> Restored {
        let r = Restored {
            pidfd: Default::default(),
            done: Default::default(),
        };
        let (slot, done) = (r.pidfd.clone(), r.done.clone());
        if let Some(path) = pid_file {
            std::thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(fd) = pidfd_of(&path) {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            });
        }
        r
    }

    /// SIGKILLs it, if it was found: its memory cannot be served.
    fn kill(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        let slot = self.pidfd.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = slot.as_ref() {
            eprintln!("lazy-serve: killing the restored process: its memory cannot be served");
            // SAFETY: no safe wrapper exists for pidfd_send_signal; it takes
            // a pidfd we hold open, a signal number and a null siginfo (which
            // the kernel reads as "as kill() sends it").
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn pidfd_of(pid_file: &Path) -> Option<OwnedFd> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: no safe wrapper exists for pidfd_open (std's PidFd is
    // unstable); it takes plain integers and reads no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: pidfd_open returned a new fd installed for us alone: open, and
    // owned by nothing else.
    (fd >= 0).then(|| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}
