//! `ckpt-shim serve`: a CRI `runtime.v1` endpoint on a unix socket. It serves
//! `CheckpointContainer` itself and relays every other call, unchanged, to the
//! real runtime ([`relay`]).

pub mod config;
mod frame;
mod headers;
mod native;
pub mod relay;
mod socket;

use std::path::PathBuf;
use std::sync::Arc;

pub use config::Config;

use crate::error::{Context, Error, Result};
use relay::{Call, Owner, Reply, ReplyFuture};

/// The one method the shim owns.
pub const CHECKPOINT_PATH: &str = "/runtime.v1.RuntimeService/CheckpointContainer";

/// The calls the shim answers itself.
struct Router {
    native: Arc<native::Native>,
    native_enabled: bool,
}

impl Owner for Router {
    fn owns(&self, path: &str) -> bool {
        path == CHECKPOINT_PATH
    }

    fn call(self: Arc<Self>, call: Call) -> ReplyFuture {
        Box::pin(async move {
            if !self.native_enabled {
                // The message the kubelet's e2e test recognises as "not supported".
                return Reply::status(tonic::Status::unimplemented(
                    "method CheckpointContainer not implemented",
                ));
            }
            self.native.clone().handle(call).await
        })
    }
}

/// The upstream's socket path from `unix:///path` (or a plain path).
pub fn socket_path(upstream: &str) -> Result<PathBuf> {
    let path = upstream.strip_prefix("unix://").unwrap_or(upstream);
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "upstream {upstream:?}: only unix:///absolute/path endpoints are supported"
        )));
    }
    Ok(PathBuf::from(path))
}

/// A lazy gRPC channel to the upstream, for the calls the shim makes itself.
fn channel(path: &std::path::Path) -> tonic::transport::Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost").connect_with_connector_lazy(
        tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }),
    )
}

/// Serves until SIGTERM or SIGINT, then removes the socket.
pub async fn serve(cfg: Config) -> Result<()> {
    let upstream = Arc::new(socket_path(&cfg.upstream)?);
    let listener = socket::bind(&cfg.listen)?;
    // A previous shim killed mid-checkpoint may have left containers frozen.
    for cg in crate::freeze::recover(&cfg.journal_dir()) {
        tracing::warn!(cgroup = %cg.display(), "thawed a container a previous ckpt-shim left frozen");
    }
    tracing::info!(listen = %cfg.listen.display(), upstream = %cfg.upstream, "serving CRI");
    let owner: Arc<dyn Owner> = Arc::new(Router {
        native: Arc::new(native::Native::new(&cfg, channel(&upstream))),
        native_enabled: cfg.checkpoint_enabled,
    });
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
        let (owner, upstream) = (owner.clone(), upstream.clone());
        tokio::spawn(async move { relay::relay(stream, &upstream, owner).await });
    }
    let _ = std::fs::remove_file(&cfg.listen);
    tracing::info!("stopped");
    Ok(())
}
