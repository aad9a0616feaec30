//! ckpt-shim: checkpoints running containers into the archive Kubernetes tools read,
//! driving CRIU itself.
//!
//! The data path: [`checkpoint`] (one module per step: locate → freeze →
//! dump → collect → sink → archive), [`pod`] for a pod's cut, [`restore`] and
//! [`inspect`] reading archives back, [`image`] for checkpoint images, and
//! [`server`], the CRI endpoint in front of containerd or CRI-O. Shared facts
//! have one home each: [`cgroup`], [`oci`], [`mountinfo`], [`meminfo`],
//! [`safefs`]; CRIU's RPC and image framing are in the `criu-rpc` crate.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cri {
    //! Generated from `proto/cri.proto`: the CRI messages the shim decodes.
    tonic::include_proto!("runtime.v1");

    /// A lazy gRPC channel to a CRI endpoint's unix socket, connected at the
    /// first call.
    pub fn unix_channel(path: &std::path::Path) -> tonic::transport::Channel {
        let p = path.to_path_buf();
        tonic::transport::Endpoint::from_static("http://localhost").connect_with_connector_lazy(
            tower::service_fn(move |_: http::Uri| {
                let p = p.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(p).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }),
        )
    }
}
pub mod cgroup;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fcopy;
pub mod image;
pub mod meminfo;
pub mod metrics;
pub mod mountinfo;
pub mod oci;
pub mod pbwire;
pub mod pod;
pub mod preflight;

pub use error::{Error, Result};
pub mod inspect;
pub mod restore;
pub mod safefs;
pub mod seal;
pub mod server;
