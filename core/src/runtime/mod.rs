//! The pipeline runtime: receivers as tasks, a bounded channel into each pipeline, processors in
//! order, and a fan-out where every exporter has its own bounded queue and consumers. A push
//! runs a pipeline whose processors hold nothing for later in its own task instead (see
//! `pipeline::Stage`).
//!
//! `output` holds the delivery contract (what a receiver's "sent" means), `pipeline` the
//! processors and the fan-out, `queue` the exporters' sending queues, `exporter` their
//! consumers and retries; this file builds them from config, starts them and drains them.

mod exporter;
mod keep;
mod pipeline;
mod queued;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::component::{BuildContext, ComponentError, ReceiverContext};
use crate::config::Config;
use crate::config::ExporterSettings;
use crate::delivery::queue::SendQueue;
pub use crate::delivery::{Captured, Output, SendError};
use crate::delivery::{Envelope, LogEvery, PipelineInput};
use crate::disk_queue::DiskQueue;
use crate::disk_queue::Stored;
use crate::id::{ComponentId, ComponentKind};
use crate::memory::MemoryLimiter;
use crate::registry::Components;
use crate::telemetry::{ComponentStats, State, Telemetry};
use exporter::{log_recovered, run_exporter, ExporterTask};
pub use keep::Kept;
use keep::{
    join, pipeline_fingerprint, stop_in_order, RunningExporter, RunningPipeline, RunningReceiver,
};
use pipeline::{run_pipeline, ExporterQueue, PipelineTask, Stage};
pub use queued::{QueuedExporter, Room};

/// Batches a pipeline's input channel holds before receivers wait.
pub const PIPELINE_QUEUE_BATCHES: usize = 64;

/// Persistent-queue file I/O off the runtime's workers: a stalled volume stalls the task that
/// waits for it, never a worker thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// An exporter's queue, its persistent directory if any, and what a previous run left there.
type OpenedQueue = (Arc<SendQueue>, Option<Arc<DiskQueue>>, Vec<Stored>);

/// The queue of the exporter `id` as `settings` give it: in memory, or over a persistent
/// directory whose batches from a previous run come back first (counted in `stats`).
fn open_queue(
    id: &str,
    settings: &ExporterSettings,
    stats: &ComponentStats,
) -> Result<OpenedQueue, String> {
    let q = &settings.sending_queue;
    let queue = Arc::new(SendQueue::new(q.capacity(), q.sizer));
    stats
        .queue_capacity
        .store(queue.capacity(), Ordering::Relaxed);
    let Some(root) = &q.storage else {
        return Ok((queue, None, Vec::new()));
    };
    let (disk, recovered) = DiskQueue::open(root, id, q.fsync, q.storage_limit)
        .map_err(|e| format!("sending_queue.storage: {e}"))?;
    log_recovered(id, disk.dir(), &recovered);
    let points = recovered
        .iter()
        .fold(0u64, |n, s| n.saturating_add(s.points));
    stats.queued.fetch_add(points, Ordering::Relaxed);
    stats.disk_bytes.store(disk.bytes(), Ordering::Relaxed);
    stats.persistent.store(true, Ordering::Relaxed);
    if let Some(first) = recovered.first() {
        stats
            .queue_oldest_ms
            .store(first.queued_at_ms.max(1), Ordering::Relaxed);
    }
    Ok((queue, Some(Arc::new(disk)), recovered))
}

/// An exporter behind its queue (as `settings` give it), and the task that drains the queue.
fn exporter_queue(
    exporter: Box<dyn crate::component::Exporter>,
    settings: &ExporterSettings,
    stats: Arc<ComponentStats>,
) -> Result<(ExporterQueue, ExporterTask), String> {
    let (queue, disk, recovered) = open_queue(&stats.id, settings, &stats)?;
    let exporter: Arc<dyn crate::component::Exporter> = exporter.into();
    let entry = ExporterQueue::new(
        &exporter,
        queue.clone(),
        stats.clone(),
        disk.clone(),
        settings,
    );
    let task = ExporterTask {
        exporter,
        queue,
        settings: settings.clone(),
        stats,
        disk,
        recovered,
        stopping: CancellationToken::new(),
    };
    Ok((entry, task))
}

/// A component that could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{kind} `{id}`: {source}")]
pub struct BuildError {
    /// Receiver, processor or exporter.
    pub kind: ComponentKind,
    /// Its instance id.
    pub id: String,
    /// Why the factory refused.
    #[source]
    pub source: ComponentError,
}

/// The collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The self-telemetry endpoint cannot be served.
    #[error("cannot serve self-telemetry on `{endpoint}`: {source}")]
    Telemetry {
        /// The address from `service.telemetry.endpoint`.
        endpoint: String,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Everything drained within the shutdown timeout.
    pub drained: bool,
    /// Points still queued when the shutdown timeout cut the drain short.
    pub lost_points: u64,
}

struct ReceiverTask {
    id: ComponentId,
    /// `None` for a receiver a reload keeps running, to be adopted at the start.
    receiver: Option<Box<dyn crate::component::Receiver>>,
    output: Output,
    stats: Arc<ComponentStats>,
    /// Its config, canonical: a reload keeps it running when this is unchanged.
    fingerprint: String,
}

/// A pipeline built, or one a reload keeps (`task: None`) to be adopted at the start.
struct BuiltPipeline {
    name: String,
    fingerprint: String,
    task: Option<PipelineTask>,
    input: PipelineInput,
    stats: Vec<Arc<ComponentStats>>,
    inputs_done: CancellationToken,
}

/// An exporter built, or one a reload keeps (`task: None`) to be adopted at the start.
struct BuiltExporter {
    id: ComponentId,
    fingerprint: String,
    task: Option<ExporterTask>,
    entry: ExporterQueue,
    stopping: CancellationToken,
}

/// A collector built from config, ready to start.
pub struct Service {
    telemetry: Telemetry,
    receivers: Vec<ReceiverTask>,
    pipelines: Vec<BuiltPipeline>,
    exporters: Vec<BuiltExporter>,
    shutdown_timeout: Duration,
    telemetry_endpoint: Option<String>,
    limiter: Option<(Arc<MemoryLimiter>, Duration)>,
    /// The registry's components before this build (a reload's kept ones): a start that fails
    /// takes the rest out again.
    registered_before: Vec<Arc<ComponentStats>>,
}

impl Service {
    /// Builds every component the pipelines use. Components defined but unused are not built.
    pub fn build(config: Config, components: &Components) -> Result<Self, BuildError> {
        Self::build_keeping(config, components, &Kept::default())
    }

    /// [`Service::build`] for a reload: what `kept` holds with the same config is not built
    /// (it runs on, holding its ports, queues and state), for [`Service::start_with`] to adopt;
    /// the self-metrics go on in `kept`'s registry.
    pub fn build_keeping(
        config: Config,
        components: &Components,
        kept: &Kept,
    ) -> Result<Self, BuildError> {
        let telemetry = kept.telemetry.clone().unwrap_or_default();
        let before = telemetry.components();
        let built = Self::build_in(config, components, kept, telemetry.clone());
        match built {
            Ok(mut service) => {
                service.registered_before = before;
                Ok(service)
            }
            Err(e) => {
                // What this build registered goes with it.
                telemetry.keep_only(&before);
                Err(e)
            }
        }
    }

    fn build_in(
        mut config: Config,
        components: &Components,
        kept: &Kept,
        telemetry: Telemetry,
    ) -> Result<Self, BuildError> {
        let limiter = MemoryLimiter::from_config(&config.service.memory_limiter);
        if let Some(l) = &limiter {
            telemetry.set_limiter(l.clone());
        }
        let pipelines_cfg = config.service.pipelines.clone();
        let fail = |kind, id: &ComponentId| {
            let id = id.to_string();
            move |source| BuildError { kind, id, source }
        };
        let missing = |kind, id: &ComponentId| BuildError {
            kind,
            id: id.to_string(),
            source: ComponentError::Config("no factory for this kind".into()),
        };

        let mut exporters: Vec<BuiltExporter> = Vec::new();
        for p in pipelines_cfg.values() {
            for id in &p.exporters {
                if exporters.iter().any(|e| &e.id == id) {
                    continue;
                }
                let (entry, settings) = config
                    .exporters
                    .get_mut(id)
                    .ok_or_else(|| missing(ComponentKind::Exporter, id))?;
                if let Some(k) = kept.exporter(id, &entry.fingerprint) {
                    exporters.push(BuiltExporter {
                        id: id.clone(),
                        fingerprint: entry.fingerprint.clone(),
                        task: None,
                        entry: k.entry.clone(),
                        stopping: k.stopping.clone(),
                    });
                    continue;
                }
                let factory = components
                    .exporters
                    .get(id.kind())
                    .ok_or_else(|| missing(ComponentKind::Exporter, id))?;
                let ctx = BuildContext {
                    id: id.clone(),
                    pipeline: None,
                    telemetry: telemetry.clone(),
                };
                // Registered first, so that an exporter can report on itself from its build.
                let stats = telemetry.register(ComponentKind::Exporter, &id.to_string(), None);
                let exporter = factory
                    .build_with_settings(&mut entry.config, &ctx, settings)
                    .map_err(fail(ComponentKind::Exporter, id))?;
                let (queue, task) =
                    exporter_queue(exporter, settings, stats).map_err(|e| BuildError {
                        kind: ComponentKind::Exporter,
                        id: id.to_string(),
                        source: ComponentError::Config(e),
                    })?;
                exporters.push(BuiltExporter {
                    id: id.clone(),
                    fingerprint: entry.fingerprint.clone(),
                    entry: queue,
                    stopping: task.stopping.clone(),
                    task: Some(task),
                });
            }
        }

        let mut pipelines = Vec::new();
        for (name, p) in &pipelines_cfg {
            let fingerprint = pipeline_fingerprint(name, p, &config);
            if let Some(k) = kept.pipeline(&fingerprint) {
                pipelines.push(BuiltPipeline {
                    name: name.clone(),
                    fingerprint,
                    task: None,
                    input: k.input.clone(),
                    stats: k.stats.clone(),
                    inputs_done: k.inputs_done.clone(),
                });
                continue;
            }
            let mut processors = Vec::new();
            for id in &p.processors {
                let entry = config
                    .processors
                    .get_mut(id)
                    .ok_or_else(|| missing(ComponentKind::Processor, id))?;
                let factory = components
                    .processors
                    .get(id.kind())
                    .ok_or_else(|| missing(ComponentKind::Processor, id))?;
                let ctx = BuildContext {
                    id: id.clone(),
                    pipeline: Some(name.clone()),
                    telemetry: telemetry.clone(),
                };
                // Registered first, so that a processor can find and report on its own stats.
                let stats =
                    telemetry.register(ComponentKind::Processor, &id.to_string(), Some(name));
                let processor = factory
                    .build(&mut entry.config, &ctx)
                    .map_err(fail(ComponentKind::Processor, id))?;
                processors.push((processor, stats));
            }
            let (tx, rx) = mpsc::channel::<Envelope>(PIPELINE_QUEUE_BATCHES);
            let queues: Vec<ExporterQueue> = p
                .exporters
                .iter()
                .filter_map(|id| exporters.iter().find(|e| &e.id == id))
                .map(|e| e.entry.clone())
                .collect();
            let stage = Arc::new(Stage::new(name.clone(), processors, queues));
            let input = PipelineInput {
                tx,
                exporters: stage.exporters.iter().map(|e| e.queue.clone()).collect(),
                direct: stage
                    .is_direct()
                    .then(|| stage.clone() as Arc<dyn crate::delivery::Direct>),
            };
            let inputs_done = CancellationToken::new();
            pipelines.push(BuiltPipeline {
                name: name.clone(),
                fingerprint,
                input,
                stats: stage.stats.clone(),
                inputs_done: inputs_done.clone(),
                task: Some(PipelineTask {
                    rx,
                    held: p.processors.iter().map(|_| Vec::new()).collect(),
                    stage,
                    inputs_done,
                }),
            });
        }

        let mut receivers = Vec::new();
        for (id, entry) in config.receivers.iter_mut() {
            let senders: Vec<_> = pipelines_cfg
                .values()
                .zip(&pipelines)
                .filter(|(p, _)| p.receivers.contains(id))
                .map(|(_, built)| built.input.clone())
                .collect();
            if senders.is_empty() {
                continue;
            }
            let factory = components
                .receivers
                .get(id.kind())
                .ok_or_else(|| missing(ComponentKind::Receiver, id))?;
            let ctx = BuildContext {
                id: id.clone(),
                pipeline: None,
                telemetry: telemetry.clone(),
            };
            let (receiver, stats) = match kept.receiver(id, &entry.fingerprint) {
                Some(k) => (None, k.stats.clone()),
                None => {
                    let receiver = factory
                        .build(&mut entry.config, &ctx)
                        .map_err(fail(ComponentKind::Receiver, id))?;
                    let stats = telemetry.register(ComponentKind::Receiver, &id.to_string(), None);
                    (Some(receiver), stats)
                }
            };
            receivers.push(ReceiverTask {
                fingerprint: entry.fingerprint.clone(),
                id: id.clone(),
                receiver,
                output: Output::new(senders, stats.clone(), limiter.clone()),
                stats,
            });
        }

        Ok(Self {
            telemetry,
            receivers,
            pipelines,
            exporters,
            shutdown_timeout: config.service.shutdown_timeout,
            telemetry_endpoint: config.service.telemetry.endpoint.clone(),
            limiter: limiter.map(|l| (l, config.service.memory_limiter.check_interval)),
            registered_before: Vec::new(),
        })
    }

    /// The counters of every component, for the caller's own checks.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Starts every task and the self-telemetry endpoint.
    pub async fn start(self) -> Result<RunningService, StartError> {
        self.start_with(&mut Kept::default()).await
    }

    /// [`Service::start`], adopting from `kept` what [`Service::build_keeping`] left unbuilt:
    /// it keeps running, and the kept receivers now feed these pipelines. On an error `kept`
    /// is left as it was.
    pub async fn start_with(self, kept: &mut Kept) -> Result<RunningService, StartError> {
        let stop_http = CancellationToken::new();
        let (telemetry_addr, http_task) = match &self.telemetry_endpoint {
            Some(endpoint) => {
                let (addr, task) = crate::http::serve_telemetry(
                    endpoint,
                    self.telemetry.clone(),
                    stop_http.clone(),
                )
                .await
                .map_err(|source| {
                    self.telemetry.keep_only(&self.registered_before);
                    StartError::Telemetry {
                        endpoint: endpoint.clone(),
                        source,
                    }
                })?;
                (Some(addr), Some(task))
            }
            None => (None, None),
        };

        if let Some((limiter, interval)) = &self.limiter {
            tokio::spawn(limiter.clone().run(*interval, stop_http.clone()));
        }
        let mut exporters = Vec::with_capacity(self.exporters.len());
        for e in self.exporters {
            let Some(task) = e.task else {
                match kept.take_exporter(&e.id, &e.fingerprint) {
                    Some(k) => exporters.push(k),
                    None => error!(exporter = %e.id, "a kept exporter was not handed to the start"),
                }
                continue;
            };
            let stats = task.stats.clone();
            let run = supervise(
                ComponentKind::Exporter,
                stats.id.clone(),
                stats,
                run_exporter(task),
            );
            exporters.push(RunningExporter {
                id: e.id,
                fingerprint: e.fingerprint,
                entry: e.entry,
                stopping: e.stopping,
                task: tokio::spawn(run),
            });
        }
        let mut pipelines = Vec::with_capacity(self.pipelines.len());
        for p in self.pipelines {
            let Some(task) = p.task else {
                match kept.take_pipeline(&p.fingerprint) {
                    Some(k) => pipelines.push(k),
                    None => {
                        error!(pipeline = %p.name, "a kept pipeline was not handed to the start")
                    }
                }
                continue;
            };
            pipelines.push(RunningPipeline {
                name: p.name,
                fingerprint: p.fingerprint,
                input: p.input,
                stats: p.stats,
                inputs_done: p.inputs_done,
                task: tokio::spawn(run_pipeline(task)),
            });
        }
        let mut receivers = Vec::with_capacity(self.receivers.len());
        for task in self.receivers {
            let Some(receiver) = task.receiver else {
                match kept.take_receiver(&task.id, &task.fingerprint) {
                    Some(k) => {
                        k.output.switch().set(task.output.switch().get());
                        receivers.push(k);
                    }
                    None => {
                        error!(receiver = %task.id, "a kept receiver was not handed to the start; it does not run");
                        task.stats.fail("not started: kept by a reload, then lost");
                    }
                }
                continue;
            };
            let stop = CancellationToken::new();
            let ctx = ReceiverContext {
                id: task.id.clone(),
                output: task.output.clone(),
                shutdown: stop.clone(),
            };
            task.stats.set_state(State::Running);
            let run = supervise(
                ComponentKind::Receiver,
                task.id.to_string(),
                task.stats.clone(),
                receiver.run(ctx),
            );
            receivers.push(RunningReceiver {
                id: task.id,
                fingerprint: task.fingerprint,
                stats: task.stats,
                output: task.output,
                stop,
                task: tokio::spawn(run),
            });
        }
        self.telemetry.set_ready(true);
        info!(
            receivers = receivers.len(),
            pipelines = pipelines.len(),
            exporters = exporters.len(),
            telemetry = ?telemetry_addr,
            "collector started"
        );
        Ok(RunningService {
            telemetry: self.telemetry,
            telemetry_addr,
            http_task,
            stop_http,
            receivers,
            pipelines,
            exporters,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    /// Starts, runs until `shutdown` resolves or every receiver has ended, then drains.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<RunSummary, StartError> {
        Ok(self.start().await?.run_until(shutdown).await)
    }
}

/// A started collector.
pub struct RunningService {
    telemetry: Telemetry,
    telemetry_addr: Option<SocketAddr>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    stop_http: CancellationToken,
    receivers: Vec<RunningReceiver>,
    pipelines: Vec<RunningPipeline>,
    exporters: Vec<RunningExporter>,
    shutdown_timeout: Duration,
}

impl RunningService {
    /// The address `/metrics`, `/healthz` and `/readyz` are served on.
    pub fn telemetry_addr(&self) -> Option<SocketAddr> {
        self.telemetry_addr
    }

    /// The counters of every component.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Waits for `shutdown` (or for every receiver to end), then stops receivers, drains the
    /// pipelines and flushes the exporters within the shutdown timeout.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> RunSummary {
        if self.wait(shutdown).await {
            info!("shutdown requested: stopping receivers, draining pipelines");
        }
        self.stop().await
    }

    /// Waits for `until` (true), or for every receiver to end (false, logged).
    pub async fn wait(&mut self, until: impl std::future::Future<Output = ()>) -> bool {
        let receivers_done = async {
            for r in &mut self.receivers {
                join(&mut r.task).await;
            }
        };
        tokio::select! {
            () = until => true,
            () = receivers_done => {
                info!("every receiver has ended: draining pipelines");
                false
            }
        }
    }

    /// Stops the receivers, drains the pipelines and flushes the exporters within the
    /// shutdown timeout.
    pub async fn stop(self) -> RunSummary {
        self.drain(None).await.0
    }

    /// [`RunningService::stop`] for a reload to `next`, keeping running what `next` has
    /// unchanged (see [`Kept`]): kept receivers are paused (pulled data waits, pushes are
    /// refused as retryable) until the next service adopts them.
    pub fn stop_for(
        mut self,
        next: &Config,
    ) -> impl std::future::Future<Output = (RunSummary, Kept)> + Send + 'static {
        // Decided here, so that the drain holds no reference to `next`.
        let listed = |id: &ComponentId, exporter: bool| {
            next.service.pipelines.values().any(|p| match exporter {
                true => p.exporters.contains(id),
                false => p.receivers.contains(id),
            })
        };
        let (receivers, rest) = std::mem::take(&mut self.receivers)
            .into_iter()
            .partition(|r| {
                let same = next.receivers.get(&r.id);
                same.is_some_and(|e| e.fingerprint == r.fingerprint) && listed(&r.id, false)
            });
        self.receivers = rest;
        let (exporters, rest) = std::mem::take(&mut self.exporters)
            .into_iter()
            .partition(|e| {
                let same = next.exporters.get(&e.id);
                same.is_some_and(|(c, _)| c.fingerprint == e.fingerprint) && listed(&e.id, true)
            });
        self.exporters = rest;
        let (pipelines, rest) = std::mem::take(&mut self.pipelines)
            .into_iter()
            .partition(|p| {
                let same = next.service.pipelines.get(&p.name);
                same.is_some_and(|c| pipeline_fingerprint(&p.name, c, next) == p.fingerprint)
            });
        self.pipelines = rest;
        let kept = Kept {
            telemetry: Some(self.telemetry.clone()),
            receivers,
            pipelines,
            exporters,
        };
        self.drain(Some(kept))
    }

    /// Stops and drains what it runs; `kept` (a reload's) stays running and is handed back.
    async fn drain(mut self, kept: Option<Kept>) -> (RunSummary, Kept) {
        let reload = kept.is_some();
        let kept = kept.unwrap_or_default();
        let mut receivers = std::mem::take(&mut self.receivers);
        let mut pipelines = std::mem::take(&mut self.pipelines);
        let mut exporters = std::mem::take(&mut self.exporters);
        for r in &kept.receivers {
            r.output.switch().set(None);
        }
        self.telemetry.set_ready(false);
        // At once, not when the drain reaches them: batches on disk stop retrying.
        for e in &exporters {
            e.stopping.cancel();
        }
        let drain = stop_in_order(&mut receivers, &mut pipelines, &mut exporters);
        let drained = tokio::time::timeout(self.shutdown_timeout, drain)
            .await
            .is_ok();
        let mut lost_points = 0;
        if !drained {
            let tasks = receivers.iter().map(|r| &r.task);
            let tasks = tasks.chain(pipelines.iter().map(|p| &p.task));
            for t in tasks.chain(exporters.iter().map(|e| &e.task)) {
                t.abort();
            }
            let mut on_disk = 0;
            // Every stopped exporter's, the queues exporters keep of their own
            // (`QueuedExporter`) too.
            let stopped = self.telemetry.components().into_iter().filter(|c| {
                c.kind == ComponentKind::Exporter && !kept.exporters.iter().any(|e| e.owns(c))
            });
            for stats in stopped {
                let queued = stats.queued.swap(0, Ordering::Relaxed);
                if stats.persistent.load(Ordering::Relaxed) {
                    stats.persisted.fetch_add(queued, Ordering::Relaxed);
                    on_disk += queued;
                } else {
                    stats.failed.fetch_add(queued, Ordering::Relaxed);
                    lost_points += queued;
                }
            }
            warn!(
                lost_points,
                kept_on_disk = on_disk,
                timeout = ?self.shutdown_timeout,
                "shutdown timeout reached before every exporter was flushed; queued points not in a persistent queue are lost"
            );
        }
        self.stop_http.cancel();
        // The port is free once `stop` returns.
        if let Some(task) = self.http_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        if reload {
            // The registry goes on with the next service: what stopped leaves it.
            self.telemetry.retain(|s| kept.holds(s));
        }
        info!(drained, kept = kept.len(), "collector stopped");
        let summary = RunSummary {
            drained,
            lost_points,
        };
        (summary, kept)
    }
}

/// Runs a component's task in its own tokio task so that a panic marks it failed instead of
/// taking the collector down.
async fn supervise(
    kind: ComponentKind,
    id: String,
    stats: Arc<ComponentStats>,
    task: impl std::future::Future<Output = Result<(), ComponentError>> + Send + 'static,
) {
    match tokio::spawn(task).await {
        Ok(Ok(())) => {
            if stats.state() != State::Failed {
                stats.set_state(State::Stopped);
            }
        }
        Ok(Err(e)) => {
            error!(%kind, %id, error = %e, "component stopped with an error");
            stats.fail(e.to_string());
        }
        Err(e) if e.is_panic() => {
            error!(%kind, %id, "component panicked");
            stats.fail("panicked");
        }
        Err(_) => stats.set_state(State::Stopped),
    }
}
