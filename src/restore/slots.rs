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
//!
//! Restores come before any background push: each `ckpt-runc create` holds a
//! shared `flock` on `restoring` in the same dir while it restores
//! ([`restoring`]), and a slot's holder copies nothing while one does
//! ([`Slots::restore_in_flight`]). A nice value cannot do this: with
//! autogroups, a page source's niceness counts only against its own session.

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
/// The lock file restores in flight hold shared.
const RESTORING: &str = "restoring";

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

/// A restore in flight on the node, until dropped.
#[derive(Debug)]
pub struct Restoring(#[allow(dead_code)] Flock<File>);

/// Marks a restore under the restore root `root` in flight, for as long as
/// the value lives; waits only for a page source's instant check.
pub fn restoring(root: &Path) -> Result<Restoring> {
    let path = root.join(DIR).join(RESTORING);
    Flock::lock(open_lock(&path)?, FlockArg::LockShared)
        .map(Restoring)
        .map_err(|(_, e)| e)
        .ctx(|| format!("lock {}", path.display()))
}

/// `path` opened for a lock, its dir made first (root-only).
fn open_lock(path: &Path) -> Result<File> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx(|| format!("create {}", dir.display()))?;
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("open {}", path.display()))
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
        for i in 0..self.n {
            let path = self.dir.join(format!("slot-{i}"));
            match Flock::lock(open_lock(&path)?, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Some(Slot(Some(lock)))),
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(e).ctx(|| format!("lock {}", path.display())),
            }
        }
        Ok(None)
    }

    /// Whether a restore is in flight on the node now ([`restoring`]): the
    /// lock is free only when none is, and is let go again at once.
    pub fn restore_in_flight(&self) -> Result<bool> {
        let path = self.dir.join(RESTORING);
        match Flock::lock(open_lock(&path)?, FlockArg::LockExclusiveNonblock) {
            Ok(_) => Ok(false),
            Err((_, Errno::EWOULDBLOCK)) => Ok(true),
            Err((_, e)) => Err(e).ctx(|| format!("lock {}", path.display())),
        }
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

    #[test]
    fn a_restore_is_in_flight_while_any_holds_the_mark_and_not_after() {
        let root = tempfile::tempdir().unwrap();
        let slots = Slots::under(root.path(), 1);
        assert!(!slots.restore_in_flight().unwrap());
        let a = restoring(root.path()).unwrap();
        let b = restoring(root.path()).unwrap();
        assert!(slots.restore_in_flight().unwrap());
        drop(a);
        assert!(slots.restore_in_flight().unwrap(), "b still restores");
        drop(b);
        assert!(!slots.restore_in_flight().unwrap());
        // The check let its lock go: a restore may start at once.
        let _c = restoring(root.path()).unwrap();
        assert!(slots.restore_in_flight().unwrap());
    }
}
