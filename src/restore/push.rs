//! A served restore's pages, put into the restored processes by the shim
//! itself straight from the archive's page cache: the restore's lazy-pages
//! daemon, for full and lazy restores alike.
//!
//! CRIU's own daemon gets each page from a page server through a socket
//! into a buffer of its own and then into the process: three copies of
//! every byte. Here the shim maps the archive and fills each run of pages
//! with one `UFFDIO_COPY` from the mapping, one copy, as a plain restore's
//! read. Every process's faults are served before each background copy; a
//! full restore pushes everything at once ([`FULL_CHUNK`] pieces), a lazy
//! one ([`LAZY_CHUNK`]) puts the working set in first and the rest only
//! while it holds one of the node's push slots ([`super::slots`]), at a
//! lower priority than its faults.
//!
//! The protocol with CRIU's restore (CRIU 4.x, criu/uffd.c): the restore
//! connects to `lazy-pages.socket` in its work dir and sends, for each
//! restored process, its pid (a native i32; negative for a zombie, and then
//! nothing more), then its userfaultfd (SCM_RIGHTS, on a one-byte message),
//! and when the restore is done the u32 `RESTORE_FINISHED`. Pages go in
//! after that, once the memory is where it will stay; faults before are
//! served at once. The userfaultfds also report forks, mremaps and dropped
//! memory (the features CRIU asks for), which are followed: a page put back
//! into memory the process dropped would bring stale data back.

use std::io::Read;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::mman::{madvise, mmap, munmap, MapFlags, MmapAdvise, ProtFlags};

use super::pagemap::PAGE_SIZE;
use super::slots::{Slot, Slots};
use super::source::Source;
use super::spans::Spans;
use super::uffd::{self, Event};
use super::working_set::{Recorder, WorkingSet};
use crate::error::{Context, Error, Result};

const SOCKET: &str = "lazy-pages.socket";
const RESTORE_FINISHED: u32 = 0x5253_5446;
/// The most one background copy of a full restore fills: large enough that
/// the ioctl's own cost vanishes, small enough that faults and events wait
/// little.
pub const FULL_CHUNK: u64 = 16 << 20;
/// The same for a lazy restore, whose process runs meanwhile: a fault waits
/// for at most one piece in flight (with a cold page cache, its read from
/// disk too), so pieces are smaller; 512 pages still make the ioctl's own
/// cost small.
pub const LAZY_CHUNK: u64 = 2 << 20;
/// What a fault fills from its page on, within its run.
const FAULT_CHUNK: u64 = 1 << 20;

/// The restored init's pidfd, filled in by the page source once the
/// runtime's pid file names it. A userfaultfd reports no exit, and a push
/// waiting for a slot tries no copy (which would fail with ESRCH), so without
/// this a page source waiting outlived its removed container.
pub type InitFd = std::sync::Arc<std::sync::Mutex<Option<OwnedFd>>>;

/// How the pages go in besides the faults.
pub struct Mode {
    /// The most one background copy fills ([`FULL_CHUNK`], [`LAZY_CHUNK`]).
    pub chunk: u64,
    /// The node's slots a background copy needs ([`super::slots`]); `None`
    /// for a full restore, whose pushing is the restore itself. Faults and
    /// the working set ([`super::source::Source::working_set`]) need none.
    pub slots: Option<Slots>,
    /// Note the pages faulted on, in order ([`Pushed`]'s working set).
    pub record: bool,
    /// A file whose presence says: push everything now, past the slots and
    /// the restores in flight ([`super::complete`]); `None` for a full
    /// restore, which does so anyway.
    pub hurry: Option<std::path::PathBuf>,
    /// The restored init, once known ([`InitFd`]): once it has exited,
    /// nothing waits either, so that the push ends with its processes.
    pub init: Option<InitFd>,
    /// The niceness background copies run at (faults at the page source's
    /// own): a lazy restore's push then leaves the CPUs to the restores and
    /// processes starting beside it. `None`: no change (a full restore).
    pub background_nice: Option<i32>,
}

/// What a push did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Pushed {
    pub processes: usize,
    pub pages: u64,
    pub faults: u64,
    pub zero_pages: u64,
    /// Pages of the checkpoint's working set, put in before any other
    /// background copy.
    pub working_set_pages: u64,
    /// Background copies that had to wait for a slot.
    pub slot_waits: u64,
    /// Background copies that waited for a restore in flight on the node.
    pub restore_waits: u64,
}

/// One restored process (or a child it forked): its userfaultfd, what is left.
struct Task {
    /// Its image pid; `None` for a child it forked.
    pid: Option<u64>,
    uffd: OwnedFd,
    left: Spans,
    /// The part of `left` in the working set: put in first.
    hot: Spans,
    /// Faults that could not be served yet (the memory was changing).
    waiting: Vec<u64>,
    gone: bool,
}

/// The archive, mapped read-only. Only the kernel reads through it (the
/// pointers [`Mapping::at`] gives go to `UFFDIO_COPY`): no Rust reference to
/// its bytes is ever made, so the file changing under it is no hazard.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(file: &std::fs::File) -> Result<Mapping> {
        let len = file.metadata().ctx(|| "stat the archive".into())?.len() as usize;
        let size = NonZeroUsize::new(len)
            .ok_or(Errno::EINVAL)
            .ctx(|| "map the archive".into())?;
        // SAFETY: with no address asked for, the kernel picks one that
        // overlaps nothing mapped, so no memory Rust knows of changes.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }
        .ctx(|| "map the archive".into())?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The mapping at archive offset `at`, `len` bytes of it in page tables
    /// first, so that the copy takes the kernel's fast path.
    fn at(&self, at: u64, len: u64) -> *const u8 {
        assert!(at + len <= self.len as u64, "pages beyond the archive");
        let start = at & !(PAGE_SIZE - 1);
        let advise = MmapAdvise::MADV_POPULATE_READ;
        // SAFETY: `start..at + len` lies in our mapping (asserted above);
        // populating its page tables reads the file in and changes no byte.
        // A failure only leaves the copy its slower path.
        let _ = unsafe {
            madvise(
                self.ptr.add(start as usize).cast(),
                (at + len - start) as usize,
                advise,
            )
        };
        self.ptr.as_ptr().wrapping_add(at as usize)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly what `new` mapped, unmapped once; no reference
        // into it exists (see the type's docs).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Serves the restore in `dir` (a served restore's staging): listens on
/// `work/lazy-pages.socket`, calls `ready`, and returns once every page of
/// every restored process is in (or the process is gone), with the pages
/// faulted on if `mode` asks for them.
pub fn run(
    dir: &Path,
    mode: Mode,
    ready: impl FnOnce() -> Result<()>,
) -> Result<(Pushed, Option<WorkingSet>)> {
    let src = Source::open(dir)?;
    // The restore connects to the socket by its name in its work dir (CRIU's
    // fixed relative name; the full path could exceed sun_path).
    let work = super::stage::Staged {
        dir: dir.to_path_buf(),
    }
    .work();
    std::env::set_current_dir(&work).ctx(|| format!("enter {}", work.display()))?;
    let _ = std::fs::remove_file(SOCKET);
    let listener = UnixListener::bind(SOCKET).ctx(|| format!("listen on {SOCKET}"))?;
    ready()?;
    let (conn, _) = listener.accept().ctx(|| format!("accept on {SOCKET}"))?;
    drop(listener);
    let _ = std::fs::remove_file(SOCKET);
    serve(conn, &src, mode)
}

/// Serves one restore connected on `conn` from `src`.
fn serve(conn: UnixStream, src: &Source, mode: Mode) -> Result<(Pushed, Option<WorkingSet>)> {
    // A bounded push reads ahead once it may push (see `push_all`).
    if mode.slots.is_none() {
        read_ahead(src.file(), src.extents());
    }
    let mut p = Pusher {
        src,
        map: Mapping::new(src.file())?,
        tasks: Vec::new(),
        done: Pushed::default(),
        faulted: mode.record.then(Recorder::default),
        mode,
        niced: false,
        hurried: false,
        own_nice: own_nice(),
    };
    p.receive(conn)?;
    p.push_all()?;
    Ok((p.done, p.faulted.map(Recorder::finish)))
}

/// Has the kernel read the pages from disk ahead of the copies, if they are
/// not in the page cache (a thread of its own: WILLNEED may wait for I/O).
fn read_ahead(file: &std::fs::File, extents: Vec<(u64, u64)>) {
    let Ok(f) = file.try_clone() else { return };
    std::thread::spawn(move || {
        for (at, len) in extents {
            let advice = PosixFadviseAdvice::POSIX_FADV_WILLNEED;
            let _ = posix_fadvise(&f, at as i64, len as i64, advice);
        }
    });
}

struct Pusher<'a> {
    src: &'a Source,
    map: Mapping,
    tasks: Vec<Task>,
    done: Pushed,
    mode: Mode,
    faulted: Option<Recorder>,
    /// Whether this thread runs at `mode.background_nice` now.
    niced: bool,
    /// `mode.hurry` was seen: nothing waits any more.
    hurried: bool,
    /// Its own niceness, which faults are served at.
    own_nice: i32,
}

/// How a fill went.
enum Fill {
    /// Up to this address it went in (or was found gone): go on.
    Progress(u64),
    /// The process's memory is changing: read its events first.
    Busy,
}

impl Pusher<'_> {
    /// Takes the restored processes' userfaultfds until the restore is done,
    /// serving their faults meanwhile.
    fn receive(&mut self, mut conn: UnixStream) -> Result<()> {
        loop {
            if self.wait(conn.as_fd())? {
                let mut b = [0u8; 4];
                conn.read_exact(&mut b).map_err(|e| {
                    Error::Other(format!("the restore left before it finished: {e}"))
                })?;
                let v = u32::from_ne_bytes(b);
                if v == RESTORE_FINISHED {
                    return Ok(());
                }
                let pid = v as i32;
                if pid >= 0 {
                    let uffd = recv_fd(&conn)?;
                    self.add(pid as u64, uffd);
                }
            }
            self.all_events()?;
        }
    }

    /// Reads and follows every task's events (a child a fork adds is read on the next pass).
    fn all_events(&mut self) -> Result<()> {
        for i in 0..self.tasks.len() {
            self.events(i)?;
        }
        Ok(())
    }

    fn add(&mut self, pid: u64, uffd: OwnedFd) {
        self.done.processes += 1;
        let left = Spans::new(&self.src.lazy_runs(pid));
        let hot = left.within(&self.src.working_set(pid));
        self.tasks.push(Task {
            pid: Some(pid),
            uffd,
            left,
            hot,
            waiting: Vec::new(),
            gone: false,
        });
    }

    /// Waits until `conn` or a userfaultfd has something; whether `conn` has.
    fn wait(&self, conn: BorrowedFd) -> Result<bool> {
        let mut fds: Vec<PollFd> = std::iter::once(conn)
            .chain(self.tasks.iter().map(|t| t.uffd.as_fd()))
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e).ctx(|| "poll".into()),
        }
        // Any event at all (`None`: one nix has no name for).
        Ok(fds[0].revents() != Some(PollFlags::empty()))
    }

    /// Fills everything left, following the processes' events. Before every
    /// copy, every process's faults are served first: a fault waits for at
    /// most the one copy in flight. Then the working sets go in, then the
    /// rest, each background copy only while a slot of the node is held.
    fn push_all(&mut self) -> Result<()> {
        let mut slot: Option<Slot> = None;
        loop {
            self.all_events()?;
            let Some((i, start, len, hot)) = self.next_piece() else {
                return Ok(());
            };
            if !hot && slot.is_none() {
                if self.done.working_set_pages > 0 && self.done.slot_waits == 0 {
                    eprintln!(
                        "lazy-serve: working set in ({} pages), the rest follows",
                        self.done.working_set_pages
                    );
                }
                slot = match self.take_slot()? {
                    Some(s) => Some(s),
                    None if self.hurry() => Some(Slot::unbounded()),
                    None => {
                        self.done.slot_waits += 1;
                        self.idle(super::slots::RETRY)?;
                        continue;
                    }
                };
                // Not before: eight restores waiting for a slot would
                // otherwise read the pages in ahead of the faults' reads.
                if slot.as_ref().is_some_and(Slot::held) || self.hurried {
                    read_ahead(self.src.file(), self.src.extents());
                }
            }
            if !hot && self.restore_in_flight()? && !self.hurry() {
                self.done.restore_waits += 1;
                self.idle(super::slots::RETRY)?;
                continue;
            }
            self.background(!hot && !self.hurried);
            let filled = self.fill(i, start, len)?;
            if let (true, Fill::Progress(end)) = (hot, filled) {
                let t = &mut self.tasks[i];
                let before = t.hot.pages();
                t.hot.cut(start, end.max(start + PAGE_SIZE));
                self.done.working_set_pages += before - t.hot.pages();
            }
        }
    }

    /// What to copy next: a piece of some process's working set, else of
    /// what is left (`true` with the working set's).
    fn next_piece(&self) -> Option<(usize, u64, u64, bool)> {
        let live = |t: &&Task| !t.gone;
        let chunk = self.mode.chunk;
        let piece = |i: usize, spans: &Spans, hot| {
            let s = spans.first().expect("not empty");
            (i, s.start, (s.end - s.start).min(chunk), hot)
        };
        let hot = self
            .tasks
            .iter()
            .enumerate()
            .find(|(_, t)| live(t) && !t.hot.is_empty());
        if let Some((i, t)) = hot {
            return Some(piece(i, &t.hot, true));
        }
        let (i, t) = self
            .tasks
            .iter()
            .enumerate()
            .find(|(_, t)| live(t) && !t.left.is_empty())?;
        Some(piece(i, &t.left, false))
    }

    /// Runs this thread at the background niceness (`on`) or its own. Nice
    /// is per thread on Linux, and `who` 0 is the caller.
    fn background(&mut self, on: bool) {
        let Some(nice) = self.mode.background_nice else {
            return;
        };
        if on == self.niced {
            return;
        }
        // SAFETY: no safe wrapper exists (neither std nor nix has
        // setpriority); it takes plain integers and reads no memory of ours.
        // Going back down needs CAP_SYS_NICE, which the page source (root)
        // has; a failure only leaves the thread at the other niceness.
        let r = unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, if on { nice } else { self.own_nice })
        };
        if r == 0 {
            self.niced = on;
        }
    }

    /// A slot of the node for background copies, if the mode bounds them.
    fn take_slot(&self) -> Result<Option<Slot>> {
        match &self.mode.slots {
            Some(s) => s.try_take(),
            None => Ok(Some(Slot::unbounded())),
        }
    }

    /// Whether everything is to go in now, once seen for good: asked to
    /// ([`Mode::hurry`]), or the restored init has exited ([`Mode::init`]):
    /// then each copy either fails for a process that is gone, which ends
    /// its push, or serves one that lives on.
    fn hurry(&mut self) -> bool {
        if self.hurried {
            return true;
        }
        if self.mode.hurry.as_ref().is_some_and(|f| f.exists()) {
            eprintln!("lazy-serve: asked to push every page now");
            self.hurried = true;
        } else if self.mode.init.as_ref().is_some_and(exited) {
            eprintln!("lazy-serve: the restored init has exited: no more waiting");
            self.hurried = true;
        }
        self.hurried
    }

    /// Whether a restore on the node is in flight, which background copies
    /// wait for ([`super::slots`]).
    fn restore_in_flight(&self) -> Result<bool> {
        match &self.mode.slots {
            Some(s) => s.restore_in_flight(),
            None => Ok(false),
        }
    }

    /// Waits up to `limit` for a process to fault (or report an event).
    fn idle(&self, limit: std::time::Duration) -> Result<()> {
        let mut fds: Vec<PollFd> = self
            .tasks
            .iter()
            .filter(|t| !t.gone)
            .map(|t| PollFd::new(t.uffd.as_fd(), PollFlags::POLLIN))
            .collect();
        let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(e).ctx(|| "poll".into()),
        }
    }

    /// Reads and follows task `i`'s events, then serves its waiting faults.
    fn events(&mut self, i: usize) -> Result<()> {
        if self.tasks[i].gone {
            return Ok(());
        }
        loop {
            let evs = uffd::read_events(self.tasks[i].uffd.as_fd())
                .ctx(|| "read a userfaultfd".into())?;
            if evs.is_empty() {
                break;
            }
            for ev in evs {
                self.follow(i, ev)?;
            }
        }
        let waiting = std::mem::take(&mut self.tasks[i].waiting);
        for addr in waiting {
            self.fault(i, addr)?;
        }
        Ok(())
    }

    fn follow(&mut self, i: usize, ev: Event) -> Result<()> {
        match ev {
            Event::Fault { address } => self.fault(i, address & !(PAGE_SIZE - 1))?,
            Event::Fork { uffd } => {
                // SAFETY: a fork event's fd is one the kernel installed in
                // our table as it read the event for us, owned by nothing
                // else; each event is read, so followed, once.
                let uffd = unsafe { OwnedFd::from_raw_fd(uffd) };
                // The child has the parent's memory, missing the same pages.
                let left = self.tasks[i].left.clone();
                let hot = self.tasks[i].hot.clone();
                self.tasks.push(Task {
                    pid: None,
                    uffd,
                    left,
                    hot,
                    waiting: Vec::new(),
                    gone: false,
                });
            }
            Event::Remap { from, to, len } => {
                self.tasks[i].left.remap(from, to, len);
                self.tasks[i].hot.remap(from, to, len);
            }
            Event::Remove { start, end } => {
                self.tasks[i].left.cut(start, end);
                self.tasks[i].hot.cut(start, end);
            }
            Event::Other(e) => {
                return Err(Error::Other(format!("unexpected userfaultfd event {e:#x}")))
            }
        }
        Ok(())
    }

    /// Serves a fault at `addr`: its pages from the archive, or the zero
    /// page where the checkpoint has none.
    fn fault(&mut self, i: usize, addr: u64) -> Result<()> {
        self.background(false);
        self.done.faults += 1;
        let t = &mut self.tasks[i];
        if t.gone {
            return Ok(());
        }
        let Some(s) = t.left.find(addr) else {
            return match uffd::zeropage(t.uffd.as_fd(), addr, PAGE_SIZE) {
                Ok(()) => {
                    self.done.zero_pages += 1;
                    Ok(())
                }
                Err(Errno::EAGAIN) => {
                    t.waiting.push(addr);
                    Ok(())
                }
                // Already there (another thread's fault), or the memory is gone.
                Err(Errno::EEXIST | Errno::ENOENT | Errno::ESRCH | Errno::ENOSPC) => Ok(()),
                Err(e) => Err(Error::Other(format!("zero page at {addr:#x}: {e}"))),
            };
        };
        let len = (s.end - addr).min(FAULT_CHUNK);
        match self.fill(i, addr, len)? {
            Fill::Busy => self.tasks[i].waiting.push(addr),
            Fill::Progress(end) => {
                if let (Some(r), Some(pid)) = (&mut self.faulted, self.tasks[i].pid) {
                    r.note(pid, addr, end.saturating_sub(addr));
                }
            }
        }
        Ok(())
    }

    /// Copies `[start, start + len)` (within one span) from the archive.
    fn fill(&mut self, i: usize, start: u64, len: u64) -> Result<Fill> {
        let t = &mut self.tasks[i];
        let Some(s) = t.left.find(start) else {
            // In already: up to where something is still left.
            let next = t.left.next(start).map_or(u64::MAX, |s| s.start);
            return Ok(Fill::Progress(next.min(start + len)));
        };
        let at = s.at + (start - s.start);
        let mut chunk = len.min(s.end - start);
        loop {
            let src = self.map.at(at, chunk);
            let (copied, err) = match uffd::copy(t.uffd.as_fd(), start, src, chunk) {
                Ok(()) => (chunk, None),
                Err((n, e)) => (n, Some(e)),
            };
            t.left.cut(start, start + copied);
            self.done.pages += copied / PAGE_SIZE;
            match err {
                None => return Ok(Fill::Progress(start + chunk)),
                Some(_) if copied > 0 => return Ok(Fill::Progress(start + copied)),
                Some(Errno::EAGAIN) => return Ok(Fill::Busy),
                // Its first page is in already (a fault raced the push).
                Some(Errno::EEXIST) => t.left.cut(start, start + PAGE_SIZE),
                // Not one mapping (the run spans two): a shorter piece.
                Some(Errno::ENOENT) if chunk > PAGE_SIZE => {
                    chunk = (chunk / 2).next_multiple_of(PAGE_SIZE);
                    continue;
                }
                // Not mapped there any more.
                Some(Errno::ENOENT) => t.left.cut(start, start + PAGE_SIZE),
                // The process is gone.
                Some(Errno::ESRCH | Errno::ENOSPC) => t.gone = true,
                Some(e) => {
                    return Err(Error::Other(format!(
                        "fill {chunk} bytes at {start:#x}: {e}"
                    )))
                }
            }
            return Ok(Fill::Progress(start + PAGE_SIZE));
        }
    }
}

/// This thread's niceness (`/proc/thread-self/stat`'s 19th field; the
/// command name before it is in parentheses and may hold spaces).
/// Whether the process of the pidfd in `init` (if it is known yet) has
/// exited: its pidfd polls readable then.
fn exited(init: &InitFd) -> bool {
    let slot = init.lock().unwrap_or_else(|p| p.into_inner());
    slot.as_ref().is_some_and(|fd| {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
    })
}

fn own_nice() -> i32 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The fd CRIU sends after a pid: SCM_RIGHTS on a one-byte message.
fn recv_fd(conn: &UnixStream) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ctx(|| "receive a userfaultfd".into())?;
    for c in msg.cmsgs().ctx(|| "receive a userfaultfd".into())? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS installed it in our table for this
                // message alone: nothing else owns or closes it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(Error::Other(
        "the restore sent a pid without its userfaultfd".into(),
    ))
}

#[cfg(test)]
mod tests {
    //! A pusher on the test process's own memory: a mapping registered with
    //! a userfaultfd as CRIU's restore registers the restored process's, and
    //! handed to the pusher over the socket as CRIU hands it.

    use super::super::pagemap::{encode, PE_LAZY, PE_PRESENT};
    use super::super::slots::Slots;
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const PAGES: u64 = 1024;
    const PID: u64 = 7;

    /// `PAGES` pages of fresh anonymous memory, unmapped when dropped.
    struct Region(NonNull<u8>);

    impl Region {
        fn new() -> Region {
            let len = NonZeroUsize::new((PAGES * PAGE_SIZE) as usize).unwrap();
            let flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_ANONYMOUS;
            // SAFETY: a new anonymous mapping where the kernel picks, over
            // nothing else.
            let p =
                unsafe { nix::sys::mman::mmap_anonymous(None, len, ProtFlags::PROT_READ, flags) };
            Region(p.unwrap().cast())
        }

        fn addr(&self, page: u64) -> u64 {
            self.0.as_ptr() as u64 + page * PAGE_SIZE
        }

        /// Which pages are in (bit 63 of `/proc/self/pagemap`), without touching them.
        fn resident(&self) -> Vec<u64> {
            let pm = std::fs::File::open("/proc/self/pagemap").unwrap();
            let mut b = vec![0u8; (PAGES * 8) as usize];
            pm.read_exact_at(&mut b, self.addr(0) / PAGE_SIZE * 8)
                .unwrap();
            (0..PAGES)
                .filter(|&i| {
                    let e = u64::from_ne_bytes(b[i as usize * 8..][..8].try_into().unwrap());
                    e >> 63 == 1
                })
                .collect()
        }

        /// Reads a byte of page `page` in a thread of its own: a fault
        /// until the pusher serves it.
        fn touch(&self, page: u64) -> u8 {
            let at = self.addr(page) as usize;
            let (tx, rx) = std::sync::mpsc::channel();
            // SAFETY: `at` is in our mapping, alive until the region drops
            // (after this returns); a read of a byte changes nothing.
            std::thread::spawn(move || tx.send(unsafe { (at as *const u8).read_volatile() }));
            rx.recv_timeout(std::time::Duration::from_secs(60))
                .expect("the fault was never served")
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: exactly the mapping `new` made; nothing refers into it.
            let _ = unsafe { munmap(self.0.cast(), (PAGES * PAGE_SIZE) as usize) };
        }
    }

    /// CRIU's side: the pid, its userfaultfd, then "restore finished".
    fn hand_over(sock: &Path, uffd: &OwnedFd) -> UnixStream {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let mut c = UnixStream::connect(sock).unwrap();
        c.write_all(&(PID as i32).to_ne_bytes()).unwrap();
        let fds = [uffd.as_raw_fd()];
        let iov = [std::io::IoSlice::new(b"\0")];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(c.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
        c.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        c
    }

    /// Runs a lazy push of `region` from `src` while the test holds the
    /// node's only slot (another restore's push in flight); `during` acts
    /// meanwhile, then the slot is let go and the push ends.
    fn push_while_slot_is_taken(
        region: &Region,
        src: &Source,
        during: impl FnOnce(),
    ) -> (Pushed, Option<WorkingSet>) {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::under(dir.path(), 1);
        let other = slots.try_take().unwrap().expect("the only slot");
        let sock = dir.path().join("lazy-pages.socket");
        let listener = UnixListener::bind(&sock).unwrap();
        let uffd = uffd::register_for_test(region.addr(0), PAGES * PAGE_SIZE);
        let mode = Mode {
            chunk: 64 * PAGE_SIZE,
            slots: Some(slots),
            record: true,
            hurry: None,
            init: None,
            background_nice: Some(10),
        };
        std::thread::scope(|s| {
            let pusher = s.spawn(move || serve(listener.accept().unwrap().0, src, mode));
            let _conn = hand_over(&sock, &uffd);
            during();
            drop(other);
            pusher.join().unwrap().unwrap()
        })
    }

    fn source(dir: &Path, region: &Region) -> Source {
        let lazy = PE_LAZY | PE_PRESENT;
        Source::for_test(
            dir,
            PID,
            &encode(1, &[(region.addr(0), PAGES as u32, lazy)]),
        )
    }

    fn assert_every_page_is_the_checkpoints(region: &Region) {
        for i in 0..PAGES {
            assert_eq!(region.touch(i), Source::test_byte(i), "page {i}");
        }
    }

    #[test]
    fn a_fault_is_served_while_another_restores_push_holds_the_nodes_slot() {
        let dir = tempfile::tempdir().unwrap();
        let region = Region::new();
        let src = source(dir.path(), &region);
        let (pushed, faulted) = push_while_slot_is_taken(&region, &src, || {
            assert_eq!(region.touch(700), Source::test_byte(700));
            // Only the fault's own piece is in: no background copy went
            // ahead of it, nor after it while the other push held the slot.
            let fault_piece: Vec<u64> = (700..700 + FAULT_CHUNK / PAGE_SIZE).collect();
            assert_eq!(region.resident(), fault_piece);
            // The slot stays taken for ten of the pusher's retries: it has
            // asked for it (the fault may have come before its first ask),
            // and still copied nothing.
            std::thread::sleep(crate::restore::slots::RETRY * 10);
            assert_eq!(region.resident(), fault_piece);
        });
        assert_eq!(
            (pushed.pages, pushed.faults, pushed.processes),
            (PAGES, 1, 1)
        );
        assert!(pushed.slot_waits >= 1, "{pushed:?}");
        assert_every_page_is_the_checkpoints(&region);
        // What the fault put in is recorded as the working set, in order.
        let ws = faulted.unwrap();
        assert_eq!(
            ws.processes[&PID],
            [(region.addr(700), FAULT_CHUNK / PAGE_SIZE)]
        );
    }

    #[test]
    fn the_working_set_goes_in_before_any_background_copy_and_needs_no_slot() {
        let dir = tempfile::tempdir().unwrap();
        let region = Region::new();
        let mut src = source(dir.path(), &region);
        let mut ws = WorkingSet {
            version: WorkingSet::VERSION,
            ..Default::default()
        };
        ws.processes
            .insert(PID, vec![(region.addr(900), 5), (region.addr(100), 10)]);
        src.set_working_set(ws);
        let (pushed, _) = push_while_slot_is_taken(&region, &src, || {
            let want: Vec<u64> = (100..110).chain(900..905).collect();
            let t = std::time::Instant::now();
            while region.resident() != want {
                let got = region.resident();
                assert!(
                    got.iter().all(|p| want.contains(p)),
                    "not the working set: {got:?}"
                );
                assert!(t.elapsed().as_secs() < 60, "the working set never went in");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        assert_eq!((pushed.pages, pushed.working_set_pages), (PAGES, 15));
        assert_every_page_is_the_checkpoints(&region);
    }
}
