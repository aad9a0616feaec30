//! Where a CRI restore keeps its checkpoint from CreateContainer to
//! StartContainer: `<root>/<container id>/`, root-only from creation, holding the
//! extracted archive (CRIU's images in `checkpoint/`, `rootfs-diff.tar`,
//! `deleted.files`, …), `restore.json` (where it came from), `work/` (the
//! restore's log) and, between the runtime's create and start, the `restored`
//! mark. The runc entry ([`super::runc`]) finds it by the container's ID, which
//! is why the node's shim and its runc entry must agree on `<root>`: the shim's
//! `restore_dir` and the runtime's `CKPT_SHIM_RESTORE_DIR`, both
//! [`DEFAULT_ROOT`] unless set.

use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};

pub const DEFAULT_ROOT: &str = "/var/lib/ckpt-shim/restore";
pub const ROOT_ENV: &str = "CKPT_SHIM_RESTORE_DIR";
const STAGING_PREFIX: &str = ".staging-";
const INFO: &str = "restore.json";
const RESTORED_MARK: &str = "restored";

/// The restore root the runc entry uses: `$CKPT_SHIM_RESTORE_DIR`, or the default.
pub fn root_from_env() -> PathBuf {
    std::env::var_os(ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_ROOT.into())
}

/// Where the restored container came from, as `ContainerStatus` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RestoreInfo {
    /// The archive's path, or the checkpoint image's name.
    pub source: String,
    pub checkpointed_id: String,
    pub checkpointed_name: String,
    pub checkpointed_at: String,
    /// The restore policy the shim ran at CreateContainer; the runtime's
    /// create applies the same (enforced when unreadable).
    #[serde(default)]
    pub policy: super::policy::Mode,
}

/// A restore being prepared: a private dir under the root, renamed to the
/// container's ID once the runtime has created the container, and removed with
/// everything in it if that never happens.
pub struct Staging(tempfile::TempDir);

impl Staging {
    pub fn new(root: &Path) -> Result<Staging> {
        ensure_root(root)?;
        let dir = crate::safefs::private_tempdir(STAGING_PREFIX, root)?;
        Ok(Staging(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Files the restore under the container's ID.
    pub fn commit(self, root: &Path, id: &str, info: &RestoreInfo) -> Result<Staged> {
        if !valid_id(id) {
            return Err(Error::Other(format!(
                "the runtime gave a container ID {id:?} that is not a plain name"
            )));
        }
        let info_json = serde_json::to_vec_pretty(info).expect("plain struct serialises");
        crate::safefs::create_new(&self.path().join(INFO), 0o600)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &info_json).ctx(|| INFO.into()))?;
        let dir = root.join(id);
        std::fs::rename(self.path(), &dir)
            .ctx(|| format!("file the restore as {}", dir.display()))?;
        let _ = self.0.keep();
        Ok(Staged { dir })
    }
}

/// A container's restore, filed under its ID.
#[derive(Debug, Clone)]
pub struct Staged {
    pub dir: PathBuf,
}

impl Staged {
    pub fn find(root: &Path, id: &str) -> Option<Staged> {
        let dir = root.join(id);
        (valid_id(id) && dir.join(INFO).is_file()).then_some(Staged { dir })
    }

    pub fn images(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    /// Whether the images are still here, waiting for the container to start.
    pub fn pending(&self) -> bool {
        self.images().join("inventory.img").is_file()
    }

    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    /// A served restore's page source's log (its stderr), in the work dir.
    pub fn lazy_log(&self) -> PathBuf {
        self.work().join("lazy-serve.log")
    }

    pub fn info(&self) -> Option<RestoreInfo> {
        serde_json::from_slice(&std::fs::read(self.dir.join(INFO)).ok()?).ok()
    }

    /// Notes that the runtime's create restored the container, so that its
    /// start has nothing left to do.
    pub fn mark_restored(&self) -> Result<()> {
        crate::safefs::create_new(&self.dir.join(RESTORED_MARK), 0o600).map(drop)
    }

    /// Takes the mark [`mark_restored`](Self::mark_restored) left, if it is there.
    pub fn take_restored_mark(&self) -> bool {
        std::fs::remove_file(self.dir.join(RESTORED_MARK)).is_ok()
    }

    /// Removes what only the restore needed (CRIU's images, the file changes),
    /// keeping `restore.json` and the restore's log for as long as the container.
    pub fn drop_images(&self) {
        for name in ["checkpoint", "rootfs-diff.tar", "deleted.files"] {
            let p = self.dir.join(name);
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// IDs of the containers restored under `root`.
pub fn restored_ids(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| Staged::find(root, id).is_some())
        .collect()
}

/// Removes unfinished stagings and the restores of containers that are gone
/// (`live`: the runtime's container IDs). Returns how many it removed.
pub fn collect_garbage(root: &Path, live: &HashSet<String>) -> usize {
    let mut removed = 0;
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with(STAGING_PREFIX) || (valid_id(&name) && !live.contains(&name));
        if stale && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn ensure_root(root: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .ctx(|| format!("create {}", root.display()))
}

/// A container ID usable as one path component.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staging_is_filed_by_id_and_collected_when_its_container_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let s = Staging::new(root.path()).unwrap();
        std::fs::create_dir(s.path().join("checkpoint")).unwrap();
        std::fs::write(s.path().join("checkpoint/inventory.img"), "i").unwrap();
        let info = RestoreInfo {
            source: "/a.tar".into(),
            ..Default::default()
        };
        assert!(Staging::new(root.path())
            .unwrap()
            .commit(root.path(), "../x", &info)
            .is_err());
        let st = s.commit(root.path(), "abc123", &info).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&st.dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let found = Staged::find(root.path(), "abc123").unwrap();
        assert!(found.pending());
        assert_eq!(found.info().unwrap().source, "/a.tar");
        assert!(!found.take_restored_mark());
        found.mark_restored().unwrap();
        assert!(found.take_restored_mark() && !found.take_restored_mark());
        found.drop_images();
        assert!(!found.pending() && found.info().is_some());
        assert_eq!(restored_ids(root.path()), ["abc123"]);
        // A crash mid-CreateContainer leaves a staging; a removed container, its restore.
        let crashed = Staging::new(root.path()).unwrap();
        let _ = crashed.0.keep();
        assert_eq!(
            collect_garbage(root.path(), &HashSet::from(["abc123".to_string()])),
            1
        );
        assert_eq!(collect_garbage(root.path(), &HashSet::new()), 1);
        assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
    }
}
