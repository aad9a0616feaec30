//! Which CreateContainer images are checkpoint images. The kubelet names the
//! image by the ID its ImageStatus gave (or by a tag, or a repo digest); CRI's
//! ImageStatus turns any of these into the image's names, and containerd's own
//! image service, on the same socket, says whether the image under one of those
//! names carries the checkpoint annotations (see [`crate::image`]).
//!
//! An image ID is the digest of its config, so what it is never changes: the
//! IDs of ordinary images are remembered, and their CreateContainer costs one
//! lookup the first time only. A runtime without containerd's API (CRI-O, which
//! restores checkpoint images itself) answers Unimplemented once and is never
//! asked again.
//!
//! An uncompressed layer is read where containerd keeps it, in its content
//! store on this node, as the archive itself: no copy through the content API.
//! containerd names its root in the CRI `Status` answer's verbose config.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::upstream::Upstream;
use crate::cri::{ImageSpec, ImageStatusRequest, StatusRequest};
use crate::error::Result;
use crate::image::containerd::{self, Found};

#[derive(Default)]
pub struct CheckpointImages {
    ordinary: Mutex<HashSet<String>>,
    no_containerd: AtomicBool,
    /// containerd's root dir, once the runtime has named it.
    content_root: tokio::sync::OnceCell<PathBuf>,
}

impl CheckpointImages {
    /// The checkpoint image `image` names, or `None` for an ordinary image or
    /// one the runtime does not have (its CreateContainer says so itself).
    pub async fn find(&self, up: &Upstream, image: &str) -> Result<Option<Found>> {
        if image.is_empty() || self.no_containerd.load(Ordering::Relaxed) || self.is_ordinary(image)
        {
            return Ok(None);
        }
        let req = ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
        };
        let Ok(status) = up.images().image_status(req).await else {
            return Ok(None);
        };
        let Some(img) = status.into_inner().image else {
            return Ok(None);
        };
        // The name asked for first, so that it is the one reported.
        let mut names: Vec<String> = img
            .repo_tags
            .iter()
            .chain(&img.repo_digests)
            .cloned()
            .collect();
        names.sort_by_key(|n| n != image);
        match containerd::checkpoint_image(&up.channel(), &names).await {
            Ok(None) => {
                // Only the ID: a tag can move to another image.
                self.ordinary
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(img.id);
                Ok(None)
            }
            Err(crate::Error::Upstream(s)) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!("the runtime has no containerd image service; checkpoint images are its own business");
                self.no_containerd.store(true, Ordering::Relaxed);
                Ok(None)
            }
            r => r,
        }
    }

    /// The layer of `found` as a file in the runtime's content store on this
    /// node, if it can serve as the archive itself (see
    /// [`containerd::local_blob`]).
    pub async fn local_layer(&self, up: &Upstream, found: &Found) -> Option<PathBuf> {
        // Not remembered when unknown: a runtime briefly away may say next time.
        let root = self
            .content_root
            .get_or_try_init(|| async {
                let req = StatusRequest { verbose: true };
                let info = up
                    .runtime()
                    .status(req)
                    .await
                    .map_err(drop)?
                    .into_inner()
                    .info;
                let config = info.get("config").ok_or(())?;
                let config: serde_json::Value = serde_json::from_str(config).map_err(drop)?;
                config["containerdRootDir"]
                    .as_str()
                    .map(PathBuf::from)
                    .ok_or(())
            })
            .await
            .ok()?;
        containerd::local_blob(root, &found.layer)
    }

    fn is_ordinary(&self, image: &str) -> bool {
        self.ordinary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(image)
    }
}
