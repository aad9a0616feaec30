//! Step 4: what goes into the archive besides CRIU's images: `config.dump`,
//! `descriptors.json`, `bind.mounts`, and the root file system's changes.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::Serialize;

use super::locate::Container;
use crate::error::{Context, Result};
use crate::mountinfo::{self, Mount};
use crate::oci::bind_destinations;

/// checkpointctl's `ContainerConfig` (config.dump).
#[derive(Debug, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rootfs_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rootfs_image_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rootfs_image_name: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub runtime: String,
    pub created_time: String,
    pub checkpointed_time: String,
    pub restored_time: String,
    pub restored: bool,
}

pub fn config_dump(c: &Container, checkpointed: &str) -> Vec<u8> {
    let cfg = ConfigDump {
        id: c.id.clone(),
        name: c.name.clone(),
        rootfs_image: c.image_name.clone(),
        rootfs_image_ref: c.image_ref.clone(),
        rootfs_image_name: c.image_name.clone(),
        runtime: c.runtime.clone(),
        // Go's time parser needs a zone: fall back to the checkpoint time.
        created_time: if c.created.is_empty() {
            checkpointed.to_string()
        } else {
            c.created.clone()
        },
        checkpointed_time: checkpointed.to_string(),
        restored_time: "0001-01-01T00:00:00Z".into(),
        restored: false,
    };
    serde_json::to_vec_pretty(&cfg).expect("plain struct serialises")
}

/// Targets of the init process's fds 0–2, as runc records them for restore.
pub fn descriptors(pid: i32) -> Vec<u8> {
    let fds: Vec<String> = (0..3)
        .map(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/dev/null".into())
        })
        .collect();
    serde_json::to_vec(&fds).expect("strings serialise")
}

/// CRI-O's `bind.mounts`: lets a restore recreate missing bind sources with the right type.
pub fn bind_mounts(spec: &Spec) -> Option<Vec<u8>> {
    #[derive(Serialize)]
    struct BindMount {
        source: String,
        destination: String,
        file_type: &'static str,
        permissions: u32,
    }
    const SKIP: &[&str] = &[
        "/dev",
        "/dev/shm",
        "/proc",
        "/run",
        "/run/.containerenv",
        "/run/secrets",
        "/sys",
    ];
    let binds = bind_destinations(spec);
    let list: Vec<BindMount> = spec
        .mounts()
        .as_ref()?
        .iter()
        .filter(|m| {
            binds.contains(m.destination())
                && !SKIP.contains(&m.destination().to_str().unwrap_or(""))
        })
        .filter_map(|m| {
            let source = m.source().as_ref()?;
            let meta = std::fs::metadata(source).ok()?;
            Some(BindMount {
                source: source.to_string_lossy().into_owned(),
                destination: m.destination().to_string_lossy().into_owned(),
                file_type: if meta.is_dir() { "directory" } else { "file" },
                permissions: meta.permissions().mode() & 0o7777,
            })
        })
        .collect();
    (!list.is_empty()).then(|| serde_json::to_vec_pretty(&list).expect("plain struct serialises"))
}

/// The writable layer of an overlay root: what changed since the image.
#[derive(Debug, Clone)]
pub struct Overlay {
    pub upper: PathBuf,
    pub lowers: Vec<PathBuf>,
}

impl Overlay {
    /// From the container's root mount, when it is an overlay.
    pub fn of_root(mounts: &[Mount]) -> Option<Overlay> {
        let root = mountinfo::at(mounts, Path::new("/"))?;
        if root.fs_type != "overlay" {
            return None;
        }
        let upper = PathBuf::from(root.super_option("upperdir")?);
        let lowers = root
            .super_option("lowerdir")
            .map(|l| l.split(':').map(PathBuf::from).collect())
            .unwrap_or_default();
        Some(Overlay { upper, lowers })
    }
}

/// The result of walking the upper dir.
#[derive(Debug, Default)]
pub struct RootfsDiff {
    /// Entries written to the diff tar (regular files, symlinks, dirs, fifos).
    pub entries: u64,
    /// Absolute in-container paths deleted from the image (`deleted.files`).
    pub deleted: Vec<String>,
}

/// Paths never taken into the diff: kernel file systems and the runtime's mount points.
fn skipped(rel: &Path, mount_points: &[PathBuf]) -> bool {
    const SKIP: &[&str] = &[
        "/dev",
        "/proc",
        "/sys",
        "/run/secrets",
        "/run/.containerenv",
    ];
    let abs = Path::new("/").join(rel);
    SKIP.iter().any(|s| abs.starts_with(s))
        || mount_points
            .iter()
            .any(|m| m != Path::new("/") && abs.starts_with(m))
}

/// Writes every added or changed entry of the upper dir into `out` as an
/// uncompressed tar (paths relative to the container root) and lists deletions:
/// whiteouts, and the image's entries hidden by an opaque directory (listed one by
/// one, never the directory itself, because restore deletes after untarring).
/// Judged by the upper dir alone, i.e. by the container's own paths.
pub fn rootfs_diff<W: std::io::Write>(
    ov: &Overlay,
    mounts: &[Mount],
    spec: &Spec,
    out: W,
) -> Result<(RootfsDiff, W)> {
    let mut mount_points: Vec<PathBuf> = mounts.iter().map(|m| m.mount_point.clone()).collect();
    mount_points.extend(
        spec.mounts()
            .as_ref()
            .map(|ms| {
                ms.iter()
                    .map(|m| m.destination().clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut diff = RootfsDiff::default();
    walk(ov, Path::new(""), &mount_points, &mut tar, &mut diff)?;
    let out = tar.into_inner().ctx(|| "finish rootfs-diff.tar".into())?;
    diff.deleted.sort();
    Ok((diff, out))
}

fn walk(
    ov: &Overlay,
    rel: &Path,
    mps: &[PathBuf],
    tar: &mut tar::Builder<impl std::io::Write>,
    diff: &mut RootfsDiff,
) -> Result<()> {
    let dir = ov.upper.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .ctx(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    if !rel.as_os_str().is_empty() && is_opaque(&dir) {
        // Everything the image had here is gone unless the upper dir has it again.
        for lower in &ov.lowers {
            for e in std::fs::read_dir(lower.join(rel))
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = rel.join(e.file_name());
                if !names.contains(&e.file_name()) && !skipped(&p, mps) {
                    diff.deleted
                        .push(Path::new("/").join(&p).to_string_lossy().into_owned());
                }
            }
        }
    }
    for name in names {
        let p = rel.join(&name);
        if skipped(&p, mps) {
            continue;
        }
        let full = ov.upper.join(&p);
        let meta = std::fs::symlink_metadata(&full).ctx(|| format!("stat {}", full.display()))?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            diff.deleted
                .push(Path::new("/").join(&p).to_string_lossy().into_owned());
            continue;
        }
        if ft.is_char_device() || ft.is_block_device() || ft.is_socket() {
            continue;
        }
        let added = match ft.is_fifo() {
            true => append_fifo(tar, &meta, &p),
            false => tar.append_path_with_name(&full, &p),
        };
        added.ctx(|| format!("add {} to rootfs-diff.tar", full.display()))?;
        diff.entries += 1;
        if ft.is_dir() {
            walk(ov, &p, mps, tar, diff)?;
        }
    }
    Ok(())
}

/// A FIFO as a tar member named `name`. The tar crate's own path for special
/// files names the member by its host path, not `name`, and so fails on
/// every absolute one.
fn append_fifo(
    tar: &mut tar::Builder<impl std::io::Write>,
    meta: &std::fs::Metadata,
    name: &Path,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    h.set_entry_type(tar::EntryType::Fifo);
    h.set_size(0);
    tar.append_data(&mut h, name, std::io::empty())
}

fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut v = [0u8; 4];
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        // SAFETY: no safe wrapper exists (neither std nor nix reads xattrs):
        // `path` and `name` are NUL-terminated, and the kernel writes at most
        // `v.len()` bytes into `v`, a live local buffer.
        let n = unsafe {
            libc::lgetxattr(path.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), v.len())
        };
        if n >= 1 && v[0] == b'y' {
            return true;
        }
    }
    false
}
