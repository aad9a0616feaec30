//! How much memory the checkpoints in flight may hold pages in while their
//! containers are frozen: one budget per process, shared by all of them.
//!
//! The rule (docs/design.md, "Holding pages during the pause"): a checkpoint asks for its
//! container's anonymous and shared memory plus a margin, and gets what is
//! left of the budget now. The budget is the least of
//! - the ceiling (`hold_pages = "auto"`: `hold_ceiling_mib`; a number: that many MiB),
//! - `MemAvailable` minus the floor (`hold_floor_mib`),
//! - what the shim's own memory cgroup still allows, less a margin,
//!
//! and nothing at all while the node's memory is under pressure (PSI `some
//! avg10` at or above `hold_pressure_pct`). What a checkpoint does not get is
//! written through, as without holding: holding must never risk the OOM killer.

use std::sync::{Arc, Mutex};

use serde::Deserialize;

/// `hold_pages`: `"auto"` (the default) or a number of MiB (0: never hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HoldPages {
    Mib(u64),
    #[serde(deserialize_with = "auto")]
    Auto,
}

fn auto<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "auto" => Ok(()),
        _ => Err(serde::de::Error::custom(format!(
            "hold_pages is \"auto\" or a number of MiB, not {s:?}"
        ))),
    }
}

impl std::str::FromStr for HoldPages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(HoldPages::Auto),
            n => n
                .parse()
                .map(HoldPages::Mib)
                .map_err(|_| format!("\"auto\" or a number of MiB, not {n:?}")),
        }
    }
}

/// The settings the budget is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub pages: HoldPages,
    /// Most bytes held at once in auto mode.
    pub ceiling: u64,
    /// `MemAvailable` never drops below this for holding.
    pub floor: u64,
    /// PSI memory `some avg10` (percent) at which nothing is held.
    pub pressure_pct: f64,
}

pub const DEFAULT_CEILING_MIB: u64 = 8 << 10;
pub const DEFAULT_FLOOR_MIB: u64 = 2 << 10;
pub const DEFAULT_PRESSURE_PCT: f64 = 10.0;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            pages: HoldPages::Auto,
            ceiling: DEFAULT_CEILING_MIB << 20,
            floor: DEFAULT_FLOOR_MIB << 20,
            pressure_pct: DEFAULT_PRESSURE_PCT,
        }
    }
}

impl Policy {
    /// Never holds: every page is written through.
    pub fn off() -> Policy {
        Policy {
            pages: HoldPages::Mib(0),
            ..Policy::default()
        }
    }

    /// The budget on this node now, and what sets it.
    pub fn budget_now(&self) -> (u64, &'static str) {
        self.limit(&Node::now())
    }

    /// The budget now, and why it is what it is.
    fn limit(&self, node: &Node) -> (u64, &'static str) {
        let ceiling = match self.pages {
            HoldPages::Auto => self.ceiling,
            HoldPages::Mib(n) => n << 20,
        };
        if ceiling == 0 {
            return (0, "setting: off");
        }
        if node.pressure_pct >= self.pressure_pct {
            return (0, "memory pressure (PSI)");
        }
        let room = node.available.saturating_sub(self.floor);
        let cgroup = node.cgroup_room.unwrap_or(u64::MAX);
        match [
            (ceiling, "ceiling"),
            (room, "MemAvailable above the floor"),
            (cgroup, "memory cgroup"),
        ]
        .into_iter()
        .min_by_key(|(n, _)| *n)
        {
            Some(least) => least,
            None => unreachable!("three candidates"),
        }
    }
}

/// What the node says about its memory now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Node {
    pub available: u64,
    pub pressure_pct: f64,
    /// What the shim's memory cgroup still allows, less a margin; `None` if unlimited.
    pub cgroup_room: Option<u64>,
}

impl Node {
    pub fn now() -> Node {
        Node {
            available: crate::meminfo::available().unwrap_or(0),
            pressure_pct: psi_some_avg10().unwrap_or(0.0),
            cgroup_room: own_cgroup_room(),
        }
    }
}

/// One per process: what the checkpoints in flight hold.
#[derive(Debug)]
pub struct Budget {
    policy: Policy,
    in_use: Mutex<u64>,
}

impl Budget {
    pub fn new(policy: Policy) -> Arc<Budget> {
        Arc::new(Budget {
            policy,
            in_use: Mutex::new(0),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Up to `want` bytes, if the budget has them now (see the module's doc);
    /// given back when the reservation is dropped.
    pub fn reserve(self: &Arc<Self>, want: u64) -> Reservation {
        self.reserve_on(want, &Node::now())
    }

    fn reserve_on(self: &Arc<Self>, want: u64, node: &Node) -> Reservation {
        let (limit, why) = self.policy.limit(node);
        let want = want.saturating_add(0xfff) & !0xfff;
        let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = want.min(limit.saturating_sub(*in_use)) & !0xfff;
        *in_use += bytes;
        crate::metrics::get().hold_reserved(*in_use, limit);
        let short = (bytes < want).then(|| {
            format!(
                "{} of {} MiB held: budget {} MiB ({why}), {} MiB held by others",
                bytes >> 20,
                want >> 20,
                limit >> 20,
                (*in_use - bytes) >> 20
            )
        });
        Reservation {
            budget: Some(self.clone()),
            bytes,
            short,
        }
    }
}

/// Bytes of the budget taken by one checkpoint.
#[derive(Debug, Default)]
pub struct Reservation {
    budget: Option<Arc<Budget>>,
    pub bytes: u64,
    /// Why less than asked was given, if it was.
    pub short: Option<String>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            let mut in_use = b.in_use.lock().unwrap_or_else(|p| p.into_inner());
            *in_use -= self.bytes;
            crate::metrics::get().hold_released(*in_use);
        }
    }
}

/// `some avg10` of /proc/pressure/memory: the share of the last 10 s in which
/// some task waited for memory.
fn psi_some_avg10() -> Option<f64> {
    let psi = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    let some = psi.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// Limit minus usage of the shim's own memory cgroup (v2, else v1), less 64
/// MiB for the shim itself; `None` when it has no limit.
fn own_cgroup_room() -> Option<u64> {
    const MARGIN: u64 = 64 << 20;
    let read = |p: std::path::PathBuf| -> Option<u64> {
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    };
    let (limit, usage) = match super::own_memory_cgroup()? {
        (dir, true) => (
            read(dir.join("memory.max"))?,
            read(dir.join("memory.current"))?,
        ),
        (dir, false) => (
            read(dir.join("memory.limit_in_bytes"))?,
            read(dir.join("memory.usage_in_bytes"))?,
        ),
    };
    // v1 says "no limit" with a huge number, v2 with "max" (which fails to parse).
    (limit < 1 << 60).then(|| limit.saturating_sub(usage).saturating_sub(MARGIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(gib: u64) -> Node {
        Node {
            available: gib << 30,
            pressure_pct: 0.0,
            cgroup_room: None,
        }
    }

    #[test]
    fn checkpoints_in_flight_share_one_budget() {
        let b = Budget::new(Policy {
            ceiling: 300 << 20,
            ..Policy::default()
        });
        let first = b.reserve_on((200 << 20) - 5, &node(20));
        let second = b.reserve_on(200 << 20, &node(20));
        assert_eq!((first.bytes, second.bytes), (200 << 20, 100 << 20));
        assert!(first.short.is_none());
        assert!(
            second.short.as_deref().unwrap().contains("ceiling"),
            "{:?}",
            second.short
        );
        drop(first);
        assert_eq!(b.reserve_on(250 << 20, &node(20)).bytes, 200 << 20);
        drop(second);
        assert_eq!(b.reserve_on(250 << 20, &node(20)).bytes, 250 << 20);
    }

    #[test]
    fn the_floor_the_cgroup_and_pressure_each_cut_the_budget() {
        let p = Policy::default();
        assert_eq!(p.limit(&node(20)), (8 << 30, "ceiling"));
        assert_eq!(p.limit(&node(3)), (1 << 30, "MemAvailable above the floor"));
        assert_eq!(p.limit(&node(1)).0, 0, "below the floor nothing is held");
        let cg = Node {
            cgroup_room: Some(512 << 20),
            ..node(20)
        };
        assert_eq!(p.limit(&cg), (512 << 20, "memory cgroup"));
        let pressed = Node {
            pressure_pct: 25.0,
            ..node(20)
        };
        assert_eq!(p.limit(&pressed), (0, "memory pressure (PSI)"));
        assert_eq!(Policy::off().limit(&node(20)), (0, "setting: off"));
        let fixed = Policy {
            pages: HoldPages::Mib(100),
            ..p
        };
        assert_eq!(fixed.limit(&node(20)), (100 << 20, "ceiling"));
    }

    #[test]
    fn hold_pages_reads_auto_or_mib() {
        #[derive(Deserialize)]
        struct F {
            hold_pages: HoldPages,
        }
        let f: F = toml::from_str("hold_pages = \"auto\"").unwrap();
        assert_eq!(f.hold_pages, HoldPages::Auto);
        let f: F = toml::from_str("hold_pages = 512").unwrap();
        assert_eq!(f.hold_pages, HoldPages::Mib(512));
        assert!(toml::from_str::<F>("hold_pages = \"lots\"").is_err());
        assert_eq!("auto".parse(), Ok(HoldPages::Auto));
        assert_eq!("0".parse(), Ok(HoldPages::Mib(0)));
        assert!("x".parse::<HoldPages>().is_err());
    }
}
