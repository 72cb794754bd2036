//! [`QueuedExporter`]: an exporter behind a sending queue, consumers, retries and (with
//! `storage`) a persistent queue of its own, run exactly as the runtime runs each configured
//! exporter. For an exporter that sends to several destinations and must not let a slow one
//! hold up the others: `loadbalancing` keeps one per backend.

use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::exporter::run_exporter;
use super::exporter_queue;
use super::pipeline::ExporterQueue;
use crate::component::{ComponentError, Exporter};
use crate::config::ExporterSettings;
use crate::delivery::queue::{Cost, Reservation};
use crate::id::ComponentKind;
use crate::model::Batch;
use crate::telemetry::Telemetry;

/// See the module doc. Its counters are an exporter's, under the id it was started with.
pub struct QueuedExporter {
    entry: ExporterQueue,
    telemetry: Telemetry,
    stopping: CancellationToken,
    task: Mutex<Option<JoinHandle<Result<(), ComponentError>>>>,
}

/// Room reserved in a [`QueuedExporter`]'s queue for one batch; given back if dropped unused.
pub struct Room<'a> {
    entry: &'a ExporterQueue,
    reservation: Reservation<'a>,
    cost: Cost,
}

impl QueuedExporter {
    /// Starts `exporter`'s consumers. With `settings.sending_queue.storage`, its persistent
    /// queue is the directory of `id` there, and what a previous run left in it is sent first.
    pub fn start(
        id: &str,
        exporter: Box<dyn Exporter>,
        settings: &ExporterSettings,
        telemetry: &Telemetry,
    ) -> Result<Self, ComponentError> {
        let stats = telemetry.register(ComponentKind::Exporter, id, None);
        let (entry, task) = match exporter_queue(exporter, settings, stats.clone()) {
            Ok(q) => q,
            Err(e) => {
                telemetry.unregister(&stats);
                return Err(ComponentError::Config(e));
            }
        };
        let stopping = task.stopping.clone();
        let task = tokio::spawn(run_exporter(task));
        Ok(Self {
            entry,
            telemetry: telemetry.clone(),
            stopping,
            task: Mutex::new(Some(task)),
        })
    }

    /// Waits for room for `batch`; `None` once stopped.
    pub async fn reserve(&self, batch: &Batch) -> Option<Room<'_>> {
        let cost = Cost::of(batch);
        let reservation = self
            .entry
            .queue
            .reserve(cost.size(self.entry.queue.sizer))
            .await?;
        Some(Room {
            entry: &self.entry,
            reservation,
            cost,
        })
    }

    /// The ids below `parent` (`parent/...`) whose persistent queues an earlier run left under
    /// `root`, for an exporter to start them again (and send on what they hold).
    pub fn left_below(root: &std::path::Path, parent: &str) -> Vec<String> {
        crate::disk_queue::ids_below(root, parent)
    }

    /// Takes nothing more and waits until what it holds is sent, given up on, or (in the
    /// persistent queue, when a send fails) kept on disk for the next start.
    pub async fn stop(&self) {
        self.stopping.cancel();
        self.entry.queue.close();
        self.join().await;
    }

    /// Stops taking batches if nothing is queued or reserved, at once, so that no batch can
    /// slip in between; whether it did. [`QueuedExporter::retire`] then finishes the job.
    pub fn close_if_idle(&self) -> bool {
        self.entry.queue.close_if_idle()
    }

    /// For a destination that left for good, once closed: waits for the batches in flight,
    /// leaves the self-metrics and removes its persistent queue's directory if nothing was
    /// kept there.
    pub async fn retire(&self) {
        self.entry.queue.close();
        self.join().await;
        self.telemetry.unregister(&self.entry.stats);
        if let Some(disk) = &self.entry.disk {
            if disk.bytes() == 0 {
                let _ = std::fs::remove_dir_all(disk.dir());
            }
        }
    }

    async fn join(&self) {
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Room<'_> {
    /// Queues `batch` (on disk first with a persistent queue), in the room reserved for it.
    pub async fn commit(self, batch: Arc<Batch>) {
        self.entry
            .enqueue(self.reservation, &batch, self.cost)
            .await;
    }
}
