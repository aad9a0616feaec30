//! The native `CheckpointContainer`: resolve the container through the upstream's
//! `ContainerStatus(verbose)`, then run the engine. One checkpoint per container
//! at a time; different containers in parallel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use crate::checkpoint::dump::DumpSettings;
use crate::checkpoint::locate::Container;
use crate::checkpoint::{self, Options};
use crate::config::Config;
use crate::cri::runtime_service_client::RuntimeServiceClient;
use crate::cri::{
    CheckpointContainerRequest, CheckpointContainerResponse, ContainerState, ContainerStatus,
    ContainerStatusRequest, ListContainersRequest,
};
use crate::error::{Error, Result};
use crate::seal::Recipients;
use crate::server::relay::{Call, Reply};

pub struct Native {
    upstream: RuntimeServiceClient<Channel>,
    criu: criu_rpc::Criu,
    settings: DumpSettings,
    runc_root: PathBuf,
    staging_dir: Option<PathBuf>,
    durable: bool,
    stream: bool,
    hold: Arc<crate::checkpoint::hold::Budget>,
    journal: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    seal: Option<Arc<Recipients>>,
    restore_dir: PathBuf,
    stop: Stop,
}

/// A stopping server: first `draining` (new checkpoints are refused, those
/// running go on), then `abandon` (those still running are stopped; each
/// thaws its container and removes what it wrote). `tasks` holds every
/// checkpoint's work and the removal of its staging, to wait on both.
#[derive(Default)]
struct Stop {
    draining: CancellationToken,
    abandon: CancellationToken,
    tasks: TaskTracker,
}

impl Native {
    pub fn new(cfg: &Config, upstream: Channel, seal: Option<Arc<Recipients>>) -> Native {
        Native {
            upstream: RuntimeServiceClient::new(upstream),
            criu: criu_rpc::Criu::new(&cfg.criu),
            settings: DumpSettings {
                tcp_established: cfg.tcp_established,
                file_locks: cfg.file_locks,
                ..Default::default()
            },
            runc_root: cfg.runc_root.clone(),
            staging_dir: cfg.staging_dir.clone(),
            durable: cfg.durable,
            stream: cfg.stream,
            hold: crate::checkpoint::hold::Budget::new(cfg.hold),
            journal: cfg.journal_dir(),
            locks: Mutex::default(),
            seal,
            restore_dir: cfg.restore_dir.clone(),
            stop: Stop::default(),
        }
    }

    /// Counts as work in flight until dropped (an owned call until its reply
    /// is written): [`drain`](Self::drain) waits for it.
    pub fn hold(&self) -> TaskTrackerToken {
        self.stop.tasks.token()
    }

    /// From now on, CheckpointContainer answers UNAVAILABLE.
    pub fn refuse_new(&self) {
        self.stop.draining.cancel();
    }

    /// Refuses new checkpoints, lets those running finish within `grace`, then
    /// stops the rest and waits for their cleanup.
    pub async fn drain(&self, grace: Duration) {
        let s = &self.stop;
        self.refuse_new();
        s.tasks.close();
        if !s.tasks.is_empty() {
            tracing::info!(
                running = s.tasks.len(),
                ?grace,
                "waiting for checkpoints in flight"
            );
        }
        if tokio::time::timeout(grace, s.tasks.wait()).await.is_err() {
            tracing::warn!(
                running = s.tasks.len(),
                "grace period over: stopping checkpoints in flight"
            );
            s.abandon.cancel();
            // Stopped checkpoints thaw and clean up in well under this; a reply
            // a client never reads (no window) is not worth waiting for longer.
            let _ = tokio::time::timeout(Duration::from_secs(30), s.tasks.wait()).await;
        }
    }

    /// Answers a CheckpointContainer call.
    pub async fn handle(self: Arc<Self>, call: Call) -> Reply {
        let deadline = grpc_deadline(&call.metadata);
        let svc = Svc {
            native: self,
            deadline,
        };
        unary(svc, call).await
    }

    async fn checkpoint(
        &self,
        r: CheckpointContainerRequest,
        grpc_deadline: Option<Instant>,
    ) -> Result<()> {
        let started = Instant::now();
        if self.stop.draining.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let (location, deadline) = validate(&r, started, grpc_deadline)?;
        let within = |what: &'static str| async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
            Error::DeadlineExceeded(what)
        };

        let c = tokio::select! { c = self.resolve(&r.container_id) => c?, e = within("resolving the container") => return Err(e) };
        let lock = self.lock_of(&c.id);
        let _serial = tokio::select! { g = lock.lock() => g, e = within("waiting for another checkpoint") => return Err(e) };
        let opts = self.options(location, deadline);
        let stop = &self.stop;
        let mut report =
            match checkpoint::checkpoint_tracked(&c, &opts, &stop.tasks, &stop.abandon).await {
                Err(Error::Cancelled) if stop.abandon.is_cancelled() => {
                    return Err(Error::ShuttingDown)
                }
                r => r?,
            };
        crate::metrics::get().checkpoint_done(
            started.elapsed(),
            report.frozen,
            report.archive_bytes,
        );
        crate::metrics::get().checkpoint_frozen_io(report.pages_held, report.frozen_written);
        let cleanup = std::mem::take(&mut report.cleanup);
        self.stop.tasks.spawn_blocking(move || cleanup.wait());
        log_checkpointed(&c.id, &report, started.elapsed());
        Ok(())
    }

    /// The lock that serialises checkpoints of container `id`.
    pub(super) fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// A checkpoint's options from the shim's settings.
    pub(super) fn options(&self, location: PathBuf, deadline: Option<Instant>) -> Options {
        Options {
            location,
            deadline,
            criu: self.criu.clone(),
            settings: self.settings.clone(),
            staging_dir: self.staging_dir.clone(),
            durable: self.durable,
            stream: self.stream,
            hold: self.hold.clone(),
            hold_cap: None,
            freeze_journal: Some(self.journal.clone()),
            seal: self.seal.clone(),
            restore_dir: Some(self.restore_dir.clone()),
        }
    }

    /// Runs `work` as a task a stopping server waits for. If this future is
    /// dropped (the caller went away) or the server stops, the work's
    /// [`Cancelled`](crate::checkpoint::sink::Cancelled) fires, and it winds down itself.
    pub(super) async fn tracked<T, F>(
        &self,
        work: impl FnOnce(crate::checkpoint::sink::Cancelled) -> F,
    ) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        if self.stop.draining.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let (keep_going, cancelled) = tokio::sync::watch::channel(());
        let mut task = self.stop.tasks.spawn(work(cancelled));
        let joined = tokio::select! {
            r = &mut task => r,
            _ = self.stop.abandon.cancelled() => {
                drop(keep_going);
                task.await
            }
        };
        match joined.map_err(|e| Error::Other(format!("task failed: {e}")))? {
            Err(Error::Cancelled) if self.stop.abandon.is_cancelled() => Err(Error::ShuttingDown),
            r => r,
        }
    }

    /// Full ID or unique prefix (crictl sends what the user typed) → a running container.
    pub(crate) async fn resolve(&self, id_or_prefix: &str) -> Result<Container> {
        let id = self.full_id(id_or_prefix).await?;
        let resp = self
            .upstream
            .clone()
            .container_status(ContainerStatusRequest {
                container_id: id.clone(),
                verbose: true,
            })
            .await?
            .into_inner();
        let status = resp
            .status
            .ok_or_else(|| Error::Other(format!("upstream returned no status for {id}")))?;
        if status.state() != ContainerState::ContainerRunning {
            return Err(Error::NotRunning {
                id,
                state: status.state().as_str_name().to_string(),
            });
        }
        let info: serde_json::Value = resp
            .info
            .get("info")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| Error::Other(format!("upstream gave no verbose info for {id}")))?;
        let pid = info["pid"].as_i64().unwrap_or(0) as i32;
        // Prefer the bundle's config.json byte for byte; fall back to the spec in the info.
        let bundle = runc_bundle(&self.runc_root, &id);
        let spec_raw = match bundle
            .as_ref()
            .and_then(|b| std::fs::read(b.join("config.json")).ok())
        {
            Some(raw) => raw,
            None => serde_json::to_vec(&info["runtimeSpec"])
                .map_err(|e| Error::Other(format!("runtimeSpec of {id}: {e}")))?,
        };
        let mut c = Container::from_spec(id, pid, spec_raw, bundle.as_deref())?;
        describe(&mut c, &status);
        if let Some(rt) = info["runtimeType"].as_str() {
            c.runtime = rt.to_string();
        }
        Ok(c)
    }

    /// The one container whose ID is `id_or_prefix` or starts with it.
    async fn full_id(&self, id_or_prefix: &str) -> Result<String> {
        let list = self
            .upstream
            .clone()
            .list_containers(ListContainersRequest::default())
            .await?
            .into_inner();
        let mut ids: Vec<String> = list
            .containers
            .into_iter()
            .map(|c| c.id)
            .filter(|id| id.starts_with(id_or_prefix))
            .collect();
        ids.sort();
        match ids.iter().position(|i| i == id_or_prefix) {
            Some(i) => Ok(ids.swap_remove(i)),
            None if ids.len() == 1 => Ok(ids.remove(0)),
            None if ids.is_empty() => Err(Error::NotFound(id_or_prefix.to_string())),
            None => Err(Error::Ambiguous {
                prefix: id_or_prefix.to_string(),
                matches: ids,
            }),
        }
    }
}

/// What the CRI status says of `c` that its spec does not: the kubelet's
/// name for it (`name_pod_namespace_uid_attempt`), when it was created, its image.
fn describe(c: &mut Container, status: &ContainerStatus) {
    let a = |k: &str| {
        status
            .annotations
            .get(k)
            .cloned()
            .or_else(|| {
                c.spec
                    .annotations()
                    .as_ref()
                    .and_then(|m| m.get(k).cloned())
            })
            .unwrap_or_default()
    };
    let meta = status.metadata.clone().unwrap_or_default();
    let name = format!(
        "{}_{}_{}_{}_{}",
        meta.name,
        a("io.kubernetes.cri.sandbox-name"),
        a("io.kubernetes.cri.sandbox-namespace"),
        a("io.kubernetes.cri.sandbox-uid"),
        meta.attempt
    );
    c.name = name;
    c.created = chrono::DateTime::from_timestamp_nanos(status.created_at)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    c.image_name = status
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .filter(|s| !s.is_empty())
        .or(c.image_name.take());
    c.image_ref = Some(status.image_ref.clone()).filter(|s| !s.is_empty());
}

/// The request's location (absolute) and the deadline that binds: the CRI
/// timeout field (seconds, 0 = the default) or the gRPC deadline, the earlier.
fn validate(
    r: &CheckpointContainerRequest,
    started: Instant,
    grpc_deadline: Option<Instant>,
) -> Result<(PathBuf, Option<Instant>)> {
    if r.container_id.is_empty() {
        return Err(Error::InvalidArgument("container_id is empty".into()));
    }
    let location = PathBuf::from(&r.location);
    if r.location.is_empty() || !location.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "location {:?} must be an absolute path",
            r.location
        )));
    }
    if r.timeout < 0 {
        return Err(Error::InvalidArgument(format!(
            "timeout {} is negative",
            r.timeout
        )));
    }
    let field = (r.timeout > 0).then(|| started + Duration::from_secs(r.timeout as u64));
    Ok((location, [field, grpc_deadline].into_iter().flatten().min()))
}

/// The status line of a checkpoint done.
fn log_checkpointed(id: &str, report: &checkpoint::Report, total: Duration) {
    let ms = |d: Duration| (d.as_secs_f64() * 1e3 * 10.0).round() / 10.0;
    let phases: Vec<String> = report
        .phases
        .iter()
        .map(|(n, d)| format!("{n}={}ms", ms(*d)))
        .collect();
    tracing::info!(
        container = %id,
        location = %report.location.display(),
        bytes = report.archive_bytes,
        archive_written_bytes = report.archive_written_bytes,
        streamed = report.streamed,
        pages_held = report.pages_held,
        frozen_written = report.frozen_written,
        frozen_ms = ms(report.frozen),
        criu_frozen_ms = report.stats.as_ref().and_then(|s| s.frozen_time).map(|us| us as f64 / 1e3),
        pages_written = report.stats.as_ref().and_then(|s| s.pages_written),
        total_ms = ms(total),
        phases = %phases.join(" "),
        "checkpointed"
    );
}

/// The bundle dir runc recorded for `id`, when the upstream runs runc under `root`.
fn runc_bundle(root: &Path, id: &str) -> Option<PathBuf> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join(id).join("state.json")).ok()?).ok()?;
    crate::checkpoint::locate::bundle_of(&state)
}

/// The deadline a `grpc-timeout` header sets (digits and a unit: H M S m u n).
pub(super) fn grpc_deadline(headers: &http::HeaderMap) -> Option<Instant> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(Instant::now() + d)
}

/// Runs a tonic unary service on a collected call, and collects its answer.
pub(super) async fn unary<S, M>(svc: S, call: Call) -> Reply
where
    S: tonic::server::UnaryService<M>,
    S::Response: prost::Message + 'static,
    M: prost::Message + Default + Send + 'static,
{
    use http_body_util::BodyExt;
    let mut req = http::Request::new(http_body_util::Full::new(call.body));
    *req.headers_mut() = call.metadata;
    let resp = tonic::server::Grpc::new(tonic_prost::ProstCodec::<S::Response, M>::default())
        .unary(svc, req)
        .await;
    let (parts, body) = resp.into_parts();
    match body.collect().await {
        Ok(c) => {
            let trailers = c.trailers().cloned();
            Reply {
                headers: parts.headers,
                body: c.to_bytes(),
                trailers,
            }
        }
        Err(e) => Reply::status(tonic::Status::internal(format!("ckpt-shim: {e}"))),
    }
}

struct Svc {
    native: Arc<Native>,
    deadline: Option<Instant>,
}

impl tonic::server::UnaryService<CheckpointContainerRequest> for Svc {
    type Response = CheckpointContainerResponse;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>>
                + Send,
        >,
    >;

    fn call(&mut self, req: tonic::Request<CheckpointContainerRequest>) -> Self::Future {
        let (native, deadline) = (self.native.clone(), self.deadline);
        Box::pin(async move {
            let r = req.into_inner();
            let id = r.container_id.clone();
            let metrics = crate::metrics::get();
            let running = metrics.checkpoint_started();
            let answer = match native.checkpoint(r, deadline).await {
                Ok(()) => Ok(tonic::Response::new(CheckpointContainerResponse {})),
                Err(e) => {
                    tracing::warn!(container = %id, "checkpoint failed: {e}");
                    Err(tonic::Status::from(e))
                }
            };
            drop(running);
            metrics.checkpoint_answered(
                answer
                    .as_ref()
                    .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
            );
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_units() {
        let mut h = http::HeaderMap::new();
        for (v, d) in [("5S", 5000u64), ("250m", 250), ("2M", 120_000)] {
            h.insert("grpc-timeout", v.parse().unwrap());
            let left = grpc_deadline(&h).unwrap() - Instant::now();
            assert!(
                left <= Duration::from_millis(d)
                    && left + Duration::from_millis(50) > Duration::from_millis(d),
                "{v}"
            );
        }
        h.insert("grpc-timeout", "12X".parse().unwrap());
        assert!(grpc_deadline(&h).is_none());
    }
}
