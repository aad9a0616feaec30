//! `manifest.json`: what a pod checkpoint records beside its archives. It names
//! the pod (sandbox metadata, labels, annotations, hostname, namespace
//! options) and each container (name, ID, image, archive file), and the time
//! of the cut. It holds no secret: archives are sealed on their own, and only
//! whether they are is noted here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};

pub const FILE: &str = "manifest.json";
pub const KIND: &str = "ckpt-shim.pod-checkpoint";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub kind: String,
    pub version: u32,
    /// When every container was frozen (RFC 3339, UTC).
    pub checkpointed_at: String,
    pub sandbox: Sandbox,
    pub containers: Vec<ContainerEntry>,
    /// Whether every archive is sealed (encrypted) to age recipients.
    pub sealed: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub hostname: String,
    pub runtime_handler: String,
    pub namespace_options: NamespaceOptions,
}

/// As CRI names the modes: POD, CONTAINER, NODE, TARGET.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceOptions {
    pub network: String,
    pub pid: String,
    pub ipc: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEntry {
    pub name: String,
    pub id: String,
    pub image: String,
    pub image_ref: String,
    /// The archive, a file name in the checkpoint's directory.
    pub archive: String,
}

impl Manifest {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        v.push(b'\n');
        v
    }

    /// Reads and checks `dir/manifest.json`: its kind and version, unique
    /// names, and archives that are plain files right in `dir`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(FILE);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| {
            Error::InvalidArgument(format!("{}: not a pod checkpoint: {e}", path.display()))
        })?;
        if !meta.is_file() {
            return Err(bad(&path, "not a regular file"));
        }
        let raw = std::fs::read(&path).ctx(|| format!("read {}", path.display()))?;
        let m: Manifest = serde_json::from_slice(&raw).map_err(|e| bad(&path, &e.to_string()))?;
        if m.kind != KIND || m.version != VERSION {
            return Err(bad(
                &path,
                &format!(
                    "{} version {}; this ckpt-shim reads {KIND} version {VERSION}",
                    m.kind, m.version
                ),
            ));
        }
        if m.containers.is_empty() {
            return Err(bad(&path, "no containers"));
        }
        let mut names = std::collections::HashSet::new();
        for c in &m.containers {
            if c.name.is_empty() || !names.insert(&c.name) {
                return Err(bad(&path, &format!("empty or repeated name {:?}", c.name)));
            }
            m.archive(dir, c)?;
        }
        Ok(m)
    }

    /// Where `c`'s archive is: a plain file name in `dir`, a regular file.
    pub fn archive(&self, dir: &Path, c: &ContainerEntry) -> Result<PathBuf> {
        let name = Path::new(&c.archive);
        let plain = name.components().count() == 1
            && matches!(
                name.components().next(),
                Some(std::path::Component::Normal(_))
            );
        if !plain {
            return Err(Error::UnsafeArchive(c.archive.clone()));
        }
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            Ok(_) => Err(bad(&path, "not a regular file")),
            Err(e) => Err(bad(&path, &format!("archive of {:?}: {e}", c.name))),
        }
    }
}

fn bad(path: &Path, why: &str) -> Error {
    Error::InvalidArgument(format!("{}: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(archive: &str) -> Manifest {
        Manifest {
            kind: KIND.into(),
            version: VERSION,
            checkpointed_at: "2026-01-01T00:00:00Z".into(),
            sandbox: Sandbox::default(),
            containers: vec![ContainerEntry {
                name: "web".into(),
                id: "abc".into(),
                image: "i".into(),
                image_ref: "sha256:1".into(),
                archive: archive.into(),
            }],
            sealed: false,
        }
    }

    #[test]
    fn archives_must_be_plain_files_beside_the_manifest() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("abc.tar"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link.tar")).unwrap();
        for (archive, ok) in [
            ("abc.tar", true),
            ("../abc.tar", false),
            ("/etc/passwd", false),
            ("link.tar", false),
            ("missing.tar", false),
        ] {
            std::fs::write(d.path().join(FILE), manifest(archive).to_bytes()).unwrap();
            let r = Manifest::read(d.path());
            assert_eq!(r.is_ok(), ok, "{archive}: {r:?}");
            if let Err(e) = r {
                assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
            }
        }
        let mut newer = manifest("abc.tar");
        newer.version = VERSION + 1;
        std::fs::write(d.path().join(FILE), newer.to_bytes()).unwrap();
        assert!(Manifest::read(d.path()).is_err());
    }
}
