//! Checkpoint images: an archive as an OCI image, the way checkpoints travel
//! between Kubernetes nodes, and back.
//!
//! The image has one layer, and that layer is the archive itself: a checkpoint
//! archive is an uncompressed tar of relative names, so as a layer it unpacks
//! to `/config.dump`, `/checkpoint/…`, exactly what `buildah add … archive /`
//! makes. The checkpoint annotations CRI-O, podman and checkpointctl use go on
//! the manifest, and the same values on the image config's labels, where CRI's
//! ImageStatus can show them.
//!
//! - [`build`]: the blobs of an image from an archive;
//! - [`layout`]: an OCI image layout directory, or an OCI archive of one;
//! - [`containerd`]: import into containerd, and find and read a checkpoint
//!   image it holds, through containerd's own API;
//! - [`push`]: to a registry.

pub mod build;
pub mod containerd;
pub mod layout;
pub mod push;

pub use build::Built;

use std::path::{Path, PathBuf};

use crate::error::Result;

/// Where `ckpt-shim image` puts the image.
#[derive(Debug, Clone)]
pub enum Dest {
    /// Into the containerd listening on this socket (its CRI namespace).
    Containerd(PathBuf),
    /// An OCI image layout directory (created).
    Layout(PathBuf),
    /// An OCI archive: that layout as one tar (created).
    OciArchive(PathBuf),
    /// To the registry the name says; plain HTTP if asked.
    Registry { plain_http: bool },
}

/// Makes `archive` a checkpoint image called `name` at `dest`. Returns the
/// full name and the manifest digest.
pub async fn make(archive: &Path, name: &str, dest: &Dest) -> Result<(String, String)> {
    let full = normalize(name);
    let built = {
        let archive = archive.to_path_buf();
        tokio::task::spawn_blocking(move || build::build(&archive))
            .await
            .expect("build does not panic")?
    };
    match dest {
        Dest::Containerd(socket) => {
            containerd::import(containerd::connect(socket).await?, &built, &full).await?
        }
        Dest::Layout(dir) => layout::write_dir(&built, &full, dir)?,
        Dest::OciArchive(file) => layout::write_archive(&built, &full, file)?,
        Dest::Registry { plain_http } => {
            push::push(&built, &full, *plain_http).await?;
        }
    }
    Ok((full, built.manifest_blob.digest.clone()))
}

/// The annotation CRI-O's restore recognises a checkpoint image by.
pub const CRIO_NAME: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
/// checkpointctl's (and containerd 2.x's) key for the same.
pub const CRIU_NAME: &str = "org.criu.checkpoint.container.name";

/// Whether these annotations (or labels) mark a checkpoint image.
pub fn is_checkpoint(annotations: &serde_json::Map<String, serde_json::Value>) -> bool {
    annotations.contains_key(CRIO_NAME) || annotations.contains_key(CRIU_NAME)
}

/// A reference as containerd and CRI keep it: a name with a registry (an
/// unqualified name is `localhost/…`, as CRI-O and podman have it) and a tag
/// (`latest` if none), or a digest.
pub fn normalize(name: &str) -> String {
    let (repo, tag) = match name.rsplit_once('@') {
        Some((r, d)) => (r, format!("@{d}")),
        None => match name.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((r, t)) => (r, format!(":{t}")),
            None => (name, ":latest".into()),
        },
    };
    let first = repo.split('/').next().unwrap_or_default();
    let qualified =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if qualified {
        format!("{repo}{tag}")
    } else {
        format!("localhost/{repo}{tag}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_qualified_and_tagged() {
        for (given, want) in [
            ("checkpoint-image", "localhost/checkpoint-image:latest"),
            ("checkpoint-image:tag1", "localhost/checkpoint-image:tag1"),
            (
                "localhost/checkpoint-image:tag1",
                "localhost/checkpoint-image:tag1",
            ),
            (
                "127.0.0.1:5000/ckpt/counter:v1",
                "127.0.0.1:5000/ckpt/counter:v1",
            ),
            (
                "127.0.0.1:5000/ckpt/counter",
                "127.0.0.1:5000/ckpt/counter:latest",
            ),
            ("quay.io/a/b@sha256:ab", "quay.io/a/b@sha256:ab"),
            ("team/ckpt:1", "localhost/team/ckpt:1"),
        ] {
            assert_eq!(normalize(given), want, "{given}");
        }
    }
}
