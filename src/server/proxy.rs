//! Forwarding to the upstream runtime as raw HTTP/2 gRPC: the request's headers
//! (metadata, `grpc-timeout`) and its framed message bytes go out as they came,
//! and the response, trailers and status included, comes back the same way.
//! Nothing is decoded, so fields this shim does not know survive, and streaming
//! methods work.

use hyper::body::Incoming;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

use crate::error::{Error, Result};

/// A lazy channel to `unix:///path` (or a plain path).
pub fn channel(upstream: &str) -> Result<Channel> {
    let path = upstream
        .strip_prefix("unix://")
        .unwrap_or(upstream)
        .to_string();
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "upstream {upstream:?}: only unix:///absolute/path endpoints are supported"
        )));
    }
    let ep = Endpoint::from_static("http://upstream.invalid");
    Ok(
        ep.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        })),
    )
}

pub async fn forward(upstream: &Channel, req: http::Request<Incoming>) -> http::Response<Body> {
    let (parts, body) = req.into_parts();
    let req = http::Request::from_parts(parts, Body::new(body));
    match upstream.clone().oneshot(req).await {
        Ok(resp) => resp,
        Err(e) => {
            tonic::Status::unavailable(format!("ckpt-shim: upstream runtime unreachable: {e}"))
                .into_http()
        }
    }
}
