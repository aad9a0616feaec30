//! Root-only file system primitives used wherever the shim writes: files are
//! new (never reused), never created through a symlink, and private from birth;
//! or in memory only.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Context, Result};

/// Creates a new file with `mode` (never follows or reuses an existing name).
pub fn create_new(path: &Path, mode: u32) -> Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ctx(|| format!("create {}", path.display()))
}

/// A fresh 0700 directory `<prefix>XXXXXX` in `parent`, removed when dropped.
pub fn private_tempdir(prefix: &str, parent: &Path) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .ctx(|| format!("create a private directory in {}", parent.display()))
}

/// What a file system has free for an unprivileged writer ([`free_space`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    pub bytes: u64,
    /// None where the file system does not count inodes (btrfs).
    pub inodes: Option<u64>,
}

/// The space and inodes `path`'s file system has free (statvfs), leaving out
/// the blocks it keeps for root.
pub fn free_space(path: &Path) -> Result<Free> {
    let s = nix::sys::statvfs::statvfs(path).ctx(|| format!("statvfs {}", path.display()))?;
    Ok(Free {
        bytes: (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64),
        inodes: (s.files() > 0).then_some(s.files_available() as u64),
    })
}

/// An unnamed file in memory (never on disk, gone with its last descriptor).
pub fn memfd(name: &std::ffi::CStr) -> Result<std::fs::File> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).ctx(|| "create a memory file".into())?;
    Ok(std::fs::File::from(fd))
}
