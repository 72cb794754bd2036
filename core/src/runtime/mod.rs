//! The pipeline runtime: receivers as tasks, a bounded channel into each pipeline, processors in
//! order, and a fan-out where every exporter has its own bounded queue and consumers.
//!
//! `output` holds the delivery contract (what a receiver's "sent" means), `pipeline` the
//! processors and the fan-out, `queue` the exporters' sending queues, `exporter` their
//! consumers and retries; this file builds them from config, starts them and drains them.

mod exporter;
mod pipeline;
mod queued;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
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
use pipeline::{run_pipeline, ExporterQueue, PipelineTask};
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

/// A receiver running: what stopping it, keeping it across a reload or adopting it takes.
struct RunningReceiver {
    id: ComponentId,
    fingerprint: String,
    stats: Arc<ComponentStats>,
    output: Output,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningReceiver {
    fn is(&self, id: &ComponentId, fingerprint: &str) -> bool {
        &self.id == id && self.fingerprint == fingerprint
    }

    /// Waits for its task to end; at once if it has (a handle must not be polled again).
    async fn join(&mut self) {
        if !self.task.is_finished() {
            let _ = (&mut self.task).await;
        }
    }
}

/// Receivers a reload keeps running ([`RunningService::stop_for`]), paused until the next
/// service adopts them ([`Service::start_with`]). Those it does not adopt are stopped with
/// [`KeptReceivers::stop`].
#[derive(Default)]
pub struct KeptReceivers(Vec<RunningReceiver>);

impl KeptReceivers {
    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Stops every receiver still held.
    pub async fn stop(self) {
        for r in &self.0 {
            r.stop.cancel();
        }
        for mut r in self.0 {
            r.join().await;
        }
    }
}

/// A collector built from config, ready to start.
pub struct Service {
    telemetry: Telemetry,
    receivers: Vec<ReceiverTask>,
    pipelines: Vec<PipelineTask>,
    exporters: Vec<ExporterTask>,
    shutdown_timeout: Duration,
    telemetry_endpoint: Option<String>,
    limiter: Option<(Arc<MemoryLimiter>, Duration)>,
    inputs_done: CancellationToken,
    stopping: CancellationToken,
}

impl Service {
    /// Builds every component the pipelines use. Components defined but unused are not built.
    pub fn build(config: Config, components: &Components) -> Result<Self, BuildError> {
        Self::build_keeping(config, components, &KeptReceivers::default())
    }

    /// [`Service::build`] for a reload: the receivers `kept` has with the same config are not
    /// built (they run on, holding their ports), for [`Service::start_with`] to adopt.
    pub fn build_keeping(
        mut config: Config,
        components: &Components,
        kept: &KeptReceivers,
    ) -> Result<Self, BuildError> {
        let telemetry = Telemetry::new();
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

        let mut exporters = Vec::new();
        let mut queues: Vec<(ComponentId, ExporterQueue)> = Vec::new();
        let stopping = CancellationToken::new();
        for p in pipelines_cfg.values() {
            for id in &p.exporters {
                if queues.iter().any(|(q, _)| q == id) {
                    continue;
                }
                let (entry, settings) = config
                    .exporters
                    .get_mut(id)
                    .ok_or_else(|| missing(ComponentKind::Exporter, id))?;
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
                let (queue, disk, recovered) = open_queue(&id.to_string(), settings, &stats)
                    .map_err(|e| BuildError {
                        kind: ComponentKind::Exporter,
                        id: id.to_string(),
                        source: ComponentError::Config(e),
                    })?;
                queues.push((
                    id.clone(),
                    ExporterQueue::new(queue.clone(), stats.clone(), disk.clone(), settings),
                ));
                exporters.push(ExporterTask {
                    exporter,
                    queue,
                    settings: settings.clone(),
                    stats,
                    disk,
                    recovered,
                    stopping: stopping.clone(),
                });
            }
        }

        let mut pipelines = Vec::new();
        let mut inputs: Vec<PipelineInput> = Vec::new();
        let inputs_done = CancellationToken::new();
        for (name, p) in &pipelines_cfg {
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
            let exporters: Vec<ExporterQueue> = p
                .exporters
                .iter()
                .filter_map(|id| queues.iter().find(|(q, _)| q == id).map(|(_, q)| q.clone()))
                .collect();
            inputs.push(PipelineInput {
                tx,
                exporters: exporters.iter().map(|e| e.queue.clone()).collect(),
            });
            pipelines.push(PipelineTask {
                name: name.clone(),
                rx,
                held: processors.iter().map(|_| Vec::new()).collect(),
                processors,
                exporters,
                inputs_done: inputs_done.clone(),
            });
        }

        let mut receivers = Vec::new();
        for (id, entry) in config.receivers.iter_mut() {
            let senders: Vec<_> = pipelines_cfg
                .iter()
                .zip(&inputs)
                .filter(|((_, p), _)| p.receivers.contains(id))
                .map(|(_, input)| input.clone())
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
            let adopted = kept.0.iter().any(|r| r.is(id, &entry.fingerprint));
            let receiver = match adopted {
                true => None,
                false => Some(
                    factory
                        .build(&mut entry.config, &ctx)
                        .map_err(fail(ComponentKind::Receiver, id))?,
                ),
            };
            let stats = telemetry.register(ComponentKind::Receiver, &id.to_string(), None);
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
            inputs_done,
            stopping,
        })
    }

    /// The counters of every component, for the caller's own checks.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Starts every task and the self-telemetry endpoint.
    pub async fn start(self) -> Result<RunningService, StartError> {
        self.start_with(&mut KeptReceivers::default()).await
    }

    /// [`Service::start`], adopting from `kept` each receiver whose config is the one this
    /// service has: it keeps running (its schedule, connections and counters) and now feeds
    /// these pipelines. On an error `kept` is left as it was.
    pub async fn start_with(self, kept: &mut KeptReceivers) -> Result<RunningService, StartError> {
        let stop_http = CancellationToken::new();
        let (telemetry_addr, http_task) = match &self.telemetry_endpoint {
            Some(endpoint) => {
                let (addr, task) = crate::http::serve_telemetry(
                    endpoint,
                    self.telemetry.clone(),
                    stop_http.clone(),
                )
                .await
                .map_err(|source| StartError::Telemetry {
                    endpoint: endpoint.clone(),
                    source,
                })?;
                (Some(addr), Some(task))
            }
            None => (None, None),
        };

        if let Some((limiter, interval)) = &self.limiter {
            tokio::spawn(limiter.clone().run(*interval, stop_http.clone()));
        }
        let mut exporter_tasks = JoinSet::new();
        let exporter_queues: Vec<_> = self.exporters.iter().map(|e| e.queue.clone()).collect();
        for task in self.exporters {
            let stats = task.stats.clone();
            exporter_tasks.spawn(supervise(
                ComponentKind::Exporter,
                stats.id.clone(),
                stats,
                run_exporter(task),
            ));
        }
        let mut pipeline_tasks = JoinSet::new();
        for task in self.pipelines {
            pipeline_tasks.spawn(run_pipeline(task));
        }
        let mut receivers = Vec::with_capacity(self.receivers.len());
        for task in self.receivers {
            if let Some(i) = kept
                .0
                .iter()
                .position(|r| r.is(&task.id, &task.fingerprint))
            {
                // The one built for this service never runs: the kept one takes its route.
                let kept = kept.0.swap_remove(i);
                kept.output.switch().set(task.output.switch().get());
                self.telemetry.unregister(&task.stats);
                self.telemetry.adopt(kept.stats.clone());
                info!(receiver = %kept.id, "config reload: receiver unchanged, kept running");
                receivers.push(kept);
                continue;
            }
            let Some(receiver) = task.receiver else {
                // Built for a kept receiver that `kept` no longer holds: a caller's mistake.
                error!(receiver = %task.id, "a kept receiver was not handed to the start; it does not run");
                task.stats.fail("not started: kept by a reload, then lost");
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
            pipelines = pipeline_tasks.len(),
            exporters = exporter_tasks.len(),
            telemetry = ?telemetry_addr,
            "collector started"
        );
        Ok(RunningService {
            telemetry: self.telemetry,
            telemetry_addr,
            http_task,
            stop_http,
            receivers,
            pipeline_tasks,
            exporter_tasks,
            exporter_queues,
            inputs_done: self.inputs_done,
            stopping: self.stopping,
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
    pipeline_tasks: JoinSet<()>,
    exporter_tasks: JoinSet<()>,
    exporter_queues: Vec<Arc<SendQueue>>,
    inputs_done: CancellationToken,
    stopping: CancellationToken,
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
        self.wait(shutdown).await;
        self.stop().await
    }

    /// Waits for `until`, or for every receiver to end.
    pub async fn wait(&mut self, until: impl std::future::Future<Output = ()>) {
        let receivers_done = async {
            for r in &mut self.receivers {
                r.join().await;
            }
        };
        tokio::select! {
            () = until => info!("stopping receivers, draining pipelines"),
            () = receivers_done => info!("every receiver has ended: draining pipelines"),
        }
    }

    /// Stops the receivers, drains the pipelines and flushes the exporters within the
    /// shutdown timeout.
    pub async fn stop(self) -> RunSummary {
        self.drain(|_| false).await.0
    }

    /// [`RunningService::stop`] for a reload to `next`: the receivers `next` has with the same
    /// config, in some pipeline, keep running, paused (pulled data waits, pushes are refused
    /// as retryable) until the next service adopts them.
    pub async fn stop_for(self, next: &Config) -> (RunSummary, KeptReceivers) {
        self.drain(|r| {
            let same = next
                .receivers
                .get(&r.id)
                .is_some_and(|e| e.fingerprint == r.fingerprint);
            same && next
                .service
                .pipelines
                .values()
                .any(|p| p.receivers.contains(&r.id))
        })
        .await
    }

    async fn drain(
        mut self,
        keep: impl Fn(&RunningReceiver) -> bool,
    ) -> (RunSummary, KeptReceivers) {
        let (kept, mut stopping): (Vec<_>, Vec<_>) = std::mem::take(&mut self.receivers)
            .into_iter()
            .partition(|r| keep(r));
        for r in &kept {
            r.output.switch().set(None);
        }
        for r in &stopping {
            r.stop.cancel();
        }
        self.telemetry.set_ready(false);
        self.stopping.cancel();
        let drain = async {
            for r in &mut stopping {
                r.join().await;
            }
            // Receivers have stopped; a copy of their output left in a stray task (a
            // connection a server did not close) must not keep the pipelines open.
            self.inputs_done.cancel();
            while self.pipeline_tasks.join_next().await.is_some() {}
            // Nothing more can be queued: consumers end once their queue is empty.
            for q in &self.exporter_queues {
                q.close();
            }
            while self.exporter_tasks.join_next().await.is_some() {}
        };
        let drained = tokio::time::timeout(self.shutdown_timeout, drain)
            .await
            .is_ok();
        let mut lost_points = 0;
        if !drained {
            for r in &stopping {
                r.task.abort();
            }
            self.pipeline_tasks.abort_all();
            self.exporter_tasks.abort_all();
            let mut kept = 0;
            // Every exporter's, the queues exporters keep of their own (`QueuedExporter`) too.
            let exporters = self.telemetry.components().into_iter();
            for stats in exporters.filter(|c| c.kind == ComponentKind::Exporter) {
                let queued = stats.queued.swap(0, Ordering::Relaxed);
                if stats.persistent.load(Ordering::Relaxed) {
                    stats.persisted.fetch_add(queued, Ordering::Relaxed);
                    kept += queued;
                } else {
                    stats.failed.fetch_add(queued, Ordering::Relaxed);
                    lost_points += queued;
                }
            }
            warn!(
                lost_points,
                kept_on_disk = kept,
                timeout = ?self.shutdown_timeout,
                "shutdown timeout reached before every exporter was flushed; queued points not in a persistent queue are lost"
            );
        }
        self.stop_http.cancel();
        // The port is free once `run_until` returns.
        if let Some(task) = self.http_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        info!(drained, kept = kept.len(), "collector stopped");
        let summary = RunSummary {
            drained,
            lost_points,
        };
        (summary, KeptReceivers(kept))
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
