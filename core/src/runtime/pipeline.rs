//! A pipeline's task: processors in order, then the fan-out into its exporters' queues.
//!
//! Pushed batches carry an acknowledgement. A processor that holds data for a later flush
//! (`batch`) keeps the acknowledgements with it, so the client hears back once its points are
//! queued for export, not when they were merely buffered; a processor that only gathers
//! ([`Processor::flush_when_idle`]) is flushed as soon as the input is empty while it holds
//! such a client's answer. At the fan-out a pushed batch goes
//! into every exporter's queue or into none (the client is told to retry); scraped data goes
//! into each queue that has room, and a full queue drops it for that exporter alone.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use super::{blocking, LogEvery};
use crate::component::{Exporter, Processor};
use crate::delivery::queue::{Cost, Item, Payload, Reservation, SendQueue, Sizer};
use crate::delivery::{Ack, Direct, Envelope, SendError};
use crate::disk_queue::{unix_ms, DiskQueue};
use crate::model::Batch;
use crate::telemetry::{ComponentStats, State};

/// A pipeline's handle on one exporter's queue.
#[derive(Clone)]
pub(crate) struct ExporterQueue {
    pub queue: Arc<SendQueue>,
    pub stats: Arc<ComponentStats>,
    pub block: bool,
    pub disk: Option<Arc<DiskQueue>>,
    pub drop_log: Arc<LogEvery>,
    /// Batches the persistent queue could not take.
    pub disk_log: Arc<LogEvery>,
    /// The exporter, which encodes each batch it can send whole as it is queued (see
    /// [`ExporterQueue::enqueue`]), unless the queue is persistent: that one stores batches.
    pub exporter: Arc<dyn Exporter>,
    /// `sending_queue.max_batch_points`: a larger batch is queued as is, for the consumer to
    /// split.
    pub max_batch_points: usize,
}

/// A pipeline's processors and the queues it ends in: run by its task, and by the pushing
/// receivers themselves where no processor holds data for later (see [`Direct`]).
pub(crate) struct Stage {
    pub name: String,
    processors: std::sync::Mutex<Processors>,
    /// Each processor's stats, outside the lock: a push finds it free unless a batch is in.
    pub stats: Vec<Arc<ComponentStats>>,
    /// Each processor's `flush_interval` and `flush_when_idle`.
    flushes: Vec<(Option<Duration>, bool)>,
    pub exporters: Vec<ExporterQueue>,
    /// Whether pushes may still run it; held shared by each push under way, so that the drain,
    /// which closes it, waits for them.
    open: tokio::sync::RwLock<bool>,
}

/// A pipeline's processors in order, each with its stats.
pub(crate) type Processors = Vec<(Box<dyn Processor>, Arc<ComponentStats>)>;

/// Where a batch left the processors.
enum Through {
    /// Past the last one.
    Out(Batch),
    /// Emptied by the processor at this index: dropped by its rule, or held for its flush.
    Emptied(usize),
    /// The processor at this index panicked; the batch is lost (and counted).
    Panicked(usize),
}

impl Stage {
    pub fn new(name: String, processors: Processors, exporters: Vec<ExporterQueue>) -> Self {
        let flushes: Vec<_> = processors
            .iter()
            .map(|(p, _)| (p.flush_interval(), p.flush_when_idle()))
            .collect();
        Self {
            name,
            stats: processors.iter().map(|(_, s)| s.clone()).collect(),
            processors: std::sync::Mutex::new(processors),
            flushes,
            exporters,
            open: tokio::sync::RwLock::new(true),
        }
    }

    /// Whether pushes run it in the pushing task (see [`Direct`]): none of its processors holds
    /// data for later.
    pub fn is_direct(&self) -> bool {
        self.flushes.iter().all(|(interval, _)| interval.is_none())
    }

    /// Lets the pushes under way finish and takes no more.
    async fn close(&self) {
        *self.open.write().await = false;
    }

    /// Runs `batch` through the processors from `start` on.
    fn run(&self, start: usize, batch: Batch) -> Through {
        let mut processors = self.processors.lock().unwrap_or_else(|p| p.into_inner());
        self.run_in(&mut processors, start, batch)
    }

    fn run_in(&self, processors: &mut Processors, start: usize, mut batch: Batch) -> Through {
        for (i, (processor, stats)) in processors.iter_mut().enumerate().skip(start) {
            ComponentStats::add(&stats.accepted, batch.point_count());
            if std::panic::catch_unwind(AssertUnwindSafe(|| processor.process(&mut batch))).is_err()
            {
                error!(pipeline = %self.name, processor = %stats.id, "processor panicked; batch dropped");
                stats.fail("panicked");
                return Through::Panicked(i);
            }
            if batch.is_empty() {
                return Through::Emptied(i);
            }
            ComponentStats::add(&stats.sent, batch.point_count());
        }
        Through::Out(batch)
    }

    /// The processor at `i`'s flush.
    fn flush(&self, i: usize) -> Result<Option<Batch>, ()> {
        let mut processors = self.processors.lock().unwrap_or_else(|p| p.into_inner());
        let (processor, stats) = &mut processors[i];
        std::panic::catch_unwind(AssertUnwindSafe(|| processor.flush())).map_err(|_| {
            error!(pipeline = %self.name, processor = %stats.id, "processor panicked in flush");
            stats.fail("panicked in flush");
        })
    }

    fn set_state(&self, state: State) {
        for stats in &self.stats {
            if state != State::Stopped || stats.state() != State::Failed {
                stats.set_state(state);
            }
        }
    }
}

/// A pushed batch runs through the processors and into every exporter's queue (or none) in the
/// receiver's own task: it stays on the core that decoded it until its request is encoded and
/// it is freed, and no handoff to the pipeline's task and back is made. The processors take
/// one batch at a time: a push that finds them busy goes through the pipeline's task rather
/// than hold up its worker.
#[async_trait::async_trait]
impl Direct for Stage {
    async fn push(&self, batch: Batch) -> Result<Result<(), SendError>, Batch> {
        let open = self.open.read().await;
        if !*open {
            return Ok(Err(SendError::Closed));
        }
        let through = match self.processors.try_lock() {
            Ok(mut processors) => self.run_in(&mut processors, 0, batch),
            Err(std::sync::TryLockError::Poisoned(p)) => self.run_in(&mut p.into_inner(), 0, batch),
            Err(std::sync::TryLockError::WouldBlock) => return Err(batch),
        };
        Ok(match through {
            Through::Out(batch) => fan_out(&self.exporters, &self.name, batch, true).await,
            Through::Emptied(_) => Ok(()),
            Through::Panicked(_) => Err(SendError::Dropped),
        })
    }
}

pub(crate) struct PipelineTask {
    pub rx: mpsc::Receiver<Envelope>,
    pub stage: Arc<Stage>,
    /// Acknowledgements of pushed data a processor holds until its next flush, one list per
    /// processor.
    pub held: Vec<Vec<Ack>>,
    /// Cancelled once every receiver has stopped: the input takes nothing more, even from a
    /// sender a stray task still holds, and the pipeline drains what it has.
    pub inputs_done: tokio_util::sync::CancellationToken,
}

fn answer(acks: Vec<Ack>, result: Result<(), SendError>) {
    for ack in acks {
        let _ = ack.send(result);
    }
}

pub(crate) async fn run_pipeline(mut task: PipelineTask) {
    let start = Instant::now();
    let mut next_flush: Vec<Option<Instant>> = task
        .stage
        .flushes
        .iter()
        .map(|(interval, _)| interval.map(|i| start + i))
        .collect();
    task.stage.set_state(State::Running);
    let inputs_done = task.inputs_done.clone();
    let mut closed = false;
    loop {
        let due = next_flush.iter().flatten().min().copied();
        let envelope = tokio::select! {
            e = task.rx.recv() => e,
            () = inputs_done.cancelled(), if !closed => {
                task.rx.close();
                closed = true;
                continue;
            }
            () = tokio::time::sleep_until(due.unwrap_or(start).into()), if due.is_some() => {
                let now = Instant::now();
                task.flush_picked(&mut next_flush, |_, _, next| next.is_some_and(|t| t <= now))
                    .await;
                continue;
            }
        };
        match envelope {
            Some(e) => {
                let acks = e.ack.into_iter().collect();
                task.process_from(0, e.batch, acks).await;
            }
            None => break,
        }
        if task.rx.is_empty() {
            // Nothing more to gather now, and waiting clients send nothing until answered.
            task.flush_picked(&mut next_flush, |t, i, _| {
                !t.held[i].is_empty() && t.stage.flushes[i].1
            })
            .await;
        }
    }
    task.stage.close().await;
    for i in 0..task.held.len() {
        task.flush(i).await;
    }
    task.stage.set_state(State::Stopped);
    debug!(pipeline = %task.stage.name, "pipeline drained");
}

impl PipelineTask {
    /// Flushes each processor `pick` chooses (given its index and next timer), its timer
    /// starting over.
    async fn flush_picked(
        &mut self,
        next_flush: &mut [Option<Instant>],
        pick: impl Fn(&Self, usize, Option<Instant>) -> bool,
    ) {
        let now = Instant::now();
        let picked: Vec<usize> = (0..self.held.len())
            .filter(|&i| pick(self, i, next_flush[i]))
            .collect();
        for i in picked {
            next_flush[i] = self.stage.flushes[i].0.map(|d| now + d);
            self.flush(i).await;
        }
    }

    async fn flush(&mut self, i: usize) {
        let acks = std::mem::take(&mut self.held[i]);
        match self.stage.flush(i) {
            Ok(Some(batch)) => self.process_from(i + 1, batch, acks).await,
            Ok(None) => answer(acks, Ok(())),
            Err(()) => answer(acks, Err(SendError::Dropped)),
        }
    }

    /// Runs `batch` through the processors from `start` on, then fans it out.
    async fn process_from(&mut self, start: usize, batch: Batch, mut acks: Vec<Ack>) {
        let through = self.stage.run(start, batch);
        let passed = match &through {
            Through::Out(_) => self.held.len(),
            Through::Emptied(i) | Through::Panicked(i) => *i,
        };
        // What a processor held before goes on with the batch it passed.
        for held in &mut self.held[start..passed] {
            acks.append(held);
        }
        match through {
            Through::Out(batch) => {
                let stage = &self.stage;
                let result = fan_out(&stage.exporters, &stage.name, batch, !acks.is_empty()).await;
                answer(acks, result);
            }
            // Held for a later flush (or folded into state that a flush emits).
            Through::Emptied(i) if self.stage.flushes[i].0.is_some() => {
                self.held[i].append(&mut acks);
            }
            // Dropped by the processor's own rule: nothing left to deliver.
            Through::Emptied(_) => answer(acks, Ok(())),
            Through::Panicked(_) => answer(acks, Err(SendError::Dropped)),
        }
    }
}

/// Hands `batch` to every exporter's queue. Pushed data (`all_or_none`) is queued in every
/// exporter or in none; scraped data in each queue with room, dropped and counted where full.
async fn fan_out(
    exporters: &[ExporterQueue],
    pipeline: &str,
    batch: Batch,
    all_or_none: bool,
) -> Result<(), SendError> {
    let cost = Cost::of(&batch);
    if cost.points == 0 {
        return Ok(());
    }
    let batch = Arc::new(batch);
    if !all_or_none {
        for q in exporters {
            match q.reserve(cost).await {
                Some(r) => q.enqueue(r, &batch, cost).await,
                None => q.drop_full(pipeline, cost.points),
            }
        }
        return Ok(());
    }
    let mut reserved = Vec::with_capacity(exporters.len());
    for q in exporters {
        match q.reserve(cost).await {
            Some(r) => reserved.push(r),
            // The reservations taken so far are given back as they drop.
            None => return Err(SendError::Full),
        }
    }
    for (q, r) in exporters.iter().zip(reserved) {
        q.enqueue(r, &batch, cost).await;
    }
    Ok(())
}

impl ExporterQueue {
    pub fn new(
        exporter: &Arc<dyn Exporter>,
        queue: Arc<SendQueue>,
        stats: Arc<ComponentStats>,
        disk: Option<Arc<DiskQueue>>,
        settings: &crate::config::ExporterSettings,
    ) -> Self {
        Self {
            queue,
            stats,
            block: settings.sending_queue.block_on_overflow,
            exporter: exporter.clone(),
            disk,
            drop_log: Default::default(),
            disk_log: Default::default(),
            max_batch_points: settings.sending_queue.max_batch_points,
        }
    }

    /// What the queue holds of `batch`: the request its exporter builds from it, where the
    /// exporter encodes and sends the batch whole. Encoding here, in the task that ran the
    /// processors (usually on the core that decoded the batch), lets the batch be freed where
    /// its memory is warm, and keeps only the much smaller request queued.
    fn payload(&self, batch: &Arc<Batch>, points: u64) -> Payload {
        let whole = self.max_batch_points == 0 || points <= self.max_batch_points as u64;
        (whole && self.disk.is_none())
            .then(|| self.exporter.encode(batch))
            .flatten()
            .map_or_else(|| Payload::Memory(batch.clone()), Payload::Encoded)
    }

    async fn reserve(&self, cost: Cost) -> Option<Reservation<'_>> {
        let size = cost.size(self.queue.sizer);
        if self.block {
            self.queue.reserve(size).await
        } else {
            self.queue.try_reserve(size)
        }
    }

    pub async fn enqueue(&self, mut room: Reservation<'_>, batch: &Arc<Batch>, cost: Cost) {
        // Written before it is queued, so a batch a consumer sees is always on disk.
        let seq = match &self.disk {
            Some(disk) => self.write(disk, batch, cost.points).await,
            None => None,
        };
        let payload = self.payload(batch, cost.points);
        // A request takes what it holds: its encoded size, not the batch's.
        let bytes = match &payload {
            Payload::Encoded(request) => request.len() as u64,
            _ => cost.bytes,
        };
        if self.queue.sizer == Sizer::Bytes {
            room.shrink(bytes);
        }
        let queued_at_ms = unix_ms(SystemTime::now());
        let _ = self.stats.queue_oldest_ms.compare_exchange(
            0,
            queued_at_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.stats.queued.fetch_add(cost.points, Ordering::Relaxed);
        self.stats.queue_bytes.fetch_add(bytes, Ordering::Relaxed);
        ComponentStats::add(&self.stats.accepted, cost.points as usize);
        room.commit(Item {
            payload,
            seq,
            queued_at_ms,
            points: cost.points,
            bytes,
            size: 0,
        });
        self.queue.report(&self.stats);
    }

    /// Writes `batch` to the persistent queue on a blocking thread (a stalled volume must
    /// not stall a runtime worker); `None` when it stays in memory only, counted and logged.
    async fn write(&self, disk: &Arc<DiskQueue>, batch: &Arc<Batch>, points: u64) -> Option<u64> {
        let (d, b) = (disk.clone(), batch.clone());
        let written = blocking(move || d.write(&b)).await;
        self.stats.disk_bytes.store(disk.bytes(), Ordering::Relaxed);
        match written {
            Ok(seq) => Some(seq),
            Err(e) => {
                ComponentStats::add(&self.stats.disk_skipped, points as usize);
                if let Some(n) = self.disk_log.hit(points) {
                    warn!(exporter = %self.stats.id, error = %e, points = n, "cannot write to the persistent queue; these points are queued in memory only (counted in genai_collector_exporter_persistent_queue_skipped_points)");
                }
                None
            }
        }
    }

    /// Counts scraped points a full queue could not take; logs at most once a minute.
    fn drop_full(&self, pipeline: &str, points: u64) {
        ComponentStats::add(&self.stats.refused, points as usize);
        if let Some(n) = self.drop_log.hit(points) {
            warn!(pipeline, exporter = %self.stats.id, points = n, used = self.queue.used(), capacity = self.queue.capacity(), "exporter queue full: dropped scraped points (counted in genai_collector_exporter_enqueue_failed_points_total)");
        }
    }
}
