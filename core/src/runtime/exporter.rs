//! An exporter's consumers: `sending_queue.num_consumers` tasks that take batches from its
//! queue and deliver them, retrying retryable failures with backoff. Requests in flight at
//! once finish in any order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use super::blocking;
use crate::component::{ComponentError, ExportError, Exporter};
use crate::config::{ExporterSettings, RetrySettings};
use crate::delivery::queue::{Item, Payload, SendQueue};
use crate::disk_queue::{DiskQueue, Stored};
use crate::model::Batch;
use crate::telemetry::{ComponentStats, State};
use crate::Bytes;

pub(crate) struct ExporterTask {
    pub exporter: Arc<dyn Exporter>,
    pub queue: Arc<SendQueue>,
    pub settings: ExporterSettings,
    pub stats: Arc<ComponentStats>,
    pub disk: Option<Arc<DiskQueue>>,
    /// Batches a previous run left in the persistent queue, sent before new ones.
    pub recovered: Vec<Stored>,
    /// Cancelled when shutdown begins: batches on disk stop retrying and stay there.
    pub stopping: tokio_util::sync::CancellationToken,
}

/// What every consumer of one exporter shares.
struct Worker {
    exporter: Arc<dyn Exporter>,
    queue: Arc<SendQueue>,
    settings: ExporterSettings,
    stats: Arc<ComponentStats>,
    disk: Option<Arc<DiskQueue>>,
    stopping: tokio_util::sync::CancellationToken,
}

pub(crate) async fn run_exporter(task: ExporterTask) -> Result<(), ComponentError> {
    task.stats.set_state(State::Running);
    for stored in task.recovered {
        task.queue.push_recovered(Item {
            points: stored.points,
            seq: Some(stored.seq),
            queued_at_ms: stored.queued_at_ms,
            payload: Payload::Disk(stored),
            bytes: 0,
            size: 0,
        });
    }
    let worker = Arc::new(Worker {
        exporter: task.exporter,
        queue: task.queue,
        settings: task.settings,
        stats: task.stats,
        disk: task.disk,
        stopping: task.stopping,
    });
    let mut consumers = JoinSet::new();
    for _ in 0..worker.settings.sending_queue.num_consumers.max(1) {
        consumers.spawn(consume(worker.clone()));
    }
    while let Some(done) = consumers.join_next().await {
        if let Err(e) = done {
            if e.is_panic() {
                error!(exporter = %worker.stats.id, "an export panicked; that consumer stopped");
                worker.stats.fail("an export panicked");
            }
        }
    }
    // Bounded by the collector's shutdown timeout, not the export timeout: an exporter with
    // queues of its own (`loadbalancing`) drains them here.
    if let Err(e) = worker.exporter.shutdown().await {
        warn!(exporter = %worker.stats.id, error = %e, "exporter shutdown failed");
    }
    Ok(())
}

async fn consume(w: Arc<Worker>) {
    while let Some(mut item) = w.queue.pop().await {
        w.stats
            .queue_oldest_ms
            .store(item.queued_at_ms.max(1), Ordering::Relaxed);
        let batch = match (item.payload.take(), &w.disk) {
            (Payload::Encoded(bytes), _) => {
                w.send_encoded(bytes, item.points as usize).await;
                w.done(&item, false).await;
                continue;
            }
            (Payload::Memory(b), _) => Ok(b),
            (Payload::Disk(stored), Some(disk)) => {
                let disk = disk.clone();
                blocking(move || disk.read(&stored)).await.map(Arc::new)
            }
            (Payload::Disk(_), None) | (Payload::Taken, _) => {
                Err(std::io::ErrorKind::NotFound.into())
            }
        };
        let mut keep_file = false;
        match batch {
            Ok(batch) => {
                keep_file = w
                    .send(batch, item.points as usize, item.seq.is_some())
                    .await
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                warn!(exporter = %w.stats.id, seq = ?item.seq, error = %e, "corrupt batch in the persistent queue; dropping it");
                ComponentStats::add(&w.stats.failed, item.points as usize);
            }
            Err(e) => {
                // A read that failed for another reason (permissions, I/O) may work next start.
                warn!(exporter = %w.stats.id, seq = ?item.seq, error = %e, "cannot read a batch of the persistent queue; it stays on disk for the next start");
                ComponentStats::add(&w.stats.persisted, item.points as usize);
                keep_file = true;
            }
        }
        w.done(&item, keep_file).await;
    }
}

impl Worker {
    /// Delivers `batch`, split into requests of at most `max_batch_points` points; whether
    /// its file (if any) must stay on disk.
    async fn send(&self, batch: Arc<Batch>, points: usize, on_disk: bool) -> bool {
        let max = self.settings.sending_queue.max_batch_points;
        let (exporter, settings, stats) = (&*self.exporter, &self.settings, &self.stats);
        // A batch on disk waits for no retry once shutdown begins: the next start sends it.
        let stopping = on_disk.then_some(&self.stopping);
        if max == 0 || points <= max {
            let request = Request::new(exporter, batch);
            let outcome = deliver(exporter, &request, points, settings, stats, stopping).await;
            return outcome == Outcome::Kept;
        }
        let owned = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
        let mut keep = false;
        for part in owned.split(max) {
            let n = part.point_count();
            let request = Request::new(exporter, Arc::new(part));
            // Parts already sent would be sent again with the file: at-least-once.
            keep |=
                deliver(exporter, &request, n, settings, stats, stopping).await == Outcome::Kept;
        }
        keep
    }

    /// Delivers a request its exporter encoded when the batch was queued.
    async fn send_encoded(&self, bytes: Bytes, points: usize) {
        let request = Request::Encoded(bytes);
        deliver(
            &*self.exporter,
            &request,
            points,
            &self.settings,
            &self.stats,
            None,
        )
        .await;
    }

    /// Marks a batch handled, delivered or given up on: off the disk, out of the counts, and
    /// its room in the queue given back.
    async fn done(&self, item: &Item, keep_file: bool) {
        if let (Some(disk), Some(seq), false) = (&self.disk, item.seq, keep_file) {
            let (d, points) = (disk.clone(), item.points);
            if let Err(e) = blocking(move || d.remove(seq, points)).await {
                warn!(exporter = %self.stats.id, seq, error = %e, "cannot remove a sent batch from the persistent queue; it will be sent again after a restart");
            }
            self.stats.disk_bytes.store(disk.bytes(), Ordering::Relaxed);
        }
        self.stats.queued.fetch_sub(item.points, Ordering::Relaxed);
        self.stats
            .queue_bytes
            .fetch_sub(item.bytes, Ordering::Relaxed);
        self.queue.release(item.size);
        self.queue.report(&self.stats);
        if self.queue.used() == 0 && self.queue.len() == 0 {
            self.stats.queue_oldest_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// What every attempt sends: the batch, or the request the exporter built from it once.
enum Request {
    Batch(Arc<Batch>),
    Encoded(Bytes),
}

impl Request {
    /// Lets the exporter encode `batch`, which is then freed here (unless another exporter
    /// shares it): on the core whose cache still holds it, and before the wait for the answer.
    fn new(exporter: &dyn Exporter, batch: Arc<Batch>) -> Self {
        match exporter.encode(&batch) {
            Some(bytes) => Self::Encoded(bytes),
            None => Self::Batch(batch),
        }
    }

    async fn send(&self, exporter: &dyn Exporter) -> Result<(), ExportError> {
        match self {
            Self::Batch(batch) => exporter.export(batch).await,
            Self::Encoded(bytes) => exporter.export_encoded(bytes.clone()).await,
        }
    }
}

/// How an export ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Sent,
    /// The backend refused the data for good, or retries ran out: counted as failed.
    Failed,
    /// Retries ran out on a batch that is on disk: it stays there for the next start.
    Kept,
}

/// Exports one batch, retrying retryable failures with exponential backoff and jitter. A batch
/// on disk (`stopping` given) is never given up on for a backend that is down: it stays for
/// the next start instead, at once when shutdown begins.
async fn deliver(
    exporter: &dyn Exporter,
    request: &Request,
    points: usize,
    settings: &ExporterSettings,
    stats: &ComponentStats,
    stopping: Option<&tokio_util::sync::CancellationToken>,
) -> Outcome {
    let on_disk = stopping.is_some();
    let started = Instant::now();
    let mut backoff = settings.retry_on_failure.initial_interval;
    loop {
        let result = match tokio::time::timeout(settings.timeout, request.send(exporter)).await {
            Ok(r) => r,
            Err(_) => Err(ExportError::retryable(format!(
                "export timed out after {:?}",
                settings.timeout
            ))),
        };
        let error = match result {
            Ok(()) => {
                ComponentStats::add(&stats.sent, points);
                return Outcome::Sent;
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
        let keep = || {
            ComponentStats::add(&stats.persisted, points);
            Outcome::Kept
        };
        match wait {
            Some(wait) => {
                debug!(exporter = %stats.id, error = %error, ?wait, "export failed; retrying");
                match stopping {
                    Some(stop) if stop.is_cancelled() => return keep(),
                    Some(stop) => tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => return keep(),
                    },
                    None => tokio::time::sleep(wait).await,
                }
                backoff = (backoff * 2).min(settings.retry_on_failure.max_interval);
            }
            None if on_disk && matches!(error, ExportError::Retryable { .. }) => {
                warn!(exporter = %stats.id, error = %error, points, "export still failing after retry_on_failure.max_elapsed_time; the batch stays in the persistent queue for the next start");
                return keep();
            }
            None => {
                ComponentStats::add(&stats.failed, points);
                warn!(exporter = %stats.id, error = %error, points, "export failed; dropping the batch");
                return Outcome::Failed;
            }
        }
    }
}

/// The longest a backend's retry hint is honoured: past it the hint is a mistake, not advice.
const MAX_HINT: Duration = Duration::from_secs(300);

/// How long to wait before the next attempt, or `None` to give up.
pub(crate) fn retry_wait(
    retry: &RetrySettings,
    elapsed: Duration,
    backoff: Duration,
    hint: Option<Duration>,
) -> Option<Duration> {
    if !retry.enabled {
        return None;
    }
    let wait = hint.map_or_else(|| jitter(backoff), |h| h.min(MAX_HINT));
    let unlimited = retry.max_elapsed_time.is_zero();
    (unlimited || elapsed.saturating_add(wait) <= retry.max_elapsed_time).then_some(wait)
}

/// Spreads retries over ±20 % so many collectors do not retry in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * crate::random_fraction())
}

/// Logs what a previous run left in the persistent queue.
pub(crate) fn log_recovered(id: &str, dir: &std::path::Path, recovered: &[Stored]) {
    if recovered.is_empty() {
        return;
    }
    let points: u64 = recovered.iter().map(|s| s.points).sum();
    info!(exporter = %id, batches = recovered.len(), points, dir = %dir.display(), "persistent queue holds batches from a previous run; sending them first");
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // A hint of u64::MAX seconds neither overflows nor parks the exporter for years.
        assert_eq!(
            retry_wait(
                &forever,
                Duration::from_secs(10),
                r.initial_interval,
                Some(Duration::from_secs(u64::MAX))
            ),
            Some(MAX_HINT)
        );
    }
}
