//! A full restore's pages, put into the restored processes by the shim itself
//! straight from the archive's page cache.
//!
//! A served restore leaves the processes' private memory to a lazy-pages
//! daemon ([`super::lazy`]). CRIU's daemon gets each page from the page
//! server through a socket into a buffer of its own and then into the
//! process: three copies of every byte, slower than CRIU's plain restore
//! reading a pages image. A full restore wants every page in at once, so
//! here the shim is the daemon: it maps the archive and fills each run of
//! pages with one `UFFDIO_COPY` from the mapping, one copy, as a plain
//! restore's read.
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
use super::source::Source;
use super::spans::Spans;
use super::uffd::{self, Event};
use crate::error::{Context, Error, Result};

const SOCKET: &str = "lazy-pages.socket";
const RESTORE_FINISHED: u32 = 0x5253_5446;
/// The most one background copy fills: large enough that the ioctl's own
/// cost vanishes, small enough that faults and events wait little.
const PUSH_CHUNK: u64 = 16 << 20;
/// What a fault fills from its page on, within its run.
const FAULT_CHUNK: u64 = 1 << 20;

/// What a push did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Pushed {
    pub processes: usize,
    pub pages: u64,
    pub faults: u64,
    pub zero_pages: u64,
}

/// One restored process (or a child it forked): its userfaultfd, what is left.
struct Task {
    uffd: OwnedFd,
    left: Spans,
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

/// Serves the restore in `dir` (a served full restore's staging): listens on
/// `work/lazy-pages.socket`, calls `ready`, and returns once every page of
/// every restored process is in (or the process is gone).
pub fn run(dir: &Path, ready: impl FnOnce() -> Result<()>) -> Result<Pushed> {
    let src = Source::open(dir)?;
    let map = Mapping::new(src.file())?;
    read_ahead(src.file(), src.extents());
    // The restore connects to the socket by its name in its work dir (CRIU's
    // fixed relative name; the full path could exceed sun_path).
    let work = dir.join("work");
    std::env::set_current_dir(&work).ctx(|| format!("enter {}", work.display()))?;
    let _ = std::fs::remove_file(SOCKET);
    let listener = UnixListener::bind(SOCKET).ctx(|| format!("listen on {SOCKET}"))?;
    ready()?;
    let (conn, _) = listener.accept().ctx(|| format!("accept on {SOCKET}"))?;
    drop(listener);
    let _ = std::fs::remove_file(SOCKET);
    let mut p = Pusher {
        src: &src,
        map,
        tasks: Vec::new(),
        done: Pushed::default(),
    };
    p.receive(conn)?;
    p.push_all()?;
    Ok(p.done)
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
}

/// How a fill went.
enum Fill {
    /// Some or all of it went in (or was found gone): go on.
    Progress,
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
        self.tasks.push(Task {
            uffd,
            left: Spans::new(&self.src.lazy_runs(pid)),
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

    /// Fills everything left, process by process, following their events.
    fn push_all(&mut self) -> Result<()> {
        loop {
            self.all_events()?;
            let Some(i) = self
                .tasks
                .iter()
                .position(|t| !t.gone && !t.left.is_empty())
            else {
                return Ok(());
            };
            let s = self.tasks[i].left.first().expect("not empty");
            let len = (s.end - s.start).min(PUSH_CHUNK);
            self.fill(i, s.start, len)?;
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
                self.tasks.push(Task {
                    uffd,
                    left,
                    waiting: Vec::new(),
                    gone: false,
                });
            }
            Event::Remap { from, to, len } => self.tasks[i].left.remap(from, to, len),
            Event::Remove { start, end } => self.tasks[i].left.cut(start, end),
            Event::Other(e) => {
                return Err(Error::Other(format!("unexpected userfaultfd event {e:#x}")))
            }
        }
        Ok(())
    }

    /// Serves a fault at `addr`: its pages from the archive, or the zero
    /// page where the checkpoint has none.
    fn fault(&mut self, i: usize, addr: u64) -> Result<()> {
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
        if let Fill::Busy = self.fill(i, addr, len)? {
            self.tasks[i].waiting.push(addr);
        }
        Ok(())
    }

    /// Copies `[start, start + len)` (within one span) from the archive.
    fn fill(&mut self, i: usize, start: u64, len: u64) -> Result<Fill> {
        let t = &mut self.tasks[i];
        let Some(s) = t.left.find(start) else {
            return Ok(Fill::Progress);
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
                None => return Ok(Fill::Progress),
                Some(_) if copied > 0 => return Ok(Fill::Progress),
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
            return Ok(Fill::Progress);
        }
    }
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
