//! Resource limits, OOM score and scheduling, each lowered to what a fresh
//! container could have (lowering is always safe, so nothing here refuses):
//!
//! - rlimits (`task_core.rlimits`): none above the spec's hard limit, or for
//!   a resource the spec does not set, above the runtime's own (what a fresh
//!   container inherits);
//! - `oom_score_adj`: never below the spec's (or the runtime's own): a lower
//!   one would let the container's processes outlive the node's others;
//! - a real-time policy or a negative nice only with CAP_SYS_NICE; else the
//!   thread restores as SCHED_OTHER at nice 0.

use criu_rpc::images::{RlimitEntry, TaskRlimitsEntry, ThreadCoreEntry};

use super::spec::{Allowed, CAP_SYS_NICE};

/// SCHED_OTHER, SCHED_BATCH and SCHED_IDLE need no privilege.
const PLAIN_POLICIES: [u32; 3] = [0, 3, 5];

/// The hard limit a fresh container gets for `resource`.
pub fn hard_limit(a: &Allowed, resource: u32) -> u64 {
    match a.rlimits.iter().find(|(r, _, _)| *r == resource) {
        Some((_, _, hard)) => *hard,
        None => own_hard_limit(resource),
    }
}

fn own_hard_limit(resource: u32) -> u64 {
    use nix::sys::resource::{getrlimit, Resource::*};
    // CRIU's images index the limits by resource number, in this order.
    let by_number = [
        RLIMIT_CPU,
        RLIMIT_FSIZE,
        RLIMIT_DATA,
        RLIMIT_STACK,
        RLIMIT_CORE,
        RLIMIT_RSS,
        RLIMIT_NPROC,
        RLIMIT_NOFILE,
        RLIMIT_MEMLOCK,
        RLIMIT_AS,
        RLIMIT_LOCKS,
        RLIMIT_SIGPENDING,
        RLIMIT_MSGQUEUE,
        RLIMIT_NICE,
        RLIMIT_RTPRIO,
        RLIMIT_RTTIME,
    ];
    // A resource this kernel has that nix does not name: none of it.
    by_number
        .get(resource as usize)
        .and_then(|&r| getrlimit(r).ok())
        .map_or(0, |(_, hard)| hard)
}

pub fn rlimits(r: &TaskRlimitsEntry, a: &Allowed) -> TaskRlimitsEntry {
    let rlimits = r
        .rlimits
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let max = e.max.min(hard_limit(a, i as u32));
            RlimitEntry {
                cur: e.cur.min(max),
                max,
            }
        })
        .collect();
    TaskRlimitsEntry { rlimits }
}

pub fn oom_score_adj(found: Option<i32>, a: &Allowed) -> Option<i32> {
    let floor = a.oom_score_adj.unwrap_or_else(own_oom_score_adj);
    found.map(|v| v.max(floor))
}

fn own_oom_score_adj() -> i32 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The thread's scheduling, lowered where it needs CAP_SYS_NICE.
pub fn sched(t: &ThreadCoreEntry, a: &Allowed) -> ThreadCoreEntry {
    let mut out = t.clone();
    if a.bound.has(CAP_SYS_NICE) {
        return out;
    }
    if !PLAIN_POLICIES.contains(&t.sched_policy.unwrap_or(0)) {
        out.sched_policy = Some(0);
        out.sched_prio = Some(0);
    }
    if t.sched_nice.unwrap_or(0) < 0 {
        out.sched_nice = Some(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn limits_are_lowered_to_the_spec_and_the_runtime() {
        let a = Allowed::from_json(&json!({"process": {"user": {"uid": 0},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}], "oomScoreAdj": 500}})).unwrap();
        let big = RlimitEntry {
            cur: u64::MAX,
            max: u64::MAX,
        };
        let r = rlimits(
            &TaskRlimitsEntry {
                rlimits: vec![big; 8],
            },
            &a,
        );
        assert_eq!(
            r.rlimits[7],
            RlimitEntry {
                cur: 4096,
                max: 4096
            }
        );
        assert_eq!(r.rlimits[0].max, own_hard_limit(0));
        assert_eq!(oom_score_adj(Some(-1000), &a), Some(500));
        assert_eq!(oom_score_adj(Some(900), &a), Some(900));
        let t = ThreadCoreEntry {
            sched_policy: Some(1),
            sched_prio: Some(99),
            sched_nice: Some(-20),
            ..Default::default()
        };
        let s = sched(&t, &a);
        assert_eq!(
            (s.sched_policy, s.sched_prio, s.sched_nice),
            (Some(0), Some(0), Some(0))
        );
    }
}
