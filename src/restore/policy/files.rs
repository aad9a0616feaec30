//! Files CRIU would create or open from the images:
//!
//! - ghost files (deleted files still open, recreated with `mknod` from
//!   `ghost-file-<id>.img`): only regular files, directories and symlinks,
//!   with no set-user-ID or set-group-ID bit on a file. A device node would
//!   be one the spec's device list never had; a set-ID file, a way back to
//!   the privileges the checks took away.
//! - terminals (`tty-info.img`): pseudo-terminals and the runtime's console
//!   only, never the host's console, a virtual or a serial terminal.
//! - tmpfs contents (`tmpfs-dev-<mnt>.tar.gz.img`, which CRIU unpacks into a
//!   restored tmpfs such as /dev): device nodes only from the spec's list
//!   (and runc's own), no set-ID files, no more than [`MAX_TMPFS_MEMBERS`].

use super::creds::privilege;
use super::images::{bad, Images};
use super::spec::Allowed;
use crate::error::Result;

/// Far more than any /dev holds; a bigger tmpfs image is refused unread.
pub const MAX_TMPFS_MEMBERS: usize = 100_000;

const S_IFMT: u32 = 0o170000;
const FILE_TYPES: [u32; 3] = [0o100000, 0o040000, 0o120000];
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IFREG: u32 = 0o100000;

/// PTY, CTTY (a session's terminal) and EXT_TTY (the runtime's console).
const TTY_TYPES: [u32; 3] = [1, 4, 5];

pub fn check(images: &Images, a: &Allowed) -> Result<()> {
    for name in &images.tmpfs {
        tmpfs(&images.dir.join(name), name, a)?;
    }
    for (name, g) in &images.ghosts {
        let kind = g.mode & S_IFMT;
        if !FILE_TYPES.contains(&kind) {
            return Err(privilege(
                name,
                "ghost file type",
                format!("{kind:o}"),
                "a regular file, directory or symlink",
            ));
        }
        if kind == S_IFREG && g.mode & (S_ISUID | S_ISGID) != 0 {
            return Err(privilege(
                name,
                "ghost file mode",
                format!("{:o}", g.mode & 0o7777),
                "no set-ID bits",
            ));
        }
    }
    for t in &images.ttys {
        if !TTY_TYPES.contains(&t.r#type) {
            return Err(privilege(
                "tty-info.img",
                "terminal type",
                t.r#type,
                "a pseudo-terminal or the runtime's console",
            ));
        }
    }
    Ok(())
}

/// One tmpfs image: a gzipped tar, read member by member.
fn tmpfs(path: &std::path::Path, name: &str, a: &Allowed) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| bad(name, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for (i, entry) in tar.entries().map_err(|e| bad(name, e))?.enumerate() {
        if i >= MAX_TMPFS_MEMBERS {
            return Err(bad(name, format!("more than {MAX_TMPFS_MEMBERS} members")));
        }
        let entry = entry.map_err(|e| bad(name, e))?;
        let h = entry.header();
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = match h.entry_type() {
            tar::EntryType::Char => Some('c'),
            tar::EntryType::Block => Some('b'),
            _ => None,
        };
        if let Some(kind) = kind {
            let dev = (
                kind,
                h.device_major().ok().flatten().unwrap_or(0) as u64,
                h.device_minor().ok().flatten().unwrap_or(0) as u64,
            );
            if !a.devices.contains(&dev) {
                return Err(privilege(
                    name,
                    "device node",
                    format!("{path} ({}:{})", dev.1, dev.2),
                    "the spec's devices",
                ));
            }
        }
        let mode = h.mode().map_err(|e| bad(name, e))?;
        if h.entry_type().is_file() && mode & (S_ISUID | S_ISGID) != 0 {
            return Err(privilege(
                name,
                "file mode",
                format!("{path} {:o}", mode & 0o7777),
                "no set-ID bits",
            ));
        }
    }
    Ok(())
}
