//! Pushing a checkpoint image to a registry (the `oci-client` crate): the
//! layer streamed from the archive, then the config and the manifest. HTTPS
//! unless plain HTTP is asked for; anonymous access.

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::build::{Built, MANIFEST_TYPE};
use crate::error::{Error, Result};

fn oci(e: impl std::fmt::Display) -> Error {
    Error::Other(format!("registry: {e}"))
}

/// Pushes `b` as `name` (a full reference, registry included). Returns the
/// pushed manifest's digest.
pub async fn push(b: &Built, name: &str, plain_http: bool) -> Result<String> {
    let image: Reference = name
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("{name}: {e}")))?;
    let client = Client::new(ClientConfig {
        protocol: if plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..Default::default()
    });
    client
        .auth(&image, &RegistryAuth::Anonymous, RegistryOperation::Push)
        .await
        .map_err(oci)?;
    if !client
        .blob_exists(&image, &b.layer.digest)
        .await
        .map_err(oci)?
    {
        let file = tokio::fs::File::open(&b.archive)
            .await
            .map_err(|e| Error::Other(format!("open {}: {e}", b.archive.display())))?;
        let chunks = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
            .map(|c| c.map_err(oci_client::errors::OciDistributionError::IoError));
        client
            .push_blob_stream(&image, chunks, &b.layer.digest, Some(b.layer.size))
            .await
            .map_err(oci)?;
    }
    client
        .push_blob(&image, b.config.clone(), &b.config_blob.digest)
        .await
        .map_err(oci)?;
    client
        .push_manifest_raw(
            &image,
            b.manifest.clone(),
            MANIFEST_TYPE.parse().expect("a valid header"),
        )
        .await
        .map_err(oci)?;
    Ok(b.manifest_blob.digest.clone())
}
