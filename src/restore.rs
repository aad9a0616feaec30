//! `ckpt-shim restore`: extract an archive safely, apply its root file system
//! changes to a bundle, and restore the process tree with CRIU.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use criu_rpc::proto::{CgroupRoot, ExtMountMap, InheritFd, JoinNamespace, Opts};
use criu_rpc::{ack_all, Criu};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::archive::safe_member_name;
use crate::dump::{bind_destinations, DumpSettings};
use crate::error::{Context, Error, Result};
use crate::mountinfo;
use crate::safefs;

#[derive(Debug)]
pub struct RestoreOptions {
    pub archive: PathBuf,
    /// Bundle of the new container: `config.json` (written from `spec.dump` when
    /// absent) and its root file system, already holding the image.
    pub bundle: PathBuf,
    pub id: String,
    pub criu: Criu,
    pub settings: DumpSettings,
    /// What the restored process gets in place of the stdio pipes it had (fds 0,
    /// 1, 2); `None` hands over this process's own stdio.
    pub stdio: Option<[OwnedFd; 3]>,
}

/// Extracts `archive` into `dest` (a fresh directory): regular files and
/// directories only, relative names without `..`, nothing followed or replaced.
pub fn extract(archive: &Path, dest: &Path) -> Result<()> {
    let file = File::open(archive).ctx(|| format!("open {}", archive.display()))?;
    if !file
        .metadata()
        .ctx(|| format!("stat {}", archive.display()))?
        .is_file()
    {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file",
            archive.display()
        )));
    }
    let mut ar = tar::Archive::new(file);
    for entry in ar.entries().ctx(|| format!("read {}", archive.display()))? {
        let mut e = entry.ctx(|| format!("read {}", archive.display()))?;
        let name = e.path().ctx(|| "member name".into())?.into_owned();
        if !safe_member_name(&name) {
            return Err(Error::UnsafeArchive(name.display().to_string()));
        }
        let out = dest.join(&name);
        match e.header().entry_type() {
            tar::EntryType::Directory => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&out)
                .ctx(|| format!("create {}", out.display()))?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = out.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .ctx(|| format!("create {}", parent.display()))?;
                }
                // Parents were made by us from checked names, so no link can redirect this.
                let mut f = safefs::create_new(&out, 0o600)?;
                std::io::copy(&mut e, &mut f).ctx(|| format!("extract {}", out.display()))?;
            }
            other => {
                return Err(Error::UnsafeArchive(format!(
                    "{} ({other:?} entries are refused)",
                    name.display()
                )))
            }
        }
    }
    Ok(())
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

/// Restores the archive as container `id`; returns the restored init's host pid.
pub async fn restore(o: &RestoreOptions) -> Result<i32> {
    let work = safefs::private_tempdir(".ckpt-shim-restore-", &o.bundle)?;
    let x = work.path().join("archive");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&x)
        .ctx(|| "create extraction dir".into())?;
    extract(&o.archive, &x)?;
    if !x.join("checkpoint/inventory.img").is_file() {
        return Err(Error::InvalidArgument(format!(
            "{}: no checkpoint/inventory.img: not a complete checkpoint",
            o.archive.display()
        )));
    }
    let config = o.bundle.join("config.json");
    if !config.exists() {
        std::fs::copy(x.join("spec.dump"), &config)
            .ctx(|| format!("write {}", config.display()))?;
    }
    let spec: Spec = serde_json::from_slice(
        &std::fs::read(&config).ctx(|| format!("read {}", config.display()))?,
    )
    .map_err(|e| Error::InvalidArgument(format!("{}: {e}", config.display())))?;
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| "rootfs".into());
    let rootfs = if root.is_absolute() {
        root
    } else {
        o.bundle.join(root)
    };
    apply_rootfs_diff(&x, &rootfs)?;
    create_mount_points(&spec, &rootfs)?;

    // CRIU wants the root to be a mount point: bind the rootfs onto a private dir.
    let criu_root = work.path().join("criu-root");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&criu_root)
        .ctx(|| "create criu-root".into())?;
    nix::mount::mount(
        Some(&rootfs),
        &criu_root,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("bind {} for CRIU", rootfs.display()))?;
    let _unmount = Unmount(criu_root.clone());

    let descriptors: Vec<String> = std::fs::read(x.join("checkpoint/descriptors.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    // New stdio takes the place of the pipes the container had.
    let stdio: Vec<OwnedFd> = match &o.stdio {
        Some(fds) => fds
            .iter()
            .map(|f| f.try_clone())
            .collect::<std::io::Result<_>>()
            .ctx(|| "dup stdio".into())?,
        // SAFETY: fds 0-2 are open for the life of the process.
        None => (0..3)
            .map(|i| unsafe { std::os::fd::BorrowedFd::borrow_raw(i) }.try_clone_to_owned())
            .collect::<std::io::Result<_>>()
            .ctx(|| "dup stdio".into())?,
    };
    let mut inherit: Vec<OwnedFd> = Vec::new();
    let mut inherit_fd = Vec::new();
    for (d, fd) in descriptors.iter().zip(stdio) {
        if d.contains("pipe:") {
            inherit_fd.push(InheritFd {
                key: d.clone(),
                fd: 4 + inherit.len() as i32,
            });
            inherit.push(fd);
        }
    }
    let mut join_ns = Vec::new();
    for ns in crate::locate::namespaces(&spec) {
        let Some(path) = ns.path() else { continue };
        match ns.typ() {
            LinuxNamespaceType::Network | LinuxNamespaceType::Pid => {
                let key = if ns.typ() == LinuxNamespaceType::Network {
                    "extRootNetNS"
                } else {
                    "extRootPidNS"
                };
                let fd: OwnedFd = File::open(path)
                    .ctx(|| format!("open {}", path.display()))?
                    .into();
                inherit_fd.push(InheritFd {
                    key: key.into(),
                    fd: 4 + inherit.len() as i32,
                });
                inherit.push(fd);
            }
            LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts => join_ns.push(JoinNamespace {
                ns: if ns.typ() == LinuxNamespaceType::Ipc {
                    "ipc".into()
                } else {
                    "uts".into()
                },
                ns_file: path.to_string_lossy().into_owned(),
                extra_opt: None,
            }),
            _ => {}
        }
    }
    let cgroup = restored_cgroup(&spec, &o.id);
    let work_fd = File::open(work.path()).ctx(|| "open work dir".into())?;
    let images_fd = File::open(x.join("checkpoint")).ctx(|| "open images".into())?;
    let opts = Opts {
        images_dir_fd: images_fd.as_raw_fd(),
        work_dir_fd: Some(work_fd.as_raw_fd()),
        root: Some(criu_root.to_string_lossy().into_owned()),
        log_level: Some(4),
        log_file: Some("restore.log".into()),
        notify_scripts: Some(true),
        orphan_pts_master: Some(true),
        manage_cgroups: Some(true),
        manage_cgroups_mode: Some(o.settings.manage_cgroups as i32),
        file_locks: Some(o.settings.file_locks),
        tcp_established: Some(o.settings.tcp_established),
        ext_unix_sk: Some(o.settings.ext_unix_sk),
        shell_job: Some(false),
        ext_mnt: restore_mounts(&spec, &cgroup)?,
        cg_root: vec![CgroupRoot {
            ctrl: None,
            path: cgroup.to_string_lossy().into_owned(),
        }],
        inherit_fd,
        join_ns,
        ..Default::default()
    };
    let pid = o.criu.restore(opts, &mut ack_all(), inherit).await?;
    Ok(pid)
}

/// The inverse of the dump's external-mount map: identifier → host path.
fn restore_mounts(spec: &Spec, cg_path: &Path) -> Result<Vec<ExtMountMap>> {
    let mut out = vec![ExtMountMap {
        key: "/dev/null".into(),
        val: "/dev/null".into(),
    }];
    let binds = bind_destinations(spec);
    for m in spec.mounts().as_ref().into_iter().flatten() {
        if binds.contains(m.destination()) {
            if let Some(src) = m.source() {
                out.push(ExtMountMap {
                    key: m.destination().to_string_lossy().into_owned(),
                    val: src.to_string_lossy().into_owned(),
                });
            }
        }
    }
    // cgroup v1 hierarchies appear inside the container as binds of its own cgroup.
    for h in mountinfo::read(std::process::id() as i32)?
        .iter()
        .filter(|m| m.fs_type == "cgroup")
    {
        let Some(name) = h.mount_point.file_name() else {
            continue;
        };
        let dir = h
            .mount_point
            .join(cg_path.strip_prefix("/").unwrap_or(cg_path));
        ensure_cgroup(&h.mount_point, &dir)?;
        out.push(ExtMountMap {
            key: Path::new("/sys/fs/cgroup")
                .join(name)
                .to_string_lossy()
                .into_owned(),
            val: dir.to_string_lossy().into_owned(),
        });
    }
    Ok(out)
}

/// The restored container's own cgroup: beside the original's, named by its ID,
/// so a restore never races the original's teardown.
fn restored_cgroup(spec: &Spec, id: &str) -> PathBuf {
    let original = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .unwrap_or_else(|| PathBuf::from("/ckpt-shim"));
    original.parent().unwrap_or(Path::new("/")).join(id)
}

/// Creates a v1 cgroup dir level by level. A new cpuset is unusable until it has
/// cpus and mems, so those are copied down from the parent, as runc does.
fn ensure_cgroup(hierarchy: &Path, dir: &Path) -> Result<()> {
    let mut cur = hierarchy.to_path_buf();
    for part in dir
        .strip_prefix(hierarchy)
        .unwrap_or(Path::new(""))
        .components()
    {
        let parent = cur.clone();
        cur.push(part);
        if cur.exists() {
            continue;
        }
        std::fs::create_dir(&cur).ctx(|| format!("create cgroup {}", cur.display()))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                std::fs::write(cur.join(f), v.trim())
                    .ctx(|| format!("write {}", cur.join(f).display()))?;
            }
        }
    }
    Ok(())
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with one entry whose name and type are written raw, bypassing the
    /// tar crate's own checks, as a hostile archive would be.
    fn hostile(name: &str, kind: tar::EntryType, link: Option<&str>) -> tempfile::NamedTempFile {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        b.append(&h, std::io::empty()).unwrap();
        b.finish().unwrap();
        f
    }

    #[test]
    fn extraction_refuses_traversal_links_and_devices() {
        let cases = [
            ("/etc/evil", tar::EntryType::Regular, None),
            ("../evil", tar::EntryType::Regular, None),
            ("checkpoint/../../evil", tar::EntryType::Regular, None),
            (
                "checkpoint/link",
                tar::EntryType::Symlink,
                Some("/etc/passwd"),
            ),
            ("checkpoint/hard", tar::EntryType::Link, Some("/etc/passwd")),
            ("checkpoint/null", tar::EntryType::Char, None),
            ("checkpoint/fifo", tar::EntryType::Fifo, None),
        ];
        for (name, kind, link) in cases {
            let ar = hostile(name, kind, link);
            let dest = tempfile::tempdir().unwrap();
            let err = extract(ar.path(), dest.path()).unwrap_err();
            assert!(matches!(err, Error::UnsafeArchive(_)), "{name}: {err:?}");
            assert_eq!(
                std::fs::read_dir(dest.path()).unwrap().count(),
                0,
                "{name}: something was written"
            );
        }
    }

    #[test]
    fn extraction_of_a_plain_archive_works() {
        let ar = hostile("checkpoint/inventory.img", tar::EntryType::Regular, None);
        let dest = tempfile::tempdir().unwrap();
        extract(ar.path(), dest.path()).unwrap();
        assert!(dest.path().join("checkpoint/inventory.img").is_file());
    }

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
