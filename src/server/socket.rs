//! The listening socket: root-owned, 0660, in a 0750 directory; a stale socket
//! is replaced, a live one (another shim) or anything else is never touched.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::error::{Context, Error, Result};

pub fn bind(path: &Path) -> Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| Error::InvalidArgument(format!("bad socket path {}", path.display())))?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .ctx(|| format!("create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::AlreadyExists(path.to_path_buf()));
            }
            std::fs::remove_file(path).ctx(|| format!("remove stale socket {}", path.display()))?;
        }
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "{} exists and is not a socket",
                path.display()
            )))
        }
        Err(_) => {}
    }
    // Bind under a temporary name, restrict it, then move it into place, so the
    // socket is never reachable with looser permissions.
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("sock"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).ctx(|| format!("bind {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
        .ctx(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("move socket to {}", path.display()))?;
    Ok(listener)
}
