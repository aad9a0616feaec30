//! The node's background push slots: a counting semaphore of `n` lock files,
//! shared by every lazy restore's page source on the node.
//!
//! Each page source is a process of its own (`ckpt-shim lazy-serve`, started
//! by a `ckpt-runc create` and left to the runtime's shim), so the bound
//! cannot live in one process's memory. A slot is an exclusive `flock` on
//! one of `slot-0` … `slot-<n-1>` in a dir under the restore root: the kernel
//! drops it when its holder closes the file or dies, so a killed page source
//! never leaks one. Taking one never blocks: a page source without a slot goes
//! on serving its process's faults and asks again a little later
//! ([`RETRY`]), so faults never wait behind the bound.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Context, Result};

/// The slots' dir under the restore root (a dot name: never taken for a
/// restore, nor collected as one).
pub const DIR: &str = ".push-slots";

/// How often a page source without a slot asks again, between faults.
pub const RETRY: Duration = Duration::from_millis(10);

/// The node's slots, `n` of them in `dir`.
#[derive(Debug, Clone)]
pub struct Slots {
    dir: PathBuf,
    n: usize,
}

/// A slot held: background pushing may go on while it lives.
#[derive(Debug)]
pub struct Slot(Option<Flock<File>>);

impl Slot {
    /// Leave to push where nothing is bounded (a full restore).
    pub fn unbounded() -> Slot {
        Slot(None)
    }

    /// Whether it holds one of the node's slots.
    pub fn held(&self) -> bool {
        self.0.is_some()
    }
}

impl Slots {
    /// The slots under the restore root `root` (a restore dir's parent).
    pub fn under(root: &Path, n: usize) -> Slots {
        Slots {
            dir: root.join(DIR),
            n: n.max(1),
        }
    }

    /// One per two CPUs (at least one): background pushes then leave the
    /// node's other CPUs to the restored processes and their faults.
    pub fn default_count() -> usize {
        std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
    }

    pub fn count(&self) -> usize {
        self.n
    }

    /// A free slot, if there is one now; never waits.
    pub fn try_take(&self) -> Result<Option<Slot>> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .ctx(|| format!("create {}", self.dir.display()))?;
        for i in 0..self.n {
            let path = self.dir.join(format!("slot-{i}"));
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .ctx(|| format!("open {}", path.display()))?;
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Some(Slot(Some(lock)))),
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(e).ctx(|| format!("lock {}", path.display())),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_more_slots_are_held_than_there_are_and_a_dropped_one_is_free_again() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::under(root.path(), 2);
        let a = slots.try_take().unwrap().expect("first");
        let b = slots.try_take().unwrap().expect("second");
        assert!(slots.try_take().unwrap().is_none(), "a third of two");
        // Another process's view (another open file description): the same.
        let other = Slots::under(root.path(), 2);
        assert!(other.try_take().unwrap().is_none());
        drop(a);
        let c = other.try_take().unwrap().expect("freed by the drop");
        assert!(slots.try_take().unwrap().is_none());
        drop((b, c));
        assert!(Slots::under(root.path(), 0).try_take().unwrap().is_some());
        assert!(Slots::default_count() >= 1);
    }
}
