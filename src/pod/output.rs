//! The checkpoint's directory. The caller's `output_path` must be an existing,
//! empty directory; the shim writes everything into a private staging dir
//! inside it, then renames that to `output_path/pod` in one step, so a crash
//! leaves either a whole checkpoint or none (a staging dir, which the journal
//! names and the next start removes). `output_path` itself is never removed.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::manifest::{self, Manifest};
use crate::checkpoint::journal::JournalEntry;
use crate::error::{Context, Error, Result};

/// The committed checkpoint's directory, in `output_path`.
pub const POD_DIR: &str = "pod";

/// Checks a CheckpointPod's `output_path`: absolute, no `..`, an existing
/// directory (not a symlink to one), and empty.
pub fn check(output_path: &str) -> Result<PathBuf> {
    let bad = |why: &str| Error::InvalidArgument(format!("output_path {output_path:?}: {why}"));
    let path = PathBuf::from(output_path);
    if output_path.is_empty() || !path.is_absolute() {
        return Err(bad("must be an absolute path"));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad("must not contain '..'"));
    }
    let meta = std::fs::symlink_metadata(&path).map_err(|e| bad(&e.to_string()))?;
    if meta.file_type().is_symlink() {
        return Err(bad("is a symlink"));
    }
    if !meta.is_dir() {
        return Err(bad("is not a directory"));
    }
    let mut entries = std::fs::read_dir(&path).map_err(|e| bad(&e.to_string()))?;
    if entries.next().is_some() {
        return Err(bad("is not empty"));
    }
    Ok(path)
}

/// Where a RestorePod's `checkpoint_path` keeps the manifest and archives:
/// `checkpoint_path/pod` (as CheckpointPod wrote it), or `checkpoint_path`
/// itself when it is that directory.
pub fn checkpoint_dir(checkpoint_path: &str) -> Result<PathBuf> {
    let path = PathBuf::from(checkpoint_path);
    if checkpoint_path.is_empty() || !path.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint_path {checkpoint_path:?} must be an absolute path"
        )));
    }
    let inner = path.join(POD_DIR);
    if std::fs::symlink_metadata(inner.join(manifest::FILE)).is_ok() {
        return Ok(inner);
    }
    Ok(path)
}

/// The checkpoint being written: a private dir in `output_path`, noted in the
/// journal for as long as it is not committed.
pub struct Staging {
    dir: tempfile::TempDir,
    _note: Option<JournalEntry>,
}

impl Staging {
    pub fn new(output: &Path, journal: Option<&Path>) -> Result<Staging> {
        // The prefix is the one the journal's recovery removes.
        let dir = crate::safefs::private_tempdir(".ckpt-shim-staging-pod-", output)?;
        let note = match journal {
            Some(j) => Some(JournalEntry::staging(j, dir.path())?),
            None => None,
        };
        Ok(Staging { dir, _note: note })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the manifest and renames the staging to `output/pod`: the
    /// checkpoint appears whole, or not at all.
    pub fn commit(self, m: &Manifest, output: &Path, durable: bool) -> Result<PathBuf> {
        let path = self.path().join(manifest::FILE);
        let mut f = crate::safefs::create_new(&path, 0o600)?;
        f.write_all(&m.to_bytes())
            .ctx(|| format!("write {}", path.display()))?;
        if durable {
            f.sync_all().ctx(|| format!("fsync {}", path.display()))?;
            sync_dir(self.path())?;
        }
        let dest = output.join(POD_DIR);
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            self.path(),
            nix::fcntl::AT_FDCWD,
            &dest,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .ctx(|| format!("rename the checkpoint to {}", dest.display()))?;
        // Renamed: the TempDir must not remove it now.
        let _ = self.dir.keep();
        if durable {
            sync_dir(output)?;
        }
        Ok(dest)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_path_must_be_an_empty_directory_of_its_own() {
        let d = tempfile::tempdir().unwrap();
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let full = d.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("x"), b"").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&empty, &link).unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(check(empty.to_str().unwrap()).is_ok());
        for bad in [
            "".to_string(),
            "relative/dir".into(),
            d.path().join("missing").display().to_string(),
            format!("{}/empty/../empty", d.path().display()),
            full.display().to_string(),
            link.display().to_string(),
            file.display().to_string(),
        ] {
            assert!(
                matches!(check(&bad), Err(Error::InvalidArgument(_))),
                "{bad:?} was taken"
            );
        }
    }

    #[test]
    fn a_commit_is_one_rename_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = Staging::new(d.path(), None).unwrap();
        std::fs::write(s.path().join("a.tar"), b"x").unwrap();
        let m: Manifest = serde_json::from_value(serde_json::json!({
            "kind": manifest::KIND, "version": manifest::VERSION,
            "checkpointedAt": "t", "sandbox": Sandbox::default(), "containers": [], "sealed": false
        }))
        .unwrap();
        let dest = s.commit(&m, d.path(), true).unwrap();
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [POD_DIR]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dest), 0o700);
        assert_eq!(mode(&dest.join(manifest::FILE)), 0o600);
    }
    use super::super::manifest::Sandbox;
}
