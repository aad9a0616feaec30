//! Step 3: the CRIU options for dumping a container, in the naming runc uses, so
//! that `runc restore` (and our restore) can map every external object back.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use criu_rpc::proto::{CgMode, ExtMountMap, NetworkLockMethod, Opts};
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

/// Operator choices for the dump. The kubelet passes no options, so the
/// defaults must let it checkpoint a container that serves (docs/sockets.md):
/// established TCP connections are dumped (`tcp_established`; without it CRIU
/// refuses any, `inet: Connected TCP socket, consider using
/// --tcp-established option`), and connections still in a listener's accept
/// queue are left to the running container (`skip_in_flight`; without it CRIU
/// refuses a listener with any, `In-flight connection (l)`, and a served
/// container is frozen before CRIU seizes it, so clients keep queueing).
#[derive(Debug, Clone)]
pub struct DumpSettings {
    pub tcp_established: bool,
    pub skip_in_flight: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub manage_cgroups: CgMode,
}

impl Default for DumpSettings {
    fn default() -> Self {
        DumpSettings {
            tcp_established: true,
            skip_in_flight: true,
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
    /// The host's (ours).
    pub host_mounts: &'a [Mount],
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
        tcp_skip_in_flight: Some(s.skip_in_flight),
        ext_unix_sk: Some(s.ext_unix_sk),
        shell_job: Some(false),
        notify_scripts: Some(true),
        log_level: Some(4),
        log_file: Some("dump.log".into()),
        network_lock: Some(network_lock(s) as i32),
        cgroup_yard: cgroup_yard(t.pid, t.host_mounts).map(|p| p.to_string_lossy().into_owned()),
        ext_mnt: external_mounts(t.spec, t.mounts),
        external: external_namespaces(t.spec)?,
        ..Default::default()
    })
}

/// CRIU's network lock keeps a namespace's traffic still while TCP connections
/// are dumped in repair mode, so that the two ends of a connection restored
/// connected (both in the checkpoint, [`crate::restore::sockets`]) agree on
/// what was sent and acknowledged. In a pod's network namespace CRIU locks the
/// whole namespace (criu/net.c, `iptables_network_lock_internal`: a `CRIU`
/// chain that drops every packet but its own, marked 0xC114), from just after
/// it seizes the tasks until it is done; in the host's, each connection alone.
/// It costs the pause an iptables-restore each way, and the pod's other
/// containers their packets meanwhile (TCP sends them again). It protects
/// nothing else: without `tcp_established` CRIU refuses to dump a container
/// with an established connection, so no TCP state is taken that traffic could
/// make stale; listening sockets are recreated on restore, and datagrams in
/// flight are lost either way. So it is skipped then.
fn network_lock(s: &DumpSettings) -> NetworkLockMethod {
    if s.tcp_established {
        NetworkLockMethod::Iptables
    } else {
        NetworkLockMethod::Skip
    }
}

/// Where the host already has every cgroup hierarchy of `pid` mounted as CRIU
/// lays out its cgroup "yard" (`<dir>/<controllers>`, `<dir>/<name>` for a
/// named hierarchy, `<dir>/unified` for v2, which is how systemd lays out
/// /sys/fs/cgroup). Given it, CRIU uses those mounts instead of mounting every
/// hierarchy afresh, which takes about 8 ms of every pause here. `None` where
/// the layout differs.
pub fn cgroup_yard(pid: i32, host_mounts: &[Mount]) -> Option<PathBuf> {
    const YARD: &str = "/sys/fs/cgroup";
    for line in crate::cgroup::memberships(pid).ok()? {
        let controllers = line.controllers.as_str();
        let (dir, kind) = match controllers {
            "" => ("unified", "cgroup2"),
            c => (c.strip_prefix("name=").unwrap_or(c), "cgroup"),
        };
        let at = Path::new(YARD).join(dir);
        let mounted = host_mounts.iter().any(|m| {
            m.mount_point == at
                && m.fs_type == kind
                && (kind == "cgroup2"
                    || controllers
                        .split(',')
                        .all(|c| m.super_options.split(',').any(|o| o == c)))
        });
        if !mounted {
            return None;
        }
    }
    Some(PathBuf::from(YARD))
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
    let binds = crate::oci::bind_destinations(spec);
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

/// Namespaces the container joined by path (the pod's) belong to the sandbox:
/// CRIU must neither dump nor recreate them. Keys as runc and crun name them.
pub fn external_namespaces(spec: &Spec) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for ns in crate::oci::namespaces(spec) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_is_locked_only_for_established_connections() {
        let mut s = DumpSettings::default();
        assert_eq!(network_lock(&s), NetworkLockMethod::Iptables);
        s.tcp_established = false;
        assert_eq!(network_lock(&s), NetworkLockMethod::Skip);
        // What the command line carries.
        let o = Opts {
            pid: Some(1),
            network_lock: Some(network_lock(&s) as i32),
            ..Default::default()
        };
        let args = criu_rpc::cli::dump_args(&o, Path::new("/i"), Path::new("/w")).unwrap();
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--network-lock" && w[1] == "skip"),
            "{args:?}"
        );
    }

    /// What the kubelet gets, passing no options: a served container can be
    /// checkpointed with its clients connected and queueing.
    #[test]
    fn by_default_connections_are_dumped_and_queued_ones_left() {
        let spec = Spec::default();
        let t = DumpTarget {
            pid: std::process::id() as i32,
            spec: &spec,
            rootfs: Path::new("/"),
            mounts: &[],
            host_mounts: &[],
            freeze_cgroup: Path::new("/sys/fs/cgroup/x"),
        };
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let o = criu_opts(&t, &fd(), &fd(), 10, &DumpSettings::default()).unwrap();
        let args = criu_rpc::cli::dump_args(&o, Path::new("/i"), Path::new("/w")).unwrap();
        for flag in ["--tcp-established", "--skip-in-flight"] {
            assert!(args.iter().any(|a| a == flag), "{flag}: {args:?}");
        }
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--network-lock" && w[1] == "iptables"),
            "{args:?}"
        );
        assert!(crate::config::Config::default().tcp_established);
    }

    #[test]
    fn the_hosts_cgroup_mounts_serve_as_criu_s_yard_where_laid_out_as_it_expects() {
        let host = crate::mountinfo::read(std::process::id() as i32).unwrap();
        let yard = cgroup_yard(std::process::id() as i32, &host);
        // Every hierarchy of ours is mounted where CRIU would look, or no yard.
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let all_there = cgroups.lines().all(|l| {
            let c = l.split(':').nth(1).unwrap();
            let dir = match c {
                "" => "unified",
                c => c.strip_prefix("name=").unwrap_or(c),
            };
            host.iter()
                .any(|m| m.mount_point == Path::new("/sys/fs/cgroup").join(dir))
        });
        assert_eq!(yard.is_some(), all_there, "{yard:?}");
        assert_eq!(cgroup_yard(std::process::id() as i32, &[]), None);
    }
}
