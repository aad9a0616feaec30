//! An OCI image layout (a directory) or OCI archive (that directory as one
//! tar), holding a checkpoint image. The index names the image by its full
//! reference, which `ctr images import`, podman and skopeo take as its name.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use serde_json::json;

use super::build::{Blob, Built};
use crate::checkpoint::archive::{ArchiveWriter, Target};
use crate::error::{Context, Result};

fn index(b: &Built, name: &str) -> Vec<u8> {
    let mut m = b.manifest_blob.descriptor();
    m["annotations"] = json!({"org.opencontainers.image.ref.name": name});
    serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).expect("JSON serialises")
}

const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes `b` as an OCI layout at `dir` (must not exist): root-only like the
/// archive it holds, built in a private dir beside it and renamed into place,
/// so that a failure leaves nothing. The layer is moved with copy_file_range,
/// or shares the archive's extents where it can.
pub fn write_dir(b: &Built, name: &str, dir: &Path) -> Result<()> {
    if dir.exists() {
        return Err(crate::Error::AlreadyExists(dir.to_path_buf()));
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = crate::safefs::private_tempdir(".ckpt-image-", parent)?;
    let blobs = tmp.path().join("blobs/sha256");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&blobs)
        .ctx(|| format!("create {}", blobs.display()))?;
    let put = |file: &Path, data: &[u8]| {
        crate::safefs::create_new(file, 0o600)?
            .write_all(data)
            .ctx(|| format!("write {}", file.display()))
    };
    put(&tmp.path().join("oci-layout"), LAYOUT)?;
    put(&tmp.path().join("index.json"), &index(b, name))?;
    put(&blobs.join(b.config_blob.hex()), &b.config)?;
    put(&blobs.join(b.manifest_blob.hex()), &b.manifest)?;
    let src = std::fs::File::open(&b.archive).ctx(|| format!("open {}", b.archive.display()))?;
    let dst = blobs.join(b.layer.hex());
    let out = crate::safefs::create_new(&dst, 0o600)?;
    crate::fcopy::copy_range(&src, 0, &out, 0, b.layer.size, true)
        .ctx(|| format!("write {}", dst.display()))?;
    std::fs::rename(tmp.path(), dir).ctx(|| format!("rename into {}", dir.display()))?;
    let _ = tmp.keep();
    Ok(())
}

/// Writes `b` as an OCI archive at `file` (must not exist): the layout as one
/// uncompressed tar, written and renamed into place like a checkpoint archive.
pub fn write_archive(b: &Built, name: &str, file: &Path) -> Result<()> {
    let target = Target::new(file)?;
    let mut w = ArchiveWriter::create(&target)?;
    w.add_bytes("oci-layout", LAYOUT)?;
    w.add_bytes("index.json", &index(b, name))?;
    w.add_dir("blobs")?;
    w.add_dir("blobs/sha256")?;
    let blob = |x: &Blob| format!("blobs/sha256/{}", x.hex());
    w.add_bytes(&blob(&b.config_blob), &b.config)?;
    w.add_bytes(&blob(&b.manifest_blob), &b.manifest)?;
    let src = std::fs::File::open(&b.archive).ctx(|| format!("open {}", b.archive.display()))?;
    w.add_file(&blob(&b.layer), &src)?;
    w.commit(true)?;
    Ok(())
}

/// Reads an OCI layout's single image back: its manifest (from the index).
pub fn read_manifest(dir: &Path) -> Result<serde_json::Value> {
    let read = |p: &Path| -> Result<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(p).ctx(|| format!("read {}", p.display()))?)
            .map_err(|e| crate::Error::InvalidArgument(format!("{}: {e}", p.display())))
    };
    let index = read(&dir.join("index.json"))?;
    let desc = &index["manifests"][0];
    let digest = desc["digest"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("sha256:");
    read(&dir.join("blobs/sha256").join(digest))
}
