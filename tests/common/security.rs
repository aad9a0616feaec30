//! What the security tests (tests/security.rs) share: the real crictl on the
//! shim's socket, pod and container configs as crictl reads them, the
//! privileges a process holds as `/proc/<pid>/status` and `mountinfo` show
//! them, and a forger of CRIU images written here, from CRIU's published
//! image format, so that nothing of the code under test decides what the
//! forged checkpoint holds.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::cri::Env;

/// crictl on the shim's socket, with an empty config (no node's crictl.yaml
/// counts) and a deadline long enough for a checkpoint.
pub struct Crictl {
    sock: PathBuf,
    config: PathBuf,
}

impl Crictl {
    pub fn new(env: &Env) -> Crictl {
        let config = env.dir.join("crictl.yaml");
        std::fs::write(&config, "").unwrap();
        Crictl {
            sock: env.shim_sock.clone(),
            config,
        }
    }

    /// `crictl ARGS`: its trimmed stdout, or its stderr when it fails.
    pub fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(super::shared_bin("crictl"))
            .arg("--config")
            .arg(&self.config)
            .arg(format!("--runtime-endpoint=unix://{}", self.sock.display()))
            .arg("--timeout=60s")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("crictl {args:?}: {e}"));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// `crictl ARGS`, which must succeed: its trimmed stdout.
    pub fn run(&self, args: &[&str]) -> String {
        self.try_run(args)
            .unwrap_or_else(|e| panic!("crictl {args:?} failed: {e}"))
    }

    /// Every container the runtime has, in any state (`crictl ps -a -q`).
    pub fn all_containers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .run(&["ps", "-a", "-q"])
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// Every pod the runtime has (`crictl pods -q`).
    pub fn all_pods(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .run(&["pods", "-q"])
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// The container's process as the runtime reports it (`info.pid`).
    pub fn pid(&self, id: &str) -> i32 {
        let inspect: serde_json::Value = serde_json::from_str(&self.run(&["inspect", id])).unwrap();
        inspect["info"]["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("no info.pid for {id}: {inspect}")) as i32
    }
}

/// SIGKILLs what is left of the runtime's start of container `id` when
/// StartContainer gave up on it: the processes whose command line names `id`
/// (ckpt-runc's), and every process under them. A restore whose CRIU fails
/// late can leave CRIU, ckpt-runc and the half-restored tree waiting on each
/// other after containerd's shim is gone, out of reach of any clean-up by
/// container state. Returns how many processes it killed.
pub fn kill_stuck_runtime(id: &str) -> usize {
    let procs: Vec<(i32, i32, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The fields after the command's closing parenthesis: state, ppid.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some((pid, ppid, cmdline))
        })
        .collect();
    let mut doomed: Vec<i32> = procs
        .iter()
        .filter(|p| p.2.contains(id) && p.0 != std::process::id() as i32)
        .map(|p| p.0)
        .collect();
    let mut i = 0;
    while i < doomed.len() {
        let parent = doomed[i];
        doomed.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    // Children before their parents, so none is handed to init first.
    for pid in doomed.iter().rev() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    doomed.len()
}

/// The gRPC status code a failed crictl call printed ("code = PermissionDenied").
pub fn grpc_code(stderr: &str) -> Option<String> {
    let (_, rest) = stderr.rsplit_once("code = ")?;
    Some(rest.split_whitespace().next()?.to_string())
}

/// A pod's or container's security settings, as CRI's
/// LinuxContainerSecurityContext has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sec {
    /// Nothing set: root, the runtime's default capabilities, no seccomp
    /// (containerd 1.6's default), masked and read-only paths.
    Default,
    Privileged,
    /// run_as_user 1000, run_as_group 1000.
    Uid1000,
    /// add_capabilities NET_ADMIN, SYS_TIME.
    AddedCaps,
    /// seccomp Unconfined, said explicitly.
    Unconfined,
    /// run_as_user and run_as_group 1000, no_new_privs, drop ALL, seccomp
    /// RuntimeDefault.
    Restricted,
}

impl Sec {
    pub fn name(self) -> &'static str {
        match self {
            Sec::Default => "default",
            Sec::Privileged => "privileged",
            Sec::Uid1000 => "uid1000",
            Sec::AddedCaps => "added-caps",
            Sec::Unconfined => "unconfined",
            Sec::Restricted => "restricted",
        }
    }

    /// The container's `linux.security_context`, in crictl's JSON (CRI's
    /// field names; SecurityProfile's RuntimeDefault = 0, Unconfined = 1).
    pub fn security_context(self) -> serde_json::Value {
        // containerd 1.6 masks and makes read-only only what the request
        // lists (none when it lists none): kubelet's defaults, as it sends
        // them for every container (a privileged one ignores them).
        let mut sc = serde_json::json!({
            "namespace_options": namespaces(),
            "masked_paths": MASKED_PATHS,
            "readonly_paths": READONLY_PATHS,
        });
        let o = sc.as_object_mut().unwrap();
        match self {
            Sec::Default => {}
            Sec::Privileged => {
                o.insert("privileged".into(), true.into());
            }
            Sec::Uid1000 => {
                o.insert("run_as_user".into(), serde_json::json!({"value": 1000}));
                o.insert("run_as_group".into(), serde_json::json!({"value": 1000}));
            }
            Sec::AddedCaps => {
                o.insert(
                    "capabilities".into(),
                    serde_json::json!({"add_capabilities": ["NET_ADMIN", "SYS_TIME"]}),
                );
            }
            Sec::Unconfined => {
                o.insert("seccomp".into(), serde_json::json!({"profile_type": 1}));
            }
            Sec::Restricted => {
                o.insert("run_as_user".into(), serde_json::json!({"value": 1000}));
                o.insert("run_as_group".into(), serde_json::json!({"value": 1000}));
                o.insert("no_new_privs".into(), true.into());
                o.insert(
                    "capabilities".into(),
                    serde_json::json!({"drop_capabilities": ["ALL"]}),
                );
                o.insert("seccomp".into(), serde_json::json!({"profile_type": 0}));
            }
        }
        sc
    }
}

/// kubelet's default masked paths (k8s.io/kubernetes pkg/securitycontext).
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// kubelet's default read-only paths.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What kubelet asks for: the pod's network, a pid namespace of the
/// container's own, the pod's IPC (NamespaceMode POD = 0, CONTAINER = 1).
fn namespaces() -> serde_json::Value {
    serde_json::json!({"network": 0, "pid": 1, "ipc": 0})
}

pub const COUNTER_IMAGE: &str = "docker.io/library/ckpt-counter:latest";

/// The counter workload's command: 1 MiB, a count every 50 ms, in
/// /tmp/count and on stdout ("counter N").
pub fn counter_command() -> Vec<String> {
    ["/bin/counter", "/tmp/count", "1", "50"]
        .map(String::from)
        .to_vec()
}

/// A pod of `env` as crictl reads it, privileged or not. Written to
/// `<env.dir>/<name>-pod.json`; (its path, its log directory).
pub fn pod_json(env: &Env, name: &str, privileged: bool) -> (PathBuf, PathBuf) {
    let logs = env.dir.join("logs").join(name);
    std::fs::create_dir_all(&logs).unwrap();
    let mut sc = serde_json::json!({ "namespace_options": namespaces() });
    if privileged {
        sc["privileged"] = true.into();
    }
    let pod = serde_json::json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "namespace": "default"},
        "hostname": name,
        "log_directory": logs,
        "linux": {
            "cgroup_parent": format!("{}/{name}", env.cgroup_parent),
            "security_context": sc,
        },
    });
    let p = env.dir.join(format!("{name}-pod.json"));
    std::fs::write(&p, pod.to_string()).unwrap();
    (p, logs)
}

/// A container `name` running `command` (its first word as CRI's `command`,
/// the rest as `args`, as kubelet sends them) from `image` with `sec`, as
/// crictl reads it; written to `<env.dir>/<name>-ctr.json`. Its log is
/// `<pod's log directory>/<name>.log`.
pub fn container_json(env: &Env, name: &str, image: &str, command: &[String], sec: Sec) -> PathBuf {
    let ctr = serde_json::json!({
        "metadata": {"name": name},
        "image": {"image": image},
        "command": command[..1],
        "args": command[1..],
        "log_path": format!("{name}.log"),
        "linux": {"security_context": sec.security_context()},
    });
    let p = env.dir.join(format!("{name}-ctr.json"));
    std::fs::write(&p, ctr.to_string()).unwrap();
    p
}

/// A pod run with crictl: its id, config file and log directory.
pub struct Pod {
    pub id: String,
    pub json: PathBuf,
    pub logs: PathBuf,
}

/// `crictl runp` of a new pod `name`, removed with the environment.
pub fn run_pod(env: &mut Env, crictl: &Crictl, name: &str, privileged: bool) -> Pod {
    let (json, logs) = pod_json(env, name, privileged);
    let id = crictl.run(&["runp", json.to_str().unwrap()]);
    env.pods.push(id.clone());
    Pod { id, json, logs }
}

/// `crictl create` of container `name` in `pod`: its id, or crictl's stderr.
pub fn create(
    env: &Env,
    crictl: &Crictl,
    pod: &Pod,
    name: &str,
    image: &str,
    command: &[String],
    sec: Sec,
) -> Result<String, String> {
    let ctr = container_json(env, name, image, command, sec);
    crictl.try_run(&[
        "create",
        &pod.id,
        ctr.to_str().unwrap(),
        pod.json.to_str().unwrap(),
    ])
}

/// `crictl create` and `start` of `command` in `pod`; its id. For the
/// counter, once it has counted.
pub fn run_container(
    env: &Env,
    crictl: &Crictl,
    pod: &Pod,
    name: &str,
    command: &[String],
    sec: Sec,
) -> String {
    let id = create(env, crictl, pod, name, COUNTER_IMAGE, command, sec)
        .unwrap_or_else(|e| panic!("create {name} ({sec:?}): {e}"));
    crictl.run(&["start", &id]);
    id
}

/// The `/proc/<pid>/status` lines that say what a process may do.
pub const STATUS_FIELDS: [&str; 11] = [
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
];

/// Those lines of `pid`'s status, their values with single spaces.
pub fn privileges(pid: i32) -> BTreeMap<&'static str, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    parse_privileges(&text).unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
}

/// A field the kernel does not print is an error, not an empty value.
pub fn parse_privileges(status: &str) -> Result<BTreeMap<&'static str, String>, String> {
    STATUS_FIELDS
        .iter()
        .map(|f| {
            let v = status
                .lines()
                .find_map(|l| l.strip_prefix(f)?.strip_prefix(':'))
                .ok_or_else(|| format!("no {f}: line in {status:?}"))?;
            Ok((*f, v.split_whitespace().collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

/// A mount over /proc or /sys as a process sees it: (mount point, file
/// system type, "ro" or "rw" for the mount).
pub type ProcSysMount = (String, String, String);

/// The file system type a masked file's mount is given here: a bind of a
/// null device, whichever file system that node lives on. runc masks a file
/// with the container's own /dev/null (tmpfs), and runc and CRIU restore
/// that mount from the host's /dev/null (devtmpfs): the same mask.
pub const NULL_DEVICE: &str = "null-device";

/// Every mount at or under /proc and /sys in `pid`'s mount namespace (mount
/// points relative to its root), sorted: the masked paths (/dev/null or a
/// read-only tmpfs over them), the read-only ones, and /proc and /sys
/// themselves.
pub fn proc_sys_mounts(pid: i32) -> Vec<ProcSysMount> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/mountinfo: {e}"));
    let mut v = parse_proc_sys_mounts(&text);
    for m in v.iter_mut() {
        // What is at the mount point, seen through the process's own root.
        let at = std::fs::metadata(format!("/proc/{pid}/root{}", m.0));
        if at.is_ok_and(|md| {
            md.file_type().is_char_device()
                && nix::sys::stat::major(md.rdev()) == 1
                && nix::sys::stat::minor(md.rdev()) == 3
        }) {
            m.1 = NULL_DEVICE.to_string();
        }
    }
    v.sort();
    v
}

pub fn parse_proc_sys_mounts(mountinfo: &str) -> Vec<ProcSysMount> {
    let under = |p: &str, top: &str| p == top || p.starts_with(&format!("{top}/"));
    let mut v: Vec<ProcSysMount> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let point = *f.get(4)?;
            if !(under(point, "/proc") || under(point, "/sys")) {
                return None;
            }
            let dash = f.iter().position(|x| *x == "-")?;
            let fstype = *f.get(dash + 1)?;
            let ro = if f[5].split(',').any(|o| o == "ro") {
                "ro"
            } else {
                "rw"
            };
            Some((point.to_string(), fstype.to_string(), ro.to_string()))
        })
        .collect();
    v.sort();
    v
}

/// The first value after `prefix` (e.g. "counter ") that `log` (CRI log
/// format) shows, waiting up to `limit` for it.
pub fn first_logged(log: &Path, prefix: &str, limit: Duration) -> Option<u64> {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(n) = logged(&text, prefix).first() {
            return Some(n.0);
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every line of a CRI log's text that has `prefix`: (the number after it,
/// the rest of the line after the number).
pub fn logged(text: &str, prefix: &str) -> Vec<(u64, String)> {
    text.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(prefix)?;
            let (n, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((n.trim().parse().ok()?, tail.to_string()))
        })
        .collect()
}

/// Waits up to `limit` for `log` to show a value of `want` or more after
/// `prefix`.
pub fn logged_up_to(log: &Path, prefix: &str, want: u64, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if logged(&text, prefix).iter().any(|(n, _)| *n >= want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits up to `limit` for the count in `rootfs/tmp/count` to reach `want`.
pub fn counts_to(rootfs: &Path, want: u64, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if super::read_count(rootfs).is_some_and(|v| v >= want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// CRIU's image format, as far as a forger needs it: an image is two
/// little-endian u32 magics, then entries, each a little-endian u32 length
/// and that many bytes of protobuf.
pub mod criu {
    /// Every image's first magic (criu/include/magic.h), and core-*.img's second.
    pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
    pub const CORE_MAGIC: u32 = 0x5505_3847;
    /// core_entry.thread_core; thread_core_entry.creds.
    pub const CORE_THREAD_CORE: u32 = 5;
    pub const THREAD_CORE_CREDS: u32 = 10;
    /// creds_entry's capability sets (repeated uint32, one per 32 bits).
    pub const CAP_INH: u32 = 9;
    pub const CAP_PRM: u32 = 10;
    pub const CAP_EFF: u32 = 11;
    pub const CAP_BND: u32 = 12;
    pub const CAP_AMB: u32 = 19;
    pub const CAP_FIELDS: [u32; 5] = [CAP_INH, CAP_PRM, CAP_EFF, CAP_BND, CAP_AMB];

    /// One field as it is on the wire: its number, wire type and value (a
    /// varint's or fixed's own bytes, or a length-delimited payload).
    #[derive(Clone, Debug)]
    pub struct Field {
        pub num: u32,
        pub wire: u8,
        pub value: Vec<u8>,
    }

    fn varint(b: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*pos).expect("a varint runs past its message");
            *pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
        }
        panic!("a varint longer than 10 bytes");
    }

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A message's fields in their order.
    pub fn parse(b: &[u8]) -> Vec<Field> {
        let mut pos = 0;
        let mut fields = Vec::new();
        while pos < b.len() {
            let key = varint(b, &mut pos);
            let (num, wire) = ((key >> 3) as u32, (key & 7) as u8);
            let start = pos;
            let value = match wire {
                0 => {
                    varint(b, &mut pos);
                    b[start..pos].to_vec()
                }
                1 => {
                    pos += 8;
                    b[start..pos].to_vec()
                }
                2 => {
                    let len = varint(b, &mut pos) as usize;
                    let v = b[pos..pos + len].to_vec();
                    pos += len;
                    v
                }
                5 => {
                    pos += 4;
                    b[start..pos].to_vec()
                }
                w => panic!("field {num}: wire type {w} is not in CRIU's images"),
            };
            fields.push(Field { num, wire, value });
        }
        fields
    }

    pub fn encode(fields: &[Field]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in fields {
            put_varint(&mut out, (u64::from(f.num) << 3) | u64::from(f.wire));
            if f.wire == 2 {
                put_varint(&mut out, f.value.len() as u64);
            }
            out.extend_from_slice(&f.value);
        }
        out
    }

    /// A repeated uint32 field's values, packed or not.
    pub fn repeated_u32(fields: &[Field], num: u32) -> Vec<u32> {
        let mut v = Vec::new();
        for f in fields.iter().filter(|f| f.num == num) {
            let mut pos = 0;
            match f.wire {
                0 => v.push(varint(&f.value, &mut pos) as u32),
                2 => {
                    while pos < f.value.len() {
                        v.push(varint(&f.value, &mut pos) as u32);
                    }
                }
                w => panic!("field {num}: wire type {w} for a uint32"),
            }
        }
        v
    }

    /// An image's entries, after checking its magics are `IMG_COMMON_MAGIC`
    /// and `magic`.
    pub fn entries(img: &[u8], magic: u32) -> Vec<Vec<u8>> {
        let word = |i: usize| u32::from_le_bytes(img[i..i + 4].try_into().unwrap());
        assert!(img.len() >= 8, "an image of {} bytes", img.len());
        assert_eq!(
            (word(0), word(4)),
            (IMG_COMMON_MAGIC, magic),
            "not the image expected"
        );
        let mut pos = 8;
        let mut v = Vec::new();
        while pos < img.len() {
            let len = word(pos) as usize;
            pos += 4;
            v.push(img[pos..pos + len].to_vec());
            pos += len;
        }
        v
    }

    /// An image of `magic` made of `entries`.
    pub fn image(magic: u32, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        out.extend_from_slice(&magic.to_le_bytes());
        for e in entries {
            out.extend_from_slice(&(e.len() as u32).to_le_bytes());
            out.extend_from_slice(e);
        }
        out
    }

    /// `f` applied to the payload of the one length-delimited field `num` of
    /// `msg`; panics if `msg` has no such field.
    fn within(msg: &[u8], num: u32, f: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        let mut fields = parse(msg);
        let mut seen = 0;
        for x in fields.iter_mut().filter(|x| x.num == num && x.wire == 2) {
            x.value = f(&x.value);
            seen += 1;
        }
        assert_eq!(seen, 1, "field {num} {seen} times in the message");
        encode(&fields)
    }

    /// creds_entry's IDs (uid, gid, euid, egid, suid, sgid, fsuid, fsgid:
    /// fields 1 to 8, in that order) and supplementary groups.
    pub const ID_FIELDS: [u32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
    pub const GROUPS: u32 = 14;

    /// A core-<tid>.img with `edit` applied to each thread's creds_entry
    /// (its fields, in their order).
    pub fn rewrite_creds(core_img: &[u8], edit: &dyn Fn(Vec<Field>) -> Vec<Field>) -> Vec<u8> {
        let forged: Vec<Vec<u8>> = entries(core_img, CORE_MAGIC)
            .iter()
            .map(|core| {
                within(core, CORE_THREAD_CORE, |tc| {
                    within(tc, THREAD_CORE_CREDS, |creds| encode(&edit(parse(creds))))
                })
            })
            .collect();
        image(CORE_MAGIC, &forged)
    }

    /// `fields` with every `num` replaced by `values`, each its own varint.
    pub fn set_u32s(fields: Vec<Field>, num: u32, values: &[u32]) -> Vec<Field> {
        let mut fields: Vec<Field> = fields.into_iter().filter(|x| x.num != num).collect();
        for v in values {
            let mut value = Vec::new();
            put_varint(&mut value, u64::from(*v));
            fields.push(Field {
                num,
                wire: 0,
                value,
            });
        }
        fields
    }

    /// A core-<tid>.img whose thread's credentials hold every capability:
    /// inheritable, permitted, effective, bounding and ambient all ones, in
    /// two 32-bit words each (CRIU keeps the bits the kernel has).
    pub fn forge_all_caps(core_img: &[u8]) -> Vec<u8> {
        rewrite_creds(core_img, &|fields| {
            CAP_FIELDS
                .iter()
                .fold(fields, |f, num| set_u32s(f, *num, &[u32::MAX, u32::MAX]))
        })
    }

    /// What a creds_entry says: its IDs (in [`ID_FIELDS`] order), groups and
    /// capability sets (by field number).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Creds {
        pub ids: [u32; 8],
        pub groups: Vec<u32>,
        pub caps: std::collections::BTreeMap<u32, Vec<u32>>,
    }

    /// A core-<tid>.img whose thread's IDs, groups and capabilities are
    /// `creds`' (everything else in them, securebits, no_new_privs and LSM
    /// labels among them, as it was).
    pub fn forge_creds(core_img: &[u8], creds: &Creds) -> Vec<u8> {
        rewrite_creds(core_img, &|fields| {
            let mut f = fields;
            for (num, id) in ID_FIELDS.iter().zip(creds.ids) {
                f = set_u32s(f, *num, &[id]);
            }
            f = set_u32s(f, GROUPS, &creds.groups);
            for (num, words) in &creds.caps {
                f = set_u32s(f, *num, words);
            }
            f
        })
    }

    /// The creds_entry of a core-<tid>.img, read back independently of the
    /// forger's rewriting.
    pub fn creds(core_img: &[u8]) -> Creds {
        let core = entries(core_img, CORE_MAGIC);
        assert_eq!(core.len(), 1, "one core_entry in a core image");
        let one = |msg: &[u8], num: u32| -> Vec<u8> {
            let f = parse(msg);
            let v: Vec<&Field> = f.iter().filter(|x| x.num == num).collect();
            assert_eq!(v.len(), 1, "field {num}");
            v[0].value.clone()
        };
        let fields = parse(&one(&one(&core[0], CORE_THREAD_CORE), THREAD_CORE_CREDS));
        let mut ids = [0u32; 8];
        for (i, num) in ID_FIELDS.iter().enumerate() {
            let v = repeated_u32(&fields, *num);
            assert_eq!(v.len(), 1, "creds field {num}: {v:?}");
            ids[i] = v[0];
        }
        Creds {
            ids,
            groups: repeated_u32(&fields, GROUPS),
            caps: CAP_FIELDS
                .iter()
                .map(|n| (*n, repeated_u32(&fields, *n)))
                .collect(),
        }
    }

    /// The capability sets a core-<tid>.img's credentials hold, by field
    /// number.
    pub fn caps(core_img: &[u8]) -> std::collections::BTreeMap<u32, Vec<u32>> {
        creds(core_img).caps
    }

    /// The credentials a process has, as `/proc/<pid>/status` shows them
    /// ([`super::privileges`]), in a creds_entry's terms: what a checkpoint
    /// of that process would hold.
    pub fn creds_of(status: &std::collections::BTreeMap<&'static str, String>) -> Creds {
        let nums = |f: &str| -> Vec<u32> {
            status[f]
                .split_whitespace()
                .map(|x| x.parse().unwrap_or_else(|e| panic!("{f} {x:?}: {e}")))
                .collect()
        };
        // Real, effective, saved and file system IDs.
        let (u, g) = (nums("Uid"), nums("Gid"));
        assert_eq!((u.len(), g.len()), (4, 4), "{status:?}");
        let words = |f: &str| {
            let v = u64::from_str_radix(&status[f], 16).unwrap();
            vec![v as u32, (v >> 32) as u32]
        };
        Creds {
            ids: [u[0], g[0], u[1], g[1], u[2], g[2], u[3], g[3]],
            groups: nums("Groups"),
            caps: [
                (CAP_INH, "CapInh"),
                (CAP_PRM, "CapPrm"),
                (CAP_EFF, "CapEff"),
                (CAP_BND, "CapBnd"),
                (CAP_AMB, "CapAmb"),
            ]
            .into_iter()
            .map(|(n, f)| (n, words(f)))
            .collect(),
        }
    }

    /// A CheckpointContainer archive's core images (`checkpoint/core-*.img`).
    pub fn is_core_image(member: &str) -> bool {
        member
            .strip_prefix("checkpoint/core-")
            .and_then(|s| s.strip_suffix(".img"))
            .is_some_and(|tid| !tid.is_empty() && tid.bytes().all(|b| b.is_ascii_digit()))
    }
}
