//! The container calls the shim looks at before the runtime does:
//! CreateContainer (a checkpoint archive or checkpoint image as the image means
//! a restore),
//! StartContainer (a restored container's images can go once it has started),
//! RemoveContainer (its restore goes with it). Any other is handed on as it came.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use prost::Message;

use super::checkpoint_images::CheckpointImages;
use super::relay::{Amend, Call, Reply};
use super::upstream::Upstream;
use crate::cri::{
    ContainerStatusRequest, CreateContainerRequest, CreateContainerResponse, ImageSpec,
    ImageStatusRequest, PullImageRequest, RemoveContainerRequest, StartContainerRequest,
};
use crate::error::{Error, Result};
use crate::image::containerd::Found;
use crate::restore::create::{self as plan};
use crate::restore::policy::Mode;
use crate::restore::stage::{self, RestoreInfo, Staged, Staging};
use crate::restore::Checkpoint;
use crate::seal::Identities;

pub struct Containers {
    upstream: Arc<Upstream>,
    root: PathBuf,
    /// IDs of the containers restored here, for `ContainerStatus`.
    pub restored: Arc<RwLock<HashSet<String>>>,
    images: CheckpointImages,
    /// What opens sealed checkpoints restored here.
    identities: Arc<Identities>,
    /// Restore lazily unless the request's annotation says otherwise.
    lazy_default: bool,
    /// The node's background push slots, for the page sources (`None`: theirs).
    push_slots: Option<usize>,
    /// Hold the images against the new container's spec (the config's
    /// `restore_policy`).
    policy: Mode,
}

/// How a restore's pages reach the process ([`Containers::pages`]).
#[derive(Debug, Clone, Copy)]
enum Pages {
    /// Served from where they are by a page source; `full`: StartContainer
    /// is answered once every page is in, else as soon as the process runs.
    Served { full: bool },
    /// Copied into the restore dir, where CRIU reads them.
    Copied,
}

/// What a CreateContainer restores.
enum Source {
    Archive(PathBuf),
    Image(Found),
}

impl Source {
    /// As `restoredFrom` reports it.
    fn name(&self) -> String {
        match self {
            Source::Archive(p) => p.to_string_lossy().into_owned(),
            Source::Image(f) => f.name.clone(),
        }
    }
}

impl Containers {
    pub fn new(upstream: Arc<Upstream>, root: &Path, identities: Arc<Identities>) -> Containers {
        let ids = stage::restored_ids(root).into_iter().collect();
        Containers {
            upstream,
            root: root.to_path_buf(),
            restored: Arc::new(RwLock::new(ids)),
            images: CheckpointImages::default(),
            identities,
            lazy_default: false,
            push_slots: None,
            policy: Mode::Enforce,
        }
    }

    /// The config's `restore_policy`.
    pub fn with_restore_policy(mut self, policy: Mode) -> Containers {
        self.policy = policy;
        self
    }

    /// Restores lazily by default (the config's `lazy_pages`).
    pub fn with_lazy_pages(mut self, on: bool, push_slots: Option<usize>) -> Containers {
        self.lazy_default = on;
        self.push_slots = push_slots;
        self
    }

    /// Removes restores whose containers are gone, and unfinished ones.
    pub async fn collect_garbage(&self) {
        let Ok(list) = self
            .upstream
            .runtime()
            .list_containers(crate::cri::ListContainersRequest::default())
            .await
        else {
            return;
        };
        let live: HashSet<String> = list
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
        let root = self.root.clone();
        let n = tokio::task::spawn_blocking(move || stage::collect_garbage(&root, &live))
            .await
            .unwrap_or(0);
        if n > 0 {
            tracing::info!(removed = n, "removed restores of containers that are gone");
        }
        self.restored
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id| Staged::find(&self.root, id).is_some());
    }

    pub async fn create(&self, call: Call) -> Reply {
        let req: CreateContainerRequest = match call.decode() {
            Ok(r) => r,
            Err(s) => return Reply::status(s),
        };
        let source = match self.source(&req).await {
            Ok(Some(s)) => s,
            Ok(None) => return self.upstream.forward(&call).await,
            Err(e) => return counted(Reply::status(e.into())),
        };
        let started = Instant::now();
        let name = source.name();
        counted(match self.restore(&call, source).await {
            Ok(reply) => {
                if let Some(r) = reply.decode::<CreateContainerResponse>() {
                    tracing::info!(container = %r.container_id, source = %name, ms = started.elapsed().as_millis() as u64, "created a container to restore");
                }
                reply
            }
            Err(e) => {
                tracing::warn!(source = %name, "restore refused: {e}");
                Reply::status(e.into())
            }
        })
    }

    /// What the request restores, if anything: an archive on the node (an
    /// absolute path as the image, CRI-O's convention), or a checkpoint image.
    async fn source(&self, req: &CreateContainerRequest) -> Result<Option<Source>> {
        if let Some(path) = plan::archive_path(req) {
            return Ok(Some(Source::Archive(path)));
        }
        let image = req
            .config
            .as_ref()
            .and_then(|c| c.image.as_ref())
            .map(|i| i.image.as_str());
        let found = self
            .images
            .find(&self.upstream, image.unwrap_or_default())
            .await?;
        Ok(found.map(Source::Image))
    }

    /// Checks the archive, finds its base image, and has the runtime create the
    /// container while the archive is extracted beside it; on any failure
    /// nothing is left.
    async fn restore(&self, call: &Call, source: Source) -> Result<Reply> {
        let name = source.name();
        let (path, fetched) = self.archive_of(source).await?;
        let ckpt = open_checkpoint(path.clone(), self.identities.clone()).await?;
        let image = self.base_image(&ckpt).await?;
        let msg = crate::pbwire::grpc_message(&call.body).unwrap_or_default();
        let create = plan::request(msg, &ckpt, &image, &name)?;
        plan::create_sources(&create.sources)?;
        let staging = Staging::new(&self.root)?;
        let info = RestoreInfo {
            source: name,
            checkpointed_id: ckpt.config.id.clone(),
            checkpointed_name: ckpt.config.name.clone(),
            checkpointed_at: ckpt.config.checkpointed_time.clone(),
            policy: self.policy,
        };
        let dest = staging.path().to_path_buf();
        let pages = self.pages(call, &ckpt, fetched.is_some());
        let slots = self.push_slots;
        let extract = blocking(move || match pages {
            Pages::Served { full } => {
                crate::restore::lazy::stage(&ckpt.path, &dest, full, slots).map(drop)
            }
            Pages::Copied => ckpt.extract(&dest),
        });
        let rewritten = Call {
            path: call.path.clone(),
            metadata: call.metadata.clone(),
            body: crate::pbwire::grpc_frame(&create.request).into(),
        };
        let created = self.upstream.forward(&rewritten);
        let (extracted, reply) = tokio::join!(extract, created);
        drop(fetched);
        // The runtime's own refusal goes back unchanged; staging goes with it.
        let Some(created) = reply.decode::<CreateContainerResponse>() else {
            return Ok(reply);
        };
        let checked = match extracted {
            Ok(()) => self.confine(&created.container_id, &staging).await,
            Err(e) => Err(e),
        };
        if let Err(e) =
            checked.and_then(|()| staging.commit(&self.root, &created.container_id, &info))
        {
            self.remove_upstream(&created.container_id).await;
            return Err(e);
        }
        self.restored
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(created.container_id);
        Ok(reply)
    }

    /// Holds the staged images against the spec the runtime just generated
    /// for container `id` ([`crate::restore::policy`]), so that a restore
    /// the runtime's create would refuse is refused here, at CreateContainer.
    /// The runtime's create checks again, against the `config.json` it runs.
    async fn confine(&self, id: &str, staging: &Staging) -> Result<()> {
        if self.policy == Mode::Off {
            return Ok(());
        }
        let spec = crate::image::containerd::container_spec(self.upstream.channel(), id).await?;
        let images = staging.path().join("checkpoint");
        let c = blocking(move || crate::restore::policy::confine(&images, &spec)).await?;
        tracing::info!(container = %id, threads = c.threads, seccomp_filter = c.filtered, "checkpoint images within the new container's spec");
        Ok(())
    }

    /// How the pages get into the restored process. Served from the archive
    /// by a page source where possible: lazily if asked for (annotation,
    /// else config), else in full, StartContainer waiting for every page.
    /// Not from a sealed archive (its pages are encrypted) nor from one
    /// fetched into a staging that goes when CreateContainer is answered:
    /// then they are copied into the restore dir.
    fn pages(&self, call: &Call, ckpt: &Checkpoint, fetched: bool) -> Pages {
        let annotations = call
            .decode::<CreateContainerRequest>()
            .ok()
            .and_then(|r| r.config)
            .map(|c| c.annotations)
            .unwrap_or_default();
        let lazy = crate::restore::lazy::wanted(&annotations, self.lazy_default);
        let why_not = if ckpt.sealed.is_some() {
            Some("the archive is encrypted".to_string())
        } else if fetched {
            Some("the checkpoint image's layer is not in the runtime's content store".into())
        } else {
            crate::restore::criu_version::criu_supported().err()
        };
        match why_not {
            None => Pages::Served { full: !lazy },
            Some(why) => {
                match lazy {
                    true => {
                        tracing::warn!(archive = %ckpt.path.display(), "restoring in full, not lazily: {why}")
                    }
                    false => {
                        tracing::info!(archive = %ckpt.path.display(), "copying the pages into the restore dir: {why}")
                    }
                }
                Pages::Copied
            }
        }
    }

    /// A CreateContainer `call` that restores `archive` (a pod restore's):
    /// the new container's ID, or why not, the runtime's refusal included.
    pub(super) async fn restore_archive(&self, call: &Call, archive: PathBuf) -> Result<String> {
        let reply = self.restore(call, Source::Archive(archive)).await?;
        match reply.decode::<CreateContainerResponse>() {
            Some(r) => Ok(r.container_id),
            None => Err(Error::Upstream(reply.grpc_status())),
        }
    }

    /// Removes a container created here, and its restore.
    pub(super) async fn discard(&self, id: &str) {
        self.remove_upstream(id).await;
        self.forget(id).await;
    }

    /// The archive to restore: the one on the node, or a checkpoint image's,
    /// read out of the runtime into a private staging of its own (which goes
    /// when the restore is done with it).
    async fn archive_of(&self, source: Source) -> Result<(PathBuf, Option<Staging>)> {
        let found = match source {
            Source::Archive(p) => return Ok((p, None)),
            Source::Image(found) => found,
        };
        if let Some(blob) = self.images.local_layer(&self.upstream, &found).await {
            tracing::info!(image = %found.name, blob = %blob.display(), "restoring from the layer in the runtime's content store");
            return Ok((blob, None));
        }
        let staging = Staging::new(&self.root)?;
        let path = staging.path().join("checkpoint.tar");
        let file = crate::safefs::create_new(&path, 0o600)?;
        crate::image::containerd::fetch_archive(&self.upstream.channel(), &found, file).await?;
        Ok((path, Some(staging)))
    }

    /// The checkpoint's base image as this node's runtime knows it: by ID or
    /// digest, else by name, else pulled by name; NotFound if none works.
    async fn base_image(&self, ckpt: &Checkpoint) -> Result<String> {
        let (reference, name) = ckpt.base_image();
        let mut images = self.upstream.images();
        for r in [reference, name].into_iter().flatten() {
            let req = ImageStatusRequest {
                image: Some(spec(r)),
            };
            if let Ok(resp) = images.image_status(req).await {
                if let Some(img) = resp.into_inner().image {
                    return Ok(if img.id.is_empty() {
                        r.to_string()
                    } else {
                        img.id
                    });
                }
            }
        }
        let Some(name) = name else {
            return Err(Error::ImageNotFound {
                image: reference.unwrap_or("(none)").into(),
                why: "the checkpoint names no image to pull".into(),
            });
        };
        match images
            .pull_image(PullImageRequest {
                image: Some(spec(name)),
            })
            .await
        {
            Ok(r) => Ok(Some(r.into_inner().image_ref)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| name.into())),
            Err(s) => Err(Error::ImageNotFound {
                image: name.into(),
                why: format!("not on this node, and pulling it failed: {}", s.message()),
            }),
        }
    }

    /// For a verbose ContainerStatus of a container restored here: its info
    /// says so, where CRI-O says it ([`restored_status`](super::restored_status)).
    pub fn amend_status(&self, request: &[u8]) -> Option<Amend> {
        let r = ContainerStatusRequest::decode(request).ok()?;
        if !r.verbose
            || !self
                .restored
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&r.container_id)
        {
            return None;
        }
        let info = Staged::find(&self.root, &r.container_id)?.info()?;
        Some(super::restored_status::amend(info))
    }

    /// StartContainer, and for a restored container, its images removed after.
    pub async fn start(&self, call: Call) -> Reply {
        let id = call
            .decode::<StartContainerRequest>()
            .map(|r| r.container_id)
            .unwrap_or_default();
        let reply = self.upstream.forward(&call).await;
        if let Some(s) = Staged::find(&self.root, &id) {
            match reply.code() {
                tonic::Code::Ok => tracing::info!(container = %id, "restored"),
                code => tracing::warn!(container = %id, ?code, "restore failed at start"),
            }
            // Off the request path: deleting GiBs of pages takes time.
            tokio::task::spawn_blocking(move || s.drop_images());
        }
        reply
    }

    /// RemoveContainer, and a restored container's restore with it.
    pub async fn remove(&self, call: Call) -> Reply {
        let id = call
            .decode::<RemoveContainerRequest>()
            .map(|r| r.container_id)
            .unwrap_or_default();
        let reply = self.upstream.forward(&call).await;
        if reply.code() == tonic::Code::Ok {
            self.forget(&id).await;
        }
        reply
    }

    async fn remove_upstream(&self, id: &str) {
        let req = RemoveContainerRequest {
            container_id: id.into(),
        };
        if let Err(e) = self.upstream.runtime().remove_container(req).await {
            tracing::error!(container = %id, "could not remove a half-restored container: {e}");
        }
    }

    async fn forget(&self, id: &str) {
        self.restored
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(s) = Staged::find(&self.root, id) {
            let _ = tokio::task::spawn_blocking(move || s.remove()).await;
        }
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// An archive opened with today's member checks, and unsealed with `ids`
/// when it is sealed (so a wrong key fails before anything is created).
pub(super) async fn open_checkpoint(path: PathBuf, ids: Arc<Identities>) -> Result<Checkpoint> {
    blocking(move || {
        let mut c = Checkpoint::open(&path)?;
        c.unseal(ids)?;
        Ok(c)
    })
    .await
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Other(format!("blocking task: {e}")))?
}

/// A restore's answer, counted in the metrics by its code.
fn counted(reply: Reply) -> Reply {
    crate::metrics::get().restore_answered(reply.code());
    reply
}
