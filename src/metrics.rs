//! The shim's Prometheus series. There is one set per process, registered on
//! first use and updated where things happen: the relay, the checkpoint and
//! restore handlers. An update costs an atomic add, or a short lock for a
//! histogram. Nothing is exported unless `metrics_listen` is set
//! ([`crate::server::scrape`]).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    checkpoints: Family<CodeLabel, Counter>,
    checkpoint_seconds: Histogram,
    pause_seconds: Histogram,
    written_bytes: Counter,
    hold: HoldSeries,
    in_flight: Gauge,
    relay_connections: Gauge,
    own_calls: Gauge,
    restores: Family<CodeLabel, Counter>,
    pod_checkpoints: Family<CodeLabel, Counter>,
    pod_restores: Family<CodeLabel, Counter>,
    pod_pause_seconds: Histogram,
    pod_containers: Histogram,
    forwarded: Family<CallLabels, Counter>,
    relay_seconds: Histograms<DirectionLabel>,
    upstream_errors: Family<KindLabel, Counter>,
    methods: Mutex<HashSet<String>>,
}

/// At most this many method names become labels; the rest count as "other",
/// so a client sending made-up paths cannot grow the series without bound.
const MAX_METHODS: usize = 64;

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Relay hops take microseconds; a slow one (a stalled reader) shows in the top buckets.
fn relay_histogram() -> Histogram {
    Histogram::new(exponential_buckets(5e-6, 2.5, 12))
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            checkpoints: Family::default(),
            checkpoint_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            pause_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            written_bytes: Counter::default(),
            hold: HoldSeries::default(),
            in_flight: Gauge::default(),
            relay_connections: Gauge::default(),
            own_calls: Gauge::default(),
            restores: Family::default(),
            pod_checkpoints: Family::default(),
            pod_restores: Family::default(),
            pod_pause_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            pod_containers: Histogram::new(exponential_buckets(1.0, 2.0, 6)),
            forwarded: Family::default(),
            relay_seconds: Family::new_with_constructor(relay_histogram),
            upstream_errors: Family::default(),
            methods: Mutex::default(),
        };
        let mut m = m.register();
        m.hold.register(&mut m.registry);
        m
    }

    /// Registers every series, in the order they are exported.
    fn register(mut self) -> Metrics {
        self.register_container_calls();
        self.register_pod_calls();
        self.register_relay();
        let build = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        add(&mut self.registry, "build", "The shim's build", None, build);
        self
    }

    /// The calls on one container: checkpoints (their time, pause and bytes)
    /// and restores.
    fn register_container_calls(&mut self) {
        let r = &mut self.registry;
        let secs = Some(Unit::Seconds);
        add(
            r,
            "checkpoints",
            "CheckpointContainer calls answered, by gRPC code",
            None,
            self.checkpoints.clone(),
        );
        add(
            r,
            "checkpoint_duration",
            "Time from the request to the answer of successful checkpoints",
            secs.clone(),
            self.checkpoint_seconds.clone(),
        );
        add(
            r,
            "checkpoint_pause",
            "How long successful checkpoints kept the container frozen",
            secs.clone(),
            self.pause_seconds.clone(),
        );
        add(
            r,
            "checkpoint_written",
            "Archive bytes written by successful checkpoints",
            Some(Unit::Bytes),
            self.written_bytes.clone(),
        );
        add(
            r,
            "checkpoints_in_flight",
            "Checkpoints running now",
            None,
            self.in_flight.clone(),
        );
        add(
            r,
            "restores",
            "CreateContainer calls that restore a checkpoint, by gRPC code",
            None,
            self.restores.clone(),
        );
    }

    /// The calls on a pod: CheckpointPod (its pause and size) and RestorePod.
    fn register_pod_calls(&mut self) {
        let r = &mut self.registry;
        let secs = Some(Unit::Seconds);
        add(
            r,
            "pod_checkpoints",
            "CheckpointPod calls answered, by gRPC code",
            None,
            self.pod_checkpoints.clone(),
        );
        add(
            r,
            "pod_restores",
            "RestorePod calls answered, by gRPC code",
            None,
            self.pod_restores.clone(),
        );
        add(
            r,
            "pod_checkpoint_pause",
            "How long successful pod checkpoints kept the pod frozen, from the first freeze to the last thaw",
            secs.clone(),
            self.pod_pause_seconds.clone(),
        );
        add(
            r,
            "pod_checkpoint_containers",
            "Containers per successful pod checkpoint",
            None,
            self.pod_containers.clone(),
        );
    }

    /// The relay to the upstream runtime: what it forwards, its connections,
    /// the calls the shim answers itself, its own latency, its failures.
    fn register_relay(&mut self) {
        let r = &mut self.registry;
        let secs = Some(Unit::Seconds);
        add(
            r,
            "forwarded_calls",
            "Calls handed on to the upstream runtime, by method and its gRPC code",
            None,
            self.forwarded.clone(),
        );
        add(
            r,
            "relay_connections",
            "Client connections being relayed now",
            None,
            self.relay_connections.clone(),
        );
        add(
            r,
            "own_calls_in_flight",
            "Calls the shim answers itself (checkpoints, restores) running now",
            None,
            self.own_calls.clone(),
        );
        add(r, "relay", "The shim's own part of a forwarded call's latency: from reading a batch of frames to having written it on, per direction", secs, self.relay_seconds.clone());
        add(
            r,
            "upstream_errors",
            "Failures to reach or talk to the upstream runtime",
            None,
            self.upstream_errors.clone(),
        );
    }

    /// The series in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// A checkpoint started; the returned guard ends it.
    pub fn checkpoint_started(&'static self) -> InFlight {
        InFlight::of(&self.in_flight)
    }

    /// A client connection is relayed until the guard is dropped.
    pub fn relay_connection(&'static self) -> InFlight {
        InFlight::of(&self.relay_connections)
    }

    /// A call the shim answers itself runs until the guard is dropped (also
    /// when its task is aborted).
    pub fn own_call(&'static self) -> InFlight {
        InFlight::of(&self.own_calls)
    }

    pub fn checkpoint_answered(&self, code: tonic::Code) {
        self.checkpoints
            .get_or_create(&CodeLabel {
                code: code_name(code as i32),
            })
            .inc();
    }

    pub fn checkpoint_done(&self, total: Duration, pause: Duration, written: u64) {
        self.checkpoint_seconds.observe(total.as_secs_f64());
        self.pause_seconds.observe(pause.as_secs_f64());
        self.written_bytes.inc_by(written);
    }

    /// A checkpoint reserved pages memory: `in_use` by all now, of `budget`.
    pub fn hold_reserved(&self, in_use: u64, budget: u64) {
        self.hold.in_use.set(in_use as i64);
        self.hold.budget.set(budget as i64);
    }

    pub fn hold_released(&self, in_use: u64) {
        self.hold.in_use.set(in_use as i64);
    }

    /// A successful checkpoint held `held` bytes while frozen and wrote
    /// `frozen_written` bytes to disk then.
    pub fn checkpoint_frozen_io(&self, held: u64, frozen_written: u64) {
        self.hold.held.inc_by(held);
        self.hold.frozen_written.inc_by(frozen_written);
    }

    pub fn restore_answered(&self, code: tonic::Code) {
        self.restores
            .get_or_create(&CodeLabel {
                code: code_name(code as i32),
            })
            .inc();
    }

    pub fn pod_checkpoint_answered(&self, code: tonic::Code) {
        Self::count(&self.pod_checkpoints, code);
    }

    pub fn pod_restore_answered(&self, code: tonic::Code) {
        Self::count(&self.pod_restores, code);
    }

    pub fn pod_checkpoint_done(&self, pause: Duration, containers: usize) {
        self.pod_pause_seconds.observe(pause.as_secs_f64());
        self.pod_containers.observe(containers as f64);
    }

    fn count(family: &Family<CodeLabel, Counter>, code: tonic::Code) {
        family
            .get_or_create(&CodeLabel {
                code: code_name(code as i32),
            })
            .inc();
    }

    /// The label a forwarded call's path is counted under.
    pub fn method_label(&self, path: &str) -> String {
        let name = ["/runtime.v1.RuntimeService/", "/runtime.v1.ImageService/"]
            .iter()
            .find_map(|s| path.strip_prefix(s))
            .filter(|n| !n.is_empty() && n.len() <= 64)
            .filter(|n| n.bytes().all(|b| b.is_ascii_alphanumeric()));
        let Some(name) = name else {
            return "other".into();
        };
        let mut seen = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(name) || seen.len() < MAX_METHODS {
            seen.insert(name.to_string());
            return name.to_string();
        }
        "other".into()
    }

    /// A forwarded call ended with grpc-status `code` (a number, as sent).
    pub fn forwarded(&self, method: String, code: i32) {
        self.forwarded
            .get_or_create(&CallLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    pub fn relay_hop(&self, to_upstream: bool, took: Duration) {
        let direction = if to_upstream {
            "to_upstream"
        } else {
            "to_client"
        };
        self.relay_seconds
            .get_or_create(&DirectionLabel { direction })
            .observe(took.as_secs_f64());
    }

    /// `kind`: "connect" (the upstream's socket refused us) or "io" (a
    /// connection to it failed midway).
    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }
}

/// Where the pages of frozen containers went (see [`crate::checkpoint::hold`]).
#[derive(Default)]
struct HoldSeries {
    in_use: Gauge,
    budget: Gauge,
    held: Counter,
    frozen_written: Counter,
}

impl HoldSeries {
    fn register(&self, r: &mut Registry) {
        let bytes = || Some(Unit::Bytes);
        add(
            r,
            "hold_in_use",
            "Memory reserved now to hold frozen containers' pages",
            bytes(),
            self.in_use.clone(),
        );
        add(
            r,
            "hold_budget",
            "The pages-holding budget computed at the last reservation",
            bytes(),
            self.budget.clone(),
        );
        add(
            r,
            "checkpoint_held",
            "Page bytes successful checkpoints held in memory while frozen",
            bytes(),
            self.held.clone(),
        );
        add(
            r,
            "checkpoint_frozen_written",
            "Bytes successful checkpoints wrote to disk while the container was frozen",
            bytes(),
            self.frozen_written.clone(),
        );
    }
}

/// Registers `m` as `ckpt_shim_<name>`; the unit and the type's suffix
/// (`_seconds`, `_total`, …) are appended by the encoder.
fn add(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, m: impl Metric) {
    let name = format!("ckpt_shim_{name}");
    match unit {
        Some(u) => r.register_with_unit(name, help, u, m),
        None => r.register(name, help, m),
    }
}

/// Counts something as running (in a gauge) until dropped.
pub struct InFlight(&'static Gauge);

impl InFlight {
    fn of(g: &'static Gauge) -> InFlight {
        g.inc();
        InFlight(g)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// gRPC's canonical code names, as grpc-go and the kubelet's metrics spell them.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_capped_and_only_cri_names() {
        let m = Metrics::new();
        assert_eq!(
            m.method_label("/runtime.v1.RuntimeService/Version"),
            "Version"
        );
        assert_eq!(
            m.method_label("/runtime.v1.ImageService/PullImage"),
            "PullImage"
        );
        assert_eq!(m.method_label("/grpc.health.v1.Health/Check"), "other");
        assert_eq!(m.method_label("/runtime.v1.RuntimeService/a{b}"), "other");
        for i in 0..200 {
            m.method_label(&format!("/runtime.v1.RuntimeService/Made{i}"));
        }
        assert_eq!(m.methods.lock().unwrap().len(), MAX_METHODS);
        assert_eq!(
            m.method_label("/runtime.v1.RuntimeService/Version"),
            "Version"
        );
        assert_eq!(
            m.method_label("/runtime.v1.RuntimeService/Made199"),
            "other"
        );
        assert_eq!(
            (code_name(0), code_name(14), code_name(99)),
            ("OK", "UNAVAILABLE", "UNKNOWN")
        );
    }

    #[test]
    fn the_text_has_the_conventional_names() {
        let m = Metrics::new();
        m.checkpoint_answered(tonic::Code::NotFound);
        m.checkpoint_done(Duration::from_millis(300), Duration::from_millis(40), 4096);
        m.forwarded("Version".into(), 0);
        let text = m.encode();
        for line in [
            "ckpt_shim_checkpoints_total{code=\"NOT_FOUND\"} 1",
            "ckpt_shim_checkpoint_written_bytes_total 4096",
            "ckpt_shim_checkpoint_pause_seconds_count 1",
            "ckpt_shim_forwarded_calls_total{method=\"Version\",code=\"OK\"} 1",
            "ckpt_shim_checkpoints_in_flight 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(text.contains("ckpt_shim_build_info{version=\""), "{text}");
    }
}
