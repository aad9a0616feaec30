//! Mounts (`mountpoints-<id>.img`) and namespaces (`core-<pid>.img` ids
//! against `inventory.img`'s `root_ids`).
//!
//! CRIU mounts what the images say, with the flags they say, except the
//! mounts runc names as external (the spec's bind mounts and masked files),
//! which it maps to the new spec's sources. So every other mount must be one
//! the new spec makes: at one of its destinations with its type and its
//! `ro`/`nosuid`/`nodev`/`noexec`, or one of its masked paths (a read-only
//! tmpfs, or a bind of the container's /dev/null), or one of its read-only
//! paths (a read-only bind within /proc or /sys), or runc's cgroup
//! hierarchies under its cgroup mount. A mount the spec has that the images
//! lack (a masked path, say) is refused too: CRIU would not make it. Only the
//! container's one mount namespace is restored.
//!
//! Namespaces: CRIU creates a namespace for the restored tree where the root
//! task's differs from the dumping CRIU's own (`root_ids`), and otherwise
//! leaves the tree in CRIU's, the host's. So for each namespace the spec
//! creates, the root task must have its own, and none where the spec has
//! none; a namespace the spec joins by path (the pod's, or the host's for a
//! hostNetwork pod) runc has CRIU join, whatever the images say. No task may
//! hold a user namespace of its own. The time namespace is not compared:
//! CRIU restores every tree into a new one (criu/cr-restore.c, with the
//! clocks' offsets from `timens-<id>.img`, or those at the dump where the tree
//! had none), so a restored container always has one, and a checkpoint of it
//! records it; it lends no privilege.

use std::collections::BTreeMap;
use std::path::Path;

use criu_rpc::images::{MntEntry, TaskKobjIdsEntry};

use super::creds::{privilege, unlike};
use super::images::{bad, only_known, Images};
use super::spec::{clean, Allowed, Ns};
use crate::error::Result;

const MS_RDONLY: u32 = 1;
const MS_NOSUID: u32 = 2;
const MS_NODEV: u32 = 4;
const MS_NOEXEC: u32 = 8;

/// CRIU's `fstype` numbers for the spec's mount types.
fn fstypes(kind: &str) -> &'static [u32] {
    match kind {
        "proc" => &[1],
        "sysfs" => &[2],
        "tmpfs" => &[5],
        "devpts" => &[6],
        "mqueue" => &[14],
        // cgroup v1: a tmpfs holding one mount per hierarchy; v2: one.
        "cgroup" | "cgroup2" => &[5, 12, 23],
        _ => &[],
    }
}

const WHO: &str = "(mount namespace)";

pub fn check(images: &Images, a: &Allowed) -> Result<()> {
    let root_ns = images.tasks[0].ids.as_ref().and_then(|i| i.mnt_ns_id);
    for (file, entries) in &images.mounts {
        let id = file
            .trim_start_matches("mountpoints-")
            .trim_end_matches(".img")
            .parse()
            .ok();
        if id != root_ns {
            return Err(privilege(
                WHO,
                "mount namespace",
                file,
                "the container's one",
            ));
        }
        let raw = super::images::read(&images.dir.join(file))?;
        for e in criu_rpc::image::entries(&raw, criu_rpc::image::Kind::Mountpoints)
            .map_err(|e| bad(file, e))?
        {
            only_known(file, "a mount", e, 1..=18)?;
        }
        mounts(entries, a)?;
    }
    namespaces(images, a)
}

fn mounts(entries: &[MntEntry], a: &Allowed) -> Result<()> {
    let mut seen = BTreeMap::new();
    for m in entries {
        let at = clean(&m.mountpoint);
        if at != "/" {
            one(m, &at, a)?;
        }
        seen.insert(at, m);
    }
    let proc_or_sys = |p: &&String| p.starts_with("/proc/") || p.starts_with("/sys/");
    let wanted = a
        .mounts
        .iter()
        .filter(|m| !is_bind(m) && !fstypes(&m.kind).is_empty())
        .map(|m| &m.destination)
        .chain(
            a.masked
                .iter()
                .chain(&a.readonly)
                .filter(proc_or_sys)
                .filter(|p| Path::new(p).exists()),
        );
    for dest in wanted {
        if !seen.contains_key(&clean(dest)) {
            return Err(unlike(
                WHO,
                "mount",
                format!("{dest} missing"),
                format!("{dest} mounted"),
            ));
        }
    }
    Ok(())
}

fn is_bind(m: &super::spec::Mount) -> bool {
    m.kind == "bind" || m.has("bind") || m.has("rbind")
}

/// One mount of the images, at `at`, against the spec.
fn one(m: &MntEntry, at: &str, a: &Allowed) -> Result<()> {
    let external = m.ext_mount == Some(true) || m.ext_key.is_some();
    let spec = a.mounts.iter().find(|s| s.destination == at);
    let cgroup = a
        .mounts
        .iter()
        .find(|s| s.kind.starts_with("cgroup") && at.starts_with(&format!("{}/", s.destination)));
    let refuse = || privilege(WHO, "mount", describe(m, at), "only the new spec's mounts");
    if at == "/dev/console" && a.terminal {
        // For a spec with a terminal, runc binds the container's pty (a
        // node of its devpts, root "/<index>") over /dev/console: a fresh
        // container of that spec has the same mount.
        let pty = m.fstype == 6
            && m.root
                .strip_prefix('/')
                .is_some_and(|n| n.parse::<u32>().is_ok());
        return if pty && !external {
            Ok(())
        } else {
            Err(refuse())
        };
    }
    if external {
        let bound = spec.is_some_and(is_bind) || cgroup.is_some();
        return match external_key_fits(m, at, bound, a) {
            true => Ok(()),
            false => Err(refuse()),
        };
    }
    if let Some(s) = spec.filter(|s| !is_bind(s)) {
        if !fstypes(&s.kind).contains(&m.fstype) {
            return Err(refuse());
        }
        // runc makes cgroup v1's tmpfs read-write whatever the spec says, and
        // its hierarchies under it read-only: a fresh container's is the same.
        let options: Vec<String> = match s.kind.starts_with("cgroup") && m.fstype == 5 {
            true => s.options.iter().filter(|o| *o != "ro").cloned().collect(),
            false => s.options.clone(),
        };
        return flags(m, at, &options);
    }
    if a.masked.iter().any(|p| clean(p) == at) {
        // A read-only tmpfs over a directory; a bind of /dev/null (on the
        // container's /dev tmpfs) over a file.
        return match m.fstype == 5 && (m.flags & MS_RDONLY != 0 || m.root == "/null") {
            true => Ok(()),
            false => Err(refuse()),
        };
    }
    if a.readonly.iter().any(|p| clean(p) == at) {
        let fs_ok = (at.starts_with("/proc/") && m.fstype == 1)
            || (at.starts_with("/sys/") && m.fstype == 2);
        return match fs_ok && m.flags & MS_RDONLY != 0 {
            true => Ok(()),
            false => Err(refuse()),
        };
    }
    match cgroup {
        Some(c) if fstypes(&c.kind).contains(&m.fstype) => flags(m, at, &c.options),
        _ => Err(refuse()),
    }
}

/// runc maps external mounts to the new spec's sources by their key: a bind
/// mount's and a cgroup hierarchy's (`bound`) is its own destination, a
/// masked file's the host's /dev/null. Any other key would put one of the
/// spec's sources somewhere the spec does not.
fn external_key_fits(m: &MntEntry, at: &str, bound: bool, a: &Allowed) -> bool {
    let key = m.ext_key.as_deref().map(clean);
    let own = key.as_deref() == Some(at) && bound;
    let masked = key.as_deref() == Some("/dev/null") && a.masked.iter().any(|p| clean(p) == at);
    own || masked
}

fn flags(m: &MntEntry, at: &str, options: &[String]) -> Result<()> {
    for (opt, bit) in [
        ("ro", MS_RDONLY),
        ("nosuid", MS_NOSUID),
        ("nodev", MS_NODEV),
        ("noexec", MS_NOEXEC),
    ] {
        if options.iter().any(|o| o == opt) && m.flags & bit == 0 {
            return Err(privilege(
                WHO,
                "mount flags",
                format!("{at} without {opt}"),
                format!("{at} {opt}"),
            ));
        }
    }
    Ok(())
}

fn describe(m: &MntEntry, at: &str) -> String {
    format!(
        "{at} (fstype {}, source {:?}, root {:?}, flags {:#x}, external key {:?})",
        m.fstype, m.source, m.root, m.flags, m.ext_key
    )
}

fn ids(i: &TaskKobjIdsEntry) -> [(Ns, Option<u32>); 7] {
    [
        (Ns::Pid, i.pid_ns_id),
        (Ns::Net, i.net_ns_id),
        (Ns::Ipc, i.ipc_ns_id),
        (Ns::Uts, i.uts_ns_id),
        (Ns::Mnt, i.mnt_ns_id),
        (Ns::User, i.user_ns_id),
        (Ns::Time, i.time_ns_id),
    ]
}

fn namespaces(images: &Images, a: &Allowed) -> Result<()> {
    let host = images
        .inventory
        .root_ids
        .as_ref()
        .ok_or_else(|| bad("inventory.img", "no root_ids"))?;
    let root = &images.tasks[0];
    let mine = root.ids.as_ref().ok_or_else(|| {
        bad(
            format!("ids-{}.img", root.pstree.pid),
            "the root task has no namespace ids",
        )
    })?;
    for ((ns, h), (_, m)) in ids(host).into_iter().zip(ids(mine)) {
        if a.joined.contains(&ns) || ns == Ns::Time {
            continue;
        }
        let own = h != m;
        match (a.has_ns(ns), own) {
            (true, false) => {
                return Err(privilege(
                    &root.name(),
                    "namespace",
                    format!("the host's {ns:?}"),
                    format!("a {ns:?} namespace of its own"),
                ))
            }
            (false, true) => {
                return Err(unlike(
                    &root.name(),
                    "namespace",
                    format!("a {ns:?} namespace of its own"),
                    format!("the host's {ns:?}"),
                ))
            }
            _ => {}
        }
    }
    for t in &images.tasks {
        if t.ids
            .as_ref()
            .is_some_and(|i| i.user_ns_id != mine.user_ns_id)
        {
            return Err(privilege(
                &t.name(),
                "user namespace",
                "one of its own",
                "the container's",
            ));
        }
    }
    Ok(())
}
