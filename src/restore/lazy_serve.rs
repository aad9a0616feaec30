//! `ckpt-shim lazy-serve DIR`: the page source of one served restore, a
//! process of its own so that it outlives the shim and the runtime's `create`
//! call. It is the restore's lazy-pages daemon ([`super::push`]): CRIU's
//! restore hands it each process's userfaultfd, and it puts the pages in
//! straight from the archive, each process's faults ahead of everything else.
//! For a full restore it pushes every page at once and `ckpt-runc` waits
//! for it. For a lazy one it runs on after the restore: it puts the working
//! set in first ([`super::working_set`]), then the rest only while it holds
//! one of the node's background push slots ([`super::slots`]), serving faults
//! all the while, and records the pages faulted on for the next restore of
//! the same archive when none is known yet.
//!
//! If the pages cannot be served, the restored process would fault forever
//! or, its userfaultfd closed, read zeros where its memory was. So then its
//! init (from the runtime's pid file) is killed: the container is reported
//! exited, never running with wrong memory.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::push::{Mode, FULL_CHUNK, LAZY_CHUNK};
use super::slots::Slots;
use super::source::Plan;
use super::working_set::{self, WorkingSet};
use crate::error::{Context, Error, Result};

/// The niceness of a lazy restore's background copies: they yield the CPUs
/// to restores starting beside them (and to the processes' faults, served at
/// the normal niceness), yet still get a tenth or so of a busy CPU.
const BACKGROUND_NICE: i32 = 10;

/// How the page source's log says it failed; a checkpoint waiting for its
/// pages looks for it ([`super::complete`]).
pub const FAILED: &str = "lazy-serve: failed";

pub struct Options {
    pub dir: PathBuf,
    /// The restored init's pid file, to kill it if its pages cannot be served.
    pub pid_file: Option<PathBuf>,
    /// Run as the page source's guard ([`Guard`]) instead.
    pub guard: bool,
}

/// Runs the page source to its end; `Err` when the pages were not all served.
pub fn run(o: &Options) -> Result<()> {
    if o.guard {
        return guard(o.pid_file.clone());
    }
    let plan = Plan::read(&o.dir)?
        .ok_or_else(|| Error::Other(format!("{} is not a served restore", o.dir.display())))?;
    let root = o.dir.parent().unwrap_or(Path::new("/"));
    let record = match plan.full {
        true => None,
        false => unrecorded(&o.dir, root, &plan.archive),
    };
    let restored = Restored::watch(o.pid_file.clone());
    let staged = super::stage::Staged { dir: o.dir.clone() };
    let mode = match plan.full {
        true => Mode {
            chunk: FULL_CHUNK,
            slots: None,
            record: false,
            hurry: None,
            init: None,
            background_nice: None,
        },
        false => Mode {
            chunk: LAZY_CHUNK,
            slots: Some(Slots::under(
                root,
                plan.push_slots.unwrap_or_else(Slots::default_count),
            )),
            record: record.is_some(),
            hurry: Some(staged.work().join(super::complete::HURRY)),
            init: Some(restored.pidfd.clone()),
            background_nice: Some(BACKGROUND_NICE),
        },
    };
    let started = Instant::now();
    // Started once ckpt-runc has its `ready` (not to delay the restore),
    // while CRIU restores and before any page is served from the archive; a
    // full restore's page source is watched by ckpt-runc, which waits for it.
    let mut guard = None;
    let pushed = super::push::run(&o.dir, mode, || {
        say_ready()?;
        if !plan.full {
            guard = Some(Guard::spawn(o)?);
        }
        Ok(())
    });
    let ms = started.elapsed().as_millis();
    match pushed {
        Ok((pushed, faulted)) => {
            eprintln!(
                "lazy-serve: every page in after {ms} ms ({:.3} s CPU): {pushed:?}",
                cpu_seconds()
            );
            if let (Some(path), Some(ws)) = (record, faulted.filter(|w| w.pages() > 0)) {
                keep_record(&path, &ws);
            }
            if let Some(g) = guard {
                g.done();
            }
            // What a checkpoint of the container waits for; without it, the
            // checkpoint waits until its deadline, and fails.
            let done = staged.work().join(super::complete::DONE);
            if let Err(e) = crate::safefs::create_new(&done, 0o600) {
                eprintln!("lazy-serve: could not mark every page in: {e}");
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("{FAILED} after {ms} ms: {e}");
            restored.kill();
            Err(e)
        }
    }
}

/// The CPU time this page source used so far (user and system).
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| secs(u.user_time()) + secs(u.system_time()))
}

/// A lazy restore's page source, killed (SIGKILL, the OOM killer), would
/// leave its process reading zeros where its memory was: its userfaultfds
/// closed, the kernel fills what is missing with zero pages. So it starts a
/// guard, `lazy-serve DIR --guard`, a process of its own holding the read
/// end of a pipe: unless the page source writes `done` there before it
/// ends, the guard kills the restored init.
struct Guard(std::process::ChildStdin);

impl Guard {
    fn spawn(o: &Options) -> Result<Guard> {
        let exe = std::env::current_exe().ctx(|| "find ckpt-shim's binary".into())?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("lazy-serve").arg(&o.dir).arg("--guard");
        if let Some(p) = &o.pid_file {
            cmd.arg("--pid-file").arg(p);
        }
        // Not our stdout: that is the pipe ckpt-runc waits on for `ready`.
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .ctx(|| "start the page source's guard".into())?;
        Ok(Guard(child.stdin.take().expect("piped")))
    }

    /// Every page is in: the guard may go.
    fn done(mut self) {
        let _ = self.0.write_all(b"done");
    }
}

/// The guard's side ([`Guard`]).
fn guard(pid_file: Option<PathBuf>) -> Result<()> {
    let restored = Restored::watch(pid_file);
    let mut said = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut said);
    if said == b"done" {
        return Ok(());
    }
    eprintln!("lazy-serve guard: the page source ended before every page was in");
    // Its pid file may still be coming (runc writes it after the restore).
    restored.kill_within(std::time::Duration::from_secs(10));
    Ok(())
}

/// Where to record this restore's faults, if no working set is known for
/// its archive yet (none in it, none recorded on this node).
fn unrecorded(dir: &Path, root: &Path, archive: &Path) -> Option<PathBuf> {
    if dir.join(working_set::MEMBER).exists() {
        return None;
    }
    let path = working_set::recorded_path(root, archive).ok()?;
    (!path.exists()).then_some(path)
}

/// Keeps the pages faulted on as the archive's working set on this node (a
/// hint: failing to keep it fails nothing).
fn keep_record(path: &Path, ws: &WorkingSet) {
    let kept = path
        .parent()
        .ok_or_else(|| Error::Other("no dir".into()))
        .and_then(|d| {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .ctx(|| format!("create {}", d.display()))
        })
        .and_then(|()| ws.write(path));
    match kept {
        Ok(()) => eprintln!(
            "lazy-serve: recorded a working set of {} pages in {}",
            ws.pages(),
            path.display()
        ),
        Err(e) => eprintln!("lazy-serve: working set not recorded: {e}"),
    }
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

/// Tells the caller the restore may connect, and lets go of its pipe.
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
    pidfd: super::push::InitFd,
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

    /// [`kill`](Self::kill), once it is found, waiting up to `limit` for that.
    fn kill_within(&self, limit: std::time::Duration) {
        let t = Instant::now();
        while t.elapsed() < limit && self.pidfd.lock().is_ok_and(|s| s.is_none()) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.kill();
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
