//! The `options` of CheckpointPod and RestorePod: every key the shim accepts is
//! here (and in docs/pods.md); any other key, or a value that does not parse, is
//! refused before anything runs.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::seal::Recipients;

/// What a CheckpointPod's options change from the shim's settings.
#[derive(Debug, Default, Clone)]
pub struct CheckpointOptions {
    /// `tcp-established`: dump established TCP connections (CRIU's
    /// `--tcp-established`), instead of the shim's `tcp_established` setting.
    pub tcp_established: Option<bool>,
    /// `hold-pages-mib`: memory to hold each container's pages during the pause.
    pub hold_pages_mib: Option<u64>,
    /// `encrypt-to`: age recipients (comma-separated) every archive is sealed to.
    pub encrypt_to: Option<Arc<Recipients>>,
    /// `parallel-dumps`: how many containers CRIU dumps at once (default all).
    pub parallel_dumps: Option<usize>,
}

pub const CHECKPOINT_KEYS: &[&str] = &[
    "tcp-established",
    "hold-pages-mib",
    "encrypt-to",
    "parallel-dumps",
];

impl CheckpointOptions {
    pub fn parse(map: &HashMap<String, String>) -> Result<CheckpointOptions> {
        let mut o = CheckpointOptions::default();
        for (k, v) in sorted(map) {
            match k {
                "tcp-established" => o.tcp_established = Some(parse_bool(k, v)?),
                "hold-pages-mib" => o.hold_pages_mib = Some(parse_num(k, v, u64::MAX >> 20)?),
                "parallel-dumps" => o.parallel_dumps = Some(parse_num(k, v, 1024)? as usize),
                "encrypt-to" => {
                    let keys: Vec<String> = v
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect();
                    let r = Recipients::parse(&keys)
                        .map_err(|e| bad(k, v, &e.to_string()))?
                        .ok_or_else(|| bad(k, v, "no recipient"))?;
                    o.encrypt_to = Some(Arc::new(r));
                }
                _ => return Err(unknown(k, CHECKPOINT_KEYS)),
            }
        }
        if o.parallel_dumps == Some(0) {
            return Err(bad("parallel-dumps", "0", "must be at least 1"));
        }
        Ok(o)
    }
}

/// RestorePod takes no options yet: whatever comes is refused.
pub fn check_restore(map: &HashMap<String, String>) -> Result<()> {
    match sorted(map).first() {
        Some((k, _)) => Err(unknown(k, &[])),
        None => Ok(()),
    }
}

fn sorted(map: &HashMap<String, String>) -> Vec<(&str, &str)> {
    let mut v: Vec<(&str, &str)> = map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    v.sort();
    v
}

fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(k, v, "must be true or false")),
    }
}

fn parse_num(k: &str, v: &str, max: u64) -> Result<u64> {
    v.parse::<u64>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| bad(k, v, &format!("must be a whole number up to {max}")))
}

fn bad(k: &str, v: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("option {k}={v:?}: {why}"))
}

fn unknown(k: &str, known: &[&str]) -> Error {
    let known = match known {
        [] => "none are accepted".to_string(),
        k => format!("accepted: {}", k.join(", ")),
    };
    Error::InvalidArgument(format!("unknown option {k:?} ({known})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn known_keys_parse_and_the_rest_is_refused() {
        let o = CheckpointOptions::parse(&map(&[
            ("tcp-established", "true"),
            ("hold-pages-mib", "64"),
            ("parallel-dumps", "1"),
        ]))
        .unwrap();
        assert_eq!(
            (o.tcp_established, o.hold_pages_mib, o.parallel_dumps),
            (Some(true), Some(64), Some(1))
        );
        for bad in [
            map(&[("tcp-established", "yes")]),
            map(&[("hold-pages-mib", "-1")]),
            map(&[("parallel-dumps", "0")]),
            map(&[("encrypt-to", "not-a-key")]),
            map(&[("leave-running", "true")]),
        ] {
            let e = CheckpointOptions::parse(&bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e}");
        }
        assert!(check_restore(&map(&[])).is_ok());
        assert!(matches!(
            check_restore(&map(&[("x", "y")])),
            Err(Error::InvalidArgument(m)) if m.contains("\"x\"")
        ));
    }
}
