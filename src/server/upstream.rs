//! The shim's own connection to the upstream runtime: typed clients for the
//! calls it makes itself, and [`Upstream::forward`] for calls it takes out of a
//! client's stream, looks at, and then hands on as they came.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::transport::Channel;

use super::relay::{Call, Reply};
use crate::cri::image_service_client::ImageServiceClient;
use crate::cri::runtime_service_client::RuntimeServiceClient;

pub struct Upstream {
    path: PathBuf,
    channel: Channel,
    send: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl Upstream {
    pub fn new(path: &Path) -> Upstream {
        Upstream {
            path: path.to_path_buf(),
            channel: crate::cri::unix_channel(path),
            send: Default::default(),
        }
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Sends `call` (its metadata and message bytes as they came) and collects
    /// the answer.
    pub async fn forward(&self, call: &Call) -> Reply {
        let metrics = crate::metrics::get();
        let reply = match self.try_forward(call).await {
            Ok(r) => r,
            Err(e) => {
                metrics.upstream_error("connect");
                Reply::status(tonic::Status::unavailable(format!(
                    "ckpt-shim: upstream runtime unreachable: {e}"
                )))
            }
        };
        metrics.forwarded(metrics.method_label(&call.path), reply.code() as i32);
        reply
    }

    async fn try_forward(
        &self,
        call: &Call,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let mut send = self.sender().await?;
        let mut req = http::Request::post(format!("http://localhost{}", call.path))
            .body(Full::new(call.body.clone()))?;
        *req.headers_mut() = call.metadata.clone();
        let resp = send.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Reply {
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    async fn sender(&self) -> std::io::Result<SendRequest<Full<Bytes>>> {
        let mut slot = self.send.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let stream = tokio::net::UnixStream::connect(&self.path).await?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        *slot = Some(send.clone());
        Ok(send)
    }
}
