//! ckpt-shim: checkpoints running containers into the archive Kubernetes tools read,
//! driving CRIU directly over its RPC.
