//! CheckpointPod and RestorePod (KEP-5823), answered by the shim and never
//! forwarded. This side talks to the upstream runtime: it resolves the pod and
//! its containers, and creates the restored sandbox and containers; the cut
//! itself and the checks against a checkpoint are in [`crate::pod`].

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::containers::{blocking, open_checkpoint, Containers};
use super::native::{self, Native};
use super::relay::{Call, Reply};
use super::upstream::Upstream;
use crate::checkpoint::locate::Container;
use crate::cri::{
    CheckpointPodRequest, CheckpointPodResponse, ContainerConfig, ContainerState,
    ListContainersRequest, NamespaceMode, PodSandboxState, PodSandboxStatus,
    PodSandboxStatusRequest, PodSandboxStatusResponse, RemovePodSandboxRequest, RestorePodRequest,
    RestorePodResponse, RestoredContainer, RunPodSandboxResponse, StatusRequest,
    StopPodSandboxRequest,
};
use crate::error::{Error, Result};
use crate::pbwire::{grpc_frame, Fields};
use crate::pod::checkpoint::{Plan, PodReport};
use crate::pod::manifest::{ContainerEntry, Manifest, NamespaceOptions, Sandbox};
use crate::pod::{options, output, restore};
use crate::seal::Identities;

const RUNTIME: &str = "/runtime.v1.RuntimeService/";

pub struct Pods {
    pub native: Arc<Native>,
    pub containers: Arc<Containers>,
    pub upstream: Arc<Upstream>,
    pub identities: Arc<Identities>,
}

/// The call's deadline: its own, or the default.
fn deadline_of(call: &Call) -> Instant {
    native::grpc_deadline(&call.metadata)
        .unwrap_or_else(|| Instant::now() + crate::pod::DEFAULT_TIMEOUT)
}

/// Fails with DEADLINE_EXCEEDED once `deadline` passes.
async fn within<T>(
    deadline: Instant,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout_at(deadline.into(), f)
        .await
        .unwrap_or(Err(Error::DeadlineExceeded(what)))
}

impl Pods {
    pub async fn checkpoint_call(self: Arc<Self>, call: Call) -> Reply {
        let deadline = deadline_of(&call);
        let svc = FnSvc(move |r: CheckpointPodRequest| {
            let pods = self.clone();
            async move {
                let pod = r.pod_sandbox_id.clone();
                let m = crate::metrics::get();
                let answer = pods.checkpoint(r, deadline).await;
                match &answer {
                    Ok(rep) => {
                        m.pod_checkpoint_done(rep.pause, rep.containers.len());
                        for c in &rep.containers {
                            m.checkpoint_frozen_io(c.pages_held, c.frozen_written);
                        }
                        tracing::info!(pod = %pod, dir = %rep.dir.display(), containers = rep.containers.len(),
                            pause_ms = rep.pause.as_secs_f64() * 1e3, "pod checkpointed");
                    }
                    Err(e) => tracing::warn!(pod = %pod, "pod checkpoint failed: {e}"),
                }
                let answer = answer
                    .map(|_| CheckpointPodResponse {})
                    .map_err(tonic::Status::from);
                m.pod_checkpoint_answered(
                    answer
                        .as_ref()
                        .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
                );
                answer
            }
        });
        native::unary(svc, call).await
    }

    pub async fn restore_call(self: Arc<Self>, call: Call) -> Reply {
        let deadline = deadline_of(&call);
        let raw =
            Bytes::copy_from_slice(crate::pbwire::grpc_message(&call.body).unwrap_or_default());
        let metadata = call.metadata.clone();
        let svc = FnSvc(move |r: RestorePodRequest| {
            let (pods, raw, metadata) = (self.clone(), raw.clone(), metadata.clone());
            async move {
                let answer = pods.restore(r, raw, metadata, deadline).await;
                match &answer {
                    Ok(r) => {
                        tracing::info!(pod = %r.pod_sandbox_id, containers = r.restored_containers.len(), "pod restored, its containers created")
                    }
                    Err(e) => tracing::warn!("pod restore refused: {e}"),
                }
                let answer = answer.map_err(tonic::Status::from);
                crate::metrics::get().pod_restore_answered(
                    answer
                        .as_ref()
                        .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
                );
                answer
            }
        });
        native::unary(svc, call).await
    }

    /// Validates everything, then runs the cut as a tracked task.
    async fn checkpoint(&self, r: CheckpointPodRequest, deadline: Instant) -> Result<PodReport> {
        let opts = options::CheckpointOptions::parse(&r.options)?;
        let output = output::check(&r.output_path)?;
        let sandbox = within(
            deadline,
            "resolving the pod",
            self.sandbox(&r.pod_sandbox_id),
        )
        .await?;
        let containers = within(
            deadline,
            "resolving the containers",
            self.select(&sandbox.id, &r.container_ids),
        )
        .await?;
        // One checkpoint per container at a time, taken in one order.
        let mut ids: Vec<&str> = containers.iter().map(|(_, c)| c.id.as_str()).collect();
        ids.sort();
        let mut serial = Vec::new();
        for id in ids {
            let lock = self.native.lock_of(id);
            serial.push(
                within(deadline, "waiting for another checkpoint", async {
                    Ok(lock.lock_owned().await)
                })
                .await?,
            );
        }
        let mut base = self.native.options(PathBuf::new(), Some(deadline));
        if let Some(t) = opts.tcp_established {
            base.settings.tcp_established = t;
        }
        if let Some(mib) = opts.hold_pages_mib {
            base.hold_cap = Some(mib << 20);
        }
        if let Some(r) = opts.encrypt_to {
            base.seal = Some(r);
        }
        let plan = Plan {
            sandbox,
            parallel: opts.parallel_dumps.unwrap_or(containers.len()).max(1),
            containers,
            output,
            journal: base.freeze_journal.clone(),
            base,
        };
        self.native
            .tracked(move |cancelled| crate::pod::checkpoint::run(plan, cancelled))
            .await
    }

    /// The pod, which must be ready, as the manifest records it.
    async fn sandbox(&self, id: &str) -> Result<Sandbox> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("pod_sandbox_id is empty".into()));
        }
        let resp = self.sandbox_status(id).await?;
        let st = resp
            .status
            .ok_or_else(|| Error::Other(format!("upstream returned no status for pod {id}")))?;
        if st.state() != PodSandboxState::SandboxReady {
            return Err(Error::InvalidArgument(format!(
                "pod sandbox {} is not ready",
                st.id
            )));
        }
        let hostname = hostname(&resp.info);
        Ok(as_recorded(st, hostname))
    }

    /// The upstream's verbose status of pod `id`.
    async fn sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        };
        match self.upstream.runtime().pod_sandbox_status(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::NotFound => Err(Error::PodNotFound(id.into())),
            Err(s) => Err(s.into()),
        }
    }

    /// The requested containers (full IDs or unique prefixes): each running,
    /// in `pod`, named once. With their CRI names.
    async fn select(&self, pod: &str, wanted: &[String]) -> Result<Vec<(String, Container)>> {
        if wanted.is_empty() {
            return Err(Error::InvalidArgument("container_ids is empty".into()));
        }
        let all = self
            .upstream
            .runtime()
            .list_containers(ListContainersRequest::default())
            .await?
            .into_inner()
            .containers;
        let mut seen = HashSet::new();
        let mut picked = Vec::new();
        for w in wanted {
            let c = pick(&all, w)?;
            if c.pod_sandbox_id != pod {
                return Err(Error::InvalidArgument(format!(
                    "container {} belongs to pod {}, not to {pod}",
                    c.id, c.pod_sandbox_id
                )));
            }
            if c.state() != ContainerState::ContainerRunning {
                return Err(Error::InvalidArgument(format!(
                    "container {} is not running ({})",
                    c.id,
                    c.state().as_str_name()
                )));
            }
            if !seen.insert(c.id.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "container {} is named twice",
                    c.id
                )));
            }
            picked.push(c);
        }
        let mut out = Vec::new();
        for c in picked {
            let name = c.metadata.clone().unwrap_or_default().name;
            out.push((name, self.native.resolve(&c.id).await?));
        }
        Ok(out)
    }

    /// Validates the request against the checkpoint, then creates the pod
    /// and its containers as a task that removes them all on any failure.
    async fn restore(
        self: Arc<Self>,
        req: RestorePodRequest,
        raw: Bytes,
        metadata: http::HeaderMap,
        deadline: Instant,
    ) -> Result<RestorePodResponse> {
        options::check_restore(&req.options)?;
        let dir = output::checkpoint_dir(&req.checkpoint_path)?;
        let m = {
            let d = dir.clone();
            blocking(move || Manifest::read(&d)).await?
        };
        restore::check_names(&m, &req.container_configs)?;
        let wire = Fields::parse(&raw)
            .map_err(|e| Error::InvalidArgument(format!("RestorePodRequest: {e}")))?;
        let sandbox = wire.get(2).unwrap_or_default().to_vec();
        let mut members = Vec::new();
        for (cfg, cfg_raw) in req.container_configs.iter().zip(wire.all(5)) {
            let name = restore::name_of(cfg).to_string();
            let entry = m
                .containers
                .iter()
                .find(|e| e.name == name)
                .expect("names checked");
            let archive = m.archive(&dir, entry)?;
            within(
                deadline,
                "checking the checkpoint",
                self.check_container(cfg, entry, &archive, cfg_raw),
            )
            .await?;
            members.push((name, cfg_raw.to_vec(), archive));
        }
        self.check_handler(&req.runtime_handler).await?;
        let handler = req.runtime_handler.clone();
        let pods = self.clone();
        self.native
            .tracked(move |_| async move {
                pods.create_pod(&metadata, &sandbox, &handler, members, deadline)
                    .await
            })
            .await
    }

    /// One container's config against its archive: today's member checks
    /// (and unsealing), the process it describes, its image, its bind mounts.
    async fn check_container(
        &self,
        cfg: &ContainerConfig,
        entry: &ContainerEntry,
        archive: &std::path::Path,
        cfg_raw: &[u8],
    ) -> Result<()> {
        let ckpt = open_checkpoint(archive.to_path_buf(), self.identities.clone()).await?;
        restore::check_process(&entry.name, cfg, &ckpt)?;
        if let Err(e) = restore::check_image(cfg, entry, false) {
            let wanted = cfg.image.as_ref().map_or("", |i| i.image.as_str());
            if !self.same_image(wanted, entry).await {
                return Err(e);
            }
        }
        // Today's create rewrite refuses undeclared bind mounts: run it dry.
        let create = create_request("", cfg_raw, &[]);
        let plan =
            crate::restore::create::request(&create, &ckpt, "-", &archive.to_string_lossy())?;
        if let Some((p, _)) = plan.sources.iter().find(|(p, _)| !p.is_absolute()) {
            return Err(Error::InvalidArgument(format!(
                "container {:?}: mount source {} is not absolute",
                entry.name,
                p.display()
            )));
        }
        Ok(())
    }

    /// Whether the runtime knows `wanted` as the checkpoint's image.
    async fn same_image(&self, wanted: &str, e: &ContainerEntry) -> bool {
        let images = self.upstream.images();
        let id = |image: String| {
            let mut images = images.clone();
            async move {
                let req = crate::cri::ImageStatusRequest {
                    image: Some(crate::cri::ImageSpec {
                        image,
                        ..Default::default()
                    }),
                };
                images
                    .image_status(req)
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().image)
                    .map(|i| i.id)
                    .filter(|i| !i.is_empty())
            }
        };
        let Some(w) = id(wanted.into()).await else {
            return false;
        };
        for r in [&e.image_ref, &e.image] {
            if !r.is_empty() && id(r.clone()).await.as_ref() == Some(&w) {
                return true;
            }
        }
        false
    }

    /// An unknown non-empty handler is refused before anything is created,
    /// where the runtime lists its handlers (containerd: its CRI config).
    async fn check_handler(&self, handler: &str) -> Result<()> {
        if handler.is_empty() {
            return Ok(());
        }
        let st = self
            .upstream
            .runtime()
            .status(StatusRequest { verbose: true })
            .await?
            .into_inner();
        let known: Option<Vec<String>> = st
            .info
            .get("config")
            .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
            .and_then(|c| {
                c["containerd"]["runtimes"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect())
            });
        match known {
            Some(k) if !k.iter().any(|h| h == handler) => Err(Error::InvalidArgument(format!(
                "runtime_handler {handler:?} is not configured on this node (it has: {})",
                k.join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// RunPodSandbox, then each container through today's restore path; on
    /// any failure, or the deadline, all that was created is removed.
    async fn create_pod(
        &self,
        metadata: &http::HeaderMap,
        sandbox: &[u8],
        handler: &str,
        members: Vec<(String, Vec<u8>, PathBuf)>,
        deadline: Instant,
    ) -> Result<RestorePodResponse> {
        let mut made = Made::default();
        let r = within(
            deadline,
            "restoring the pod",
            self.create_all(&mut made, metadata, sandbox, handler, members),
        )
        .await;
        if r.is_err() {
            self.roll_back(made).await;
        }
        r
    }

    async fn create_all(
        &self,
        made: &mut Made,
        metadata: &http::HeaderMap,
        sandbox: &[u8],
        handler: &str,
        members: Vec<(String, Vec<u8>, PathBuf)>,
    ) -> Result<RestorePodResponse> {
        let mut run = Fields::default();
        run.push(1, sandbox);
        run.push(2, handler.as_bytes());
        let reply = self
            .upstream
            .forward(&call(metadata, "RunPodSandbox", &run.encode()))
            .await;
        let id = reply
            .decode::<RunPodSandboxResponse>()
            .ok_or_else(|| Error::Upstream(reply.grpc_status()))?
            .pod_sandbox_id;
        made.sandbox = Some(id.clone());
        let mut restored = Vec::new();
        for (name, cfg, archive) in members {
            let create = call(
                metadata,
                "CreateContainer",
                &create_request(&id, &cfg, sandbox),
            );
            let cid = self.containers.restore_archive(&create, archive).await?;
            made.containers.push(cid.clone());
            restored.push(RestoredContainer {
                name,
                container_id: cid,
            });
        }
        Ok(RestorePodResponse {
            pod_sandbox_id: id,
            restored_containers: restored,
        })
    }

    async fn roll_back(&self, made: Made) {
        for id in made.containers.iter().rev() {
            self.containers.discard(id).await;
        }
        let Some(pod) = made.sandbox else { return };
        let mut rt = self.upstream.runtime();
        let stop = StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        };
        let remove = RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        };
        if let Err(e) = rt.stop_pod_sandbox(stop).await {
            tracing::error!(pod = %pod, "could not stop a half-restored pod: {e}");
        }
        if let Err(e) = rt.remove_pod_sandbox(remove).await {
            tracing::error!(pod = %pod, "could not remove a half-restored pod: {e}");
        }
    }
}

/// The pod's hostname, from the verbose status's `info` (its config as the
/// runtime keeps it); empty if not there.
fn hostname(info: &std::collections::HashMap<String, String>) -> String {
    let info: serde_json::Value = info
        .get("info")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    info["config"]["hostname"]
        .as_str()
        .unwrap_or_default()
        .into()
}

/// A ready pod's status as the manifest records it.
fn as_recorded(st: PodSandboxStatus, hostname: String) -> Sandbox {
    let namespace_options = namespace_options(&st);
    let meta = st.metadata.clone().unwrap_or_default();
    Sandbox {
        id: st.id.clone(),
        name: meta.name,
        uid: meta.uid,
        namespace: meta.namespace,
        attempt: meta.attempt,
        labels: st.labels.into_iter().collect(),
        annotations: st.annotations.into_iter().collect(),
        hostname,
        runtime_handler: st.runtime_handler,
        namespace_options,
    }
}

/// The pod's network, pid and ipc namespace modes, by their CRI names.
fn namespace_options(st: &PodSandboxStatus) -> NamespaceOptions {
    let ns = st
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .cloned()
        .unwrap_or_default();
    let mode = |m: i32| {
        NamespaceMode::try_from(m)
            .map_or("UNKNOWN", |m| m.as_str_name())
            .to_string()
    };
    NamespaceOptions {
        network: mode(ns.network),
        pid: mode(ns.pid),
        ipc: mode(ns.ipc),
    }
}

/// What a pod restore has created so far.
#[derive(Default)]
struct Made {
    sandbox: Option<String>,
    containers: Vec<String>,
}

/// The one container `w` names (its full ID, or a unique prefix).
fn pick<'a>(all: &'a [crate::cri::Container], w: &str) -> Result<&'a crate::cri::Container> {
    if let Some(c) = all.iter().find(|c| c.id == w) {
        return Ok(c);
    }
    let matches: Vec<&crate::cri::Container> = all
        .iter()
        .filter(|c| !w.is_empty() && c.id.starts_with(w))
        .collect();
    match matches.as_slice() {
        [c] => Ok(c),
        [] => Err(Error::NotFound(w.into())),
        many => Err(Error::Ambiguous {
            prefix: w.into(),
            matches: many.iter().map(|c| c.id.clone()).collect(),
        }),
    }
}

/// A CreateContainerRequest on the wire: the config and sandbox config as
/// the caller sent them, every field kept.
fn create_request(pod: &str, config: &[u8], sandbox: &[u8]) -> Vec<u8> {
    let mut f = Fields::default();
    f.push(1, pod.as_bytes());
    f.push(2, config);
    f.push(3, sandbox);
    f.encode()
}

fn call(metadata: &http::HeaderMap, method: &str, msg: &[u8]) -> Call {
    Call {
        path: format!("{RUNTIME}{method}"),
        metadata: metadata.clone(),
        body: grpc_frame(msg).into(),
    }
}

/// A tonic unary service from an async function.
struct FnSvc<F>(F);

impl<R, S, F, Fut> tonic::server::UnaryService<R> for FnSvc<F>
where
    F: FnMut(R) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<S, tonic::Status>> + Send + 'static,
{
    type Response = S;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::result::Result<tonic::Response<S>, tonic::Status>>
                + Send,
        >,
    >;

    fn call(&mut self, req: tonic::Request<R>) -> Self::Future {
        let fut = (self.0)(req.into_inner());
        Box::pin(async move { fut.await.map(tonic::Response::new) })
    }
}
