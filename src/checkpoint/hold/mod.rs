//! Part of step 5: memory that holds the pages during the pause, so the
//! pause never waits for the disk.
//!
//! While the container is frozen, CRIU can go no faster than the streamer reads
//! its pipes. Writing the pages into the archive's page cache means allocating
//! every page of the file on the way, and once the kernel's dirty limits are
//! reached, waiting for writeback: the pause then tracks the disk. Copying them
//! into memory runs at memory speed. So before the freeze, the shim reserves
//! memory as large as the container's (within the [`budget`] every checkpoint
//! in flight shares): a memory file on a tmpfs of its own ([`pages_file`]), or
//! for a sealed checkpoint a buffer faulted in first. The pages image goes
//! into it while CRIU is held, and into the archive once the container runs
//! again ([`Thawed`]). What does not fit goes straight to the archive, as
//! without a hold, and is counted as written while frozen.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};

use nix::errno::Errno;
use nix::fcntl::{fallocate, openat, splice, FallocateFlags, OFlag, SpliceFFlags};
use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use nix::sys::sendfile::sendfile;
use nix::sys::stat::Mode;

use crate::error::{Context, Result};

pub mod budget;
pub use budget::{Budget, HoldPages, Policy, Reservation};

/// Memory that holds a pages image while the container is frozen, with the
/// share of the budget it stands for.
pub struct Hold {
    mem: Mem,
    _reservation: Reservation,
}

enum Mem {
    /// Anonymous memory faulted in before the freeze, for what needs the
    /// bytes as a buffer (a sealed checkpoint's parts).
    Buffer(Mapping),
    /// A memory file ([`pages_file`]) the pipe is spliced into, up to `cap`
    /// bytes. Nothing is faulted in first: a full page written into a memory
    /// file is allocated but never zeroed, and it is not dirty page cache, so
    /// no writeback throttles it. Faulting in a buffer first cost about 0.5 s
    /// per GiB here before the checkpoint could start, for a pause no shorter.
    File { file: std::fs::File, cap: usize },
}

impl Hold {
    /// The bytes `r` reserved, as a memory file, or as a faulted-in buffer
    /// when `buffer`; `None` if that is nothing.
    pub fn reserved(r: Reservation, buffer: bool) -> Result<Option<Hold>> {
        if r.bytes == 0 {
            return Ok(None);
        }
        let mut h = match buffer {
            true => Hold::new(r.bytes as usize)?,
            false => Hold::in_file(r.bytes as usize)?,
        };
        h._reservation = r;
        Ok(Some(h))
    }

    /// A memory file taking up to `cap` bytes.
    pub fn in_file(cap: usize) -> Result<Hold> {
        Ok(Hold {
            mem: Mem::File {
                file: pages_file()?,
                cap,
            },
            _reservation: Reservation::default(),
        })
    }

    /// Maps and faults in `len` bytes.
    pub fn new(len: usize) -> Result<Hold> {
        let map = Mapping::new(len).ctx(|| format!("map {len} bytes to hold pages"))?;
        // No MADV_HUGEPAGE: huge pages come from free 2 MiB blocks, which are
        // what a VM balloon with free page reporting has handed back to the
        // host, so touching them first costs 1-3 s per GiB here (against 0.5 s
        // for small pages taken from what the guest kept), and varies 10×.
        map.populate()
            .ctx(|| format!("fault in {len} bytes to hold pages"))?;
        Ok(Hold {
            mem: Mem::Buffer(map),
            _reservation: Reservation::default(),
        })
    }

    pub fn len(&self) -> usize {
        match &self.mem {
            Mem::Buffer(map) => map.len,
            Mem::File { cap, .. } => *cap,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer; empty for a memory file.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.mem {
            Mem::Buffer(map) => map.as_mut_slice(),
            Mem::File { .. } => &mut [],
        }
    }

    /// Takes what `pipe` carries until it ends or the hold is full; returns
    /// how much was taken and whether the pipe ended.
    pub fn fill_from(&mut self, pipe: &OwnedFd) -> std::io::Result<(usize, bool)> {
        let cap = self.len();
        let mut filled = 0;
        while filled < cap {
            let n = match &mut self.mem {
                Mem::File { file, .. } => {
                    let mut off = filled as i64;
                    let want = (cap - filled).min(1 << 20);
                    let flags = SpliceFFlags::SPLICE_F_MOVE;
                    splice(pipe, None, &*file, Some(&mut off), want, flags)
                }
                Mem::Buffer(map) => nix::unistd::read(pipe, &mut map.as_mut_slice()[filled..]),
            };
            match n {
                Ok(0) => return Ok((filled, true)),
                Ok(n) => filled += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok((filled, false))
    }

    /// Writes the first `len` bytes into `file` at `at`, giving each chunk's
    /// memory back as soon as it is written. The page cache the write needs
    /// is then taken from memory freed an instant before: on this project's
    /// VM (a balloon with free page reporting), memory that has been free for
    /// a while costs a trip to the host on first touch, about 1 s per GiB, and
    /// a second such cost after the one paid for the hold itself would double
    /// the checkpoint's total time.
    pub fn write_into(&mut self, file: &std::fs::File, at: u64, len: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            match &mut self.mem {
                Mem::Buffer(map) => {
                    file.write_all_at(&map.as_mut_slice()[done..done + n], at + done as u64)?;
                    // Whole pages (CHUNK is a multiple of the page size),
                    // written already and never read again.
                    map.discard(done, n & !0xfff);
                }
                Mem::File { file: mem, .. } => {
                    send_range(mem, done as u64, file, at + done as u64, n)?;
                    // A range written already: its memory goes back.
                    let punch =
                        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                    let _ = fallocate(&*mem, punch, done as i64, n as i64);
                }
            }
            // Writeback starts now, behind the next chunk's copy, rather than
            // all at once in the archive's final fdatasync.
            start_writeback(file, at + done as u64, n);
            done += n;
        }
        Ok(())
    }
}

/// Asks the kernel to start writing `len` bytes of `file` from `at` back
/// (`SYNC_FILE_RANGE_WRITE`): a hint, whose failure changes nothing.
fn start_writeback(file: &std::fs::File, at: u64, len: usize) {
    // SAFETY: no safe wrapper exists (nix has no sync_file_range); the call
    // takes plain integers and an fd `file` keeps open, and reads or writes
    // no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            at as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// The chunks held data is written out in, each given back once written.
const CHUNK: usize = 32 << 20;

/// Anonymous memory of our own: a private, readable and writable mapping of
/// `len` bytes, unmapped when dropped. nix's mmap, madvise and munmap stay
/// unsafe (they could change memory Rust holds references into), so each
/// call here says why it cannot.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping owns its memory alone (no other pointer to it exists), so
// it may move to another thread as a Box<[u8]> may; it is not Sync.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes (`MAP_NORESERVE`: only what is touched counts).
    fn new(len: usize) -> std::io::Result<Mapping> {
        let size = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        let flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE;
        // SAFETY: with no address asked for, the kernel picks one that
        // overlaps nothing mapped, so no memory Rust knows of changes.
        let ptr = unsafe { mmap_anonymous(None, size, prot, flags) }?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Faults every page in now (`MADV_POPULATE_WRITE`), so that filling it
    /// later runs at memory speed.
    fn populate(&self) -> std::io::Result<()> {
        // SAFETY: exactly our own mapping; populating allocates its pages
        // and changes no byte of it (they read as zeros before and after).
        unsafe { madvise(self.ptr.cast(), self.len, MmapAdvise::MADV_POPULATE_WRITE) }?;
        Ok(())
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` starts `len` bytes mapped readable and writable until
        // drop, initialised (anonymous memory reads as zeros), and reachable
        // only through this borrow of `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Gives back the memory of `len` bytes from `at` (`MADV_DONTNEED`: they
    /// read as zeros after). Both must be page-aligned; a failed hint
    /// changes nothing.
    fn discard(&mut self, at: usize, len: usize) {
        assert!(at <= self.len && len <= self.len - at, "within the mapping");
        // SAFETY: a range inside our own mapping, under `&mut self` so no
        // slice of it is alive; DONTNEED on private anonymous memory only
        // zeroes those bytes, which stay mapped and initialised.
        let _ = unsafe { madvise(self.ptr.add(at).cast(), len, MmapAdvise::MADV_DONTNEED) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly what `new` mapped, unmapped once, when no borrow
        // of it can be left.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// Copies `len` bytes of `src` at `from` into `dst` at `to` in the kernel
/// (sendfile: the memory file's pages go to the page cache with one copy and
/// no mapping of ours). `dst`'s file position is moved.
fn send_range(
    src: &std::fs::File,
    from: u64,
    dst: &std::fs::File,
    to: u64,
    len: usize,
) -> std::io::Result<()> {
    use std::io::Seek;
    (&*dst).seek(std::io::SeekFrom::Start(to))?;
    let mut off = from as libc::off_t;
    let end = from + len as u64;
    while (off as u64) < end {
        let want = (end - off as u64) as usize;
        match sendfile(dst, src, Some(&mut off), want) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// How much memory to ask to hold for `pid`'s container: its anonymous and
/// shared memory (what CRIU writes as pages) plus a margin. `None` if unknown.
pub fn estimate(pid: i32) -> Option<u64> {
    Some(container_memory(pid)?.saturating_add(4 << 20) / 16 * 17)
}

/// Anonymous plus shared memory of `pid`'s memory cgroup (v1 `total_rss` and
/// `total_shmem`, or v2 `anon` and `shmem`).
fn container_memory(pid: i32) -> Option<u64> {
    let (dir, v2) = memory_cgroup(pid)?;
    let keys: &[&str] = if v2 {
        &["anon", "shmem"]
    } else {
        &["total_rss", "total_shmem"]
    };
    let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    Some(
        stat.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| keys.contains(k))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum(),
    )
}

/// The shim's own memory cgroup, and whether it is v2.
pub(crate) fn own_memory_cgroup() -> Option<(std::path::PathBuf, bool)> {
    memory_cgroup(std::process::id() as i32)
}

/// `pid`'s memory cgroup dir: v1's memory controller where it is mounted,
/// else v2's unified hierarchy; and whether it is v2.
fn memory_cgroup(pid: i32) -> Option<(std::path::PathBuf, bool)> {
    match crate::cgroup::of(pid, "memory").ok()?? {
        crate::cgroup::Dir::V1(p) => Some((p, false)),
        crate::cgroup::Dir::V2(p) => Some((p, true)),
    }
}

/// An unnamed file in memory for a pages image: on a tmpfs of its own
/// ([`detached_tmpfs`]) where one can be had, else a memfd.
fn pages_file() -> Result<std::fs::File> {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let root = match detached_tmpfs() {
        Ok(root) => root,
        Err(e) => {
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!("holding pages in memfds: no tmpfs of our own: {e}");
            }
            return crate::safefs::memfd(c"ckpt-shim-pages");
        }
    };
    let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC;
    // The mount lives as long as the file; the root's fd closes here.
    let fd = openat(&root, c".", flags, Mode::from_bits_truncate(0o600))
        .ctx(|| "an unnamed file on the hold's tmpfs".into())?;
    Ok(std::fs::File::from(fd))
}

/// A tmpfs of a hold's own, mounted nowhere (fsopen and fsmount: only its fd
/// reaches it, and it goes with its last file), whose files take large folios
/// (`huge=within_size`). Memfds take a 4 KiB page at a time while the
/// system's `shmem_enabled` is `never`, as it is by default: filling 2 GiB
/// took 1.0-1.2 s that way here against 0.35-0.5 s on this tmpfs (and 0.6-0.7
/// s into ext4's page cache), measured in turn in one run. With
/// `huge=always` it took 4.7-6.6 s: a whole 2 MiB page is zeroed first, and
/// free 2 MiB blocks are what this VM's balloon has handed back to the host.
/// Fails without CAP_SYS_ADMIN, or on a kernel older than 5.2.
fn detached_tmpfs() -> std::io::Result<OwnedFd> {
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const ATTRS: libc::c_uint = 0x2 | 0x4 | 0x8; // MOUNT_ATTR_NOSUID | NODEV | NOEXEC
    let fs = fsopen(c"tmpfs")?;
    // Its size is the hold budget's to limit (0: tmpfs sets none of its own).
    for (key, value) in [
        (c"huge", c"within_size"),
        (c"mode", c"0700"),
        (c"size", c"0"),
    ] {
        fsconfig(fs.as_fd(), FSCONFIG_SET_STRING, Some(key), Some(value))?;
    }
    fsconfig(fs.as_fd(), FSCONFIG_CMD_CREATE, None, None)?;
    fsmount(fs.as_fd(), ATTRS)
}

// The new mount API: neither libc nor nix wraps it, so its calls are raw
// syscalls, each given only fds and NUL-terminated strings (or null).

/// `fsopen(name, FSOPEN_CLOEXEC)`: a file system context.
fn fsopen(name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    // SAFETY: the kernel only reads `name`, NUL-terminated and alive across
    // the call.
    new_fd(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })
}

/// `fsconfig(fs, cmd, key, value, 0)`, a null for each `None`.
fn fsconfig(
    fs: BorrowedFd,
    cmd: libc::c_uint,
    key: Option<&std::ffi::CStr>,
    value: Option<&std::ffi::CStr>,
) -> std::io::Result<()> {
    let ptr = |s: Option<&std::ffi::CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: the kernel only reads `key` and `value`, each null (as the
    // commands that take none want) or NUL-terminated and alive across the
    // call; `fs` is an open fs context.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            ptr(key),
            ptr(value),
            0,
        )
    };
    match r {
        r if r < 0 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// `fsmount(fs, FSMOUNT_CLOEXEC, attrs)`: the created file system, as a
/// mount attached nowhere.
fn fsmount(fs: BorrowedFd, attrs: libc::c_uint) -> std::io::Result<OwnedFd> {
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    // SAFETY: plain integers and `fs`, an open fs context; no memory of ours
    // is read or written.
    new_fd(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })
}

/// The fd a syscall returned, owned from here; its error if it failed.
fn new_fd(r: libc::c_long) -> std::io::Result<OwnedFd> {
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscalls passed here (fsopen, fsmount) return a new fd
    // installed for us alone: open, and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Opens once the container runs again. Writes of what was held wait for it,
/// so nothing but what did not fit is written while the container is frozen.
/// It opens on every path: thawed ([`Thawed::open`]), or abandoned.
#[derive(Clone, Default)]
pub struct Thawed(Arc<(Mutex<Option<bool>>, Condvar)>);

impl Thawed {
    /// Open from the start: nothing waits (pages written through).
    pub fn already() -> Thawed {
        let t = Thawed::default();
        t.open(true);
        t
    }

    /// Opens it: `thawed`, or abandoned (the checkpoint failed).
    pub fn open(&self, thawed: bool) {
        let (state, cv) = &*self.0;
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.get_or_insert(thawed);
        cv.notify_all();
    }

    pub fn is_open(&self) -> bool {
        self.0
             .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Blocks until it opens; `false` if the checkpoint was abandoned.
    pub fn wait(&self) -> bool {
        let (state, cv) = &*self.0;
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *s {
                Some(thawed) => return thawed,
                None => s = cv.wait(s).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// Opens its latch as abandoned when dropped, unless it was opened before:
/// no writer waits forever on a checkpoint that failed.
pub struct OpenOnDrop(pub Thawed);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latch_opens_once_and_wakes_its_waiters() {
        let t = Thawed::default();
        assert!(!t.is_open());
        let waiter = {
            let t = t.clone();
            std::thread::spawn(move || t.wait())
        };
        drop(OpenOnDrop(t.clone()));
        assert!(!waiter.join().unwrap(), "dropped: abandoned");
        t.open(true);
        assert!(!t.wait(), "the first opening stands");
        assert!(Thawed::already().wait());
    }

    #[test]
    fn a_memory_file_takes_a_pipe_and_gives_it_back_in_place() {
        let mut h = Hold::in_file(3 << 20).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let data: Vec<u8> = (0..(5 << 19)).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            std::io::Write::write_all(&mut std::fs::File::from(w), &sent).unwrap()
        });
        let (n, ended) = h.fill_from(&r).unwrap();
        writer.join().unwrap();
        assert_eq!((n, ended), (data.len(), true));
        let d = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(d.path().join("out")).unwrap();
        h.write_into(&out, 4096, n).unwrap();
        let back = std::fs::read(d.path().join("out")).unwrap();
        assert!(back[..4096].iter().all(|b| *b == 0) && back[4096..] == data[..]);
    }

    /// As root, the pages go to a tmpfs of their own, reachable only through
    /// the process's fds: not a memfd, and no mount anyone can see.
    #[test]
    fn pages_are_held_on_a_tmpfs_mounted_nowhere() {
        assert!(nix::unistd::geteuid().is_root(), "the tests run as root");
        let f = pages_file().unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        let link = link.to_string_lossy();
        assert!(!link.starts_with("/memfd:"), "{link}");
        let st = nix::sys::statfs::fstatfs(&f).unwrap();
        assert_eq!(st.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
        // The fd's mount id, as statx's STATX_MNT_ID gives it.
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd()));
        let mnt_id = fdinfo
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("mnt_id:").map(|v| v.trim().to_string()))
            .expect("fdinfo has mnt_id");
        let id = format!("{mnt_id} ");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.lines().any(|l| l.starts_with(&id)), "mounted: {id}");
        let root = detached_tmpfs().unwrap();
        let mode = nix::sys::stat::fstat(&root).unwrap().st_mode;
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_hold_takes_what_a_pipe_carries_and_says_when_it_is_full() {
        let mut h = Hold::new(1 << 20).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let data: Vec<u8> = (0..(3 << 19)).map(|i| (i % 253) as u8).collect();
            let mut f = std::fs::File::from(w);
            let _ = std::io::Write::write_all(&mut f, &data);
        });
        let (n, ended) = h.fill_from(&r).unwrap();
        assert_eq!((n, ended), (1 << 20, false), "the buffer fills first");
        assert!(h
            .as_mut_slice()
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 253) as u8));
        let mut rest = Hold::new(1 << 20).unwrap();
        let (n, ended) = rest.fill_from(&r).unwrap();
        writer.join().unwrap();
        assert!(ended && n == 1 << 19, "{n} {ended}");
        assert!(estimate(std::process::id() as i32).is_some_and(|n| n > 4 << 20));
    }
}
