//! Issue 25: a restore must not let the checkpoint's author choose the
//! restored process's privileges. CRIU restores credentials, capabilities,
//! seccomp and mounts from the images, so each restore is held against the
//! new container's config: what the checkpoint holds beyond it is lowered or
//! refused, and a restore that succeeds holds exactly what a fresh container
//! of that config holds.
//!
//! Everything goes through the real CRI path: crictl 1.34 (grpc-go) on the
//! shim's socket, in front of containerd 1.6 whose runc is ckpt-runc, except
//! RestorePod, which crictl lacks (cri-client's pods module, hack/cri-client). The forged checkpoint is
//! forged by this file's helpers (tests/common/security.rs), from CRIU's image
//! format, not by anything of src/.

mod common;

use cri_client::pods as cri_pods;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cri::Env;
use common::security::{
    self as sec, counter_command, criu, privileges, proc_sys_mounts, Crictl, Pod, ProcSysMount, Sec,
};

const SOURCES: [Sec; 5] = [
    Sec::Default,
    Sec::Privileged,
    Sec::Uid1000,
    Sec::AddedCaps,
    Sec::Unconfined,
];
const TARGETS: [Sec; 3] = [Sec::Default, Sec::Restricted, Sec::Privileged];

/// How long a restored process gets to show it goes on.
const WAIT: Duration = Duration::from_secs(20);

const PERMISSION_DENIED: &str = "PermissionDenied";
const FAILED_PRECONDITION: &str = "FailedPrecondition";

/// What a restore of `src`'s checkpoint into a container of config `tgt` must do.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Restored, holding what a fresh `tgt` container holds.
    Restores,
    /// Refused at CreateContainer with one of these codes, nothing left.
    Refused(&'static [&'static str]),
}

/// The issue's table. The identity (uid, gid, groups) and the mount set must
/// match the target's, or the restore is refused (PERMISSION_DENIED); extra
/// capabilities and a missing or weaker seccomp filter are lowered to the
/// target's. A checkpoint with fewer privileges than a fresh privileged
/// container may also be answered FAILED_PRECONDITION.
fn expected(src: Sec, tgt: Sec) -> Expect {
    use Sec::*;
    match (src, tgt) {
        (Default, Default) | (Unconfined, Default) | (AddedCaps, Default) => Expect::Restores,
        (Uid1000, Restricted) | (Privileged, Privileged) => Expect::Restores,
        (_, Privileged) => Expect::Refused(&[PERMISSION_DENIED, FAILED_PRECONDITION]),
        _ => Expect::Refused(&[PERMISSION_DENIED]),
    }
}

/// What a process holds: its status lines and its /proc and /sys mounts.
#[derive(Clone, Debug, PartialEq)]
struct Held {
    status: BTreeMap<&'static str, String>,
    mounts: Vec<ProcSysMount>,
}

fn held(pid: i32) -> Held {
    Held {
        status: privileges(pid),
        mounts: proc_sys_mounts(pid),
    }
}

/// The status fields in one line, capabilities as the kernel prints them.
fn status_line(s: &BTreeMap<&'static str, String>) -> String {
    sec::STATUS_FIELDS
        .iter()
        .map(|f| format!("{f}={}", s[f].replace(' ', ",")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where `got` differs from `want`, field by field and mount by mount.
fn differences(what: &str, got: &Held, want: &Held) -> Vec<String> {
    let mut v: Vec<String> = sec::STATUS_FIELDS
        .iter()
        .filter(|f| got.status[*f] != want.status[*f])
        .map(|f| {
            format!(
                "{what}: {f} is {:?}, a fresh container's {:?}",
                got.status[f], want.status[f]
            )
        })
        .collect();
    let extra: Vec<&ProcSysMount> = got
        .mounts
        .iter()
        .filter(|m| !want.mounts.contains(m))
        .collect();
    let missing: Vec<&ProcSysMount> = want
        .mounts
        .iter()
        .filter(|m| !got.mounts.contains(m))
        .collect();
    if got.mounts != want.mounts {
        v.push(format!(
            "{what}: /proc and /sys mounts differ from a fresh container's: extra {extra:?}, missing {missing:?}"
        ));
    }
    v
}

/// A source container: its checkpoint's archive and the counts just before
/// and after it, or why CheckpointContainer failed.
struct Source {
    sec: Sec,
    checkpoint: Result<(PathBuf, (u64, u64)), String>,
    /// Why the checkpoint is a stand-in, forged from another, if it is.
    stand_in: Option<String>,
}

#[derive(Debug)]
enum Outcome {
    /// The source could not be checkpointed: nothing to restore.
    NoCheckpoint(String),
    /// CreateContainer failed: crictl's gRPC code and message.
    Refused(Option<String>, String),
    /// Created, then StartContainer failed.
    StartFailed(String),
    /// Running: what it held, its first count (if it logged one) and whether
    /// it counted on.
    Restored(Held, Option<u64>, bool),
}

struct Row {
    src: Sec,
    /// The source's checkpoint is a stand-in.
    stand_in: bool,
    tgt: Sec,
    expect: Expect,
    outcome: Outcome,
    problems: Vec<String>,
}

impl Row {
    fn print(&self) -> String {
        let star = if self.stand_in { "*" } else { "" };
        let pair = format!("{}{star} -> {}", self.src.name(), self.tgt.name());
        let want = match self.expect {
            Expect::Restores => "restores".to_string(),
            Expect::Refused(codes) => format!("refused {}", codes.join("|")),
        };
        let (got, detail) = match &self.outcome {
            Outcome::NoCheckpoint(e) => ("no checkpoint".to_string(), e.clone()),
            Outcome::Refused(code, msg) => (
                format!("refused {}", code.as_deref().unwrap_or("?")),
                // The runtime's own words, after crictl's wrapping.
                msg.rsplit_once("desc = ")
                    .map_or(msg.as_str(), |(_, d)| d)
                    .trim_end_matches('"')
                    .to_string(),
            ),
            Outcome::StartFailed(e) => (
                "start failed".to_string(),
                e.lines().last().unwrap_or("").to_string(),
            ),
            Outcome::Restored(h, first, counting) => (
                "restored".to_string(),
                format!(
                    "{} | {} /proc,/sys mounts | first count {} {}",
                    status_line(&h.status),
                    h.mounts.len(),
                    first.map_or("none".into(), |n| n.to_string()),
                    if *counting {
                        "counting"
                    } else {
                        "NOT counting"
                    }
                ),
            ),
        };
        let verdict = if self.problems.is_empty() {
            "ok"
        } else {
            "FAIL"
        };
        format!("{pair:<26} {want:<42} {got:<26} {verdict:<4} {detail}")
    }
}

/// Restores `src`'s checkpoint into `pod` as container `name` of config
/// `tgt`; the outcome, and the problems with it against `expect` and the
/// fresh container `fresh`. A container made is removed again.
#[allow(clippy::too_many_arguments)]
fn restore_one(
    env: &Env,
    crictl: &Crictl,
    pod: &Pod,
    name: &str,
    src: &Source,
    tgt: Sec,
    expect: Expect,
    fresh: &Held,
) -> Row {
    let mut problems = Vec::new();
    let (archive, (before, after)) = match &src.checkpoint {
        Ok(c) => c.clone(),
        Err(e) => {
            problems.push(format!(
                "{name}: {} could not be checkpointed",
                src.sec.name()
            ));
            return Row {
                src: src.sec,
                stand_in: src.stand_in.is_some(),
                tgt,
                expect,
                outcome: Outcome::NoCheckpoint(e.clone()),
                problems,
            };
        }
    };
    let containers = crictl.all_containers();
    let restores = env.restores();
    let image = archive.to_str().unwrap();
    let outcome = match sec::create(env, crictl, pod, name, image, &counter_command(), tgt) {
        Err(stderr) => {
            let left = crictl.all_containers();
            if left != containers {
                problems.push(format!(
                    "{name}: refused, but `crictl ps -a` went from {containers:?} to {left:?}"
                ));
            }
            if env.restores() != restores {
                problems.push(format!(
                    "{name}: refused, but the shim keeps {:?} (had {restores:?})",
                    env.restores()
                ));
            }
            Outcome::Refused(sec::grpc_code(&stderr), stderr)
        }
        Ok(id) => {
            let outcome = match crictl.try_run(&["start", &id]) {
                Err(e) => {
                    let killed = sec::kill_stuck_runtime(&id);
                    Outcome::StartFailed(format!(
                        "{e}\nthe shim's log ends: {}\n({killed} processes of its start left, killed)",
                        tail(&env.shim_log(), 5)
                    ))
                }
                Ok(_) => {
                    // Once it has logged, CRIU is done with it.
                    let log = pod.logs.join(format!("{name}.log"));
                    let first = sec::first_logged(&log, "counter ", WAIT);
                    let h = held(crictl.pid(&id));
                    let counting =
                        first.is_some_and(|f| sec::logged_up_to(&log, "counter ", f + 3, WAIT));
                    Outcome::Restored(h, first, counting)
                }
            };
            crictl.run(&["rm", "-f", &id]);
            outcome
        }
    };
    match (expect, &outcome) {
        (Expect::Refused(codes), Outcome::Refused(code, msg)) => {
            if !code.as_deref().is_some_and(|c| codes.contains(&c)) {
                problems.push(format!(
                    "{name}: refused with {code:?}, not one of {codes:?}: {msg}"
                ));
            }
        }
        (Expect::Refused(_), other) => problems.push(format!(
            "{name}: must be refused at CreateContainer, but {}",
            match other {
                Outcome::StartFailed(e) => format!("it was created and its start failed: {e}"),
                _ => "it was restored".to_string(),
            }
        )),
        (Expect::Restores, Outcome::Restored(h, first, counting)) => {
            problems.extend(differences(name, h, fresh));
            match first {
                Some(n) if *n > before && *n <= after + 1 => {}
                _ => problems.push(format!(
                    "{name}: restored at count {first:?}, the checkpoint saw {before}..{after}"
                )),
            }
            if !counting {
                problems.push(format!("{name}: does not count on"));
            }
        }
        (Expect::Restores, other) => {
            problems.push(format!("{name}: must be restored, but {other:?}"))
        }
    }
    Row {
        src: src.sec,
        stand_in: src.stand_in.is_some(),
        tgt,
        expect,
        outcome,
        problems,
    }
}

/// A node whose capabilities lack CAP_SYS_RESOURCE cannot checkpoint a
/// non-root process at all (CRIU cannot read its rlimits). There, the
/// uid-1000 rows restore a stand-in: the default container's checkpoint with
/// every thread's IDs, groups and capabilities rewritten to what the running
/// uid-1000 container has (its /proc/<pid>/status). The policy holds the
/// images' credentials against the new spec, so the restore takes the same
/// path; the table marks those rows with `*`.
fn uid1000_stand_in(sources: &mut [Source], held: &BTreeMap<Sec, Held>, dir: &Path) {
    let default = sources
        .iter()
        .find(|x| x.sec == Sec::Default)
        .and_then(|x| x.checkpoint.clone().ok());
    let Some(src) = sources
        .iter_mut()
        .find(|x| x.sec == Sec::Uid1000 && x.checkpoint.is_err())
    else {
        return;
    };
    if has_cap(&all_caps(), CAP_SYS_RESOURCE) {
        return;
    }
    let Some((archive, counts)) = default else {
        return;
    };
    let want = criu::creds_of(&held[&Sec::Uid1000].status);
    let forged = dir.join("uid1000-stand-in.tar");
    common::archive::rewrite(
        &archive,
        &forged,
        |name, data| criu::is_core_image(name).then(|| criu::forge_creds(data, &want)),
        None,
    );
    let cores: Vec<String> = common::members(&forged)
        .into_iter()
        .map(|m| m.0)
        .filter(|m| criu::is_core_image(m))
        .collect();
    assert!(!cores.is_empty(), "no core image in {}", archive.display());
    for name in &cores {
        assert_eq!(
            criu::creds(&common::member_bytes(&forged, name)),
            want,
            "{name} of the stand-in"
        );
    }
    let why = format!(
        "{}; stand-in: the default checkpoint, {} core images' credentials set to the uid-1000 container's {want:?}",
        src.checkpoint.as_ref().unwrap_err(),
        cores.len()
    );
    eprintln!("uid1000: {why}");
    src.checkpoint = Ok((forged, counts));
    src.stand_in = Some(why);
}

/// CheckpointContainer's error, in one line, with what this node lacks if
/// that is the cause: CRIU reads each task's rlimits with prlimit(), which
/// for a task of another user needs CAP_SYS_RESOURCE.
fn why_no_checkpoint(stderr: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.contains("Error (") && !l.contains("Dumping FAILED"))
        .or_else(|| stderr.lines().find(|l| l.contains("rpc error")))
        .unwrap_or(stderr)
        .trim()
        .to_string();
    if line.contains("rlimit") && !has_cap(&all_caps(), CAP_SYS_RESOURCE) {
        format!("{line} (this node's capability bounding set lacks CAP_SYS_RESOURCE, which CRIU needs to read a non-root task's rlimits)")
    } else {
        line
    }
}

/// Capability bit `n` is in the hex set `caps` (as /proc/<pid>/status prints it).
fn has_cap(caps: &str, n: u32) -> bool {
    u64::from_str_radix(caps, 16).unwrap() & (1 << n) != 0
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_SYS_TIME: u32 = 25;

/// What a privileged container gets: every capability the runtime has,
/// which is this process's bounding set (containerd is started from here).
/// On a node without CAP_SYS_RESOURCE, say, that is not the kernel's all.
fn all_caps() -> String {
    privileges(std::process::id() as i32)["CapBnd"].clone()
}

/// The configs did what the test means them to do, or the matrix would
/// compare nothing: crictl ignores a field it does not know.
fn assert_configs_took_effect(fresh: &BTreeMap<Sec, Held>, sources: &BTreeMap<Sec, Held>) {
    let d = &fresh[&Sec::Default];
    assert_eq!(d.status["Uid"], "0 0 0 0", "fresh default: {d:?}");
    assert!(!has_cap(&d.status["CapEff"], CAP_SYS_ADMIN), "{d:?}");
    assert!(
        d.mounts.iter().any(|m| m.0 == "/proc/sys" && m.2 == "ro")
            && d.mounts.iter().any(|m| m.0 == "/sys" && m.2 == "ro"),
        "fresh default has no read-only /proc/sys and /sys: {:?}",
        d.mounts
    );
    assert!(
        d.mounts.iter().any(|m| m.1 == sec::NULL_DEVICE)
            && d.mounts
                .iter()
                .any(|m| m.0 == "/sys/firmware" && m.2 == "ro"),
        "fresh default has no masked paths: {:?}",
        d.mounts
    );
    let r = &fresh[&Sec::Restricted];
    assert_eq!(
        (
            r.status["Uid"].as_str(),
            r.status["Gid"].as_str(),
            r.status["CapEff"].as_str(),
            r.status["CapBnd"].as_str(),
            r.status["NoNewPrivs"].as_str(),
            r.status["Seccomp"].as_str(),
        ),
        (
            "1000 1000 1000 1000",
            "1000 1000 1000 1000",
            "0000000000000000",
            "0000000000000000",
            "1",
            "2"
        ),
        "fresh restricted: {r:?}"
    );
    let p = &fresh[&Sec::Privileged];
    assert_eq!(p.status["CapEff"], all_caps(), "fresh privileged: {p:?}");
    assert!(
        p.mounts.iter().all(|m| m.2 == "rw")
            && p.mounts.iter().any(|m| m.0 == "/sys" && m.1 == "sysfs"),
        "fresh privileged: {:?}",
        p.mounts
    );
    assert_ne!(d.mounts, p.mounts);
    assert_eq!(
        sources[&Sec::Default],
        *d,
        "the default source is a default container"
    );
    assert_eq!(sources[&Sec::Privileged], *p, "the privileged source");
    let u = &sources[&Sec::Uid1000];
    assert_eq!(
        (u.status["Uid"].as_str(), u.status["Gid"].as_str()),
        ("1000 1000 1000 1000", "1000 1000 1000 1000"),
        "{u:?}"
    );
    let c = &sources[&Sec::AddedCaps].status;
    assert!(
        has_cap(&c["CapEff"], CAP_NET_ADMIN)
            && has_cap(&c["CapEff"], CAP_SYS_TIME)
            && !has_cap(&d.status["CapEff"], CAP_NET_ADMIN)
            && !has_cap(&d.status["CapEff"], CAP_SYS_TIME),
        "added caps {c:?}, default {:?}",
        d.status
    );
    assert_eq!(sources[&Sec::Unconfined].status["Seccomp"], "0");
}

/// Five checkpoints (default, privileged, uid 1000, added capabilities,
/// seccomp unconfined), each restored into three configs (default,
/// restricted, privileged): the issue's table, row by row, against a fresh
/// container of each config in the same pod.
#[test]
fn the_restore_matrix_holds_what_a_fresh_container_of_the_new_config_holds() {
    let mut env = Env::start();
    let crictl = Crictl::new(&env);
    let src_pod = sec::run_pod(&mut env, &crictl, "src", false);
    let dst_pod = sec::run_pod(&mut env, &crictl, "dst", false);
    // Privileged containers need a privileged pod: the privileged source,
    // the privileged target and the restores into it.
    let priv_pod = sec::run_pod(&mut env, &crictl, "priv", true);
    let pod_for = |s: Sec| {
        if s == Sec::Privileged {
            &priv_pod
        } else {
            &src_pod
        }
    };
    let target_pod = |s: Sec| {
        if s == Sec::Privileged {
            &priv_pod
        } else {
            &dst_pod
        }
    };

    let mut source_ids = Vec::new();
    for s in SOURCES {
        let name = format!("src-{}", s.name());
        let id = sec::run_container(&env, &crictl, pod_for(s), &name, &counter_command(), s);
        source_ids.push((s, id));
    }
    let mut fresh = BTreeMap::new();
    for t in TARGETS {
        let name = format!("fresh-{}", t.name());
        let id = sec::run_container(&env, &crictl, target_pod(t), &name, &counter_command(), t);
        common::wait_count(&env.rootfs(&id), |v| v >= 3);
        fresh.insert(t, held(crictl.pid(&id)));
    }
    let mut source_held = BTreeMap::new();
    for (s, id) in &source_ids {
        common::wait_count(&env.rootfs(id), |v| v >= 3);
        source_held.insert(*s, held(crictl.pid(id)));
    }
    for (t, h) in &fresh {
        eprintln!(
            "fresh {:<10} {} | /proc,/sys: {:?}",
            t.name(),
            status_line(&h.status),
            h.mounts
        );
    }
    assert_configs_took_effect(&fresh, &source_held);

    let out = common::out_dir();
    let mut sources = Vec::new();
    for (s, id) in &source_ids {
        let archive = out.path().join(format!("{}.tar", s.name()));
        let before = env.count(id).unwrap();
        let done = crictl.try_run(&["checkpoint", &format!("--export={}", archive.display()), id]);
        let after = env.count(id).unwrap();
        sources.push(Source {
            sec: *s,
            checkpoint: done
                .map(|_| (archive, (before, after)))
                .map_err(|e| why_no_checkpoint(&e)),
            stand_in: None,
        });
    }
    uid1000_stand_in(&mut sources, &source_held, out.path());

    // The harness tells a refusal when it sees one: an archive cut short,
    // which the shim refuses already, gives a code and leaves nothing.
    let default = sources
        .iter()
        .find(|x| x.sec == Sec::Default)
        .and_then(|x| x.checkpoint.clone().ok())
        .expect("the default checkpoint");
    let bytes = std::fs::read(&default.0).unwrap();
    let cut = out.path().join("cut-short.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let cut = Source {
        sec: Sec::Default,
        checkpoint: Ok((cut, default.1)),
        stand_in: None,
    };
    let check = restore_one(
        &env,
        &crictl,
        &dst_pod,
        "cut-short",
        &cut,
        Sec::Default,
        Expect::Refused(&["InvalidArgument"]),
        &fresh[&Sec::Default],
    );
    assert!(
        check.problems.is_empty(),
        "{}\n{:?}",
        check.print(),
        check.problems
    );

    let mut rows = Vec::new();
    for src in &sources {
        for t in TARGETS {
            let name = format!("r-{}-{}", src.sec.name(), t.name());
            rows.push(restore_one(
                &env,
                &crictl,
                target_pod(t),
                &name,
                src,
                t,
                expected(src.sec, t),
                &fresh[&t],
            ));
        }
    }
    eprintln!(
        "\nissue 25 restore matrix ({} rows)\n{:<26} {:<42} {:<26} {:<4} details",
        rows.len(),
        "checkpoint -> target",
        "expected",
        "outcome",
        ""
    );
    for r in &rows {
        eprintln!("{}", r.print());
    }
    for s in &sources {
        if let Some(why) = &s.stand_in {
            eprintln!("* {}: {why}", s.sec.name());
        }
    }
    let problems: Vec<&String> = rows.iter().flat_map(|r| &r.problems).collect();
    assert!(
        problems.is_empty(),
        "{} of {} rows fail:\n{}",
        rows.iter().filter(|r| !r.problems.is_empty()).count(),
        rows.len(),
        problems
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The attempts a process with every capability could make, each printed
/// with its result, forever, with a count in memory (also in /tmp/count).
/// Each write puts back the value the file already has (if it can be read),
/// so even one that succeeds changes nothing on the node.
const PROBER: &str = r#"mkdir -p /mnt
echo 'not a module' > /tmp/m.ko
i=0
try() { if out=$("$@" 2>&1); then echo ok; else echo "fail($(echo $out))"; fi; }
rewrite() { v=$(cat "$1") && printf '%s\n' "$v" > "$1"; }
while :; do
  i=$((i+1))
  m=$(try mount -t tmpfs none /mnt) && [ "$m" = ok ] && umount /mnt
  u=$(try rewrite /sys/kernel/uevent_helper)
  k=$(try insmod /tmp/m.ko)
  p=$(try rewrite /proc/sys/kernel/modprobe)
  echo $i > /tmp/count
  echo "attempt $i mount=$m uevent_helper=$u insmod=$k modprobe=$p"
  sleep 0.2
done"#;

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn prober() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), PROBER.into()]
}

/// The attempts' results in a log: (count, [(attempt, result)]).
fn attempts(log: &Path) -> Vec<(u64, Vec<(String, String)>)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    sec::logged(&text, "attempt ")
        .into_iter()
        .map(|(n, rest)| {
            // Each result runs to the next " name=".
            let mut parts: Vec<(String, String)> = Vec::new();
            for word in rest.split(' ') {
                match word.split_once('=') {
                    Some((k, val))
                        if ["mount", "uevent_helper", "insmod", "modprobe"].contains(&k) =>
                    {
                        parts.push((k.to_string(), val.to_string()))
                    }
                    _ => {
                        if let Some(last) = parts.last_mut() {
                            last.1.push(' ');
                            last.1.push_str(word);
                        }
                    }
                }
            }
            (n, parts)
        })
        .collect()
}

/// Waits until `log` shows attempt `n` or later; every attempt line so far.
fn attempts_until(log: &Path, n: u64) -> Vec<(u64, Vec<(String, String)>)> {
    let t = std::time::Instant::now();
    loop {
        let a = attempts(log);
        if a.last().is_some_and(|x| x.0 >= n) {
            return a;
        }
        assert!(
            t.elapsed() < WAIT,
            "{} shows no attempt {n}: {a:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A default container's checkpoint whose images were forged to hold every
/// capability, restored into a default pod: the restored tree holds what a
/// fresh default container holds, and everything it tries that needs more
/// fails. A privileged container running the same prober shows that the
/// prober does see a success.
#[test]
fn a_checkpoint_forged_to_hold_every_capability_restores_with_the_default_ones() {
    let mut env = Env::start();
    let crictl = Crictl::new(&env);
    let src_pod = sec::run_pod(&mut env, &crictl, "ex-src", false);
    let dst_pod = sec::run_pod(&mut env, &crictl, "ex-dst", false);
    let priv_pod = sec::run_pod(&mut env, &crictl, "ex-priv", true);

    let src = sec::run_container(&env, &crictl, &src_pod, "prober", &prober(), Sec::Default);
    sec::run_container(
        &env,
        &crictl,
        &priv_pod,
        "control",
        &prober(),
        Sec::Privileged,
    );
    let fresh = sec::run_container(
        &env,
        &crictl,
        &dst_pod,
        "fresh",
        &counter_command(),
        Sec::Default,
    );
    common::wait_count(&env.rootfs(&fresh), |v| v >= 2);
    let fresh_held = held(crictl.pid(&fresh));
    let src_log = src_pod.logs.join("prober.log");
    let src_attempts = attempts_until(&src_log, 2);
    let control_attempts = attempts_until(&priv_pod.logs.join("control.log"), 1);
    eprintln!(
        "default prober: {:?}\nprivileged control: {:?}",
        src_attempts.last(),
        control_attempts.last()
    );
    // The prober tells a success from a failure: privileged, it mounts.
    assert!(
        control_attempts
            .iter()
            .all(|(_, r)| r.iter().any(|(k, v)| k == "mount" && v == "ok")),
        "a privileged container could not mount: {control_attempts:?}"
    );
    assert!(
        src_attempts
            .iter()
            .all(|(_, r)| r.len() == 4 && r.iter().all(|(_, v)| v.starts_with("fail("))),
        "the default container could do one of them: {src_attempts:?}"
    );

    let out = common::out_dir();
    let archive = out.path().join("prober.tar");
    let rootfs = env.rootfs(&src);
    let before = common::wait_count(&rootfs, |_| true);
    crictl.run(&[
        "checkpoint",
        &format!("--export={}", archive.display()),
        &src,
    ]);
    let after = common::wait_count(&rootfs, |_| true);

    // Every thread's credentials rewritten to all ones.
    let forged = out.path().join("forged.tar");
    let cores = std::sync::Mutex::new(Vec::new());
    common::archive::rewrite(
        &archive,
        &forged,
        |name, data| {
            criu::is_core_image(name).then(|| {
                cores.lock().unwrap().push(name.to_string());
                criu::forge_all_caps(data)
            })
        },
        None,
    );
    let cores = cores.into_inner().unwrap();
    assert!(!cores.is_empty(), "no core image in {}", archive.display());
    let ones = vec![u32::MAX, u32::MAX];
    for name in &cores {
        let was = criu::caps(&common::member_bytes(&archive, name));
        let now = criu::caps(&common::member_bytes(&forged, name));
        assert!(now.values().all(|v| *v == ones), "{name} forged: {now:x?}");
        assert_ne!(
            was[&criu::CAP_EFF],
            ones,
            "{name} held every capability already"
        );
        eprintln!("{name}: caps {was:x?} forged to all ones");
    }

    let id = sec::create(
        &env,
        &crictl,
        &dst_pod,
        "restored",
        forged.to_str().unwrap(),
        &prober(),
        Sec::Default,
    )
    .unwrap_or_else(|e| {
        panic!("the forged checkpoint must be restored with its capabilities lowered: {e}")
    });
    if let Err(e) = crictl.try_run(&["start", &id]) {
        let killed = sec::kill_stuck_runtime(&id);
        panic!(
            "StartContainer of the forged checkpoint: {e}\n({killed} processes of its start left, killed)\nthe shim's log ends: {}",
            tail(&env.shim_log(), 5),
        );
    }
    let log = dst_pod.logs.join("restored.log");
    let first = sec::first_logged(&log, "attempt ", WAIT).expect("the restored prober logs");
    let pid = crictl.pid(&id);
    let restored = held(pid);
    let seen = attempts_until(&log, first + 2);
    eprintln!(
        "restored init {pid}: {}\nfresh default:     {}",
        status_line(&restored.status),
        status_line(&fresh_held.status)
    );
    for (n, r) in &seen {
        eprintln!("restored attempt {n}: {r:?}");
    }
    assert!(
        first > before && first <= after + 1,
        "restored at attempt {first}, the checkpoint saw {before}..{after}"
    );
    let caps = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"];
    let pick = |h: &Held| caps.map(|c| h.status[c].clone());
    assert_eq!(
        pick(&restored),
        pick(&fresh_held),
        "{caps:?} of the restored init against a fresh default container's"
    );
    assert!(
        seen.iter()
            .all(|(_, r)| r.len() == 4 && r.iter().all(|(_, v)| v.starts_with("fail("))),
        "the restored prober could do one of them: {seen:?}"
    );
}

/// What the runtime has: pods, containers, and the shim's kept restores.
fn census(env: &Env, crictl: &Crictl) -> (Vec<String>, Vec<String>, Vec<String>) {
    (crictl.all_pods(), crictl.all_containers(), env.restores())
}

/// A pod checkpoint holding one privileged container among ordinary ones,
/// restored with RestorePod into an ordinary pod config: refused as a whole,
/// with no pod and no container left; without the privileged one, the same
/// restore is taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_checkpoint_with_a_privileged_container_is_refused_whole() {
    let mut env = Env::start();
    let crictl = Crictl::new(&env);
    let pod = sec::run_pod(&mut env, &crictl, "psrc", true);
    let mut ids = Vec::new();
    for (name, s) in [
        ("a", Sec::Default),
        ("p", Sec::Privileged),
        ("b", Sec::Default),
    ] {
        let id = sec::run_container(&env, &crictl, &pod, name, &counter_command(), s);
        ids.push(id);
    }
    for id in &ids {
        common::wait_count(&env.rootfs(id), |v| v >= 2);
    }
    let p = held(crictl.pid(&ids[1]));
    assert_eq!(p.status["CapEff"], all_caps(), "p is privileged: {p:?}");

    let out = common::out_dir();
    let req = cri_pods::CheckpointPodRequest {
        pod_sandbox_id: pod.id.clone(),
        output_path: out.path().to_string_lossy().into_owned(),
        container_ids: ids.clone(),
        options: Default::default(),
    };
    cri_pods::checkpoint_pod(env.channel().await, req, Duration::from_secs(60))
        .await
        .expect("CheckpointPod");

    // Without p, the same restore is taken: a refusal below is p's.
    let ordinary = common::out_dir();
    let req = cri_pods::CheckpointPodRequest {
        pod_sandbox_id: pod.id.clone(),
        output_path: ordinary.path().to_string_lossy().into_owned(),
        container_ids: vec![ids[0].clone(), ids[2].clone()],
        options: Default::default(),
    };
    cri_pods::checkpoint_pod(env.channel().await, req, Duration::from_secs(60))
        .await
        .expect("CheckpointPod of a and b");
    let r = restore_pod(&mut env, ordinary.path(), "pdst-ordinary", &["a", "b"])
        .await
        .expect("RestorePod of the ordinary containers alone");
    let names: Vec<&str> = r
        .restored_containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b"]);

    let before = census(&env, &crictl);
    let r = restore_pod(&mut env, out.path(), "pdst", &["a", "p", "b"]).await;
    let after = census(&env, &crictl);
    eprintln!(
        "RestorePod: {:?}\npods, containers, restores before {before:?}\nafter {after:?}",
        r.as_ref().map(|r| r.restored_containers.len())
    );
    let err = r.expect_err("RestorePod of a privileged container into an ordinary pod");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(after, before, "RestorePod left something");
    // crictl's --name is a regular expression ("pdst-ordinary" is there).
    assert_eq!(crictl.run(&["pods", "--name", "^pdst$", "-q"]), "");
}

/// RestorePod of the pod checkpoint in `dir` into a new ordinary pod `name`,
/// its containers `names` given the counter's ordinary config (kubelet's
/// masked and read-only paths, as the checkpointed ones had). A pod it makes
/// is removed with `env`.
async fn restore_pod(
    env: &mut Env,
    dir: &Path,
    name: &str,
    names: &[&str],
) -> Result<cri_pods::RestorePodResponse, tonic::Status> {
    let sb = env.sandbox_config(name, false);
    std::fs::create_dir_all(&sb.log_directory).unwrap();
    let configs = names
        .iter()
        .map(|n| {
            let mut c = common::cri::counter_config(n, false);
            c.args = counter_command()[1..].to_vec();
            let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
            sc.masked_paths = sec::MASKED_PATHS.map(String::from).to_vec();
            sc.readonly_paths = sec::READONLY_PATHS.map(String::from).to_vec();
            c
        })
        .collect();
    let req = cri_pods::RestorePodRequest {
        checkpoint_path: dir.to_string_lossy().into_owned(),
        config: Some(sb),
        runtime_handler: String::new(),
        options: Default::default(),
        container_configs: configs,
    };
    let r = cri_pods::restore_pod(env.channel().await, req, Duration::from_secs(60)).await;
    if let Ok(r) = &r {
        env.pods.push(r.pod_sandbox_id.clone());
    }
    r
}

// The harness's own parsers and forger, on known input.

#[test]
fn status_lines_and_proc_sys_mounts_are_read_as_the_kernel_prints_them() {
    let status = "Name:\tcounter\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n\
        Groups:\t10 20 \nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000000\nCapBnd:\t00000000a80425fb\nCapAmb:\t0000000000000000\n\
        NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";
    let p = sec::parse_privileges(status).unwrap();
    assert_eq!(p["Uid"], "1000 1000 1000 1000");
    assert_eq!(p["Groups"], "10 20");
    assert_eq!(p["CapBnd"], "00000000a80425fb");
    assert_eq!(p["Seccomp"], "2");
    assert_eq!(p["Seccomp_filters"], "1");
    assert_eq!(p.len(), sec::STATUS_FIELDS.len());
    let missing = sec::parse_privileges("Uid:\t0\t0\t0\t0\n");
    assert!(missing.is_err(), "a missing field must not read as empty");
    // In a creds_entry's terms: IDs real, effective, saved, fs.
    let creds = criu::creds_of(&p);
    assert_eq!(creds.ids, [1000; 8]);
    assert_eq!(creds.groups, [10, 20]);
    assert_eq!(creds.caps[&criu::CAP_BND], [0xa80425fb, 0]);
    assert_eq!(creds.caps[&criu::CAP_EFF], [0, 0]);

    let mountinfo = "\
1 0 0:1 / / rw,relatime - overlay overlay rw,lowerdir=/a
2 1 0:2 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
3 1 0:3 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k
4 1 0:4 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
5 2 0:3 /null /proc/kcore rw,nosuid shared:3 - tmpfs tmpfs rw,size=65536k
6 2 0:5 / /proc/acpi ro,relatime - tmpfs tmpfs ro
7 2 0:2 /sys /proc/sys ro,nosuid,nodev,noexec,relatime - proc proc rw
8 1 0:6 / /sysroot rw - tmpfs tmpfs rw
9 4 0:7 / /sys/fs/cgroup ro,nosuid master:1 - cgroup2 cgroup rw
";
    assert_eq!(
        sec::parse_proc_sys_mounts(mountinfo),
        [
            ("/proc", "proc", "rw"),
            ("/proc/acpi", "tmpfs", "ro"),
            ("/proc/kcore", "tmpfs", "rw"),
            ("/proc/sys", "proc", "ro"),
            ("/sys", "sysfs", "ro"),
            ("/sys/fs/cgroup", "cgroup2", "ro"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    assert_eq!(
        sec::grpc_code(
            "E1207 create failed\ncreate container: rpc error: code = PermissionDenied desc = uid 0"
        )
        .as_deref(),
        Some("PermissionDenied")
    );
    assert_eq!(sec::grpc_code("no such file"), None);
}

/// A core image as CRIU writes it, its fields in an order of its own, caps
/// packed in one set and not in the others: forged, every capability set is
/// all ones, and every other field, at every level, is as it was.
#[test]
fn the_forger_sets_every_capability_and_keeps_everything_else() {
    let varint = |mut v: u64| {
        let mut o = Vec::new();
        while v >= 0x80 {
            o.push(v as u8 | 0x80);
            v >>= 7;
        }
        o.push(v as u8);
        o
    };
    let field = |num: u32, wire: u8, value: Vec<u8>| criu::Field { num, wire, value };
    let creds = criu::encode(&[
        field(1, 0, varint(1000)),
        field(2, 0, varint(1000)),
        field(3, 0, varint(1000)),
        field(4, 0, varint(1000)),
        field(5, 0, varint(1000)),
        field(6, 0, varint(1000)),
        field(7, 0, varint(1000)),
        field(8, 0, varint(1000)),
        field(9, 0, varint(0)),
        field(9, 0, varint(0)),
        field(11, 2, [varint(0xa80425fb), varint(0)].concat()),
        field(13, 0, varint(0)),
        field(14, 0, varint(10)),
        field(18, 0, varint(1)),
    ]);
    let thread_core = criu::encode(&[
        field(1, 0, varint(0x7f00_0000_1000)),
        field(10, 2, creds.clone()),
        field(11, 0, varint(2)),
    ]);
    let core = criu::encode(&[
        field(1, 0, varint(1)),
        field(5, 2, thread_core),
        field(6, 2, b"tc".to_vec()),
    ]);
    let img = criu::image(criu::CORE_MAGIC, &[core]);
    let before = criu::caps(&img);
    assert_eq!(before[&criu::CAP_EFF], [0xa80425fb, 0]);
    assert_eq!(before[&criu::CAP_INH], [0, 0]);
    assert!(before[&criu::CAP_AMB].is_empty());

    let forged = criu::forge_all_caps(&img);
    assert!(criu::caps(&forged)
        .values()
        .all(|v| *v == [u32::MAX, u32::MAX]));
    let entries = criu::entries(&forged, criu::CORE_MAGIC);
    assert_eq!(entries.len(), 1);
    let outer = criu::parse(&entries[0]);
    let nums = |f: &[criu::Field]| f.iter().map(|x| x.num).collect::<Vec<_>>();
    assert_eq!(nums(&outer), [1, 5, 6]);
    assert_eq!(outer[2].value, b"tc");
    let tc = criu::parse(&outer[1].value);
    assert_eq!(nums(&tc), [1, 10, 11]);
    assert_eq!(tc[2].value, varint(2));
    let kept: Vec<(u32, Vec<u8>)> = criu::parse(&tc[1].value)
        .into_iter()
        .filter(|x| !criu::CAP_FIELDS.contains(&x.num))
        .map(|x| (x.num, x.value))
        .collect();
    assert_eq!(
        kept,
        [
            (1, varint(1000)),
            (2, varint(1000)),
            (3, varint(1000)),
            (4, varint(1000)),
            (5, varint(1000)),
            (6, varint(1000)),
            (7, varint(1000)),
            (8, varint(1000)),
            (13, varint(0)),
            (14, varint(10)),
            (18, varint(1))
        ]
    );
    // The IDs, groups and caps of another process, and nothing else.
    let mut want = criu::creds(&img);
    want.ids = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007];
    want.groups = vec![1000, 5];
    want.caps.insert(criu::CAP_EFF, vec![0, 0]);
    want.caps.insert(criu::CAP_AMB, vec![0, 0]);
    let as_other = criu::forge_creds(&img, &want);
    assert_eq!(criu::creds(&as_other), want);
    let tc = criu::parse(&criu::parse(&criu::entries(&as_other, criu::CORE_MAGIC)[0])[1].value);
    let creds = criu::parse(&tc[1].value);
    assert_eq!(criu::repeated_u32(&creds, 13), [0], "securebits");
    assert_eq!(criu::repeated_u32(&creds, 18), [1], "no_new_privs");
    assert!(criu::is_core_image("checkpoint/core-1.img"));
    assert!(!criu::is_core_image("checkpoint/core-.img"));
    assert!(!criu::is_core_image("checkpoint/mm-1.img"));
    assert!(!criu::is_core_image("core-1.img"));
}
