//! A CRI client as kubelet and crictl are clients, shared by the shim's tests
//! and its tools (`cri-ctl`, `cri-demo`, `proxy-bench` in `src/bin/`):
//! [`client`] connects on a unix socket and builds the configs kubelet would
//! send; [`pods`] calls KEP-5823's CheckpointPod and RestorePod.

pub mod client;
pub mod pods;
