//! What a verbose ContainerStatus of a restored container says about its
//! restore, where CRI-O says it: `restored` (a JSON boolean) and
//! `checkpointedAt` (RFC 3339) inside the JSON object under the `info` key of
//! the response's `info` map, so `crictl inspect -o go-template --template
//! '{{.info.restored}}'` reads the same behind either runtime. `restoredFrom`
//! (the archive's path or the checkpoint image's name) sits beside them.
//!
//! The relay may only append to the upstream's encoded answer. A protobuf map
//! is a repeated entry message, and a decoder keeps the last entry for a key,
//! so appending an `info` entry replaces containerd's: the appended one is
//! containerd's own JSON object (every field it had, in its order) with the
//! three keys added.

use prost::Message;
use serde_json::Value;

use super::relay::Amend;
use crate::cri::ContainerStatusResponse;
use crate::restore::stage::RestoreInfo;

/// The key of the map entry that holds the runtime's JSON (containerd and
/// CRI-O both use it).
const INFO: &str = "info";

/// Appends to a `ContainerStatusResponse` the upstream's `info` object with
/// the restore's keys added.
pub fn amend(info: RestoreInfo) -> Amend {
    Box::new(move |msg: &[u8]| {
        let upstream = ContainerStatusResponse::decode(msg)
            .ok()
            .and_then(|r| r.info.get(INFO).cloned());
        let extra = ContainerStatusResponse {
            status: None,
            info: [(INFO.to_string(), merged(upstream.as_deref(), &info))].into(),
        };
        [msg, &extra.encode_to_vec()].concat()
    })
}

/// The upstream's `info` JSON object (an empty one if it sent none, or
/// something that is not an object) with `restored`, `checkpointedAt` and
/// `restoredFrom` set.
fn merged(upstream: Option<&str>, info: &RestoreInfo) -> String {
    let mut obj = upstream
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .unwrap_or_default();
    obj.insert("restored".into(), Value::Bool(true));
    obj.insert(
        "checkpointedAt".into(),
        Value::String(rfc3339(&info.checkpointed_at)),
    );
    obj.insert("restoredFrom".into(), Value::String(info.source.clone()));
    Value::Object(obj).to_string()
}

/// A checkpoint time as RFC 3339 in UTC, like CRI-O's (Go's `time.Time`), with
/// fractional seconds only when there are some. config.dump's time comes from
/// whichever engine made the archive; one that does not parse is passed on as
/// it was.
fn rfc3339(t: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| {
            d.with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        })
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::ContainerStatus;

    fn info() -> RestoreInfo {
        RestoreInfo {
            source: "/var/lib/ckpt/c.tar".into(),
            checkpointed_id: "abc".into(),
            checkpointed_name: "counter".into(),
            checkpointed_at: "2026-12-06T06:10:11.123456789+01:00".into(),
            policy: Default::default(),
        }
    }

    fn answer(info: &[(&str, &str)]) -> Vec<u8> {
        ContainerStatusResponse {
            status: Some(ContainerStatus {
                id: "abc".into(),
                ..Default::default()
            }),
            info: info
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
        .encode_to_vec()
    }

    #[test]
    fn the_restore_is_told_inside_the_upstreams_info_object() {
        let raw = answer(&[
            (
                "info",
                r#"{"sandboxID":"pod1","pid":42,"runtimeSpec":{"a":1}}"#,
            ),
            ("other", "kept"),
        ]);
        let out = amend(info())(&raw);
        assert!(out.starts_with(&raw), "the upstream's bytes are kept");
        let got = ContainerStatusResponse::decode(&out[..]).unwrap();
        assert_eq!(got.status.unwrap().id, "abc");
        assert_eq!(got.info["other"], "kept");
        assert_eq!(got.info.len(), 2);
        let v: Value = serde_json::from_str(&got.info["info"]).unwrap();
        assert_eq!(v["restored"], Value::Bool(true));
        assert_eq!(v["checkpointedAt"], "2026-12-06T05:10:11.123456789Z");
        assert_eq!(v["restoredFrom"], "/var/lib/ckpt/c.tar");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["sandboxID"], "pod1");
        assert_eq!(v["runtimeSpec"]["a"], 1);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "sandboxID",
                "pid",
                "runtimeSpec",
                "restored",
                "checkpointedAt",
                "restoredFrom"
            ]
        );
    }

    #[test]
    fn without_an_upstream_object_the_restore_keys_stand_alone() {
        for raw in [answer(&[]), answer(&[("info", "not json")])] {
            let out = amend(info())(&raw);
            let got = ContainerStatusResponse::decode(&out[..]).unwrap();
            let v: Value = serde_json::from_str(&got.info["info"]).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
            assert_eq!(v["restored"], Value::Bool(true));
        }
    }

    #[test]
    fn checkpoint_times_are_utc_rfc3339() {
        assert_eq!(rfc3339("2026-01-02T03:04:05Z"), "2026-01-02T03:04:05Z");
        assert_eq!(
            rfc3339("2026-01-02T03:04:05.5-02:00"),
            "2026-01-02T05:04:05.500Z"
        );
        assert_eq!(rfc3339("yesterday"), "yesterday");
    }
}
