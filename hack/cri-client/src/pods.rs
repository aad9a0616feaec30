//! KEP-5823's CheckpointPod and RestorePod as a client calls them. The k8s-cri
//! crate predates them, so their messages are declared here (the published
//! field numbers, around k8s-cri's own types) and called by path. Shared by
//! cri-ctl and the pod tests.

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use tonic::transport::Channel;

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckpointPodRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(string, tag = "2")]
    pub output_path: String,
    #[prost(string, repeated, tag = "3")]
    pub container_ids: Vec<String>,
    #[prost(map = "string, string", tag = "4")]
    pub options: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckpointPodResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RestorePodRequest {
    #[prost(string, tag = "1")]
    pub checkpoint_path: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<cri::PodSandboxConfig>,
    #[prost(string, tag = "3")]
    pub runtime_handler: String,
    #[prost(map = "string, string", tag = "4")]
    pub options: HashMap<String, String>,
    #[prost(message, repeated, tag = "5")]
    pub container_configs: Vec<cri::ContainerConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RestoredContainer {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RestorePodResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, repeated, tag = "2")]
    pub restored_containers: Vec<RestoredContainer>,
}

async fn unary<Req, Resp>(
    channel: Channel,
    method: &'static str,
    req: Req,
    timeout: std::time::Duration,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(method);
    let mut req = tonic::Request::new(req);
    req.set_timeout(timeout);
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    Ok(grpc.unary(req, path, codec).await?.into_inner())
}

/// CheckpointPod with `timeout` as the call's deadline.
pub async fn checkpoint_pod(
    channel: Channel,
    req: CheckpointPodRequest,
    timeout: std::time::Duration,
) -> Result<CheckpointPodResponse, tonic::Status> {
    unary(
        channel,
        "/runtime.v1.RuntimeService/CheckpointPod",
        req,
        timeout,
    )
    .await
}

pub async fn restore_pod(
    channel: Channel,
    req: RestorePodRequest,
    timeout: std::time::Duration,
) -> Result<RestorePodResponse, tonic::Status> {
    unary(
        channel,
        "/runtime.v1.RuntimeService/RestorePod",
        req,
        timeout,
    )
    .await
}
