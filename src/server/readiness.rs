//! The `CheckpointReady` runtime condition. The kubelet and `crictl info` read
//! a runtime's conditions from its `Status` answer; the shim appends one to
//! the upstream's answer. Protobuf merges an embedded message that appears
//! again, and appends to its repeated fields, so appending
//! `status { conditions { … } }` adds one condition. Nothing the upstream
//! said is decoded or re-encoded, so fields the shim does not know survive.
//!
//! The condition comes from the preflight's checks
//! ([`preflight::readiness_checks`]), run in the background: at start, every
//! [`REFRESH`], and on SIGHUP. A `Status` call only reads the last result.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message;

use crate::config::Config;
use crate::cri::{RuntimeCondition, RuntimeStatus, StatusResponse};
use crate::preflight::{self, Check, Status};
use crate::server::relay::Amend;

pub const CONDITION: &str = "CheckpointReady";
/// `criu check` takes about a second; the node's state rarely changes faster.
pub const REFRESH: Duration = Duration::from_secs(60);

pub struct Readiness {
    now: RwLock<RuntimeCondition>,
    again: tokio::sync::Notify,
}

impl Readiness {
    /// Not ready until the first checks are done; they start at once.
    pub fn spawn(cfg: Config) -> Arc<Readiness> {
        let r = Arc::new(Readiness {
            now: RwLock::new(condition(false, "Checking", "the first check is running")),
            again: tokio::sync::Notify::new(),
        });
        let bg = r.clone();
        tokio::spawn(async move {
            loop {
                let c = judge(&preflight::readiness_checks(&cfg).await);
                if !c.status {
                    tracing::warn!(reason = %c.reason, "not ready to checkpoint: {}", c.message);
                }
                *bg.now.write().unwrap_or_else(|p| p.into_inner()) = c;
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH) => {}
                    _ = bg.again.notified() => {}
                }
            }
        });
        r
    }

    /// Runs the checks again now (SIGHUP), in the background.
    pub fn refresh(&self) {
        self.again.notify_one();
    }

    /// Appends the current condition to a `StatusResponse`.
    pub fn amend(&self) -> Amend {
        let c = self.now.read().unwrap_or_else(|p| p.into_inner()).clone();
        let extra = StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![c],
            }),
            info: Default::default(),
        }
        .encode_to_vec();
        Box::new(move |msg: &[u8]| [msg, &extra].concat())
    }
}

/// What a ready node's condition says: KEP-5823's calls are served too (CRI has
/// no runtime feature flag for them yet).
pub const SERVED: &str =
    "CheckpointContainer served; pod checkpoint served (CheckpointPod, RestorePod)";

fn condition(status: bool, reason: &str, message: &str) -> RuntimeCondition {
    RuntimeCondition {
        r#type: CONDITION.into(),
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

/// Ready when no check failed; otherwise the first failure names the reason
/// (`criu-check` → `CriuCheckFailed`) and every failure is in the message.
pub fn judge(checks: &[Check]) -> RuntimeCondition {
    let failed: Vec<&Check> = checks.iter().filter(|c| c.status == Status::Fail).collect();
    let Some(first) = failed.first() else {
        return condition(true, "", SERVED);
    };
    let reason: String = first
        .name
        .split('-')
        .map(|w| w[..1].to_uppercase() + &w[1..])
        .chain(["Failed".to_string()])
        .collect();
    let message: Vec<String> = failed
        .iter()
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    condition(false, &reason, &message.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pbwire::Fields;

    fn check(name: &'static str, status: Status, detail: &str) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
        }
    }

    #[test]
    fn the_first_failure_is_the_reason_and_warnings_do_not_count() {
        let ok = judge(&[
            check("criu", Status::Ok, "/x"),
            check("staging-dir", Status::Warn, "w"),
        ]);
        assert!(ok.status && ok.reason.is_empty());
        assert!(ok.message.contains("CheckpointPod"), "{}", ok.message);
        let bad = judge(&[
            check("criu", Status::Ok, "/x"),
            check("criu-check", Status::Fail, "exit 1"),
            check("freezer", Status::Fail, "none"),
        ]);
        assert_eq!(
            (bad.status, bad.reason.as_str(), bad.message.as_str()),
            (
                false,
                "CriuCheckFailed",
                "criu-check: exit 1; freezer: none"
            )
        );
    }

    #[test]
    fn the_condition_is_appended_and_the_rest_survives() {
        // An upstream answer with two conditions, info, and a field we do not know.
        let upstream = StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![condition(true, "", ""), condition(true, "", "")],
            }),
            info: [("config".to_string(), "{}".to_string())].into(),
        };
        let mut raw = Fields::parse(&upstream.encode_to_vec()).unwrap();
        raw.push(99, b"future");
        let raw = raw.encode();
        let r = Readiness {
            now: RwLock::new(condition(false, "CriuCheckFailed", "no")),
            again: Default::default(),
        };
        let amended = (r.amend())(&raw);
        assert!(amended.starts_with(&raw));
        let got = StatusResponse::decode(&amended[..]).unwrap();
        let conds = got.status.unwrap().conditions;
        assert_eq!(conds.len(), 3);
        assert_eq!(
            (conds[2].r#type.as_str(), conds[2].status),
            (CONDITION, false)
        );
        assert_eq!(got.info["config"], "{}");
        assert_eq!(
            Fields::parse(&amended).unwrap().get(99),
            Some(&b"future"[..])
        );
    }
}
