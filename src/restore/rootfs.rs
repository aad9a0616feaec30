//! A bundle's root file system made ready for a restore: the checkpoint's file
//! changes applied, and the mount points the spec needs.

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::archive::safe_member_name;
use crate::error::{Context, Error, Result};
use crate::safefs;

/// The root file system a bundle's spec names: `root.path`, relative to the
/// bundle unless absolute (`rootfs` when the spec has no root).
pub fn bundle_rootfs(spec: &Spec, bundle: &Path) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| "rootfs".into());
    bundle.join(root)
}

/// Applies `rootfs-diff.tar` and then `deleted.files` onto `rootfs`.
pub fn apply_rootfs_diff(extracted: &Path, rootfs: &Path) -> Result<()> {
    let diff = extracted.join("rootfs-diff.tar");
    if diff.exists() {
        let mut ar = tar::Archive::new(File::open(&diff).ctx(|| "open rootfs-diff.tar".into())?);
        ar.set_preserve_permissions(true);
        ar.set_overwrite(true);
        for entry in ar.entries().ctx(|| "read rootfs-diff.tar".into())? {
            let mut e = entry.ctx(|| "read rootfs-diff.tar".into())?;
            // Device nodes from an archive are never created.
            if matches!(
                e.header().entry_type(),
                tar::EntryType::Char | tar::EntryType::Block
            ) {
                continue;
            }
            // unpack_in refuses names that climb out of the rootfs.
            e.unpack_in(rootfs).ctx(|| "apply rootfs-diff.tar".into())?;
        }
    }
    let deleted = extracted.join("deleted.files");
    if deleted.exists() {
        let list: Vec<String> =
            serde_json::from_slice(&std::fs::read(&deleted).ctx(|| "read deleted.files".into())?)
                .map_err(|e| Error::UnsafeArchive(format!("deleted.files: {e}")))?;
        let root = rootfs
            .canonicalize()
            .ctx(|| format!("resolve {}", rootfs.display()))?;
        for p in list {
            let rel = Path::new(&p)
                .strip_prefix("/")
                .map_err(|_| Error::UnsafeArchive(p.clone()))?;
            if !safe_member_name(rel) {
                return Err(Error::UnsafeArchive(p));
            }
            let target = root.join(rel);
            // The parent must resolve inside the rootfs, whatever links the image has.
            let parent_ok = target
                .parent()
                .and_then(|d| d.canonicalize().ok())
                .is_some_and(|d| d.starts_with(&root));
            if !parent_ok {
                continue;
            }
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target)
                    .ctx(|| format!("remove {}", target.display()))?,
                Ok(_) => {
                    std::fs::remove_file(&target).ctx(|| format!("remove {}", target.display()))?
                }
                Err(_) => {}
            }
        }
    }
    Ok(())
}

/// Creates the spec's missing mount targets in the rootfs, as a runtime does when
/// it starts a container: a file where a file is bound, a directory otherwise.
/// CRIU needs them to exist before it can mount the restored tree.
pub fn create_mount_points(spec: &Spec, rootfs: &Path) -> Result<()> {
    let root = rootfs
        .canonicalize()
        .ctx(|| format!("resolve {}", rootfs.display()))?;
    for m in spec.mounts().as_ref().into_iter().flatten() {
        let Ok(rel) = m.destination().strip_prefix("/") else {
            continue;
        };
        if !safe_member_name(rel) {
            continue;
        }
        let target = root.join(rel);
        if std::fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        let parent = target.parent().unwrap_or(&root);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .ctx(|| format!("create {}", parent.display()))?;
        // Never create through a link that leads out of the rootfs.
        if !parent.canonicalize().is_ok_and(|p| p.starts_with(&root)) {
            continue;
        }
        let is_file = m
            .source()
            .as_ref()
            .and_then(|s| std::fs::metadata(s).ok())
            .is_some_and(|md| !md.is_dir());
        if is_file {
            safefs::create_new(&target, 0o644)?;
        } else {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&target)
                .ctx(|| format!("create {}", target.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_files_cannot_escape_the_rootfs() {
        let x = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::fs::write(root.path().join("gone"), "x").unwrap();
        std::fs::write(
            x.path().join("deleted.files"),
            r#"["/gone", "/escape/victim"]"#,
        )
        .unwrap();
        apply_rootfs_diff(x.path(), root.path()).unwrap();
        assert!(!root.path().join("gone").exists());
        assert!(
            outside.path().join("victim").exists(),
            "followed a link out of the rootfs"
        );
        std::fs::write(x.path().join("deleted.files"), r#"["/../etc/passwd"]"#).unwrap();
        assert!(matches!(
            apply_rootfs_diff(x.path(), root.path()),
            Err(Error::UnsafeArchive(_))
        ));
    }
}
