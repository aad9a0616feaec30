//! ckpt-shim: checkpoints running containers into the archive Kubernetes tools read,
//! driving CRIU itself.
//!
//! The data path, one module per step: [`locate`] → [`freeze`] → [`dump`] →
//! [`collect`] → [`archive`], run by [`checkpoint`]; [`stream`] fuses the dump and
//! the archive when CRIU streams its images; [`restore`] and [`inspect`] read
//! archives back.

pub mod archive;
pub mod cri {
    //! Generated from `proto/cri.proto`: the CRI messages the shim decodes.
    tonic::include_proto!("runtime.v1");
}
pub mod checkpoint;
pub mod collect;
pub mod dump;
pub mod error;
pub mod fcopy;
pub mod freeze;
pub mod hold;
pub mod image;
pub mod locate;
pub mod metrics;
pub mod mountinfo;
pub mod pbwire;
pub mod pod;
pub mod preflight;

pub use error::{Error, Result};
pub mod inspect;
pub mod restore;
pub mod safefs;
pub mod seal;
pub mod server;
pub mod sink;
pub mod stream;
