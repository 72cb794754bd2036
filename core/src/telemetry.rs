//! Self-telemetry: what each component received, sent, dropped and refused, queue fill, and
//! whether it is up. Rendered as Prometheus text (`genai_collector_*`) and as health JSON.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::id::ComponentKind;
use crate::memory::MemoryLimiter;
use crate::model::{kv, now_unix_nanos, number_point, Batch, KeyValue, Metric, MetricExt};

/// A component's lifecycle state, as health checks report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Built, not yet running.
    Starting = 0,
    /// Running.
    Running = 1,
    /// Stopped on shutdown.
    Stopped = 2,
    /// Stopped on an error; `/healthz` answers 503.
    Failed = 3,
}

impl State {
    /// The state as `/healthz` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Running,
            2 => Self::Stopped,
            3 => Self::Failed,
            _ => Self::Starting,
        }
    }
}

/// Declares the counters once: the atomic fields of [`ComponentStats`], which the runtime
/// updates, and the plain fields of [`Counts`], the read-only copy everyone else reads.
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Counters of one component instance. All counts are in data points. The runtime
        /// updates them; read them with [`ComponentStats::snapshot`].
        #[derive(Debug)]
        pub struct ComponentStats {
            /// Receiver, processor or exporter.
            pub kind: ComponentKind,
            /// The instance id.
            pub id: String,
            /// The pipeline a processor instance belongs to.
            pub pipeline: Option<String>,
            $($(#[$doc])* pub(crate) $name: AtomicU64,)*
            /// Exporter: its queue is on disk, so what it holds at a cut-short shutdown is kept.
            pub(crate) persistent: AtomicBool,
            /// When it was registered (Unix ns): its counters' start time.
            started_unix_nanos: u64,
            state: AtomicU8,
            last_error: Mutex<Option<String>>,
        }

        /// A component's counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Counts {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl ComponentStats {
            fn new(kind: ComponentKind, id: String, pipeline: Option<String>) -> Self {
                let stats = Self {
                    kind,
                    id,
                    pipeline,
                    $($name: AtomicU64::new(0),)*
                    persistent: AtomicBool::new(false),
                    started_unix_nanos: now_unix_nanos(),
                    state: AtomicU8::new(State::Starting as u8),
                    last_error: Mutex::new(None),
                };
                stats.targets.store(u64::MAX, Ordering::Relaxed);
                stats.backends.store(u64::MAX, Ordering::Relaxed);
                stats
            }

            /// The counters now.
            pub fn snapshot(&self) -> Counts {
                Counts {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Receiver: pushed into its pipelines. Processor: came in. Exporter: queued.
    accepted,
    /// Processor: went out. Exporter: delivered.
    sent,
    /// Receiver: refused because its pipelines or their exporters' queues were full (a push
    /// client is told to retry). Exporter: scraped points dropped, its queue full on arrival.
    refused,
    /// Receiver: refused or dropped because the process was above its memory limit.
    memory_refused,
    /// Pull receiver: rounds skipped because the process was above its memory limit.
    skipped_rounds,
    /// Exporter: given up on (permanent error, retries exhausted, or shutdown deadline).
    failed,
    /// Exporter: failed attempts, retried or not (in requests, not points).
    attempt_failures,
    /// Exporter: points waiting in its queue or being sent.
    queued,
    /// Exporter: what the queue holds at most, in its sizer's units.
    queue_capacity,
    /// Exporter: what the queue holds now (queued and in flight), in its sizer's units.
    queue_used,
    /// Exporter: batches waiting in the queue.
    queue_batches,
    /// Exporter: heap bytes its queue holds, queued and in flight (batches estimated, encoded
    /// requests by their length).
    queue_bytes,
    /// Exporter: when the oldest batch in the queue was queued (Unix ms), 0 when empty.
    queue_oldest_ms,
    /// Exporter: points kept in the persistent queue at shutdown, to be sent after a restart.
    persisted,
    /// Processor (`genai_normalize`): scraped targets whose page lacks a core metric its
    /// engine's table maps (running, waiting, KV cache).
    incomplete_targets,
    /// Exporter: bytes of its persistent queue's files.
    disk_bytes,
    /// Exporter: points queued in memory only, because the persistent queue was full
    /// (`storage_limit`) or could not be written.
    disk_skipped,
    /// Pull receiver: targets it scrapes now; `u64::MAX` for receivers without targets.
    targets,
    /// Processor (`efficiency`): evaluation windows that gave no figures because a counter
    /// went back, GPUs changed hands, or a GPU is shared.
    skipped_intervals,
    /// Processor (`pool_aggregate`): pools it emitted at its last flush.
    pools,
    /// Exporter (`loadbalancing`): backends resolved now; `u64::MAX` for other exporters.
    backends,
    /// Exporter (`loadbalancing`): of those, backends passed over as unreachable.
    backends_down,
}

impl ComponentStats {
    /// Sets `genai_normalize`'s count of scraped targets whose page lacks a core metric.
    pub fn set_incomplete_targets(&self, n: u64) {
        self.incomplete_targets.store(n, Ordering::Relaxed);
    }

    /// Sets how many backends `loadbalancing` has, and how many of them are passed over.
    pub fn set_backends(&self, resolved: u64, down: u64) {
        self.backends.store(resolved, Ordering::Relaxed);
        self.backends_down.store(down, Ordering::Relaxed);
    }

    /// Sets the number of pools `pool_aggregate` emitted at its last flush.
    pub fn set_pools(&self, n: u64) {
        self.pools.store(n, Ordering::Relaxed);
    }

    /// Counts `efficiency`'s skipped evaluation windows.
    pub fn add_skipped_intervals(&self, n: u64) {
        self.skipped_intervals.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Seconds the oldest queued batch has waited.
    pub fn queue_age_seconds(&self) -> f64 {
        match self.queue_oldest_ms.load(Ordering::Relaxed) {
            0 => 0.0,
            t => {
                crate::disk_queue::unix_ms(std::time::SystemTime::now()).saturating_sub(t) as f64
                    / 1000.0
            }
        }
    }

    /// The component's state now.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Sets the state; the runtime does, at start, stop and failure.
    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Marks the component failed with the reason health checks will show.
    pub fn fail(&self, error: impl Into<String>) {
        self.set_state(State::Failed);
        self.set_error(error);
    }

    /// Records a problem survived (a target down): `/healthz` shows it as `last_error`.
    pub fn set_error(&self, error: impl Into<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error.into());
        }
    }

    /// Forgets the last error, for a condition that has passed (not for events).
    pub fn clear_error(&self) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }

    /// The last problem recorded, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// The registry of component stats, shared by the runtime and the telemetry endpoint.
#[derive(Clone, Debug)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    ready: AtomicBool,
    components: Mutex<Vec<Arc<ComponentStats>>>,
    /// Replaced by each service a reload starts.
    limiter: Mutex<Option<Arc<MemoryLimiter>>>,
    /// Why the last config reload was refused, while this config runs on.
    config_error: Mutex<Option<String>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                started: Instant::now(),
                ready: AtomicBool::new(false),
                components: Mutex::new(Vec::new()),
                limiter: Mutex::new(None),
                config_error: Mutex::new(None),
            }),
        }
    }

    /// The stats of a new component instance, registered for `/metrics` and `/healthz`.
    pub fn register(
        &self,
        kind: ComponentKind,
        id: &str,
        pipeline: Option<&str>,
    ) -> Arc<ComponentStats> {
        let stats = Arc::new(ComponentStats::new(
            kind,
            id.to_owned(),
            pipeline.map(str::to_owned),
        ));
        if let Ok(mut c) = self.inner.components.lock() {
            c.push(stats.clone());
        }
        stats
    }

    /// Removes `stats` from `/metrics` and `/healthz`: a component that is gone for good.
    pub(crate) fn unregister(&self, stats: &Arc<ComponentStats>) {
        if let Ok(mut c) = self.inner.components.lock() {
            c.retain(|s| !Arc::ptr_eq(s, stats));
        }
    }

    /// Keeps only the components `keep` says: after a reload's drain, those still running.
    pub(crate) fn retain(&self, keep: impl Fn(&ComponentStats) -> bool) {
        if let Ok(mut c) = self.inner.components.lock() {
            c.retain(|s| keep(s));
        }
    }

    /// Keeps only `these`: what was registered before a build or start that failed.
    pub(crate) fn keep_only(&self, these: &[Arc<ComponentStats>]) {
        self.retain(|s| these.iter().any(|t| std::ptr::eq(&**t, s)));
    }

    /// Every registered component's stats.
    pub fn components(&self) -> Vec<Arc<ComponentStats>> {
        self.inner
            .components
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// The stats of the component `id` of `kind` (the first pipeline's, for processors).
    pub fn find(&self, kind: ComponentKind, id: &str) -> Option<Arc<ComponentStats>> {
        self.components()
            .into_iter()
            .find(|c| c.kind == kind && c.id == id)
    }

    /// The stats of the processor `id` in `pipeline`: registered before the processor is
    /// built, so that it can report on itself.
    pub fn find_processor(&self, id: &str, pipeline: &str) -> Option<Arc<ComponentStats>> {
        self.components().into_iter().find(|c| {
            c.kind == ComponentKind::Processor
                && c.id == id
                && c.pipeline.as_deref() == Some(pipeline)
        })
    }

    /// The memory limiter whose readings `/metrics` shows.
    pub fn set_limiter(&self, limiter: Arc<MemoryLimiter>) {
        if let Ok(mut l) = self.inner.limiter.lock() {
            *l = Some(limiter);
        }
    }

    /// Sets what `/readyz` answers (on start and at shutdown).
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    /// Ready: started, not shutting down, and no component failed.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed) && self.is_healthy()
    }

    /// Healthy: no component failed.
    pub fn is_healthy(&self) -> bool {
        self.components().iter().all(|c| c.state() != State::Failed)
    }

    /// Records why a config reload was refused: `/healthz` shows it as `config_error` while
    /// the running config carries on.
    pub fn set_config_error(&self, error: impl Into<String>) {
        self.set_config_error_to(Some(error.into()));
    }

    /// A reload succeeded: `/healthz` no longer shows a refused one.
    pub fn clear_config_error(&self) {
        self.set_config_error_to(None);
    }

    fn set_config_error_to(&self, error: Option<String>) {
        if let Ok(mut e) = self.inner.config_error.lock() {
            *e = error;
        }
    }

    /// The health document `/healthz` and `/readyz` serve.
    pub fn health_json(&self) -> String {
        let mut out = format!(
            "{{\"status\":\"{}\",\"ready\":{},\"uptime_seconds\":{:.3},",
            if self.is_healthy() { "ok" } else { "failed" },
            self.is_ready(),
            self.inner.started.elapsed().as_secs_f64()
        );
        if let Some(e) = self.inner.config_error.lock().ok().and_then(|e| e.clone()) {
            let _ = write!(out, "\"config_error\":{},", json_str(&e));
        }
        out.push_str("\"components\":[");
        for (i, c) in self.components().iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{{\"kind\":\"{}\",\"id\":{}", c.kind, json_str(&c.id));
            if let Some(p) = &c.pipeline {
                let _ = write!(out, ",\"pipeline\":{}", json_str(p));
            }
            let _ = write!(out, ",\"state\":\"{}\"", c.state().as_str());
            if let Some(e) = c.last_error() {
                let _ = write!(out, ",\"last_error\":{}", json_str(&e));
            }
            out.push('}');
        }
        out.push_str("]}");
        out
    }

    /// Self-metrics as a batch (sums and gauges), for the `internal` receiver.
    pub fn to_batch(&self) -> Batch {
        let now = now_unix_nanos();
        let components = self.components();
        let mut metrics = Vec::with_capacity(SERIES.len() + 1);
        let up = components
            .iter()
            .map(|c| {
                number_point(
                    now,
                    f64::from(u8::from(c.state() == State::Running)),
                    point_attrs(c),
                )
            })
            .collect();
        metrics.push(Metric::gauge("genai_collector_component_up", "", up));
        for s in SERIES {
            let points: Vec<_> = components
                .iter()
                .filter(|c| c.kind == s.kind)
                .filter_map(|c| {
                    let v = (s.value)(c);
                    if v.is_nan() {
                        return None;
                    }
                    let mut p = number_point(now, v, point_attrs(c));
                    if s.counter {
                        p.start_time_unix_nano = c.started_unix_nanos;
                    }
                    Some(p)
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let mut m = if s.counter {
                Metric::sum(s.name, s.unit, true, points)
            } else {
                Metric::gauge(s.name, s.unit, points)
            };
            s.help.clone_into(&mut m.description);
            metrics.push(m);
        }
        Batch::with_resource(
            vec![
                kv("service.name", "genai-collector"),
                kv("service.version", env!("CARGO_PKG_VERSION")),
            ],
            metrics,
        )
    }

    /// Self-metrics in the Prometheus text format (0.0.4).
    pub fn render_prometheus(&self) -> String {
        let components = self.components();
        let mut out = String::with_capacity(4096);
        let of = |kind: ComponentKind| components.iter().filter(move |c| c.kind == kind);
        family(
            &mut out,
            "genai_collector_build_info",
            "gauge",
            "Version of this collector.",
            |o| {
                let _ = writeln!(
                    o,
                    "genai_collector_build_info{{version=\"{}\"}} 1",
                    env!("CARGO_PKG_VERSION")
                );
            },
        );
        family(
            &mut out,
            "genai_collector_uptime_seconds",
            "gauge",
            "Seconds since the collector started.",
            |o| {
                let _ = writeln!(
                    o,
                    "genai_collector_uptime_seconds {:.3}",
                    self.inner.started.elapsed().as_secs_f64()
                );
            },
        );
        let limiter = self.inner.limiter.lock().ok().and_then(|l| l.clone());
        if let Some(l) = limiter {
            family(
                &mut out,
                "genai_collector_memory_usage_bytes",
                "gauge",
                "Resident memory at the last check plus what requests being decoded have reserved.",
                |o| {
                    let _ = writeln!(o, "genai_collector_memory_usage_bytes {}", l.usage());
                },
            );
            family(
                &mut out,
                "genai_collector_memory_limit_bytes",
                "gauge",
                "The memory limiter's limits: above `soft` data is refused, above `hard` also logged.",
                |o| {
                    let _ = writeln!(o, "genai_collector_memory_limit_bytes{{limit=\"soft\"}} {}", l.soft_limit());
                    let _ = writeln!(o, "genai_collector_memory_limit_bytes{{limit=\"hard\"}} {}", l.hard_limit());
                },
            );
            family(
                &mut out,
                "genai_collector_memory_pressure",
                "gauge",
                "0 below the soft limit, 1 above it, 2 above the hard limit.",
                |o| {
                    let _ = writeln!(o, "genai_collector_memory_pressure {}", l.pressure() as u8);
                },
            );
        }
        family(
            &mut out,
            "genai_collector_component_up",
            "gauge",
            "1 when the component runs, 0 when it failed or stopped.",
            |o| {
                for c in &components {
                    let up = u8::from(c.state() == State::Running);
                    let _ = writeln!(
                        o,
                        "genai_collector_component_up{{kind=\"{}\",{}}} {up}",
                        c.kind,
                        labels(c)
                    );
                }
            },
        );
        for s in SERIES {
            let name = s.prometheus_name();
            family(
                &mut out,
                &name,
                if s.counter { "counter" } else { "gauge" },
                s.help,
                |o| {
                    for c in of(s.kind) {
                        let v = (s.value)(c);
                        if !v.is_nan() {
                            let _ = writeln!(o, "{name}{{{}}} {v}", labels(c));
                        }
                    }
                },
            );
        }
        out
    }
}

/// One self-metric: which components have it, and which counter it reads (NaN: this component
/// has no such value).
struct Series {
    kind: ComponentKind,
    /// The name without the `_total` a Prometheus counter takes.
    name: &'static str,
    counter: bool,
    unit: &'static str,
    help: &'static str,
    value: fn(&ComponentStats) -> f64,
}

impl Series {
    fn prometheus_name(&self) -> String {
        if self.counter {
            format!("{}_total", self.name)
        } else {
            self.name.to_owned()
        }
    }
}

const SERIES: [Series; 25] = [
    Series {
        kind: ComponentKind::Receiver,
        name: "genai_collector_receiver_accepted_points",
        counter: true,
        unit: "{point}",
        help: "Points a receiver pushed into its pipelines.",
        value: |c| ComponentStats::get(&c.accepted) as f64,
    },
    Series {
        kind: ComponentKind::Receiver,
        name: "genai_collector_receiver_refused_points",
        counter: true,
        unit: "{point}",
        help: "Points a receiver refused because its pipelines or their exporters' queues were full (push clients retry them).",
        value: |c| ComponentStats::get(&c.refused) as f64,
    },
    Series {
        kind: ComponentKind::Receiver,
        name: "genai_collector_receiver_memory_refused_points",
        counter: true,
        unit: "{point}",
        help: "Points a receiver refused (push) or dropped (pull) because the collector was above its memory limit.",
        value: |c| ComponentStats::get(&c.memory_refused) as f64,
    },
    Series {
        kind: ComponentKind::Receiver,
        name: "genai_collector_receiver_skipped_rounds",
        counter: true,
        unit: "{round}",
        help: "Rounds a pull receiver skipped because the collector was above its memory limit.",
        value: |c| ComponentStats::get(&c.skipped_rounds) as f64,
    },
    Series {
        kind: ComponentKind::Receiver,
        name: "genai_collector_receiver_targets",
        counter: false,
        unit: "{target}",
        help: "Targets a pull receiver scrapes now: static, from files and discovered pods.",
        value: |c| match ComponentStats::get(&c.targets) {
            u64::MAX => f64::NAN,
            n => n as f64,
        },
    },
    Series {
        kind: ComponentKind::Processor,
        name: "genai_collector_processor_incoming_points",
        counter: true,
        unit: "{point}",
        help: "Points that entered a processor.",
        value: |c| ComponentStats::get(&c.accepted) as f64,
    },
    Series {
        kind: ComponentKind::Processor,
        name: "genai_collector_processor_outgoing_points",
        counter: true,
        unit: "{point}",
        help: "Points that left a processor.",
        value: |c| ComponentStats::get(&c.sent) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_sent_points",
        counter: true,
        unit: "{point}",
        help: "Points an exporter delivered.",
        value: |c| ComponentStats::get(&c.sent) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_send_failed_points",
        counter: true,
        unit: "{point}",
        help:
            "Points an exporter gave up on: permanent errors, retries exhausted, shutdown deadline.",
        value: |c| ComponentStats::get(&c.failed) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_enqueue_failed_points",
        counter: true,
        unit: "{point}",
        help: "Scraped points dropped because the exporter's queue was full (pushed points are refused instead, and counted by the receiver).",
        value: |c| ComponentStats::get(&c.refused) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_send_failures",
        counter: true,
        unit: "{request}",
        help: "Failed export attempts, retried or not.",
        value: |c| ComponentStats::get(&c.attempt_failures) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_queue_points",
        counter: false,
        unit: "{point}",
        help: "Points waiting in an exporter's queue or being sent.",
        value: |c| ComponentStats::get(&c.queued) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_queue_size",
        counter: false,
        unit: "1",
        help: "What an exporter's queue holds now, queued and in flight, in its sizer's units (bytes, points or requests).",
        value: |c| ComponentStats::get(&c.queue_used) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_queue_capacity",
        counter: false,
        unit: "1",
        help: "What an exporter's queue holds at most, in its sizer's units.",
        value: |c| ComponentStats::get(&c.queue_capacity) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_queue_batches",
        counter: false,
        unit: "{batch}",
        help: "Batches waiting in an exporter's queue for a consumer.",
        value: |c| ComponentStats::get(&c.queue_batches) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_queue_bytes",
        counter: false,
        unit: "By",
        help: "Heap bytes an exporter's queue holds, queued and in flight: batches by their estimated size, requests encoded when queued by their length.",
        value: |c| ComponentStats::get(&c.queue_bytes) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_queue_age_seconds",
        counter: false,
        unit: "s",
        help: "How long the oldest batch in an exporter's queue has waited.",
        value: ComponentStats::queue_age_seconds,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_persisted_points",
        counter: true,
        unit: "{point}",
        help: "Points left in the persistent queue at shutdown, sent after the restart.",
        value: |c| ComponentStats::get(&c.persisted) as f64,
    },
    Series {
        kind: ComponentKind::Processor,
        name: "genai_collector_processor_incomplete_targets",
        counter: false,
        unit: "{target}",
        help: "Scraped targets whose page lacks a core metric (running, waiting, KV cache) their engine's table maps: an engine version the tables do not know.",
        value: |c| ComponentStats::get(&c.incomplete_targets) as f64,
    },
    Series {
        kind: ComponentKind::Processor,
        name: "genai_collector_processor_skipped_intervals",
        counter: true,
        unit: "{interval}",
        help: "Efficiency windows that gave no figures: a counter went back (driver reload, engine restart), GPUs changed hands, or a GPU is shared.",
        value: |c| ComponentStats::get(&c.skipped_intervals) as f64,
    },
    Series {
        kind: ComponentKind::Processor,
        name: "genai_collector_processor_pools",
        counter: false,
        unit: "{pool}",
        help: "Pools pool_aggregate emitted at its last flush: behind several gateways, the pools routed to this one.",
        value: |c| ComponentStats::get(&c.pools) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_backends",
        counter: false,
        unit: "{backend}",
        help: "Backends the loadbalancing exporter resolved (gateway replicas).",
        value: |c| match ComponentStats::get(&c.backends) {
            u64::MAX => f64::NAN,
            n => n as f64,
        },
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_backends_down",
        counter: false,
        unit: "{backend}",
        help: "Backends the loadbalancing exporter passes over as unreachable, their keys failed over to the next.",
        value: |c| match ComponentStats::get(&c.backends) {
            u64::MAX => f64::NAN,
            _ => ComponentStats::get(&c.backends_down) as f64,
        },
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_persistent_queue_bytes",
        counter: false,
        unit: "By",
        help: "Bytes of an exporter's persistent queue files, those of earlier runs included.",
        value: |c| ComponentStats::get(&c.disk_bytes) as f64,
    },
    Series {
        kind: ComponentKind::Exporter,
        name: "genai_collector_exporter_persistent_queue_skipped_points",
        counter: true,
        unit: "{point}",
        help: "Points queued in memory only: the persistent queue was at storage_limit or could not be written.",
        value: |c| ComponentStats::get(&c.disk_skipped) as f64,
    },
];

fn family(out: &mut String, name: &str, ty: &str, help: &str, body: impl FnOnce(&mut String)) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
    body(out);
}

fn point_attrs(c: &ComponentStats) -> Vec<KeyValue> {
    let mut attrs = vec![
        kv("kind", c.kind.as_str()),
        kv(c.kind.as_str(), c.id.as_str()),
    ];
    if let Some(p) = &c.pipeline {
        attrs.push(kv("pipeline", p.as_str()));
    }
    attrs
}

fn labels(c: &ComponentStats) -> String {
    let mut s = format!("{}=\"{}\"", c.kind, escape_label(&c.id));
    if let Some(p) = &c.pipeline {
        let _ = write!(s, ",pipeline=\"{}\"", escape_label(p));
    }
    s
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pull_receivers_report_targets() {
        let t = Telemetry::new();
        let scraper = t.register(ComponentKind::Receiver, "vllm", None);
        t.register(ComponentKind::Receiver, "otlp", None);
        scraper.targets.store(3, Ordering::Relaxed);
        let text = t.render_prometheus();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("genai_collector_receiver_targets{"))
            .collect();
        assert_eq!(
            lines,
            ["genai_collector_receiver_targets{receiver=\"vllm\"} 3"]
        );
        let batch = t.to_batch();
        let m = batch
            .metrics()
            .find(|m| m.name == "genai_collector_receiver_targets")
            .unwrap();
        assert_eq!(crate::model::MetricExt::point_count(m), 1);
    }

    #[test]
    fn renders_counters_and_health() {
        let t = Telemetry::new();
        let r = t.register(ComponentKind::Receiver, "vllm/chat", None);
        let e = t.register(ComponentKind::Exporter, "otlp", None);
        ComponentStats::add(&r.accepted, 42);
        ComponentStats::add(&e.failed, 7);
        r.set_state(State::Running);
        e.fail("connection refused \"x\"");
        let text = t.render_prometheus();
        assert!(
            text.contains(
                "genai_collector_receiver_accepted_points_total{receiver=\"vllm/chat\"} 42"
            ),
            "{text}"
        );
        assert!(
            text.contains("genai_collector_exporter_send_failed_points_total{exporter=\"otlp\"} 7")
        );
        assert!(
            text.contains("genai_collector_component_up{kind=\"exporter\",exporter=\"otlp\"} 0")
        );
        let batch = t.to_batch();
        let accepted = batch
            .metrics()
            .find(|m| m.name == "genai_collector_receiver_accepted_points")
            .unwrap();
        assert_eq!(accepted.kind_name(), "sum");
        assert_eq!(accepted.point_count(), 1);
        t.set_ready(true);
        assert!(
            !t.is_ready(),
            "a failed component makes the collector not ready"
        );
        let health = t.health_json();
        assert!(health.starts_with("{\"status\":\"failed\""), "{health}");
        assert!(
            health.contains("\"last_error\":\"connection refused \\\"x\\\"\""),
            "{health}"
        );
    }
}
