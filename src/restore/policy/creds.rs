//! Credentials, each thread's (`thread_core.creds` in `core-<tid>.img`):
//!
//! - user and group IDs (real, effective, saved, fs) and supplementary
//!   groups: the init's must be the spec's `process.user`; another process's
//!   too, unless the container may change IDs (CAP_SETUID, CAP_SETGID). An
//!   ID cannot be changed under a running program, so a mismatch is refused.
//! - capabilities: every set is cut down to what a process of a fresh
//!   container could hold (lowering is always safe). The init's must then be
//!   a fresh init's, or the restore is refused as unlike the config.
//! - no_new_privs: set where the spec sets it (setting it is safe).
//! - securebits: only with CAP_SETPCAP, which setting them needs; an init's
//!   must be a fresh one's (none).
//! - LSM: the profile must be the spec's, or none; policy data never loads.

use criu_rpc::images::CredsEntry;

use super::spec::{Allowed, Caps, CAP_SETGID, CAP_SETPCAP, CAP_SETUID};
use crate::error::{Error, Result};

fn mask(words: &[u32]) -> u64 {
    words
        .iter()
        .take(2)
        .enumerate()
        .fold(0, |m, (i, w)| m | (u64::from(*w) << (32 * i)))
}

fn words(m: u64) -> Vec<u32> {
    vec![m as u32, (m >> 32) as u32]
}

pub fn caps_of(c: &CredsEntry) -> Caps {
    Caps {
        eff: mask(&c.cap_eff),
        prm: mask(&c.cap_prm),
        inh: mask(&c.cap_inh),
        bnd: mask(&c.cap_bnd),
        amb: mask(&c.cap_amb),
    }
}

fn set_caps(c: &mut CredsEntry, caps: Caps) {
    c.cap_eff = words(caps.eff);
    c.cap_prm = words(caps.prm);
    c.cap_inh = words(caps.inh);
    c.cap_bnd = words(caps.bnd);
    c.cap_amb = words(caps.amb);
}

pub fn privilege(
    process: &str,
    field: &'static str,
    found: impl ToString,
    allowed: impl ToString,
) -> Error {
    Error::Privilege {
        process: process.into(),
        field,
        found: found.to_string(),
        allowed: allowed.to_string(),
    }
}

pub fn unlike(
    process: &str,
    field: &'static str,
    found: impl ToString,
    fresh: impl ToString,
) -> Error {
    Error::Unlike {
        process: process.into(),
        field,
        found: found.to_string(),
        fresh: fresh.to_string(),
    }
}

/// The credentials `c` of a thread of `process` as the restore may give
/// them, or why not. `init`: the root of the tree.
pub fn confine(process: &str, init: bool, c: &CredsEntry, a: &Allowed) -> Result<CredsEntry> {
    ids(process, init, c, a)?;
    lsm(process, c, a)?;
    let mut out = c.clone();
    let caps = caps_of(c).within(&a.bound);
    set_caps(&mut out, caps);
    if a.no_new_privs {
        out.no_new_privs = Some(1);
    }
    if c.secbits != 0 && !a.bound.has(CAP_SETPCAP) {
        return Err(privilege(
            process,
            "securebits",
            format!("{:#x}", c.secbits),
            "0 (no CAP_SETPCAP)",
        ));
    }
    if init {
        like_fresh(process, &out, a)?;
    }
    Ok(out)
}

fn ids(process: &str, init: bool, c: &CredsEntry, a: &Allowed) -> Result<()> {
    let uids = [
        ("uid", c.uid),
        ("euid", c.euid),
        ("suid", c.suid),
        ("fsuid", c.fsuid),
    ];
    let gids = [
        ("gid", c.gid),
        ("egid", c.egid),
        ("sgid", c.sgid),
        ("fsgid", c.fsgid),
    ];
    let may_setuid = !init && a.bound.has(CAP_SETUID);
    let may_setgid = !init && a.bound.has(CAP_SETGID);
    for (field, id) in uids.into_iter().filter(|_| !may_setuid) {
        if id != a.uid {
            return Err(privilege(process, field, id, a.uid));
        }
    }
    for (field, id) in gids.into_iter().filter(|_| !may_setgid) {
        if id != a.gid {
            return Err(privilege(process, field, id, a.gid));
        }
    }
    let mut have = c.groups.clone();
    let mut want = a.groups.clone();
    have.sort_unstable();
    have.dedup();
    want.sort_unstable();
    want.dedup();
    if !may_setgid && have != want {
        return Err(privilege(
            process,
            "groups",
            format!("{have:?}"),
            format!("{want:?}"),
        ));
    }
    Ok(())
}

fn lsm(process: &str, c: &CredsEntry, a: &Allowed) -> Result<()> {
    if c.apparmor_data.as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(privilege(
            process,
            "AppArmor policy data",
            "present",
            "none",
        ));
    }
    let wanted = a.lsm_label.as_deref().unwrap_or("");
    for (field, label) in [
        ("LSM profile", &c.lsm_profile),
        ("LSM socket label", &c.lsm_sockcreate),
    ] {
        let label = label.as_deref().unwrap_or("");
        if !label.is_empty() && label != wanted {
            return Err(privilege(
                process,
                field,
                label,
                if wanted.is_empty() { "none" } else { wanted },
            ));
        }
    }
    Ok(())
}

/// The init, once cut down, must hold what a fresh init holds.
fn like_fresh(process: &str, c: &CredsEntry, a: &Allowed) -> Result<()> {
    let have = caps_of(c);
    let fresh = a.init;
    for (field, h, f) in [
        ("CapEff", have.eff, fresh.eff),
        ("CapPrm", have.prm, fresh.prm),
        ("CapInh", have.inh, fresh.inh),
        ("CapBnd", have.bnd, fresh.bnd),
        ("CapAmb", have.amb, fresh.amb),
    ] {
        if h != f {
            return Err(unlike(
                process,
                field,
                format!("{h:016x}"),
                format!("{f:016x}"),
            ));
        }
    }
    let nnp = c.no_new_privs.unwrap_or(0) != 0;
    if nnp != a.no_new_privs {
        return Err(unlike(
            process,
            "NoNewPrivs",
            nnp as u8,
            a.no_new_privs as u8,
        ));
    }
    if c.secbits != 0 {
        return Err(unlike(
            process,
            "securebits",
            format!("{:#x}", c.secbits),
            "0",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::creds;
    use super::*;
    use serde_json::json;

    fn allowed(uid: u32, caps: &[&str], nnp: bool) -> Allowed {
        Allowed::from_json(&json!({"process": {"user": {"uid": uid, "gid": uid},
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": nnp}}))
        .unwrap()
    }

    #[test]
    fn capabilities_are_lowered_and_no_new_privs_set() {
        let a = allowed(0, &["CAP_CHOWN", "CAP_KILL"], true);
        let out = confine("pid 1 (sh)", true, &creds(0, u64::MAX >> 23), &a).unwrap();
        assert_eq!(caps_of(&out), a.init);
        assert_eq!(out.no_new_privs, Some(1));
        assert_eq!(out.cap_eff, vec![(1 << 0) | (1 << 5), 0]);
    }

    #[test]
    fn a_uid_mismatch_is_refused_naming_the_process_and_field() {
        let a = allowed(1000, &[], true);
        let e = confine("pid 1 (sh)", true, &creds(0, 0), &a).unwrap_err();
        assert!(matches!(&e, Error::Privilege { field: "uid", .. }), "{e}");
        assert!(e.to_string().contains("pid 1 (sh)"), "{e}");
        // A child may differ only where the container may change IDs.
        let root = allowed(0, &["CAP_SETUID", "CAP_SETGID"], false);
        let mut child = creds(33, 0);
        child.cap_bnd = words(root.bound.bnd);
        assert!(confine("pid 9 (worker)", false, &child, &root).is_ok());
        assert!(confine("pid 1 (nginx)", true, &child, &root).is_err());
    }

    #[test]
    fn an_init_below_a_fresh_one_is_unlike_and_labels_and_securebits_are_checked() {
        let a = allowed(0, &["CAP_CHOWN", "CAP_KILL"], false);
        let e = confine("pid 1", true, &creds(0, 1), &a).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Unlike {
                    field: "CapEff",
                    ..
                }
            ),
            "{e}"
        );
        let mut c = creds(0, u64::MAX);
        c.lsm_profile = Some("unconfined".into());
        assert!(matches!(
            confine("pid 1", true, &c, &a),
            Err(Error::Privilege {
                field: "LSM profile",
                ..
            })
        ));
        let mut c = creds(0, u64::MAX);
        c.apparmor_data = Some(vec![1]);
        assert!(confine("pid 1", true, &c, &a).is_err());
        let mut c = creds(0, u64::MAX);
        c.secbits = 0x10;
        assert!(matches!(
            confine("pid 1", true, &c, &a),
            Err(Error::Privilege {
                field: "securebits",
                ..
            })
        ));
    }
}
