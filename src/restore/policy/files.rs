//! Files CRIU would create or open from the images:
//!
//! - ghost files (deleted files still open, recreated with `mknod` from
//!   `ghost-file-<id>.img`): only regular files, directories and symlinks,
//!   with no set-user-ID or set-group-ID bit on a file. A device node would
//!   be one the spec's device list never had; a set-ID file, a way back to
//!   the privileges the checks took away.
//! - terminals (`tty-info.img`): pseudo-terminals and the runtime's console
//!   only, never the host's console, a virtual or a serial terminal.

use super::creds::privilege;
use super::images::Images;
use crate::error::Result;

const S_IFMT: u32 = 0o170000;
const FILE_TYPES: [u32; 3] = [0o100000, 0o040000, 0o120000];
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IFREG: u32 = 0o100000;

/// PTY, CTTY (a session's terminal) and EXT_TTY (the runtime's console).
const TTY_TYPES: [u32; 3] = [1, 4, 5];

pub fn check(images: &Images) -> Result<()> {
    for (name, g) in &images.ghosts {
        let kind = g.mode & S_IFMT;
        if !FILE_TYPES.contains(&kind) {
            return Err(privilege(name, "ghost file type", format!("{kind:o}"), "a regular file, directory or symlink"));
        }
        if kind == S_IFREG && g.mode & (S_ISUID | S_ISGID) != 0 {
            return Err(privilege(name, "ghost file mode", format!("{:o}", g.mode & 0o7777), "no set-ID bits"));
        }
    }
    for t in &images.ttys {
        if !TTY_TYPES.contains(&t.r#type) {
            return Err(privilege("tty-info.img", "terminal type", t.r#type, "a pseudo-terminal or the runtime's console"));
        }
    }
    Ok(())
}
