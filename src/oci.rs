//! OCI runtime spec helpers that checkpoint and restore share: the spec's
//! namespaces, the ones it joins by path (the pod's), and its bind mounts.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Spec};

/// The spec's namespaces (empty when it has none).
pub fn namespaces(spec: &Spec) -> Vec<LinuxNamespace> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
}

/// The spec's namespace of `kind`: `None` where the container shares the
/// runtime's, `Some` with a path where it joins one (the pod's), `Some`
/// without a path where a new one is made.
pub fn namespace(spec: &Spec, kind: LinuxNamespaceType) -> Option<LinuxNamespace> {
    namespaces(spec).into_iter().find(|n| n.typ() == kind)
}

/// The path of the namespace of `kind` that the spec joins, if it joins one.
pub fn joined(spec: &Spec, kind: LinuxNamespaceType) -> Option<PathBuf> {
    namespace(spec, kind)?.path().clone()
}

/// Destinations of the spec's bind mounts (type `bind`, or a `bind` or
/// `rbind` option, as runc reads them).
pub fn bind_destinations(spec: &Spec) -> Vec<PathBuf> {
    spec.mounts()
        .as_ref()
        .map(|ms| {
            ms.iter()
                .filter(|m| {
                    m.typ().as_deref() == Some("bind")
                        || m.options()
                            .as_ref()
                            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
                })
                .map(|m| m.destination().clone())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn joined_namespaces_and_binds_are_read_as_runc_reads_them() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [
                {"type": "network", "path": "/proc/7/ns/net"},
                {"type": "mount"}
            ]},
            "mounts": [
                {"destination": "/data", "type": "bind", "source": "/srv"},
                {"destination": "/etc/hosts", "type": "none", "source": "/x", "options": ["rbind", "ro"]},
                {"destination": "/proc", "type": "proc", "source": "proc"}
            ]
        }));
        assert_eq!(
            joined(&s, LinuxNamespaceType::Network),
            Some(PathBuf::from("/proc/7/ns/net"))
        );
        assert_eq!(
            joined(&s, LinuxNamespaceType::Mount),
            None,
            "made, not joined"
        );
        assert!(namespace(&s, LinuxNamespaceType::Mount).is_some());
        assert!(namespace(&s, LinuxNamespaceType::Ipc).is_none());
        assert_eq!(
            bind_destinations(&s),
            vec![PathBuf::from("/data"), PathBuf::from("/etc/hosts")]
        );
    }
}
