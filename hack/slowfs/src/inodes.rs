//! The kernel's inode numbers and what they stand for: an `O_PATH` descriptor
//! of the backing file, held while the kernel remembers the number. A
//! descriptor, not a path, so renames and hard links need no bookkeeping, and
//! the backing inode (hence its number) cannot be reused while it is known.
//! Open file and directory handles are kept here too.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{Errno, INodeNo};

/// A backing file's identity: device and inode number.
pub type Key = (u64, u64);

struct Node {
    fd: Arc<OwnedFd>,
    key: Key,
    lookups: u64,
}

pub struct Inodes {
    table: Mutex<Table>,
}

struct Table {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<Key, u64>,
    next: u64,
}

impl Inodes {
    /// The table with the backing directory as the root (never forgotten).
    pub fn new(root: OwnedFd, key: Key) -> Inodes {
        let root_ino = INodeNo::ROOT.0;
        let mut t = Table {
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            next: root_ino + 1,
        };
        let fd = Arc::new(root);
        t.nodes.insert(
            root_ino,
            Node {
                fd,
                key,
                lookups: u64::MAX / 2,
            },
        );
        t.by_key.insert(key, root_ino);
        Inodes {
            table: Mutex::new(t),
        }
    }

    /// The descriptor behind `ino`; ESTALE for a number the kernel forgot.
    pub fn fd(&self, ino: INodeNo) -> Result<Arc<OwnedFd>, Errno> {
        let t = self.table.lock().unwrap();
        t.nodes
            .get(&ino.0)
            .map(|n| n.fd.clone())
            .ok_or(Errno::ESTALE)
    }

    /// Counts one more lookup of the file `fd` opens: its number, the one it
    /// already had if the kernel knows it.
    pub fn remember(&self, fd: OwnedFd, key: Key) -> u64 {
        let mut t = self.table.lock().unwrap();
        if let Some(&ino) = t.by_key.get(&key) {
            t.nodes.get_mut(&ino).expect("indexed").lookups += 1;
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        let fd = Arc::new(fd);
        t.nodes.insert(
            ino,
            Node {
                fd,
                key,
                lookups: 1,
            },
        );
        t.by_key.insert(key, ino);
        ino
    }

    /// The kernel forgets `n` lookups of `ino`: its descriptor closes at zero.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut t = self.table.lock().unwrap();
        let Some(node) = t.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let key = node.key;
            t.nodes.remove(&ino);
            t.by_key.remove(&key);
        }
    }
}

/// Open files or directories by handle number.
pub struct Handles<T> {
    map: Mutex<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Handles<T> {
    pub fn new() -> Handles<T> {
        Handles {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    pub fn insert(&self, v: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.lock().unwrap().insert(fh, Arc::new(v));
        fh
    }

    pub fn get(&self, fh: u64) -> Result<Arc<T>, Errno> {
        self.map
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    pub fn remove(&self, fh: u64) {
        self.map.lock().unwrap().remove(&fh);
    }
}
