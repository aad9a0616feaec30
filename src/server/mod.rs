//! `ckpt-shim serve`: a CRI `runtime.v1` endpoint on a unix socket. It serves
//! `CheckpointContainer` itself and relays every other call, unchanged, to the
//! real runtime ([`relay`]).

mod checkpoint_images;
mod containers;
mod frame;
mod headers;
mod native;
mod pods;
mod readiness;
pub mod relay;
mod restored_status;
pub mod scrape;
mod socket;
mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{socket_path, Config};
use crate::error::{Context, Result};
use relay::{Call, Owner, Reply, ReplyFuture};

const RUNTIME: &str = "/runtime.v1.RuntimeService/";
pub const CHECKPOINT_PATH: &str = "/runtime.v1.RuntimeService/CheckpointContainer";

/// The calls the shim answers itself, or looks at before handing them on.
struct Router {
    native: Arc<native::Native>,
    native_enabled: bool,
    containers: Arc<containers::Containers>,
    pods: Arc<pods::Pods>,
    readiness: Arc<readiness::Readiness>,
}

impl Owner for Router {
    fn owns(&self, path: &str) -> bool {
        matches!(
            path.strip_prefix(RUNTIME),
            Some(
                "CheckpointContainer"
                    | "CreateContainer"
                    | "StartContainer"
                    | "RemoveContainer"
                    | "CheckpointPod"
                    | "RestorePod"
            )
        )
    }

    fn call(self: Arc<Self>, call: Call) -> ReplyFuture {
        Box::pin(async move {
            match call.path.strip_prefix(RUNTIME).unwrap_or_default() {
                "CreateContainer" => self.containers.create(call).await,
                "StartContainer" => self.containers.start(call).await,
                "RemoveContainer" => self.containers.remove(call).await,
                "RestorePod" => self.pods.clone().restore_call(call).await,
                // The message the kubelet's e2e test recognises as "not supported".
                m if !self.native_enabled => Reply::status(tonic::Status::unimplemented(format!(
                    "method {m} not implemented"
                ))),
                "CheckpointPod" => self.pods.clone().checkpoint_call(call).await,
                _ => self.native.clone().handle(call).await,
            }
        })
    }

    fn hold(&self) -> Option<tokio_util::task::task_tracker::TaskTrackerToken> {
        Some(self.native.hold())
    }

    fn watches(&self, path: &str) -> bool {
        matches!(
            path.strip_prefix(RUNTIME),
            Some("ContainerStatus" | "Status")
        )
    }

    fn amend(&self, path: &str, request: &[u8]) -> Option<relay::Amend> {
        match path.strip_prefix(RUNTIME) {
            Some("Status") => Some(self.readiness.amend()),
            _ => self.containers.amend_status(request),
        }
    }
}

/// Serves until SIGTERM or SIGINT, then stops as [`stop`] says.
pub async fn serve(cfg: Config) -> Result<()> {
    let upstream = Arc::new(socket_path(&cfg.upstream)?);
    // Bad keys or a bad metrics address stop the start: never serve and then
    // write plaintext, or run without the metrics asked for.
    let seal = crate::seal::Recipients::parse(&cfg.encrypt_to)?.map(Arc::new);
    let identities = Arc::new(crate::seal::Identities::load(&cfg.identities)?);
    let metrics = cfg
        .metrics_listen
        .as_deref()
        .map(scrape::Listen::parse)
        .transpose()?;
    if let Some(r) = &seal {
        tracing::info!(recipients = r.len(), "checkpoints are encrypted");
    }
    let listener = socket::bind(&cfg.listen)?;
    if let Some(m) = &metrics {
        scrape::spawn(m).await?;
    }
    // A previous shim killed mid-checkpoint may have left containers frozen.
    for cg in crate::checkpoint::journal::recover(&cfg.journal_dir()) {
        tracing::warn!(cgroup = %cg.display(), "thawed a container a previous ckpt-shim left frozen");
    }
    tracing::info!(listen = %cfg.listen.display(), upstream = %cfg.upstream, "serving CRI");
    let up = Arc::new(upstream::Upstream::new(&upstream));
    let containers = Arc::new(
        containers::Containers::new(up.clone(), &cfg.restore_dir, identities.clone())
            .with_lazy_pages(cfg.lazy_pages, cfg.lazy_push_slots)
            .with_restore_policy(cfg.restore_policy),
    );
    tokio::spawn({
        let c = containers.clone();
        async move { c.collect_garbage().await }
    });
    let native = Arc::new(native::Native::new(&cfg, up.channel(), seal));
    let pods = Arc::new(pods::Pods {
        native: native.clone(),
        containers: containers.clone(),
        upstream: up.clone(),
        identities,
    });
    let router = Arc::new(Router {
        native,
        native_enabled: cfg.checkpoint_enabled,
        containers,
        pods,
        readiness: readiness::Readiness::spawn(cfg.clone()),
    });
    accept(listener, &upstream, router.clone()).await?;
    stop(&cfg, &router).await;
    Ok(())
}

/// Relays each client connection until SIGTERM or SIGINT. SIGHUP runs the
/// readiness checks again; the config is read at start only (docs/operations.md, "Stopping and reloading").
async fn accept(
    listener: tokio::net::UnixListener,
    upstream: &Arc<PathBuf>,
    router: Arc<Router>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ctx(|| "SIGTERM handler".into())?;
    let mut hup = signal(SignalKind::hangup()).ctx(|| "SIGHUP handler".into())?;
    let owner: Arc<dyn Owner> = router.clone();
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: checking readiness again; restart ckpt-shim to apply config changes");
                router.readiness.refresh();
                continue;
            }
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
}

/// Stops taking connections (the socket goes first, so clients see the shim
/// gone rather than hanging), lets checkpoints in flight finish within the
/// grace period, stops the rest, each thawing its container and removing
/// what it wrote, and returns. Forwarded calls still open are cut.
async fn stop(cfg: &Config, router: &Router) {
    router.native.refuse_new();
    let _ = std::fs::remove_file(&cfg.listen);
    tracing::info!("stopping");
    router
        .native
        .drain(std::time::Duration::from_secs(cfg.shutdown_grace_seconds))
        .await;
    tracing::info!("stopped");
}
