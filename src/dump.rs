//! Step 3: the CRIU options for dumping a container, in the naming runc uses, so
//! that `runc restore` (and our restore) can map every external object back.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use criu_rpc::proto::{CgMode, ExtMountMap, Opts};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{Context, Result};
use crate::mountinfo::Mount;

/// File systems CRIU recreates by itself; any other mount comes from outside the
/// container and must be declared external.
const RECREATED_FS: &[&str] = &[
    "proc",
    "sysfs",
    "tmpfs",
    "devpts",
    "mqueue",
    "cgroup2",
    "binfmt_misc",
    "securityfs",
    "debugfs",
    "tracefs",
];

/// Operator choices for the dump (CRI-O/containerd parity by default).
#[derive(Debug, Clone)]
pub struct DumpSettings {
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub manage_cgroups: CgMode,
}

impl Default for DumpSettings {
    fn default() -> Self {
        DumpSettings {
            tcp_established: false,
            ext_unix_sk: false,
            file_locks: true,
            manage_cgroups: CgMode::Soft,
        }
    }
}

pub struct DumpTarget<'a> {
    pub pid: i32,
    pub spec: &'a Spec,
    pub rootfs: &'a Path,
    /// The container's own mount table (`/proc/<pid>/mountinfo`).
    pub mounts: &'a [Mount],
    pub freeze_cgroup: &'a Path,
}

pub fn criu_opts(
    t: &DumpTarget,
    images: &OwnedFd,
    work: &OwnedFd,
    timeout_secs: u32,
    s: &DumpSettings,
) -> Result<Opts> {
    Ok(Opts {
        images_dir_fd: images.as_raw_fd(),
        work_dir_fd: Some(work.as_raw_fd()),
        pid: Some(t.pid),
        root: Some(t.rootfs.to_string_lossy().into_owned()),
        leave_running: Some(true),
        // We froze the cgroup: naming it lets CRIU seize the frozen tasks at once.
        freeze_cgroup: Some(t.freeze_cgroup.to_string_lossy().into_owned()),
        timeout: Some(timeout_secs.max(1)),
        manage_cgroups: Some(true),
        manage_cgroups_mode: Some(s.manage_cgroups as i32),
        file_locks: Some(s.file_locks),
        tcp_established: Some(s.tcp_established),
        ext_unix_sk: Some(s.ext_unix_sk),
        shell_job: Some(false),
        notify_scripts: Some(true),
        log_level: Some(4),
        log_file: Some("dump.log".into()),
        ext_mnt: external_mounts(t.spec, t.mounts),
        external: external_namespaces(t.spec)?,
        ..Default::default()
    })
}

/// Every mount whose content lives outside the container, keyed by its mount point
/// inside the container. Values follow runc: the mount point itself, and
/// `/dev/null` for masked files.
pub fn external_mounts(spec: &Spec, mounts: &[Mount]) -> Vec<ExtMountMap> {
    let masked: Vec<PathBuf> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.masked_paths().clone())
        .unwrap_or_default()
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let binds = bind_destinations(spec);
    let mut out: Vec<ExtMountMap> = Vec::new();
    for m in mounts {
        let mp = &m.mount_point;
        if mp == Path::new("/") {
            continue;
        }
        let key = mp.to_string_lossy().into_owned();
        let val = if masked.contains(mp) {
            // Masked directories are a read-only tmpfs that CRIU dumps itself.
            if m.fs_type == "tmpfs" && m.root == "/" {
                continue;
            }
            "/dev/null".to_string()
        } else if m.fs_type == "cgroup"
            || binds.contains(mp)
            || !RECREATED_FS.contains(&m.fs_type.as_str())
        {
            key.clone()
        } else {
            continue;
        };
        if !out.iter().any(|e| e.key == key) {
            out.push(ExtMountMap { key, val });
        }
    }
    out
}

/// Destinations of the spec's bind mounts.
pub fn bind_destinations(spec: &Spec) -> Vec<PathBuf> {
    spec.mounts()
        .as_ref()
        .map(|ms| {
            ms.iter()
                .filter(|m| {
                    m.typ().as_deref() == Some("bind")
                        || m.options()
                            .as_ref()
                            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
                })
                .map(|m| m.destination().clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Namespaces the container joined by path (the pod's) belong to the sandbox:
/// CRIU must neither dump nor recreate them. Keys as runc and crun name them.
pub fn external_namespaces(spec: &Spec) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for ns in crate::locate::namespaces(spec) {
        let (kind, key) = match ns.typ() {
            LinuxNamespaceType::Network => ("net", "extRootNetNS"),
            LinuxNamespaceType::Pid => ("pid", "extRootPidNS"),
            _ => continue,
        };
        if let Some(path) = ns.path() {
            let ino = std::fs::metadata(path)
                .ctx(|| format!("stat namespace {}", path.display()))?
                .ino();
            out.push(format!("{kind}[{ino}]:{key}"));
        }
    }
    Ok(out)
}
