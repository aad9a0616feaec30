//! `ckpt-shim serve`: a CRI `runtime.v1` endpoint on a unix socket. It serves
//! `CheckpointContainer` itself and forwards every other call, unchanged, to the
//! real runtime.

pub mod config;
mod native;
mod proxy;
mod socket;

use std::convert::Infallible;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::body::Body;

pub use config::Config;

use crate::error::{Context, Result};

/// The one method the shim owns.
pub const CHECKPOINT_PATH: &str = "/runtime.v1.RuntimeService/CheckpointContainer";

#[derive(Clone)]
struct Router {
    native: Arc<native::Native>,
    upstream: tonic::transport::Channel,
    native_enabled: bool,
}

impl Router {
    async fn route(self, req: http::Request<Incoming>) -> Result<http::Response<Body>, Infallible> {
        if req.uri().path() == CHECKPOINT_PATH {
            if !self.native_enabled {
                // The message the kubelet's e2e test recognises as "not supported".
                return Ok(tonic::Status::unimplemented(
                    "method CheckpointContainer not implemented",
                )
                .into_http());
            }
            return Ok(self.native.handle(req).await);
        }
        Ok(proxy::forward(&self.upstream, req).await)
    }
}

/// Serves until SIGTERM or SIGINT, then removes the socket.
pub async fn serve(cfg: Config) -> Result<()> {
    let upstream = proxy::channel(&cfg.upstream)?;
    let listener = socket::bind(&cfg.listen)?;
    // A previous shim killed mid-checkpoint may have left containers frozen.
    for cg in crate::freeze::recover(&cfg.journal_dir()) {
        tracing::warn!(cgroup = %cg.display(), "thawed a container a previous ckpt-shim left frozen");
    }
    tracing::info!(listen = %cfg.listen.display(), upstream = %cfg.upstream, "serving CRI");
    let router = Router {
        native: Arc::new(native::Native::new(&cfg, upstream.clone())),
        upstream,
        native_enabled: cfg.checkpoint_enabled,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .ctx(|| "SIGTERM handler".into())?;
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (stream, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| router.clone().route(req));
            let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            // CRI messages (image lists, exec output) can be large; match gRPC's usual window.
            http2
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20);
            if let Err(e) = http2.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    let _ = std::fs::remove_file(&cfg.listen);
    tracing::info!("stopped");
    Ok(())
}
