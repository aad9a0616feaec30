//! CreateContainer of a checkpoint: the request that has the runtime create the
//! container a restore brings back.
//!
//! As CRI-O does it, the process, its environment and working directory come
//! from the checkpoint (`spec.dump`); the container's name, labels, annotations,
//! log path, pod and security settings come from the request. The image becomes
//! the checkpoint's base image. Every other field of the request passes byte
//! for byte ([`crate::pbwire`]).
//!
//! Mounts come from the request. A bind mount the checkpointed container had
//! must be declared there too (the runtime's own, like `/etc/hosts`, aside):
//! otherwise the request is refused, naming it. The sources an archive records
//! are the old node's, and binding whatever path an archive names is how
//! CVE-2024-8676 let a restore reach the host. A declared source that does not
//! exist on this node is created empty, as the file or directory the checkpoint
//! had there, because CRIU restores a bind mount only onto its own kind.

use std::path::{Path, PathBuf};

use prost::Message;

use super::Checkpoint;
use crate::cri::{ContainerConfig, CreateContainerRequest, ImageSpec, KeyValue};
use crate::error::{Error, Result};
use crate::pbwire::Fields;

/// Bind mounts the runtime makes for every container of a pod, from the pod.
const RUNTIME_MOUNTS: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/dev/shm",
];

/// The annotation that names what a restored container came from.
pub const RESTORED_FROM: &str = "io.ckpt-shim.restored-from";

/// The rewritten request, and the mount sources to create before sending it.
#[derive(Debug)]
pub struct Create {
    pub request: Vec<u8>,
    pub sources: Vec<(PathBuf, SourceKind)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    File,
    Dir,
}

/// The checkpoint's image path from a request, if it names one: an absolute
/// path (CRI-O's convention for restoring from an archive on the node).
pub fn archive_path(req: &CreateContainerRequest) -> Option<PathBuf> {
    let image = &req.config.as_ref()?.image.as_ref()?.image;
    Path::new(image).is_absolute().then(|| PathBuf::from(image))
}

/// Rewrites `original` (an encoded CreateContainerRequest) to create the
/// container `ckpt` restores into, from `image`.
pub fn request(original: &[u8], ckpt: &Checkpoint, image: &str, source: &str) -> Result<Create> {
    let bad =
        |e: &dyn std::fmt::Display| Error::InvalidArgument(format!("CreateContainerRequest: {e}"));
    let req = CreateContainerRequest::decode(original).map_err(|e| bad(&e))?;
    let config = req.config.unwrap_or_default();
    let process = ckpt
        .spec
        .process()
        .as_ref()
        .filter(|p| p.args().as_ref().is_some_and(|a| !a.is_empty()))
        .ok_or_else(|| {
            Error::InvalidArgument("the checkpoint's spec.dump has no process".into())
        })?;
    terminal_matches(process.terminal() == Some(true), config.tty)?;
    let sources = mount_sources(ckpt, &config)?;

    let mut outer = Fields::parse(original).map_err(|e| bad(&e))?;
    let mut cfg = Fields::parse(outer.get(2).unwrap_or_default()).map_err(|e| bad(&e))?;
    let args: Vec<&[u8]> = process
        .args()
        .iter()
        .flatten()
        .map(|a| a.as_bytes())
        .collect();
    let spec_image = ImageSpec {
        image: image.to_string(),
        ..Default::default()
    };
    cfg.set(2, &[&spec_image.encode_to_vec()]);
    cfg.set(3, &args);
    cfg.remove(4);
    cfg.set(5, &[process.cwd().to_string_lossy().as_bytes()]);
    let envs: Vec<Vec<u8>> = process
        .env()
        .iter()
        .flatten()
        // The runtime sets the new pod's own.
        .filter(|e| !e.starts_with("HOSTNAME="))
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap_or((e, ""));
            KeyValue {
                key: k.into(),
                value: v.into(),
            }
            .encode_to_vec()
        })
        .collect();
    cfg.set(6, &envs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let mut entry = Fields::default();
    entry.push(1, RESTORED_FROM.as_bytes());
    entry.push(2, source.as_bytes());
    cfg.push(10, &entry.encode());
    outer.set(2, &[&cfg.encode()]);
    Ok(Create {
        request: outer.encode(),
        sources,
    })
}

/// A container that had a terminal comes back on a new one: CRIU makes the
/// pty and hands its master to runc, which passes it to the runtime through
/// the console socket the runtime gives it only for a config that asks for
/// a terminal (`tty`). Without one, CRIU aborts at StartContainer (`Don't
/// have tty to inherit session from`); given one for a checkpoint without a
/// terminal, the runtime waits for a console that never comes. So the
/// request must ask for a terminal exactly when the checkpoint had one.
fn terminal_matches(had: bool, asked: bool) -> Result<()> {
    match (had, asked) {
        (true, false) => Err(Error::InvalidArgument(
            "the checkpointed container had a terminal: restore it with tty (and stdin, \
             to attach to it), so that the runtime gives it a new one"
                .into(),
        )),
        (false, true) => Err(Error::InvalidArgument(
            "the checkpointed container had no terminal: restore it without tty".into(),
        )),
        _ => Ok(()),
    }
}

/// Checks that the request declares every bind mount the checkpoint had, and
/// lists the declared sources missing on this node.
fn mount_sources(
    ckpt: &Checkpoint,
    config: &ContainerConfig,
) -> Result<Vec<(PathBuf, SourceKind)>> {
    let declared = |dest: &Path| {
        config
            .mounts
            .iter()
            .find(|m| Path::new(&m.container_path) == dest)
    };
    let mut undeclared = Vec::new();
    for dest in crate::oci::bind_destinations(&ckpt.spec) {
        if !RUNTIME_MOUNTS.iter().any(|m| Path::new(m) == dest) && declared(&dest).is_none() {
            undeclared.push(dest.display().to_string());
        }
    }
    if !undeclared.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the checkpointed container had bind mounts the request does not declare: {}; \
             declare them (with this node's sources) to restore it",
            undeclared.join(", ")
        )));
    }
    let mut missing = Vec::new();
    for m in &config.mounts {
        let src = PathBuf::from(&m.host_path);
        if m.host_path.is_empty() || std::fs::symlink_metadata(&src).is_ok() {
            continue;
        }
        let was_file = ckpt
            .bind_mounts
            .iter()
            .any(|b| b.destination == m.container_path && b.file_type != "directory");
        missing.push((
            src,
            if was_file {
                SourceKind::File
            } else {
                SourceKind::Dir
            },
        ));
    }
    Ok(missing)
}

/// Creates the missing sources [`request`] listed: empty, of the checkpoint's kind.
pub fn create_sources(sources: &[(PathBuf, SourceKind)]) -> Result<()> {
    use crate::error::Context;
    for (path, kind) in sources {
        if !path.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "mount source {} is not absolute",
                path.display()
            )));
        }
        let parent = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
        match kind {
            SourceKind::Dir => {
                std::fs::create_dir(path).ctx(|| format!("create {}", path.display()))?
            }
            SourceKind::File => drop(crate::safefs::create_new(path, 0o644)?),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::Mount;
    use crate::restore::archive::BindMount;

    fn checkpoint(mounts: serde_json::Value) -> Checkpoint {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/counter", "/tmp/count"], "cwd": "/work",
                        "env": ["PATH=/bin", "HOSTNAME=old-pod", "A=b=c"], "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": mounts,
            // What an archive's author could slip in: devices and runtime settings.
            "annotations": {"cdi.k8s.io/gpu": "vendor.com/gpu=all",
                            "io.kubernetes.cri.untrusted-workload": "false",
                            "run.oci.keep_original_groups": "1"},
        });
        Checkpoint {
            path: "/c.tar".into(),
            spec: serde_json::from_value(spec).unwrap(),
            config: Default::default(),
            bind_mounts: vec![BindMount {
                source: "/old/cfg".into(),
                destination: "/etc/app.conf".into(),
                file_type: "file".into(),
            }],
            sealed: None,
        }
    }

    fn bind(dest: &str, src: &str) -> serde_json::Value {
        serde_json::json!({"destination": dest, "type": "bind", "source": src, "options": ["rbind"]})
    }

    #[test]
    fn process_comes_from_the_checkpoint_and_the_rest_from_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let new_src = dir.path().join("new/cfg");
        let ckpt = checkpoint(serde_json::json!([
            bind("/etc/hosts", "/old/hosts"),
            bind("/etc/app.conf", "/old/cfg")
        ]));
        let req = CreateContainerRequest {
            pod_sandbox_id: "pod".into(),
            config: Some(ContainerConfig {
                image: Some(ImageSpec {
                    image: "/c.tar".into(),
                    ..Default::default()
                }),
                command: vec!["/bin/sh".into()],
                args: vec!["-c".into(), "x".into()],
                mounts: vec![Mount {
                    container_path: "/etc/app.conf".into(),
                    host_path: new_src.to_string_lossy().into_owned(),
                    readonly: false,
                }],
                log_path: "new.log".into(),
                ..Default::default()
            }),
        };
        let mut wire = req.encode_to_vec();
        wire.extend([0xfa, 0x01, 0x01, b'z']); // field 31: a newer CRI's
        let out = request(&wire, &ckpt, "sha256:abc", "/c.tar").unwrap();
        let back = CreateContainerRequest::decode(out.request.as_slice()).unwrap();
        let c = back.config.unwrap();
        assert_eq!(back.pod_sandbox_id, "pod");
        assert_eq!(c.image.unwrap().image, "sha256:abc");
        assert_eq!(
            (c.command, c.args, c.working_dir.as_str()),
            (
                vec!["/bin/counter".to_string(), "/tmp/count".into()],
                vec![],
                "/work"
            )
        );
        let envs: Vec<(String, String)> = c.envs.into_iter().map(|e| (e.key, e.value)).collect();
        assert_eq!(
            envs,
            [("PATH".into(), "/bin".into()), ("A".into(), "b=c".into())]
        );
        assert_eq!(
            (c.log_path.as_str(), c.annotations[RESTORED_FROM].as_str()),
            ("new.log", "/c.tar")
        );
        assert_eq!(
            c.annotations.keys().collect::<Vec<_>>(),
            [RESTORED_FROM],
            "no annotation of the checkpoint's reaches the new container"
        );
        let unknown = [0xfa, 0x01, 0x01, b'z'];
        assert!(
            out.request.windows(4).any(|w| w == unknown),
            "a field the shim does not know was lost"
        );
        assert_eq!(out.sources, [(new_src.clone(), SourceKind::File)]);
        create_sources(&out.sources).unwrap();
        assert!(new_src.is_file());

        // A terminal is asked for exactly when the checkpoint had one.
        let mut tty = req.clone();
        tty.config.as_mut().unwrap().tty = true;
        let err = request(&tty.encode_to_vec(), &ckpt, "i", "/c.tar").unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m.contains("had no terminal")),
            "{err}"
        );
        let mut had = checkpoint(serde_json::json!([bind("/etc/app.conf", "/old/cfg")]));
        let mut spec = serde_json::to_value(&had.spec).unwrap();
        spec["process"]["terminal"] = true.into();
        had.spec = serde_json::from_value(spec).unwrap();
        let err = request(&wire, &had, "i", "/c.tar").unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m.contains("had a terminal")),
            "{err}"
        );
        assert!(request(&tty.encode_to_vec(), &had, "i", "/c.tar").is_ok());

        // A bind mount the request leaves out is refused, by name.
        let mut undeclared = req.clone();
        undeclared.config.as_mut().unwrap().mounts.clear();
        let err = request(&undeclared.encode_to_vec(), &ckpt, "i", "/c.tar").unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m.contains("/etc/app.conf") && !m.contains("hosts")),
            "{err}"
        );
    }
}
