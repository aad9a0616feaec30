//! The blobs of a checkpoint image built from an archive: the archive as its
//! one (uncompressed) layer, a config, and a manifest carrying the checkpoint
//! annotations.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Context, Result};
use crate::restore::Checkpoint;

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// A content-addressed blob, as a descriptor names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Blob {
    pub fn of(media_type: &str, data: &[u8]) -> Blob {
        Blob {
            media_type: media_type.into(),
            digest: format!("sha256:{:x}", Sha256::digest(data)),
            size: data.len() as u64,
        }
    }

    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }

    /// The digest's hex part.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

/// An image of one archive.
#[derive(Debug)]
pub struct Built {
    /// The layer's data: the archive itself.
    pub archive: PathBuf,
    pub layer: Blob,
    pub config: Vec<u8>,
    pub config_blob: Blob,
    pub manifest: Vec<u8>,
    pub manifest_blob: Blob,
    pub annotations: BTreeMap<String, String>,
}

/// Builds the image of `archive`, checked as a checkpoint archive first.
pub fn build(archive: &Path) -> Result<Built> {
    let ckpt = Checkpoint::open(archive)?;
    let layer = Blob {
        media_type: LAYER_TYPE.into(),
        digest: format!("sha256:{}", file_sha256(archive)?),
        size: std::fs::metadata(archive)
            .ctx(|| format!("stat {}", archive.display()))?
            .len(),
    };
    let annotations = annotations(&ckpt);
    let config = serde_json::to_vec(&json!({
        "created": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        "config": {"Labels": annotations},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        "history": [{"created_by": "ckpt-shim image", "comment": "a checkpoint archive"}],
    }))
    .expect("JSON serialises");
    let config_blob = Blob::of(CONFIG_TYPE, &config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": annotations,
    }))
    .expect("JSON serialises");
    Ok(Built {
        archive: archive.to_path_buf(),
        layer,
        config_blob,
        config,
        manifest_blob: Blob::of(MANIFEST_TYPE, &manifest),
        manifest,
        annotations,
    })
}

/// The annotations CRI-O, checkpointctl and podman set on a checkpoint image:
/// the container's, its base image's and the checkpoint's own, each set only
/// if known and not empty.
fn annotations(c: &Checkpoint) -> BTreeMap<String, String> {
    let spec_ann = c.spec.annotations().clone().unwrap_or_default();
    container(c, &spec_ann)
        .into_iter()
        .chain(base_image(c))
        .chain(checkpoint(c))
        .filter_map(|(k, v)| Some((k, v.filter(|v| !v.is_empty())?)))
        .collect()
}

/// Annotations by name, each with its value if known.
type Entries = Vec<(String, Option<String>)>;

/// The container: its name (under CRI-O's key and CRIU's), ID, engine and
/// runtime, and its pod, from the spec's annotations and `config.dump`.
fn container(c: &Checkpoint, spec_ann: &HashMap<String, String>) -> Entries {
    let ann = |keys: &[&str]| keys.iter().find_map(|k| spec_ann.get(*k).cloned());
    let name = ann(&[
        "io.kubernetes.cri.container-name",
        "io.kubernetes.container.name",
    ])
    .unwrap_or_else(|| {
        c.config
            .name
            .split('_')
            .next()
            .unwrap_or_default()
            .to_string()
    });
    let pod_name = ann(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]);
    let pod_namespace = ann(&[
        "io.kubernetes.cri.sandbox-namespace",
        "io.kubernetes.pod.namespace",
    ]);
    let engine = crate::inspect::engine_of(spec_ann);
    vec![
        (super::CRIO_NAME.into(), Some(name.clone())),
        (super::CRIU_NAME.into(), Some(name)),
        (criu_key("container.id"), Some(c.config.id.clone())),
        (criu_key("engine.name"), Some(engine.into())),
        (criu_key("runtime.name"), Some(c.config.runtime.clone())),
        (criu_key("pod.name"), pod_name),
        (criu_key("pod.namespace"), pod_namespace),
    ]
}

/// The image the container ran (under CRIU's keys and CRI-O's), and the name
/// it was asked for by.
fn base_image(c: &Checkpoint) -> Entries {
    let (image_ref, image_name) = c.base_image();
    let mut out = Entries::new();
    for (k, v) in [
        ("rootfsImageName", image_name),
        ("rootfsImageID", image_ref),
    ] {
        out.push((criu_key(k), v.map(String::from)));
        out.push((crio_key(k), v.map(String::from)));
    }
    out.push((
        criu_key("rootfsImageUserRequested"),
        c.config.rootfs_image.clone(),
    ));
    out
}

/// The checkpoint itself: sealed or not, and the CRIU that wrote it (under
/// both keys).
fn checkpoint(c: &Checkpoint) -> Entries {
    let sealed = c.sealed.as_ref().map(|_| "age".to_string());
    let criu = criu_version();
    vec![
        ("io.ckpt-shim.checkpoint.encrypted".into(), sealed),
        (criu_key("criu.version"), criu.clone()),
        (crio_key("criu.version"), criu),
    ]
}

fn criu_key(k: &str) -> String {
    format!("org.criu.checkpoint.{k}")
}

fn crio_key(k: &str) -> String {
    format!("io.kubernetes.cri-o.annotations.checkpoint.{k}")
}

/// This node's CRIU version, as `criu --version` says it.
fn criu_version() -> Option<String> {
    let out = std::process::Command::new("criu")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .ctx(|| format!("read {}", path.display()))?;
        if n == 0 {
            return Ok(format!("{:x}", h.finalize()));
        }
        h.update(&buf[..n]);
    }
}
