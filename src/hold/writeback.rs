//! Whether writing a frozen container's pages through would reach the disk
//! while it is frozen: what "auto" holds for.
//!
//! Written through, the pages go into the archive's page cache, which is a
//! copy into memory for as long as the kernel neither starts writing back
//! nor throttles the writer. Holding costs a second copy: into a memory file
//! while frozen, then into the page cache once thawed. On a fast idle disk
//! that made the total 2.5-3× writing through, for a pause 1.3× longer
//! (README, "Pages held during the pause"). So auto holds only where writing
//! through would meet the disk:
//! - the archive's device is strictly limited (`strict_limit` on its bdi, as
//!   FUSE sets): its writers are throttled to a small share of the dirty
//!   limit, the slow-disk case;
//! - or the container's pages, on top of what is dirty or under writeback
//!   now, would pass the background dirty threshold. There the kernel starts
//!   writing back, so the disk is busy while the container is frozen; a
//!   little past it (the free-run point, halfway to the hard limit) it
//!   throttles the writer to the disk's speed, and the pause with it.

use std::path::{Path, PathBuf};

/// The figures the rule reads, in bytes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Node {
    /// `Dirty` + `Writeback` now.
    pub dirty: u64,
    /// What the dirty limits are a share of: free memory and the file LRUs.
    pub dirtyable: u64,
    /// `vm.dirty_background_bytes` and `_ratio`, `vm.dirty_bytes` and `_ratio`.
    pub background: (u64, u64),
    pub limit: (u64, u64),
}

impl Node {
    pub fn now() -> Node {
        let m = |k| super::meminfo(k).unwrap_or(0);
        let vm = |k: &str| {
            std::fs::read_to_string(format!("/proc/sys/vm/{k}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        Node {
            dirty: m("Dirty:") + m("Writeback:"),
            dirtyable: m("MemFree:") + m("Active(file):") + m("Inactive(file):"),
            background: (vm("dirty_background_bytes"), vm("dirty_background_ratio")),
            limit: (vm("dirty_bytes"), vm("dirty_ratio")),
        }
    }

    /// The background threshold, as the kernel works it out: bytes if set,
    /// else a ratio of the dirtyable memory, and never above half the limit.
    pub fn background_threshold(&self) -> u64 {
        let of = |(bytes, ratio): (u64, u64)| match bytes {
            0 => self.dirtyable / 100 * ratio,
            b => b,
        };
        let (bg, limit) = (of(self.background), of(self.limit));
        if bg >= limit {
            limit / 2
        } else {
            bg
        }
    }
}

impl Node {
    /// How much more the page cache takes before the background threshold.
    pub fn headroom(&self) -> u64 {
        self.background_threshold().saturating_sub(self.dirty)
    }
}

/// Why `bytes` written while frozen into files under `dirs` would meet the
/// disk, or `None` if the page cache takes them as memory.
pub fn would_meet_disk(dirs: &[&Path], bytes: u64, node: &Node) -> Option<String> {
    if let Some(d) = dirs.iter().find(|d| strictly_limited(d)) {
        return Some(format!(
            "{} is on a device whose writers are strictly limited",
            d.display()
        ));
    }
    let bg = node.background_threshold();
    (node.dirty + bytes > bg).then(|| {
        format!(
            "{} MiB on top of {} MiB dirty would pass the background writeback threshold ({} MiB)",
            bytes >> 20,
            node.dirty >> 20,
            bg >> 20
        )
    })
}

/// Is `dir`'s device's bdi in strict-limit mode (or, before the kernel
/// showed that, given less than the whole dirty limit)?
fn strictly_limited(dir: &Path) -> bool {
    let Some(bdi) = bdi_of(dir) else {
        return false;
    };
    let read = |f: &str| std::fs::read_to_string(bdi.join(f)).ok();
    match read("strict_limit") {
        Some(s) => s.trim() == "1",
        None => read("max_ratio").is_some_and(|r| r.trim().parse::<u32>().is_ok_and(|r| r < 100)),
    }
}

/// The sysfs dir of the bdi that `dir`'s file system writes back through: a
/// block device's (a partition's is its disk's), or one a file system
/// registered under its own device number (FUSE).
fn bdi_of(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let id = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let block = Path::new("/sys/dev/block").join(&id);
    [
        block.join("bdi"),
        block.join("../bdi"),
        Path::new("/sys/class/bdi").join(&id),
    ]
    .into_iter()
    .find_map(|p| p.canonicalize().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(dirty: u64) -> Node {
        Node {
            dirty,
            dirtyable: 22 * GIB,
            background: (0, 10),
            limit: (0, 20),
        }
    }

    #[test]
    fn the_background_threshold_is_worked_out_as_the_kernel_does() {
        assert_eq!(node(0).background_threshold(), 22 * GIB / 100 * 10);
        let bytes = Node {
            background: (GIB, 10),
            ..node(0)
        };
        assert_eq!(bytes.background_threshold(), GIB);
        let above = Node {
            background: (0, 30),
            ..node(0)
        };
        assert_eq!(above.background_threshold(), 22 * GIB / 100 * 20 / 2);
    }

    #[test]
    fn pages_that_would_pass_the_background_threshold_meet_the_disk() {
        let here = [Path::new("/")];
        assert_eq!(would_meet_disk(&here, GIB, &node(0)), None);
        let why = would_meet_disk(&here, GIB, &node(GIB + GIB / 2)).unwrap();
        assert!(why.contains("1024 MiB on top of 1536 MiB dirty"), "{why}");
        assert!(would_meet_disk(&here, 3 * GIB, &node(0)).is_some());
    }

    #[test]
    fn the_root_disk_has_a_bdi_that_is_not_strictly_limited() {
        assert!(bdi_of(Path::new("/")).is_some() || bdi_of(Path::new("/var/tmp")).is_some());
        assert!(!strictly_limited(Path::new("/")));
    }
}
