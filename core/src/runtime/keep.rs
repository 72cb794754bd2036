//! What a config reload keeps running: each receiver, pipeline and exporter whose config is the
//! same in the new config, so that its schedule, connections, queue and state carry on.
//!
//! A pipeline is kept when its processors and exporters are the same, in the same order; an
//! exporter when its config and settings are the same and a pipeline of the new config lists
//! it; a receiver when its config is the same and a pipeline lists it. The running service
//! hands them over paused ([`super::RunningService::stop_for`]), the next one adopts them
//! ([`super::Service::start_with`]) and points the kept receivers at its pipelines.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::pipeline::ExporterQueue;
use crate::config::{Config, PipelineConfig};
use crate::delivery::{Output, PipelineInput};
use crate::id::ComponentId;
use crate::telemetry::{ComponentStats, Telemetry};

pub(crate) struct RunningReceiver {
    pub id: ComponentId,
    pub fingerprint: String,
    pub stats: Arc<ComponentStats>,
    pub output: Output,
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

pub(crate) struct RunningPipeline {
    pub name: String,
    pub fingerprint: String,
    pub input: PipelineInput,
    /// Its processors' stats.
    pub stats: Vec<Arc<ComponentStats>>,
    /// Cancelled to make it drain and end.
    pub inputs_done: CancellationToken,
    pub task: JoinHandle<()>,
}

pub(crate) struct RunningExporter {
    pub id: ComponentId,
    pub fingerprint: String,
    pub entry: ExporterQueue,
    /// Cancelled when it is to stop: batches on disk stop retrying and stay there.
    pub stopping: CancellationToken,
    pub task: JoinHandle<()>,
}

impl RunningReceiver {
    fn is(&self, id: &ComponentId, fingerprint: &str) -> bool {
        &self.id == id && self.fingerprint == fingerprint
    }
}

impl RunningExporter {
    fn is(&self, id: &ComponentId, fingerprint: &str) -> bool {
        &self.id == id && self.fingerprint == fingerprint
    }

    /// Whether `stats` are this exporter's, or of a queue it keeps of its own
    /// (`QueuedExporter`, registered under its id and a `/`).
    pub fn owns(&self, stats: &ComponentStats) -> bool {
        let id = self.id.to_string();
        stats.kind == crate::id::ComponentKind::Exporter
            && (stats.id == id
                || stats
                    .id
                    .strip_prefix(id.as_str())
                    .is_some_and(|rest| rest.starts_with('/')))
    }
}

/// The first of `list` that `is` picks, taken out.
fn take<T>(list: &mut Vec<T>, is: impl Fn(&T) -> bool) -> Option<T> {
    let i = list.iter().position(is)?;
    Some(list.swap_remove(i))
}

/// Stops the receivers, then lets the pipelines drain what they hold, then the exporters
/// flush their queues: each stage waits for the one before.
pub(crate) async fn stop_in_order(
    receivers: &mut [RunningReceiver],
    pipelines: &mut [RunningPipeline],
    exporters: &mut [RunningExporter],
) {
    for r in receivers.iter() {
        r.stop.cancel();
    }
    for r in receivers.iter_mut() {
        join(&mut r.task).await;
    }
    // Receivers have stopped; a copy of their output left in a stray task (a connection a
    // server did not close) must not keep the pipelines open.
    for p in pipelines.iter() {
        p.inputs_done.cancel();
    }
    for p in pipelines.iter_mut() {
        join(&mut p.task).await;
    }
    // Nothing more can be queued: consumers end once their queue is empty.
    for e in exporters.iter() {
        e.stopping.cancel();
        e.entry.queue.close();
    }
    for e in exporters.iter_mut() {
        join(&mut e.task).await;
    }
}

/// Waits for a task to end; at once if it has (a handle must not be polled again).
pub(crate) async fn join(task: &mut JoinHandle<()>) {
    if !task.is_finished() {
        let _ = task.await;
    }
}

/// The canonical text of pipeline `name` of `config`: its processors' and exporters' ids and
/// configs in order. Equal text, equal pipeline.
pub(crate) fn pipeline_fingerprint(name: &str, p: &PipelineConfig, config: &Config) -> String {
    let mut out = format!("{name}|");
    for id in &p.processors {
        let fp = config.processors.get(id).map_or("", |e| &e.fingerprint);
        out.push_str(&format!("{id}={fp};"));
    }
    out.push('|');
    for id in &p.exporters {
        let fp = config.exporters.get(id).map_or("", |(e, _)| &e.fingerprint);
        out.push_str(&format!("{id}={fp};"));
    }
    out
}

/// Components a reload keeps running, paused until the next service adopts them. Those it
/// does not adopt are stopped with [`Kept::stop`].
#[derive(Default)]
pub struct Kept {
    /// The registry they report to, which the next service goes on with.
    pub(crate) telemetry: Option<Telemetry>,
    pub(crate) receivers: Vec<RunningReceiver>,
    pub(crate) pipelines: Vec<RunningPipeline>,
    pub(crate) exporters: Vec<RunningExporter>,
}

impl Kept {
    /// How many components it holds.
    pub fn len(&self) -> usize {
        self.receivers.len() + self.pipelines.len() + self.exporters.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn receiver(&self, id: &ComponentId, fingerprint: &str) -> Option<&RunningReceiver> {
        self.receivers.iter().find(|r| r.is(id, fingerprint))
    }

    pub(crate) fn take_receiver(
        &mut self,
        id: &ComponentId,
        fingerprint: &str,
    ) -> Option<RunningReceiver> {
        take(&mut self.receivers, |r| r.is(id, fingerprint))
    }

    pub(crate) fn pipeline(&self, fingerprint: &str) -> Option<&RunningPipeline> {
        self.pipelines.iter().find(|p| p.fingerprint == fingerprint)
    }

    pub(crate) fn take_pipeline(&mut self, fingerprint: &str) -> Option<RunningPipeline> {
        take(&mut self.pipelines, |p| p.fingerprint == fingerprint)
    }

    pub(crate) fn exporter(&self, id: &ComponentId, fingerprint: &str) -> Option<&RunningExporter> {
        self.exporters.iter().find(|e| e.is(id, fingerprint))
    }

    pub(crate) fn take_exporter(
        &mut self,
        id: &ComponentId,
        fingerprint: &str,
    ) -> Option<RunningExporter> {
        take(&mut self.exporters, |e| e.is(id, fingerprint))
    }

    /// Whether `stats` are a held component's (an exporter's own queues included).
    pub(crate) fn holds(&self, stats: &ComponentStats) -> bool {
        self.receivers
            .iter()
            .any(|r| std::ptr::eq(&*r.stats, stats))
            || self
                .pipelines
                .iter()
                .flat_map(|p| &p.stats)
                .any(|p| std::ptr::eq(&**p, stats))
            || self.exporters.iter().any(|e| e.owns(stats))
    }

    /// Stops every component still held, receivers first, exporters last, and takes them out
    /// of the self-metrics.
    pub async fn stop(mut self) {
        stop_in_order(
            &mut self.receivers,
            &mut self.pipelines,
            &mut self.exporters,
        )
        .await;
        if let Some(t) = &self.telemetry {
            t.retain(|s| !self.holds(s));
        }
    }
}
