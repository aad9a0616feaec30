//! What the new container's OCI spec allows, read from its `config.json` (or
//! the runtime's stored copy of it): the most any process of a fresh
//! container of this config could hold, and what its init holds.

use serde_json::Value;

use crate::error::{Error, Result};

/// Capability sets as 64-bit masks, bit N for capability N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    pub eff: u64,
    pub prm: u64,
    pub inh: u64,
    pub bnd: u64,
    pub amb: u64,
}

/// A mount of the spec, as the checks compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub destination: String,
    pub kind: String,
    pub options: Vec<String>,
}

impl Mount {
    pub fn has(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ns {
    Pid,
    Net,
    Ipc,
    Uts,
    Mnt,
    User,
    Cgroup,
    Time,
}

#[derive(Debug, Clone)]
pub struct Allowed {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The bounds for every process: what a root process of the container
    /// could hold after an exec.
    pub bound: Caps,
    /// What the init of a fresh container holds.
    pub init: Caps,
    pub no_new_privs: bool,
    /// `process.terminal`: runc binds the container's pty over /dev/console.
    pub terminal: bool,
    pub lsm_label: Option<String>,
    /// (resource number, soft, hard) for the resources the spec sets.
    pub rlimits: Vec<(u32, u64, u64)>,
    pub oom_score_adj: Option<i32>,
    pub mounts: Vec<Mount>,
    pub masked: Vec<String>,
    pub readonly: Vec<String>,
    pub namespaces: Vec<Ns>,
    /// Those of them the spec joins by path (a pod's, or the host's for a
    /// hostNetwork pod): runc has CRIU join the path, whatever the images say.
    pub joined: Vec<Ns>,
    /// Device nodes the container may have: (`c` or `b`, major, minor), the
    /// spec's `linux.devices` and those runc always makes.
    pub devices: Vec<(char, u64, u64)>,
    /// `linux.seccomp`, compiled later ([`super::seccomp`]).
    pub seccomp: Option<Value>,
}

pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_SYS_NICE: u32 = 23;

impl Caps {
    pub fn has(&self, cap: u32) -> bool {
        self.eff & (1 << cap) != 0
    }

    /// Each set cut down to `bound`'s.
    pub fn within(&self, bound: &Caps) -> Caps {
        Caps {
            eff: self.eff & bound.eff,
            prm: self.prm & bound.prm,
            inh: self.inh & bound.inh,
            bnd: self.bnd & bound.bnd,
            amb: self.amb & bound.amb,
        }
    }
}

impl Allowed {
    pub fn from_json(spec: &Value) -> Result<Allowed> {
        let process = &spec["process"];
        let user = &process["user"];
        let uid = u32_of(&user["uid"]);
        let no_new_privs = process["noNewPrivileges"].as_bool().unwrap_or(false);
        let (bound, init) = capabilities(&process["capabilities"], uid, no_new_privs)?;
        let linux = &spec["linux"];
        Ok(Allowed {
            uid,
            gid: u32_of(&user["gid"]),
            groups: user["additionalGids"]
                .as_array()
                .map(|a| a.iter().map(u32_of).collect())
                .unwrap_or_default(),
            bound,
            init,
            no_new_privs,
            terminal: process["terminal"].as_bool().unwrap_or(false),
            lsm_label: process["apparmorProfile"]
                .as_str()
                .or(process["selinuxLabel"].as_str())
                .filter(|s| !s.is_empty())
                .map(String::from),
            rlimits: rlimits(&process["rlimits"])?,
            oom_score_adj: process["oomScoreAdj"].as_i64().map(|v| v as i32),
            mounts: mounts(&spec["mounts"]),
            masked: strings(&linux["maskedPaths"]),
            readonly: strings(&linux["readonlyPaths"]),
            namespaces: namespaces(&linux["namespaces"])?,
            joined: namespaces(&Value::Array(
                linux["namespaces"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|n| n["path"].as_str().is_some_and(|p| !p.is_empty()))
                    .cloned()
                    .collect(),
            ))?,
            devices: devices(&linux["devices"]),
            seccomp: Some(linux["seccomp"].clone()).filter(|v| !v.is_null()),
        })
    }

    pub fn has_ns(&self, ns: Ns) -> bool {
        self.namespaces.contains(&ns)
    }
}

fn u32_of(v: &Value) -> u32 {
    v.as_u64().unwrap_or(0) as u32
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn caps_mask(v: &Value) -> Result<u64> {
    let mut mask = 0u64;
    for name in strings(v) {
        let cap: caps::Capability = name.parse().map_err(|_| {
            Error::InvalidArgument(format!("unknown capability {name:?} in the spec"))
        })?;
        mask |= 1 << cap.index();
    }
    Ok(mask)
}

fn rlimits(v: &Value) -> Result<Vec<(u32, u64, u64)>> {
    let mut out = Vec::new();
    for r in v.as_array().into_iter().flatten() {
        let name = r["type"].as_str().unwrap_or_default();
        let resource = RLIMITS.iter().position(|n| *n == name).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown rlimit {name:?} in the spec"))
        })?;
        let get = |k: &str| r[k].as_u64().unwrap_or(u64::MAX);
        out.push((resource as u32, get("soft"), get("hard")));
    }
    Ok(out)
}

/// The rlimit names of the OCI spec, at their resource numbers.
pub const RLIMITS: &[&str] = &[
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

fn mounts(v: &Value) -> Vec<Mount> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|m| Mount {
            destination: clean(m["destination"].as_str().unwrap_or_default()),
            kind: m["type"].as_str().unwrap_or_default().to_string(),
            options: strings(&m["options"]),
        })
        .collect()
}

/// The most any process of a fresh container may hold (`bound`), and what its
/// init holds (`init`), from the spec's capability sets.
fn capabilities(sets: &Value, uid: u32, no_new_privs: bool) -> Result<(Caps, Caps)> {
    let set = |name: &str| caps_mask(&sets[name]);
    let (inh, bnd, prm) = (set("inheritable")?, set("bounding")?, set("permitted")?);
    // An ambient capability is raised only if it is permitted and
    // inheritable; runc lets the others go without a word.
    let amb = set("ambient")? & inh & prm;
    // After the exec of the container's process: root gains its inheritable
    // and bounding sets (the file's sets are all ones for root); anyone else
    // keeps only its ambient set, unless it may still exec a set-user-ID root
    // program (no no_new_privs).
    let root_max = inh | bnd | amb;
    let init_eff = if uid == 0 { root_max } else { amb };
    let bound_eff = if uid != 0 && no_new_privs {
        amb
    } else {
        root_max
    };
    let caps = |eff| Caps {
        eff,
        prm: eff,
        inh,
        bnd,
        amb,
    };
    Ok((caps(bound_eff), caps(init_eff)))
}

/// A path as an absolute one without `.` parts or trailing slashes.
pub fn clean(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// null, zero, full, random, urandom and tty: runc makes them in every
/// container's /dev.
const RUNC_DEVICES: [(char, u64, u64); 6] = [
    ('c', 1, 3),
    ('c', 1, 5),
    ('c', 1, 7),
    ('c', 1, 8),
    ('c', 1, 9),
    ('c', 5, 0),
];

fn devices(v: &Value) -> Vec<(char, u64, u64)> {
    let listed = v.as_array().into_iter().flatten().filter_map(|d| {
        let kind = match d["type"].as_str()? {
            "b" => 'b',
            "c" | "u" => 'c',
            _ => return None,
        };
        Some((kind, d["major"].as_u64()?, d["minor"].as_u64()?))
    });
    RUNC_DEVICES.into_iter().chain(listed).collect()
}

fn namespaces(v: &Value) -> Result<Vec<Ns>> {
    let mut out = Vec::new();
    for n in v.as_array().into_iter().flatten() {
        out.push(match n["type"].as_str().unwrap_or_default() {
            "pid" => Ns::Pid,
            "network" => Ns::Net,
            "ipc" => Ns::Ipc,
            "uts" => Ns::Uts,
            "mount" => Ns::Mnt,
            "user" => Ns::User,
            "cgroup" => Ns::Cgroup,
            "time" => Ns::Time,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown namespace {other:?} in the spec"
                )))
            }
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(user: Value, caps: Value, nnp: bool) -> Value {
        serde_json::json!({
            "process": {"user": user, "capabilities": caps, "noNewPrivileges": nnp,
                        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/x"}],
                      "maskedPaths": ["/proc/kcore"]},
            "mounts": [{"destination": "/proc/", "type": "proc", "options": ["nosuid"]}]
        })
    }

    #[test]
    fn root_gains_its_bounding_set_and_others_only_their_ambient_one() {
        let caps = serde_json::json!({"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_CHOWN"],
                                      "inheritable": [], "ambient": []});
        let root = Allowed::from_json(&spec(
            serde_json::json!({"uid": 0, "gid": 0}),
            caps.clone(),
            false,
        ))
        .unwrap();
        let both = (1 << 0) | (1 << 5);
        assert_eq!(
            root.init,
            Caps {
                eff: both,
                prm: both,
                inh: 0,
                bnd: both,
                amb: 0
            }
        );
        assert_eq!(root.bound, root.init);
        let user = Allowed::from_json(&spec(
            serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [5]}),
            caps.clone(),
            true,
        ))
        .unwrap();
        assert_eq!(
            user.init,
            Caps {
                eff: 0,
                prm: 0,
                inh: 0,
                bnd: both,
                amb: 0
            }
        );
        assert_eq!(
            user.bound, user.init,
            "no_new_privs: no set-user-ID root exec"
        );
        assert_eq!(user.groups, vec![5]);
        let user =
            Allowed::from_json(&spec(serde_json::json!({"uid": 1000}), caps, false)).unwrap();
        assert_eq!(
            user.bound.eff, both,
            "without no_new_privs a set-user-ID exec reaches the bounding set"
        );
        assert_eq!(user.rlimits, vec![(7, 1024, 4096)]);
        assert_eq!(user.namespaces, vec![Ns::Pid, Ns::Mnt, Ns::Net]);
        assert_eq!(user.joined, vec![Ns::Net]);
        assert_eq!(user.mounts[0].destination, "/proc");
    }

    #[test]
    fn unknown_names_are_refused() {
        let caps = serde_json::json!({"bounding": ["CAP_EVERYTHING"]});
        assert!(Allowed::from_json(&spec(serde_json::json!({"uid": 0}), caps, false)).is_err());
    }
}
