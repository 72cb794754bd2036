//! The pipeline runtime: receivers as tasks, a bounded channel into each pipeline, processors in
//! order, and a fan-out where every exporter has its own bounded queue and worker.
//!
//! Backpressure runs from a full pipeline back to its receivers ([`Output::send`] waits,
//! [`Output::try_send`] refuses). An exporter's queue never blocks the pipeline: when it is full
//! the batch is dropped for that exporter alone and counted, so one dead backend cannot stall
//! the others or the receivers.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::component::{
    BuildContext, ComponentError, ComponentId, ComponentKind, Components, ExportError, Exporter,
    Processor, Receiver, ReceiverContext,
};
use crate::config::{Config, ExporterSettings, RetrySettings};
use crate::disk_queue::{unix_ms, DiskQueue, Stored};
use crate::model::Batch;
use crate::telemetry::{ComponentStats, State, Telemetry};

/// Batches a pipeline's input channel holds before receivers wait.
pub const PIPELINE_QUEUE_BATCHES: usize = 64;

/// Why a batch could not enter the pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the pipeline is full")]
    Full,
    #[error("the collector is shutting down")]
    Closed,
}

/// Where a receiver sends its batches: every pipeline that lists it.
#[derive(Clone)]
pub struct Output {
    senders: Arc<[mpsc::Sender<Batch>]>,
    stats: Arc<ComponentStats>,
}

impl Output {
    /// An output feeding the given channels; for tests and custom runtimes.
    pub fn new(senders: Vec<mpsc::Sender<Batch>>, stats: Arc<ComponentStats>) -> Self {
        Self {
            senders: senders.into(),
            stats,
        }
    }

    /// Sends `batch` to every pipeline, waiting while a pipeline is full.
    pub async fn send(&self, batch: Batch) -> Result<(), SendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let points = batch.point_count();
        let Some((last, rest)) = self.senders.split_last() else {
            return Ok(());
        };
        for s in rest {
            s.send(batch.clone()).await.map_err(|_| SendError::Closed)?;
        }
        last.send(batch).await.map_err(|_| SendError::Closed)?;
        ComponentStats::add(&self.stats.accepted, points);
        Ok(())
    }

    /// Records a problem the receiver hit but survived (a target down): `/healthz` shows the
    /// latest as the receiver's `last_error`, without marking it failed.
    pub fn report_error(&self, error: impl Into<String>) {
        self.stats.set_error(error);
    }

    /// How many targets a pull receiver scrapes now (`genai_collector_receiver_targets`).
    pub fn set_targets(&self, n: usize) {
        self.stats
            .targets
            .store(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends `batch` to every pipeline if all have room now, else refuses it whole; for push
    /// receivers that answer their client with "try later".
    pub fn try_send(&self, batch: Batch) -> Result<(), SendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let points = batch.point_count();
        let permits: Result<Vec<_>, _> =
            self.senders.iter().map(mpsc::Sender::try_reserve).collect();
        let mut permits = match permits {
            Ok(p) => p,
            Err(e) => {
                ComponentStats::add(&self.stats.refused, points);
                return Err(match e {
                    mpsc::error::TrySendError::Full(()) => SendError::Full,
                    mpsc::error::TrySendError::Closed(()) => SendError::Closed,
                });
            }
        };
        if let Some(last) = permits.pop() {
            for p in permits {
                p.send(batch.clone());
            }
            last.send(batch);
        }
        ComponentStats::add(&self.stats.accepted, points);
        Ok(())
    }
}

/// A component that could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{kind} `{id}`: {source}")]
pub struct BuildError {
    pub kind: ComponentKind,
    pub id: String,
    #[source]
    pub source: ComponentError,
}

/// The collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot serve self-telemetry on `{endpoint}`: {source}")]
    Telemetry {
        endpoint: String,
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

struct ExporterTask {
    id: ComponentId,
    exporter: Box<dyn Exporter>,
    rx: mpsc::Receiver<Queued>,
    settings: ExporterSettings,
    stats: Arc<ComponentStats>,
    disk: Option<Arc<DiskQueue>>,
    /// Batches a previous run left in the persistent queue, sent before new ones.
    recovered: Vec<Stored>,
}

/// A batch in an exporter's queue.
struct Queued {
    batch: Arc<Batch>,
    /// Its file in the persistent queue.
    seq: Option<u64>,
    queued_at_ms: u64,
}

#[derive(Clone)]
struct ExporterQueue {
    tx: mpsc::Sender<Queued>,
    stats: Arc<ComponentStats>,
    block: bool,
    disk: Option<Arc<DiskQueue>>,
}

struct PipelineTask {
    name: String,
    rx: mpsc::Receiver<Batch>,
    processors: Vec<(Box<dyn Processor>, Arc<ComponentStats>)>,
    exporters: Vec<ExporterQueue>,
}

struct ReceiverTask {
    id: ComponentId,
    receiver: Box<dyn Receiver>,
    output: Output,
    stats: Arc<ComponentStats>,
}

/// A collector built from config, ready to start.
pub struct Service {
    telemetry: Telemetry,
    receivers: Vec<ReceiverTask>,
    pipelines: Vec<PipelineTask>,
    exporters: Vec<ExporterTask>,
    shutdown_timeout: Duration,
    telemetry_endpoint: Option<String>,
}

impl Service {
    /// Builds every component the pipelines use. Components defined but unused are not built.
    pub fn build(mut config: Config, components: &Components) -> Result<Self, BuildError> {
        let telemetry = Telemetry::new();
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
                let exporter = factory
                    .build(&mut entry.config, &ctx)
                    .map_err(fail(ComponentKind::Exporter, id))?;
                let stats = telemetry.register(ComponentKind::Exporter, &id.to_string(), None);
                let capacity = settings.sending_queue.queue_size.max(1);
                stats
                    .queue_capacity
                    .store(capacity as u64, Ordering::Relaxed);
                let (tx, rx) = mpsc::channel(capacity);
                let block = settings.sending_queue.block_on_overflow;
                let (disk, recovered) = match &settings.sending_queue.storage {
                    Some(root) => {
                        let (disk, recovered) =
                            DiskQueue::open(root, &id.to_string()).map_err(|e| BuildError {
                                kind: ComponentKind::Exporter,
                                id: id.to_string(),
                                source: ComponentError::Config(format!(
                                    "sending_queue.storage: {e}"
                                )),
                            })?;
                        if !recovered.is_empty() {
                            let points: u64 = recovered.iter().map(|s| s.points).sum();
                            info!(exporter = %id, batches = recovered.len(), points, dir = %disk.dir().display(), "persistent queue holds batches from a previous run; sending them first");
                            stats.queued.fetch_add(points, Ordering::Relaxed);
                            stats
                                .queue_batches
                                .store(recovered.len() as u64, Ordering::Relaxed);
                            stats
                                .queue_oldest_ms
                                .store(recovered[0].queued_at_ms.max(1), Ordering::Relaxed);
                        }
                        (Some(Arc::new(disk)), recovered)
                    }
                    None => (None, Vec::new()),
                };
                queues.push((
                    id.clone(),
                    ExporterQueue {
                        tx,
                        stats: stats.clone(),
                        block,
                        disk: disk.clone(),
                    },
                ));
                exporters.push(ExporterTask {
                    id: id.clone(),
                    exporter,
                    rx,
                    settings: settings.clone(),
                    stats,
                    disk,
                    recovered,
                });
            }
        }

        let mut pipelines = Vec::new();
        let mut inputs: Vec<(String, mpsc::Sender<Batch>)> = Vec::new();
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
                let processor = factory
                    .build(&mut entry.config, &ctx)
                    .map_err(fail(ComponentKind::Processor, id))?;
                let stats =
                    telemetry.register(ComponentKind::Processor, &id.to_string(), Some(name));
                processors.push((processor, stats));
            }
            let (tx, rx) = mpsc::channel(PIPELINE_QUEUE_BATCHES);
            inputs.push((name.clone(), tx));
            let exporters = p
                .exporters
                .iter()
                .filter_map(|id| queues.iter().find(|(q, _)| q == id).map(|(_, q)| q.clone()))
                .collect();
            pipelines.push(PipelineTask {
                name: name.clone(),
                rx,
                processors,
                exporters,
            });
        }

        let mut receivers = Vec::new();
        for (id, entry) in config.receivers.iter_mut() {
            let senders: Vec<_> = pipelines_cfg
                .iter()
                .zip(&inputs)
                .filter(|((_, p), _)| p.receivers.contains(id))
                .map(|(_, (_, tx))| tx.clone())
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
            let receiver = factory
                .build(&mut entry.config, &ctx)
                .map_err(fail(ComponentKind::Receiver, id))?;
            let stats = telemetry.register(ComponentKind::Receiver, &id.to_string(), None);
            receivers.push(ReceiverTask {
                id: id.clone(),
                receiver,
                output: Output::new(senders, stats.clone()),
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
        })
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Starts every task and the self-telemetry endpoint.
    pub async fn start(self) -> Result<RunningService, StartError> {
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

        let mut exporter_tasks = JoinSet::new();
        let exporter_stats: Vec<_> = self
            .exporters
            .iter()
            .map(|e| (e.stats.clone(), e.disk.is_some()))
            .collect();
        for task in self.exporters {
            let stats = task.stats.clone();
            let id = task.id.clone();
            exporter_tasks.spawn(supervise(
                ComponentKind::Exporter,
                id,
                stats,
                run_exporter(task),
            ));
        }
        let mut pipeline_tasks = JoinSet::new();
        for task in self.pipelines {
            pipeline_tasks.spawn(run_pipeline(task));
        }
        let receivers_stop = CancellationToken::new();
        let mut receiver_tasks = JoinSet::new();
        for task in self.receivers {
            let ctx = ReceiverContext {
                id: task.id.clone(),
                output: task.output,
                shutdown: receivers_stop.clone(),
            };
            task.stats.set_state(State::Running);
            let stats = task.stats.clone();
            let receiver = task.receiver;
            receiver_tasks.spawn(supervise(
                ComponentKind::Receiver,
                task.id,
                stats,
                receiver.run(ctx),
            ));
        }
        self.telemetry.set_ready(true);
        info!(
            receivers = receiver_tasks.len(),
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
            receivers_stop,
            receiver_tasks,
            pipeline_tasks,
            exporter_tasks,
            exporter_stats,
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
    receivers_stop: CancellationToken,
    receiver_tasks: JoinSet<()>,
    pipeline_tasks: JoinSet<()>,
    exporter_tasks: JoinSet<()>,
    exporter_stats: Vec<(Arc<ComponentStats>, bool)>,
    shutdown_timeout: Duration,
}

impl RunningService {
    /// The address `/metrics`, `/healthz` and `/readyz` are served on.
    pub fn telemetry_addr(&self) -> Option<SocketAddr> {
        self.telemetry_addr
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Waits for `shutdown` (or for every receiver to end), then stops receivers, drains the
    /// pipelines and flushes the exporters within the shutdown timeout.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> RunSummary {
        let receivers_done = async { while self.receiver_tasks.join_next().await.is_some() {} };
        tokio::select! {
            () = shutdown => info!("shutdown requested: stopping receivers, draining pipelines"),
            () = receivers_done => info!("every receiver has ended: draining pipelines"),
        }
        self.telemetry.set_ready(false);
        self.receivers_stop.cancel();
        let drain = async {
            while self.receiver_tasks.join_next().await.is_some() {}
            while self.pipeline_tasks.join_next().await.is_some() {}
            while self.exporter_tasks.join_next().await.is_some() {}
        };
        let drained = tokio::time::timeout(self.shutdown_timeout, drain)
            .await
            .is_ok();
        let mut lost_points = 0;
        if !drained {
            self.receiver_tasks.abort_all();
            self.pipeline_tasks.abort_all();
            self.exporter_tasks.abort_all();
            let mut kept = 0;
            for (stats, persistent) in &self.exporter_stats {
                let queued = stats.queued.swap(0, Ordering::Relaxed);
                if *persistent {
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
        info!(drained, "collector stopped");
        RunSummary {
            drained,
            lost_points,
        }
    }
}

/// Runs a component's task in its own tokio task so that a panic marks it failed instead of
/// taking the collector down.
async fn supervise(
    kind: ComponentKind,
    id: ComponentId,
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

async fn run_pipeline(mut task: PipelineTask) {
    let start = Instant::now();
    let mut next_flush: Vec<Option<Instant>> = task
        .processors
        .iter()
        .map(|(p, _)| p.flush_interval().map(|i| start + i))
        .collect();
    for (_, stats) in &task.processors {
        stats.set_state(State::Running);
    }
    loop {
        let due = next_flush.iter().flatten().min().copied();
        let batch = match due {
            Some(due) => tokio::select! {
                b = task.rx.recv() => b,
                () = tokio::time::sleep_until(due.into()) => {
                    let now = Instant::now();
                    let due: Vec<usize> = (0..next_flush.len())
                        .filter(|&i| next_flush[i].is_some_and(|t| t <= now))
                        .collect();
                    for i in due {
                        next_flush[i] = task.processors[i].0.flush_interval().map(|d| now + d);
                        task.flush(i).await;
                    }
                    continue;
                }
            },
            None => task.rx.recv().await,
        };
        match batch {
            Some(b) => task.process_from(0, b).await,
            None => break,
        }
    }
    for i in 0..task.processors.len() {
        task.flush(i).await;
    }
    for (_, stats) in &task.processors {
        if stats.state() != State::Failed {
            stats.set_state(State::Stopped);
        }
    }
    debug!(pipeline = %task.name, "pipeline drained");
}

impl PipelineTask {
    async fn flush(&mut self, i: usize) {
        let (processor, stats) = &mut self.processors[i];
        match std::panic::catch_unwind(AssertUnwindSafe(|| processor.flush())) {
            Ok(Some(batch)) => self.process_from(i + 1, batch).await,
            Ok(None) => {}
            Err(_) => {
                error!(pipeline = %self.name, processor = %stats.id, "processor panicked in flush");
                stats.fail("panicked in flush");
            }
        }
    }

    /// Runs `batch` through the processors from `start` on, then fans it out.
    async fn process_from(&mut self, start: usize, mut batch: Batch) {
        for (processor, stats) in &mut self.processors[start..] {
            ComponentStats::add(&stats.accepted, batch.point_count());
            if std::panic::catch_unwind(AssertUnwindSafe(|| processor.process(&mut batch))).is_err()
            {
                error!(pipeline = %self.name, processor = %stats.id, "processor panicked; batch dropped");
                stats.fail("panicked");
                return;
            }
            if batch.is_empty() {
                return;
            }
            ComponentStats::add(&stats.sent, batch.point_count());
        }
        fan_out(&self.exporters, &self.name, batch).await;
    }
}

/// Hands `batch` to every exporter's queue; a full queue drops it for that exporter alone,
/// unless the exporter asked to block.
async fn fan_out(exporters: &[ExporterQueue], pipeline: &str, batch: Batch) {
    let points = batch.point_count();
    if points == 0 {
        return;
    }
    let batch = Arc::new(batch);
    for q in exporters {
        // Counted before the send so the worker never sees its own decrement first.
        q.stats.queued.fetch_add(points as u64, Ordering::Relaxed);
        let permit = if q.block {
            q.tx.reserve()
                .await
                .map_err(|_| mpsc::error::TrySendError::Closed(()))
        } else {
            q.tx.try_reserve()
        };
        match permit {
            Ok(permit) => {
                // Written before it is queued, so a batch the worker sees is always on disk.
                let seq = q.disk.as_ref().and_then(|d| match d.write(&batch) {
                    Ok(seq) => Some(seq),
                    Err(e) => {
                        warn!(exporter = %q.stats.id, error = %e, "cannot write to the persistent queue; this batch is queued in memory only");
                        None
                    }
                });
                let queued_at_ms = unix_ms(SystemTime::now());
                let _ = q.stats.queue_oldest_ms.compare_exchange(
                    0,
                    queued_at_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                permit.send(Queued {
                    batch: batch.clone(),
                    seq,
                    queued_at_ms,
                });
                ComponentStats::add(&q.stats.accepted, points);
                let used = q.tx.max_capacity() - q.tx.capacity();
                q.stats.queue_batches.store(used as u64, Ordering::Relaxed);
            }
            Err(e) => {
                q.stats.queued.fetch_sub(points as u64, Ordering::Relaxed);
                let full = matches!(e, mpsc::error::TrySendError::Full(_));
                let counter = if full {
                    &q.stats.refused
                } else {
                    &q.stats.failed
                };
                ComponentStats::add(counter, points);
                debug!(pipeline, exporter = %q.stats.id, points, full, "exporter queue refused a batch");
            }
        }
    }
}

async fn run_exporter(mut task: ExporterTask) -> Result<(), ComponentError> {
    task.stats.set_state(State::Running);
    let recovered = std::mem::take(&mut task.recovered);
    if let Some(disk) = task.disk.clone() {
        let mut left = recovered.len();
        for stored in recovered {
            left -= 1;
            task.stats
                .queue_oldest_ms
                .store(stored.queued_at_ms.max(1), Ordering::Relaxed);
            match disk.read(&stored) {
                Ok(batch) => task.send(Arc::new(batch), stored.points as usize).await,
                Err(e) => {
                    warn!(exporter = %task.id, seq = stored.seq, error = %e, "unreadable batch in the persistent queue; dropping it");
                    task.stats
                        .failed
                        .fetch_add(stored.points, Ordering::Relaxed);
                }
            }
            task.done(Some(stored.seq), stored.points, left + task.rx.len());
        }
    }
    while let Some(item) = task.rx.recv().await {
        task.stats
            .queue_oldest_ms
            .store(item.queued_at_ms, Ordering::Relaxed);
        task.stats
            .queue_batches
            .store(task.rx.len() as u64, Ordering::Relaxed);
        let points = item.batch.point_count();
        task.send(item.batch, points).await;
        task.done(item.seq, points as u64, task.rx.len());
    }
    if let Err(e) = tokio::time::timeout(task.settings.timeout, task.exporter.shutdown()).await {
        warn!(exporter = %task.id, error = %e, "exporter shutdown timed out");
    }
    Ok(())
}

impl ExporterTask {
    /// Delivers `batch`, split into requests of at most `max_batch_points` points.
    async fn send(&mut self, batch: Arc<Batch>, points: usize) {
        let max = self.settings.sending_queue.max_batch_points;
        if max == 0 || points <= max {
            deliver(
                &mut *self.exporter,
                &batch,
                points,
                &self.settings,
                &self.stats,
            )
            .await;
            return;
        }
        let owned = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
        for part in owned.split(max) {
            let n = part.point_count();
            deliver(&mut *self.exporter, &part, n, &self.settings, &self.stats).await;
        }
    }

    /// Marks a batch handled, delivered or given up on: off the disk and out of the counts.
    fn done(&self, seq: Option<u64>, points: u64, waiting: usize) {
        if let (Some(disk), Some(seq)) = (&self.disk, seq) {
            if let Err(e) = disk.remove(seq, points) {
                warn!(exporter = %self.id, seq, error = %e, "cannot remove a sent batch from the persistent queue; it will be sent again after a restart");
            }
        }
        self.stats.queued.fetch_sub(points, Ordering::Relaxed);
        self.stats
            .queue_batches
            .store(waiting as u64, Ordering::Relaxed);
        if waiting == 0 {
            self.stats.queue_oldest_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// Exports one batch, retrying retryable failures with exponential backoff and jitter.
async fn deliver(
    exporter: &mut dyn Exporter,
    batch: &Batch,
    points: usize,
    settings: &ExporterSettings,
    stats: &ComponentStats,
) {
    let started = Instant::now();
    let mut backoff = settings.retry_on_failure.initial_interval;
    loop {
        let result = match tokio::time::timeout(settings.timeout, exporter.export(batch)).await {
            Ok(r) => r,
            Err(_) => Err(ExportError::retryable(format!(
                "export timed out after {:?}",
                settings.timeout
            ))),
        };
        let error = match result {
            Ok(()) => {
                ComponentStats::add(&stats.sent, points);
                return;
            }
            Err(e) => e,
        };
        stats.attempt_failures.fetch_add(1, Ordering::Relaxed);
        stats.set_error(error.to_string());
        let wait = match &error {
            ExportError::Retryable { retry_after, .. } => retry_wait(
                &settings.retry_on_failure,
                started.elapsed(),
                backoff,
                *retry_after,
            ),
            ExportError::Permanent(_) => None,
        };
        match wait {
            Some(wait) => {
                debug!(exporter = %stats.id, error = %error, ?wait, "export failed; retrying");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(settings.retry_on_failure.max_interval);
            }
            None => {
                ComponentStats::add(&stats.failed, points);
                warn!(exporter = %stats.id, error = %error, points, "export failed; dropping the batch");
                return;
            }
        }
    }
}

/// How long to wait before the next attempt, or `None` to give up.
fn retry_wait(
    retry: &RetrySettings,
    elapsed: Duration,
    backoff: Duration,
    hint: Option<Duration>,
) -> Option<Duration> {
    if !retry.enabled {
        return None;
    }
    let wait = hint.unwrap_or_else(|| jitter(backoff));
    let unlimited = retry.max_elapsed_time.is_zero();
    (unlimited || elapsed + wait <= retry.max_elapsed_time).then_some(wait)
}

/// Spreads retries over ±20 % so many collectors do not retry in step.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    // A cheap hash of the clock is random enough to de-synchronise retries.
    let r = (nanos.wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0;
    d.mul_f64(0.8 + 0.4 * r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{number_point, Metric, MetricExt};

    fn one_point() -> Batch {
        Batch::with_resource(
            vec![],
            vec![Metric::gauge("g", "1", vec![number_point(1, 1.0, vec![])])],
        )
    }

    #[tokio::test]
    async fn output_applies_backpressure_and_refuses_when_full() {
        let telemetry = Telemetry::new();
        let stats = telemetry.register(ComponentKind::Receiver, "r", None);
        let (tx_a, mut rx_a) = mpsc::channel(1);
        let (tx_b, rx_b) = mpsc::channel(2);
        let out = Output::new(vec![tx_a, tx_b], stats.clone());

        out.try_send(one_point()).unwrap();
        // Pipeline `a` is full: the batch is refused whole, `b` does not get a copy either.
        assert_eq!(out.try_send(one_point()), Err(SendError::Full));
        assert_eq!(rx_b.len(), 1);
        assert_eq!(ComponentStats::get(&stats.refused), 1);

        // `send` waits until `a` has room.
        let sender = out.clone();
        let pending = tokio::spawn(async move { sender.send(one_point()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !pending.is_finished(),
            "send waits while a pipeline is full"
        );
        rx_a.recv().await.unwrap();
        pending.await.unwrap().unwrap();
        assert_eq!((rx_a.len(), rx_b.len()), (1, 2));
        assert_eq!(ComponentStats::get(&stats.accepted), 2);

        drop((rx_a, rx_b));
        assert_eq!(out.send(one_point()).await, Err(SendError::Closed));
        assert_eq!(one_point().point_count(), 1);
        assert_eq!(Metric::gauge("x", "", vec![]).point_count(), 0);
    }

    #[test]
    fn retry_policy() {
        let r = RetrySettings {
            enabled: true,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            max_elapsed_time: Duration::from_secs(2),
        };
        let w = retry_wait(&r, Duration::ZERO, Duration::from_millis(100), None).unwrap();
        assert!(
            w >= Duration::from_millis(80) && w <= Duration::from_millis(120),
            "{w:?}"
        );
        assert_eq!(
            retry_wait(
                &r,
                Duration::ZERO,
                r.initial_interval,
                Some(Duration::from_secs(1))
            ),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            retry_wait(
                &r,
                Duration::from_millis(1950),
                r.initial_interval,
                Some(Duration::from_secs(1))
            ),
            None
        );
        let off = RetrySettings {
            enabled: false,
            ..r.clone()
        };
        assert_eq!(
            retry_wait(&off, Duration::ZERO, r.initial_interval, None),
            None
        );
        let forever = RetrySettings {
            max_elapsed_time: Duration::ZERO,
            ..r
        };
        assert!(retry_wait(
            &forever,
            Duration::from_secs(3600),
            Duration::from_secs(1),
            None
        )
        .is_some());
    }
}
