//! `ckpt-shim restore`: extract an archive safely, apply its root file system
//! changes to a bundle, and restore the process tree with CRIU.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use criu_rpc::proto::{CgroupRoot, ExtMountMap, InheritFd, JoinNamespace, Opts};
use criu_rpc::{ack_all, Criu};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::{apply_rootfs_diff, create_mount_points, Checkpoint};
use crate::checkpoint::dump::DumpSettings;
use crate::error::{Context, Error, Result};
use crate::mountinfo;
use crate::oci::bind_destinations;
use crate::safefs;
use crate::seal::Identities;
use std::sync::Arc;

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
    /// What opens a sealed archive.
    pub identities: Arc<Identities>,
    /// Hold the images against the bundle's `config.json` ([`super::policy`]).
    pub policy: super::policy::Mode,
}

/// Restores the archive as container `id`; returns the restored init's host pid.
pub async fn restore(o: &RestoreOptions) -> Result<i32> {
    // A sealed archive is opened (its spec decrypted) before anything is written.
    let mut ckpt = Checkpoint::open(&o.archive)?;
    ckpt.unseal(o.identities.clone())?;
    let work = safefs::private_tempdir(".ckpt-shim-restore-", &o.bundle)?;
    let x = private_dir(work.path(), "archive")?;
    ckpt.extract(&x)?;
    let spec = bundle_spec(&o.bundle, &x, o.policy)?;
    let json =
        serde_json::to_value(&spec).map_err(|e| Error::Other(format!("config.json: {e}")))?;
    super::policy::enforce(&x.join("checkpoint"), &json, o.policy)?;
    let rootfs = super::rootfs::bundle_rootfs(&spec, &o.bundle);
    apply_rootfs_diff(&x, &rootfs)?;
    create_mount_points(&spec, &rootfs)?;
    super::ipc::drop_live_objects(&spec, &x.join("checkpoint"))?;
    super::sockets::skip_network_unlock(&spec, &x.join("checkpoint"))?;
    let criu_root = private_dir(work.path(), "criu-root")?;
    bind_root(&rootfs, &criu_root)?;
    let _unmount = Unmount(criu_root.clone());

    let mut handed = Handed::default();
    handed.stdio(&x, stdio(o)?);
    handed.namespaces(&spec)?;
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
        inherit_fd: handed.inherit_fd,
        join_ns: handed.join_ns,
        ..Default::default()
    };
    Ok(o.criu.restore(opts, &mut ack_all(), handed.fds).await?)
}

/// `dir/name`, created 0700.
fn private_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&p)
        .ctx(|| format!("create {}", p.display()))?;
    Ok(p)
}

/// The bundle's `config.json`, written from the archive's `spec.dump` first
/// when the bundle has none, which only a restore that trusts the archive
/// may do: the archive's author wrote `spec.dump`, so holding the images
/// against it would check nothing.
fn bundle_spec(bundle: &Path, extracted: &Path, policy: super::policy::Mode) -> Result<Spec> {
    let config = bundle.join("config.json");
    if !config.exists() && policy == super::policy::Mode::Enforce {
        return Err(Error::InvalidArgument(format!(
            "{} is missing: a restore is held against the new container's own spec \
             (write one, or pass --restore-policy off to trust the archive's spec.dump)",
            config.display()
        )));
    }
    if !config.exists() {
        std::fs::copy(extracted.join("spec.dump"), &config)
            .ctx(|| format!("write {}", config.display()))?;
    }
    serde_json::from_slice(&std::fs::read(&config).ctx(|| format!("read {}", config.display()))?)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", config.display())))
}

/// CRIU wants the root to be a mount point: `rootfs` bound onto `at`.
fn bind_root(rootfs: &Path, at: &Path) -> Result<()> {
    nix::mount::mount(
        Some(rootfs),
        at,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("bind {} for CRIU", rootfs.display()))
}

/// What takes the place of the container's stdio: the caller's fds, or this
/// process's own.
fn stdio(o: &RestoreOptions) -> Result<Vec<OwnedFd>> {
    let fds: std::io::Result<Vec<OwnedFd>> = match &o.stdio {
        Some(fds) => fds.iter().map(|f| f.try_clone()).collect(),
        // SAFETY: fds 0-2 are open for the life of the process.
        None => (0..3)
            .map(|i| unsafe { std::os::fd::BorrowedFd::borrow_raw(i) }.try_clone_to_owned())
            .collect(),
    };
    fds.ctx(|| "dup stdio".into())
}

/// The fds handed to CRIU (as fd 4 on, each under its external key) and the
/// namespaces the restored tree joins.
#[derive(Default)]
struct Handed {
    fds: Vec<OwnedFd>,
    inherit_fd: Vec<InheritFd>,
    join_ns: Vec<JoinNamespace>,
}

impl Handed {
    fn hand(&mut self, key: String, fd: OwnedFd) {
        self.inherit_fd.push(InheritFd {
            key,
            fd: 4 + self.fds.len() as i32,
        });
        self.fds.push(fd);
    }

    /// New stdio takes the place of the pipes the container had.
    fn stdio(&mut self, extracted: &Path, stdio: Vec<OwnedFd>) {
        let descriptors: Vec<String> = std::fs::read(extracted.join("checkpoint/descriptors.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (d, fd) in descriptors.iter().zip(stdio) {
            if d.contains("pipe:") {
                self.hand(d.clone(), fd);
            }
        }
    }

    /// The pod's network and pid namespaces are handed over as the dump's
    /// external keys; its IPC and UTS namespaces are joined.
    fn namespaces(&mut self, spec: &Spec) -> Result<()> {
        for ns in crate::oci::namespaces(spec) {
            let Some(path) = ns.path() else { continue };
            let (key, join) = match ns.typ() {
                LinuxNamespaceType::Network => ("extRootNetNS", None),
                LinuxNamespaceType::Pid => ("extRootPidNS", None),
                LinuxNamespaceType::Ipc => ("", Some("ipc")),
                LinuxNamespaceType::Uts => ("", Some("uts")),
                _ => continue,
            };
            match join {
                Some(kind) => self.join_ns.push(JoinNamespace {
                    ns: kind.into(),
                    ns_file: path.to_string_lossy().into_owned(),
                    extra_opt: None,
                }),
                None => {
                    let fd: OwnedFd = File::open(path)
                        .ctx(|| format!("open {}", path.display()))?
                        .into();
                    self.hand(key.into(), fd);
                }
            }
        }
        Ok(())
    }
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
    for h in crate::cgroup::v1_mounts(&mountinfo::read(std::process::id() as i32)?) {
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
