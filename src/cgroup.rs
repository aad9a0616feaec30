//! cgroups as the host mounts them: which cgroup a process is in, for a v1
//! controller or the unified (v2) hierarchy, resolved against the mount that
//! shows it, its root included; and the processes in a cgroup and below it.
//! The freezer (checkpoint step 2), the hold's memory estimate, the dump's
//! cgroup yard, the standalone restore and `ckpt-shim check` all look here.

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use crate::mountinfo::{self, Mount};

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`, with
/// empty controllers for the unified hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Comma-separated, `name=…` for a named v1 hierarchy; empty for v2.
    pub controllers: String,
    pub path: String,
}

impl Membership {
    /// Whether this line is v1 `controller`'s hierarchy.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.split(',').any(|c| c == controller)
    }

    pub fn unified(&self) -> bool {
        self.controllers.is_empty()
    }
}

/// A cgroup's directory on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dir {
    V1(PathBuf),
    V2(PathBuf),
}

impl Dir {
    pub fn path(&self) -> &Path {
        match self {
            Dir::V1(p) | Dir::V2(p) => p,
        }
    }
}

/// `pid`'s cgroups, one per hierarchy.
pub fn memberships(pid: i32) -> Result<Vec<Membership>> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).ctx(|| format!("read {path}"))?;
    Ok(parse(&text))
}

pub fn parse(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some(Membership {
                controllers: controllers.to_string(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// `pid`'s cgroup for v1 `controller` where the host mounts that hierarchy
/// (on a hybrid host v1 wins, as runc uses it there), else its cgroup in the
/// unified hierarchy. `None` where neither is mounted.
pub fn of(pid: i32, controller: &str) -> Result<Option<Dir>> {
    let host = mountinfo::read(std::process::id() as i32)?;
    Ok(resolve(&memberships(pid)?, controller, &host))
}

/// [`of`] on given `/proc/<pid>/cgroup` lines and host mounts.
pub fn resolve(lines: &[Membership], controller: &str, host: &[Mount]) -> Option<Dir> {
    let v1 = lines.iter().find(|l| l.has(controller)).and_then(|l| {
        let m = v1_mount(host, controller)?;
        Some(Dir::V1(join(&m.mount_point, &m.root, &l.path)))
    });
    v1.or_else(|| {
        let l = lines.iter().find(|l| l.unified())?;
        let m = v2_mount(host)?;
        Some(Dir::V2(join(&m.mount_point, &m.root, &l.path)))
    })
}

/// The host's mount of v1 `controller`'s hierarchy.
pub fn v1_mount<'a>(host: &'a [Mount], controller: &str) -> Option<&'a Mount> {
    v1_mounts(host).find(|m| m.super_options.split(',').any(|o| o == controller))
}

/// Every v1 hierarchy the host mounts.
pub fn v1_mounts(host: &[Mount]) -> impl Iterator<Item = &Mount> {
    host.iter().filter(|m| m.fs_type == "cgroup")
}

/// The host's mount of the unified hierarchy.
pub fn v2_mount(host: &[Mount]) -> Option<&Mount> {
    host.iter().find(|m| m.fs_type == "cgroup2")
}

/// A cgroup `path` (as `/proc/<pid>/cgroup` gives it) under a mount. A cgroup
/// namespace or a bind of a sub-hierarchy shows a mount root other than "/",
/// which the path then starts with.
pub fn join(mount_point: &Path, mount_root: &str, path: &str) -> PathBuf {
    let rel = path
        .strip_prefix(mount_root)
        .filter(|_| mount_root != "/")
        .unwrap_or(path);
    mount_point.join(rel.trim_start_matches('/'))
}

/// Every pid in `dir`'s `cgroup.procs` and in those of the cgroups below it.
pub fn procs_below(dir: &Path, out: &mut Vec<i32>) -> Result<()> {
    let file = dir.join("cgroup.procs");
    let procs = std::fs::read_to_string(&file).ctx(|| format!("read {}", file.display()))?;
    out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    for e in std::fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))? {
        let e = e.ctx(|| format!("list {}", dir.display()))?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            procs_below(&e.path(), out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "37 31 0:34 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n\
        38 31 0:35 /k8s /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";

    #[test]
    fn v1_wins_on_a_hybrid_host_and_the_mount_root_is_honoured() {
        let host = mountinfo::parse(HYBRID);
        let lines = parse("7:freezer:/pod/c1\n6:memory:/k8s/pod/c1\n0::/pod/c1\n");
        assert_eq!(
            resolve(&lines, "freezer", &host),
            Some(Dir::V1("/sys/fs/cgroup/freezer/pod/c1".into()))
        );
        assert_eq!(
            resolve(&lines, "memory", &host),
            Some(Dir::V1("/sys/fs/cgroup/memory/pod/c1".into())),
            "the memory hierarchy is mounted from /k8s"
        );
        assert_eq!(
            resolve(&lines, "pids", &host),
            Some(Dir::V2("/sys/fs/cgroup/unified/pod/c1".into())),
            "a controller v1 does not mount falls back to the unified hierarchy"
        );
    }

    #[test]
    fn nothing_mounted_is_none() {
        let lines = parse("7:freezer:/pod/c1\n");
        assert_eq!(resolve(&lines, "freezer", &[]), None);
    }

    #[test]
    fn the_running_process_has_a_cgroup_with_itself_in_it() {
        let me = std::process::id() as i32;
        let dir = of(me, "freezer")
            .unwrap()
            .expect("a freezer or cgroup2 here");
        let mut procs = Vec::new();
        procs_below(dir.path(), &mut procs).unwrap();
        assert!(procs.contains(&me), "{me} not in {}", dir.path().display());
    }
}
