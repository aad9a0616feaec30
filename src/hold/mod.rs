//! Memory that holds the pages during the pause, so the pause never waits
//! for the disk.
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

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

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
    Buffer { ptr: *mut u8, len: usize },
    /// A memory file ([`pages_file`]) the pipe is spliced into, up to `cap`
    /// bytes. Nothing is faulted in first: a full page written into a memory
    /// file is allocated but never zeroed, and it is not dirty page cache, so
    /// no writeback throttles it. Faulting in a buffer first cost about 0.5 s
    /// per GiB here before the checkpoint could start, for a pause no shorter.
    File { file: std::fs::File, cap: usize },
}

// SAFETY: the mapping is owned by this value and used by one thread at a time.
unsafe impl Send for Hold {}

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
        // SAFETY: a fresh private anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .ctx(|| format!("map {len} bytes to hold pages"));
        }
        let hold = Hold {
            mem: Mem::Buffer {
                ptr: ptr.cast(),
                len,
            },
            _reservation: Reservation::default(),
        };
        // No MADV_HUGEPAGE: huge pages come from free 2 MiB blocks, which are
        // what a VM balloon with free page reporting has handed back to the
        // host, so touching them first costs 1-3 s per GiB here (against 0.5 s
        // for small pages taken from what the guest kept), and varies 10×.
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: as above; fails only if memory cannot be had, then we give up.
        if unsafe { libc::madvise(ptr, len, MADV_POPULATE_WRITE) } != 0 {
            return Err(std::io::Error::last_os_error())
                .ctx(|| format!("fault in {len} bytes to hold pages"));
        }
        Ok(hold)
    }

    pub fn len(&self) -> usize {
        match &self.mem {
            Mem::Buffer { len, .. } => *len,
            Mem::File { cap, .. } => *cap,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer; empty for a memory file.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &self.mem {
            // SAFETY: the mapping is `len` bytes, readable and writable, and ours.
            Mem::Buffer { ptr, len } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
            Mem::File { .. } => &mut [],
        }
    }

    /// Takes what `pipe` carries until it ends or the hold is full; returns
    /// how much was taken and whether the pipe ended.
    pub fn fill_from(&mut self, pipe: &OwnedFd) -> std::io::Result<(usize, bool)> {
        let cap = self.len();
        let file_fd = match &self.mem {
            Mem::File { file, .. } => Some(file.as_raw_fd()),
            Mem::Buffer { .. } => None,
        };
        let buf = self.as_mut_slice();
        let mut filled = 0;
        while filled < cap {
            let n = match file_fd {
                // SAFETY: both fds are open; the offset is a local the kernel advances.
                Some(fd) => unsafe {
                    let mut off = filled as i64;
                    libc::splice(
                        pipe.as_raw_fd(),
                        std::ptr::null_mut(),
                        fd,
                        &mut off,
                        (cap - filled).min(1 << 20),
                        libc::SPLICE_F_MOVE,
                    )
                },
                // SAFETY: reading into our own buffer, within its length.
                None => unsafe {
                    libc::read(
                        pipe.as_raw_fd(),
                        buf[filled..].as_mut_ptr().cast(),
                        cap - filled,
                    )
                },
            };
            match n {
                0 => return Ok((filled, true)),
                n if n > 0 => filled += n as usize,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
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
            match &self.mem {
                Mem::Buffer { ptr, .. } => {
                    // SAFETY: within the buffer's own length.
                    let chunk = unsafe { std::slice::from_raw_parts(ptr.add(done), n) };
                    file.write_all_at(chunk, at + done as u64)?;
                    // SAFETY: whole pages of our own mapping (CHUNK is a multiple
                    // of the page size), written already and never read again.
                    unsafe { libc::madvise(ptr.add(done).cast(), n & !0xfff, libc::MADV_DONTNEED) };
                }
                Mem::File { file: mem, .. } => {
                    send_range(mem, done as u64, file, at + done as u64, n)?;
                    // SAFETY: a range of our own memory file, written already.
                    unsafe {
                        libc::fallocate(
                            mem.as_raw_fd(),
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            done as i64,
                            n as i64,
                        )
                    };
                }
            }
            // Writeback starts now, behind the next chunk's copy, rather than
            // all at once in the archive's final fdatasync.
            // SAFETY: a hint on a range of a file we hold open.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    (at + done as u64) as i64,
                    n as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            done += n;
        }
        Ok(())
    }
}

/// The chunks held data is written out in, each given back once written.
const CHUNK: usize = 32 << 20;

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
        // SAFETY: both fds are open; `off` is a local the kernel advances.
        let n = unsafe { libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), &mut off, want) };
        match n {
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            n if n > 0 => {}
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Mem::Buffer { ptr, len } = self.mem {
            // SAFETY: unmapping exactly what `new` mapped.
            unsafe { libc::munmap(ptr.cast(), len) };
        }
    }
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
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (v1, v2) = cgroups.lines().fold((None, None), |(v1, v2), l| {
        let mut p = l.splitn(3, ':');
        let (_, ctl, path) = (
            p.next(),
            p.next().unwrap_or(""),
            p.next().unwrap_or("").to_string(),
        );
        match ctl {
            c if c.split(',').any(|c| c == "memory") => (Some(path), v2),
            "" => (v1, Some(path)),
            _ => (v1, v2),
        }
    });
    match (v1, v2) {
        (Some(p), _) => Some((
            Path::new("/sys/fs/cgroup/memory").join(p.trim_start_matches('/')),
            false,
        )),
        (None, Some(p)) => Some((cgroup2_root()?.join(p.trim_start_matches('/')), true)),
        _ => None,
    }
}

fn cgroup2_root() -> Option<std::path::PathBuf> {
    crate::mountinfo::read(std::process::id() as i32)
        .ok()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

/// An unnamed file in memory for a pages image: on a tmpfs of its own
/// ([`detached_tmpfs`]) where one can be had, else a memfd.
fn pages_file() -> Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let root = match detached_tmpfs() {
        Ok(root) => root,
        Err(e) => {
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!("holding pages in memfds: no tmpfs of our own: {e}");
            }
            return memfd(c"ckpt-shim-pages");
        }
    };
    let flags = libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path relative to the mount's root fd.
    let fd = unsafe { libc::openat(root.as_raw_fd(), c".".as_ptr(), flags, 0o600) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .ctx(|| "an unnamed file on the hold's tmpfs".into());
    }
    // SAFETY: just opened, owned by the File from here. The mount lives as
    // long as the file; the root's fd closes here.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
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
    use std::os::fd::FromRawFd;
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const ATTRS: libc::c_uint = 0x2 | 0x4 | 0x8; // MOUNT_ATTR_NOSUID | NODEV | NOEXEC
    let check = |r: libc::c_long| match r {
        r if r < 0 => Err(std::io::Error::last_os_error()),
        r => Ok(r as i32),
    };
    // SAFETY: fsopen with a NUL-terminated name; the fd is owned from here.
    let fs = unsafe {
        OwnedFd::from_raw_fd(check(libc::syscall(
            libc::SYS_fsopen,
            c"tmpfs".as_ptr(),
            FSOPEN_CLOEXEC,
        ))?)
    };
    // Its size is the hold budget's to limit (0: tmpfs sets none of its own).
    for (key, value) in [
        (c"huge", c"within_size"),
        (c"mode", c"0700"),
        (c"size", c"0"),
    ] {
        // SAFETY: NUL-terminated key and value on our fs context fd.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        })?;
    }
    // SAFETY: as above, no key or value.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })?;
    // SAFETY: fsmount of our created context; the mount fd is owned from here.
    let mnt =
        check(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, ATTRS) })?;
    // SAFETY: just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(mnt) })
}

/// An unnamed file in memory (what a frozen container's data is held in).
pub fn memfd(name: &std::ffi::CStr) -> Result<std::fs::File> {
    // SAFETY: a NUL-terminated name; the fd returned is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| "create a memory file".into());
    }
    // SAFETY: just opened, owned by the File from here.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
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

pub(crate) fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
                .map(|k| k * 1024)
        })
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
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs into our own struct, on our own fd.
        assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) }, 0);
        assert_eq!(st.f_type, libc::TMPFS_MAGIC);
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        let (empty, mnt_id) = (libc::AT_EMPTY_PATH, libc::STATX_MNT_ID);
        // SAFETY: statx of our own fd into our own struct.
        assert_eq!(
            unsafe { libc::statx(f.as_raw_fd(), c"".as_ptr(), empty, mnt_id, &mut stx) },
            0
        );
        let id = format!("{} ", stx.stx_mnt_id);
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
