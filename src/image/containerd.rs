//! Checkpoint images in containerd, through its own gRPC API (the
//! `containerd-client` crate), never its store on disk: import one, and tell
//! whether an image is one and read its layer back. Everything is in the CRI
//! plugin's namespace, `k8s.io`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::{
    leases_client::LeasesClient, CreateImageRequest, GetImageRequest, Image, ReadContentRequest,
    UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;
use containerd_client::types::Descriptor;
use futures_util::StreamExt;
use serde_json::Value;

use super::build::{Blob, Built};
use crate::error::{Context, Error, Result};

const NAMESPACE: &str = "k8s.io";
const CHUNK: usize = 1 << 20;

/// A request in the CRI namespace, under `lease` if given (so nothing written
/// is collected before the image refers to it).
fn req<T>(msg: T, lease: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", NAMESPACE.parse().expect("ascii"));
    if let Some(l) = lease {
        r.metadata_mut()
            .insert("containerd-lease", l.parse().expect("ascii"));
    }
    r
}

/// The OCI runtime spec containerd generated for container `id` (CRI's
/// CreateContainer stores it with the container record; the task's
/// `config.json` is written from it at start).
pub async fn container_spec(ch: Channel, id: &str) -> Result<Value> {
    use containerd_client::services::v1::{
        containers_client::ContainersClient, GetContainerRequest,
    };
    let got = ContainersClient::new(ch)
        .get(req(GetContainerRequest { id: id.into() }, None))
        .await?
        .into_inner();
    let spec = got
        .container
        .and_then(|c| c.spec)
        .ok_or_else(|| Error::Other(format!("containerd holds no spec for container {id}")))?;
    serde_json::from_slice(&spec.value)
        .map_err(|e| Error::Other(format!("the spec containerd holds for {id}: {e}")))
}

pub async fn connect(socket: &Path) -> Result<Channel> {
    containerd_client::connect(socket)
        .await
        .map_err(|e| Error::Other(format!("containerd at {}: {e}", socket.display())))
}

/// Imports `b` as image `name`: its blobs into the content store, then the
/// image record. An image of that name is updated to point at this one.
pub async fn import(ch: Channel, b: &Built, name: &str) -> Result<()> {
    let mut leases = LeasesClient::new(ch.clone());
    let lease_id = format!("ckpt-shim-import-{}", &b.manifest_blob.hex()[..16]);
    let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire_in_an_hour())]);
    let lease = containerd_client::services::v1::CreateRequest {
        id: lease_id.clone(),
        labels,
    };
    leases.create(req(lease, None)).await?;
    let result = async {
        let archive =
            std::fs::File::open(&b.archive).ctx(|| format!("open {}", b.archive.display()))?;
        write_blob(
            &ch,
            &lease_id,
            &b.layer,
            Source::File(archive),
            HashMap::new(),
        )
        .await?;
        write_blob(
            &ch,
            &lease_id,
            &b.config_blob,
            Source::Bytes(&b.config),
            HashMap::new(),
        )
        .await?;
        // The manifest keeps its config and layer from garbage collection.
        let refs = HashMap::from([
            (
                "containerd.io/gc.ref.content.config".into(),
                b.config_blob.digest.clone(),
            ),
            (
                "containerd.io/gc.ref.content.l.0".into(),
                b.layer.digest.clone(),
            ),
        ]);
        write_blob(
            &ch,
            &lease_id,
            &b.manifest_blob,
            Source::Bytes(&b.manifest),
            refs,
        )
        .await?;
        create_image(&ch, name, &b.manifest_blob).await
    }
    .await;
    let delete = containerd_client::services::v1::DeleteRequest {
        id: lease_id,
        sync: false,
    };
    let _ = leases.delete(req(delete, None)).await;
    result
}

async fn create_image(ch: &Channel, name: &str, target: &Blob) -> Result<()> {
    let image = Image {
        name: name.into(),
        // The label CRI's own imports carry.
        labels: HashMap::from([("io.cri-containerd.image".into(), "managed".into())]),
        target: Some(Descriptor {
            media_type: target.media_type.clone(),
            digest: target.digest.clone(),
            size: target.size as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let mut images = containerd_client::services::v1::images_client::ImagesClient::new(ch.clone());
    let created = images
        .create(req(
            CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            },
            None,
        ))
        .await;
    match created {
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            images
                .update(req(
                    UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    },
                    None,
                ))
                .await?;
            Ok(())
        }
        r => r.map(drop).map_err(Into::into),
    }
}

enum Source<'a> {
    File(std::fs::File),
    Bytes(&'a [u8]),
}

/// Writes one blob into the content store; one that is there already is fine.
async fn write_blob(
    ch: &Channel,
    lease: &str,
    blob: &Blob,
    source: Source<'_>,
    labels: HashMap<String, String>,
) -> Result<()> {
    let request = |action: WriteAction, offset: i64, data: Vec<u8>| WriteContentRequest {
        action: action as i32,
        r#ref: format!("ckpt-shim-{}", blob.hex()),
        total: blob.size as i64,
        expected: blob.digest.clone(),
        offset,
        data,
        labels: HashMap::new(),
    };
    let mut commit = request(WriteAction::Commit, blob.size as i64, Vec::new());
    commit.labels = labels;
    let template = request(WriteAction::Write, 0, Vec::new());
    let write = move |offset: i64, data: Vec<u8>| WriteContentRequest {
        offset,
        data,
        ..template.clone()
    };
    let stream = match source {
        Source::Bytes(b) => {
            let mut chunks: Vec<_> = b
                .chunks(CHUNK)
                .enumerate()
                .map(|(i, c)| write((i * CHUNK) as i64, c.to_vec()))
                .collect();
            chunks.push(commit);
            futures_util::stream::iter(chunks).boxed()
        }
        Source::File(f) => file_chunks(f, write, commit),
    };
    let mut content =
        containerd_client::services::v1::content_client::ContentClient::new(ch.clone());
    match content.write(req(stream, Some(lease))).await {
        Ok(mut responses) => {
            while responses.get_mut().message().await?.is_some() {}
            Ok(())
        }
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => Err(s.into()),
    }
}

/// A file as WRITE requests of one MiB, then the COMMIT.
fn file_chunks(
    f: std::fs::File,
    write: impl Fn(i64, Vec<u8>) -> WriteContentRequest + Send + 'static,
    commit: WriteContentRequest,
) -> futures_util::stream::BoxStream<'static, WriteContentRequest> {
    use std::os::unix::fs::FileExt;
    let reads = futures_util::stream::unfold((f, 0u64), move |(f, off)| async move {
        let mut buf = vec![0u8; CHUNK];
        match f.read_at(&mut buf, off) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some(((off, buf), (f, off + n as u64)))
            }
        }
    });
    reads
        .map(move |(off, buf)| write(off as i64, buf))
        .chain(futures_util::stream::once(async move { commit }))
        .boxed()
}

fn expire_in_an_hour() -> String {
    (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A checkpoint image the runtime holds: its name and its one layer.
#[derive(Debug, Clone)]
pub struct Found {
    pub name: String,
    pub layer: Descriptor,
}

/// Which of `names` (an image's references, as CRI resolved them) is a
/// checkpoint image, by the checkpoint annotations on its manifest (or index),
/// or the labels of its config. `None` if it is an ordinary image.
pub async fn checkpoint_image(ch: &Channel, names: &[String]) -> Result<Option<Found>> {
    let mut images = containerd_client::services::v1::images_client::ImagesClient::new(ch.clone());
    for name in names {
        let got = match images
            .get(req(GetImageRequest { name: name.clone() }, None))
            .await
        {
            Err(s) if s.code() == tonic::Code::NotFound => continue,
            r => r?,
        };
        let Some(target) = got.into_inner().image.and_then(|i| i.target) else {
            continue;
        };
        let mut doc: Value = serde_json::from_slice(&read_blob(ch, &target.digest).await?)
            .map_err(|e| Error::Other(format!("manifest of {name}: {e}")))?;
        let mut marked = doc["annotations"]
            .as_object()
            .is_some_and(super::is_checkpoint);
        if let Some(first) = doc["manifests"].as_array().and_then(|m| m.first()).cloned() {
            // An index: its first manifest (checkpoint images have one).
            let digest = first["digest"].as_str().unwrap_or_default().to_string();
            doc = serde_json::from_slice(&read_blob(ch, &digest).await?)
                .map_err(|e| Error::Other(format!("manifest of {name}: {e}")))?;
        }
        marked |= doc["annotations"]
            .as_object()
            .is_some_and(super::is_checkpoint);
        if !marked {
            let digest = doc["config"]["digest"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let config: Value =
                serde_json::from_slice(&read_blob(ch, &digest).await?).unwrap_or_default();
            marked = config["config"]["Labels"]
                .as_object()
                .is_some_and(super::is_checkpoint);
        }
        let layers = doc["layers"].as_array().cloned().unwrap_or_default();
        if !marked {
            return Ok(None);
        }
        let [layer] = layers.as_slice() else {
            return Err(Error::InvalidArgument(format!(
                "checkpoint image {name} has {} layers; one is expected",
                layers.len()
            )));
        };
        return Ok(Some(Found {
            name: name.clone(),
            layer: Descriptor {
                media_type: layer["mediaType"].as_str().unwrap_or_default().into(),
                digest: layer["digest"].as_str().unwrap_or_default().into(),
                size: layer["size"].as_i64().unwrap_or(0),
                annotations: HashMap::new(),
            },
        }));
    }
    Ok(None)
}

async fn read_blob(ch: &Channel, digest: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    read_into(ch, digest, &mut out).await?;
    Ok(out)
}

async fn read_into(ch: &Channel, digest: &str, out: &mut (dyn Write + Send)) -> Result<u64> {
    let mut content =
        containerd_client::services::v1::content_client::ContentClient::new(ch.clone());
    let read = ReadContentRequest {
        digest: digest.into(),
        offset: 0,
        size: 0,
    };
    let mut stream = content.read(req(read, None)).await?.into_inner();
    let mut n = 0u64;
    while let Some(chunk) = stream.message().await? {
        out.write_all(&chunk.data)
            .ctx(|| format!("write out {digest}"))?;
        n += chunk.data.len() as u64;
    }
    Ok(n)
}

/// The layer's blob in containerd's content store under `root` (its
/// `containerdRootDir`), where it can be read as the archive itself: an
/// uncompressed layer, a sha256 digest, and a root-owned regular file of the
/// layer's size that nobody else can write. containerd verified the digest
/// when the blob came in, and only root can change it since. `None` sends the
/// caller through the content API instead.
pub fn local_blob(root: &Path, layer: &Descriptor) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let compressed = ["gzip", "zstd"]
        .iter()
        .any(|c| layer.media_type.ends_with(c));
    let hex = layer.digest.strip_prefix("sha256:")?;
    let hex_ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if compressed || !hex_ok {
        return None;
    }
    let path = root
        .join("io.containerd.content.v1.content/blobs/sha256")
        .join(hex);
    let m = std::fs::symlink_metadata(&path).ok()?;
    let safe = m.file_type().is_file() && m.uid() == 0 && m.mode() & 0o022 == 0;
    (safe && m.len() == layer.size as u64).then_some(path)
}

/// Writes the checkpoint archive a checkpoint image's layer holds into
/// `file`, uncompressing a gzip layer (as buildah and
/// podman push them).
pub async fn fetch_archive(ch: &Channel, found: &Found, file: std::fs::File) -> Result<()> {
    let gzip = found.layer.media_type.ends_with("gzip");
    if found.layer.media_type.ends_with("zstd") {
        return Err(Error::InvalidArgument(format!(
            "checkpoint image {}: zstd-compressed layers are not supported; push it uncompressed or with gzip",
            found.name
        )));
    }
    if gzip {
        let mut unzip = flate2::write::GzDecoder::new(file);
        read_into(ch, &found.layer.digest, &mut unzip).await?;
        unzip
            .finish()
            .ctx(|| format!("uncompress {}", found.layer.digest))?;
    } else {
        let mut w = std::io::BufWriter::with_capacity(CHUNK, file);
        read_into(ch, &found.layer.digest, &mut w).await?;
        w.flush()
            .ctx(|| format!("write out {}", found.layer.digest))?;
    }
    Ok(())
}
