//! Memory that holds the pages during the pause.
//!
//! While the container is frozen, CRIU can go no faster than the streamer reads
//! its pipes. Writing the pages into the archive's page cache runs at about 2.5
//! GB/s here, because every page of the file is allocated on the way; copying
//! them into memory that is already faulted in runs several times faster. So
//! before the freeze, the shim faults in a buffer as large as the container's
//! memory (within a budget), reads the pages image into it while CRIU is held,
//! and writes it into the archive after the container runs again. What does
//! not fit goes straight to the archive, as without a buffer.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::error::{Context, Result};

/// Faulted-in anonymous memory, unmapped when dropped.
pub struct Hold {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and used by one thread at a time.
unsafe impl Send for Hold {}

impl Hold {
    /// Maps and faults in `len` bytes (huge pages where the kernel gives them).
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
            ptr: ptr.cast(),
            len,
        };
        // SAFETY: advice on our own mapping; huge pages fault in faster.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: as above; fails only if memory cannot be had, then we give up.
        if unsafe { libc::madvise(ptr, len, MADV_POPULATE_WRITE) } != 0 {
            return Err(std::io::Error::last_os_error())
                .ctx(|| format!("fault in {len} bytes to hold pages"));
        }
        Ok(hold)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and ours.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Reads `pipe` into the buffer until it ends or the buffer is full;
    /// returns how much was read and whether the pipe ended.
    pub fn fill_from(&mut self, pipe: &OwnedFd) -> std::io::Result<(usize, bool)> {
        let buf = self.as_mut_slice();
        let mut filled = 0;
        while filled < buf.len() {
            // SAFETY: reading into our own buffer, within its length.
            let n = unsafe {
                libc::read(
                    pipe.as_raw_fd(),
                    buf[filled..].as_mut_ptr().cast(),
                    buf.len() - filled,
                )
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
}

impl Drop for Hold {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// How much memory to hold for `pid`'s container: its anonymous and shared
/// memory (what CRIU writes as pages) plus a margin, within `budget` and a
/// quarter of the memory available now. `None` if that is nothing.
pub fn size_for(pid: i32, budget: u64) -> Option<usize> {
    let need = container_memory(pid)?.saturating_add(4 << 20) / 16 * 17;
    let available = meminfo("MemAvailable:").unwrap_or(0) / 4;
    let len = need.min(budget).min(available) & !0xfff;
    (len > 0).then_some(len as usize)
}

/// Anonymous plus shared memory of `pid`'s memory cgroup (v1 `total_rss` and
/// `total_shmem`, or v2 `anon` and `shmem`).
fn container_memory(pid: i32) -> Option<u64> {
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
    let read = |dir: &Path, keys: &[&str]| -> Option<u64> {
        let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
        Some(
            stat.lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(k, _)| keys.contains(k))
                .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                .sum(),
        )
    };
    match (v1, v2) {
        (Some(p), _) => read(
            &Path::new("/sys/fs/cgroup/memory").join(p.trim_start_matches('/')),
            &["total_rss", "total_shmem"],
        ),
        (None, Some(p)) => read(
            &cgroup2_root()?.join(p.trim_start_matches('/')),
            &["anon", "shmem"],
        ),
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

fn meminfo(key: &str) -> Option<u64> {
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
        assert!(size_for(std::process::id() as i32, 1 << 40).is_some());
        assert_eq!(size_for(std::process::id() as i32, 0), None);
    }
}
