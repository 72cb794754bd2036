//! [`Output`]: where a receiver's batches enter the pipelines, and the delivery contract.
//!
//! A push receiver calls [`Output::push`], which answers only once every pipeline has run the
//! batch through its processors and every exporter has taken it into its queue (or the
//! pipeline dropped it by its own rule, a filter); a full queue or the memory limit makes it
//! refuse the whole batch, so the client's retry loses nothing. A pull receiver calls
//! [`Output::send`], which waits for room in the pipelines and leaves the exporters to drop
//! what their full queues cannot take: its source is read again next interval.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::memory::{MemoryLimiter, Reserved, TooMuch};
use crate::model::Batch;
use crate::telemetry::ComponentStats;
use queue::SendQueue;

pub(crate) mod queue;

/// Counts events and says when to log them: at most once a minute, with the count since.
#[derive(Debug, Default)]
pub(crate) struct LogEvery {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogEvery {
    const INTERVAL: Duration = Duration::from_secs(60);

    /// Adds `n`; returns the count to log when a line is due.
    pub fn hit(&self, n: u64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += n;
        if s.0.is_some_and(|t| t.elapsed() < Self::INTERVAL) {
            return None;
        }
        s.0 = Some(Instant::now());
        Some(std::mem::take(&mut s.1))
    }
}

/// Why a batch was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// A pipeline's channel or an exporter's queue has no room: try later.
    #[error("the collector's queues are full")]
    Full,
    /// The process is above its memory limit: try later.
    #[error("the collector is above its memory limit")]
    MemoryLimit,
    /// The batch alone is more than the memory limit allows: never taken.
    #[error("the request would decode to more memory than the collector's limit allows")]
    TooLarge,
    /// The collector is shutting down: stop sending.
    #[error("the collector is shutting down")]
    Closed,
    /// A processor panicked on this batch, which is lost (and counted).
    #[error("a processor failed on this batch")]
    Dropped,
}

impl SendError {
    /// Whether the client should send the same data again later.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Full | Self::MemoryLimit | Self::Closed)
    }
}

pub(crate) type Ack = oneshot::Sender<Result<(), SendError>>;

/// A batch on its way into a pipeline; push receivers wait on `ack`.
pub(crate) struct Envelope {
    pub batch: Batch,
    pub ack: Option<Ack>,
}

/// One pipeline as a receiver sees it: its input and the queues it ends in.
#[derive(Clone)]
pub(crate) struct PipelineInput {
    pub tx: mpsc::Sender<Envelope>,
    pub exporters: Arc<[Arc<SendQueue>]>,
    /// Where a push runs the pipeline in its own task rather than the pipeline's.
    pub direct: Option<Arc<dyn Direct>>,
}

/// A pipeline that a push runs in the pushing task: its processors, then its exporters' queues.
#[async_trait::async_trait]
pub(crate) trait Direct: Send + Sync {
    /// Answers as [`Output::push`] does for this pipeline; gives the batch back when the
    /// pipeline is busy, for its task to take.
    async fn push(&self, batch: Batch) -> Result<Result<(), SendError>, Batch>;
}

/// Where a receiver sends its batches: every pipeline that lists it.
#[derive(Clone)]
pub struct Output {
    route: Arc<Switch>,
    stats: Arc<ComponentStats>,
    skip_log: Arc<LogEvery>,
}

/// The pipelines a receiver feeds and the memory limit they run under.
pub(crate) struct Route {
    pub pipelines: Arc<[PipelineInput]>,
    pub limiter: Option<Arc<MemoryLimiter>>,
}

/// A receiver's route, which a config reload that keeps the receiver running points at the new
/// pipelines. Between the old pipelines' drain and the new ones' start it is paused: pulled
/// data waits, pushed data is refused (the client retries).
#[derive(Default)]
pub(crate) struct Switch {
    route: std::sync::RwLock<Option<Arc<Route>>>,
    changed: tokio::sync::Notify,
}

impl Switch {
    /// Points the receiver at `route`; `None` pauses it.
    pub fn set(&self, route: Option<Arc<Route>>) {
        *self.route.write().unwrap_or_else(|p| p.into_inner()) = route;
        self.changed.notify_waiters();
    }

    pub fn get(&self) -> Option<Arc<Route>> {
        self.route.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The route, waiting while paused.
    async fn wait(&self) -> Arc<Route> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(r) = self.get() {
                return r;
            }
            changed.await;
        }
    }
}

/// The receiving end of [`Output::capture`], for tests of a receiver alone.
pub struct Captured(mpsc::Receiver<Envelope>);

impl Captured {
    /// The next batch, acknowledged as taken.
    pub async fn recv(&mut self) -> Option<Batch> {
        let e = self.0.recv().await?;
        if let Some(ack) = e.ack {
            let _ = ack.send(Ok(()));
        }
        Some(e.batch)
    }

    /// A batch if one is waiting now.
    pub fn try_recv(&mut self) -> Option<Batch> {
        let e = self.0.try_recv().ok()?;
        if let Some(ack) = e.ack {
            let _ = ack.send(Ok(()));
        }
        Some(e.batch)
    }
}

impl Output {
    pub(crate) fn new(
        pipelines: Vec<PipelineInput>,
        stats: Arc<ComponentStats>,
        limiter: Option<Arc<MemoryLimiter>>,
    ) -> Self {
        let route = Switch::default();
        route.set(Some(Arc::new(Route {
            pipelines: pipelines.into(),
            limiter,
        })));
        Self {
            route: Arc::new(route),
            stats,
            skip_log: Arc::new(LogEvery::default()),
        }
    }

    /// Its route, for a reload to point elsewhere.
    pub(crate) fn switch(&self) -> &Arc<Switch> {
        &self.route
    }

    /// An output into one channel of `capacity` batches, for testing a receiver alone.
    pub fn capture(capacity: usize, stats: Arc<ComponentStats>) -> (Self, Captured) {
        let (tx, rx) = mpsc::channel(capacity);
        let input = PipelineInput {
            tx,
            exporters: Arc::new([]),
            direct: None,
        };
        (Self::new(vec![input], stats, None), Captured(rx))
    }

    /// Whether a push could be taken now: under the memory limit, room in every pipeline and
    /// in every exporter queue they end in. Push receivers ask before decoding a request.
    pub fn ready(&self) -> Result<(), SendError> {
        let route = self.route.get().ok_or(SendError::Full)?;
        if route.limiter.as_ref().is_some_and(|l| !l.admits()) {
            return Err(SendError::MemoryLimit);
        }
        for p in route.pipelines.iter() {
            if p.tx.is_closed() {
                return Err(SendError::Closed);
            }
            if p.tx.capacity() == 0 || p.exporters.iter().any(|q| q.is_full()) {
                return Err(SendError::Full);
            }
        }
        Ok(())
    }

    /// Reserves the memory a request will take once decoded, until the returned guard is
    /// dropped (after the request is answered).
    pub fn reserve_memory(&self, bytes: u64) -> Result<Option<Reserved>, SendError> {
        let route = self.route.get().ok_or(SendError::Full)?;
        match &route.limiter {
            None => Ok(None),
            Some(l) => l.reserve(bytes).map(Some).map_err(|e| match e {
                TooMuch::Never => SendError::TooLarge,
                TooMuch::NotNow => SendError::MemoryLimit,
            }),
        }
    }

    /// Counts `points` the receiver refused without trying to send them.
    pub fn refused(&self, points: usize, why: SendError) {
        let counter = match why {
            SendError::MemoryLimit | SendError::TooLarge => {
                if let Some(l) = self.route.get().and_then(|r| r.limiter.clone()) {
                    ComponentStats::add(&l.refused_points, points);
                }
                &self.stats.memory_refused
            }
            _ => &self.stats.refused,
        };
        ComponentStats::add(counter, points);
    }

    /// Sends `batch` to every pipeline and waits until each has queued it in every exporter
    /// (see the module doc). `Ok` means nothing more can be lost short of a crash (or, for
    /// in-memory queues, a backend that stays down past the retry limit).
    pub async fn push(&self, batch: Batch) -> Result<(), SendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let points = batch.point_count();
        let result = self.push_counted(batch).await;
        match result {
            Ok(()) => ComponentStats::add(&self.stats.accepted, points),
            Err(e) => self.refused(points, e),
        }
        result
    }

    async fn push_counted(&self, batch: Batch) -> Result<(), SendError> {
        let route = self.route.get().ok_or(SendError::Full)?;
        if route.limiter.as_ref().is_some_and(|l| !l.admits()) {
            return Err(SendError::MemoryLimit);
        }
        let full = |e| match e {
            mpsc::error::TrySendError::Full(()) => SendError::Full,
            mpsc::error::TrySendError::Closed(()) => SendError::Closed,
        };
        // Room in the input of every pipeline a push goes through, before any is sent to.
        let permits = route
            .pipelines
            .iter()
            .map(|p| p.direct.is_none().then(|| p.tx.try_reserve()).transpose())
            .collect::<Result<Vec<_>, _>>()
            .map_err(full)?;
        let mut answers = Vec::with_capacity(permits.len());
        let mut direct = Vec::new();
        let mut batch = Some(batch);
        let last = permits.len() - 1;
        let send = |permit: mpsc::Permit<'_, Envelope>, batch| {
            let (ack, answer) = oneshot::channel();
            permit.send(Envelope {
                batch,
                ack: Some(ack),
            });
            answer
        };
        for (i, (p, permit)) in route.pipelines.iter().zip(permits).enumerate() {
            let b = if i == last {
                batch.take().unwrap_or_default()
            } else {
                batch.clone().unwrap_or_default()
            };
            match (permit, &p.direct) {
                (Some(permit), _) => answers.push(send(permit, b)),
                (None, Some(d)) => direct.push((p, d, b)),
                (None, None) => {}
            }
        }
        let mut result = Ok(());
        for (p, d, b) in direct {
            let r = match d.push(b).await {
                Ok(r) => r,
                Err(b) => match p.tx.try_reserve() {
                    Ok(permit) => {
                        answers.push(send(permit, b));
                        continue;
                    }
                    Err(e) => Err(full(e)),
                },
            };
            if result.is_ok() {
                result = r;
            }
        }
        for answer in answers {
            let r = answer.await.unwrap_or(Err(SendError::Closed));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Sends `batch` to every pipeline, waiting while a pipeline is full; for pull receivers.
    /// Above the memory limit the batch is dropped and counted.
    pub async fn send(&self, batch: Batch) -> Result<(), SendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let points = batch.point_count();
        let route = self.route.wait().await;
        if route.limiter.as_ref().is_some_and(|l| !l.admits()) {
            self.refused(points, SendError::MemoryLimit);
            return Err(SendError::MemoryLimit);
        }
        let Some((last, rest)) = route.pipelines.split_last() else {
            return Ok(());
        };
        for p in rest {
            let e = Envelope {
                batch: batch.clone(),
                ack: None,
            };
            p.tx.send(e).await.map_err(|_| SendError::Closed)?;
        }
        let e = Envelope { batch, ack: None };
        last.tx.send(e).await.map_err(|_| SendError::Closed)?;
        ComponentStats::add(&self.stats.accepted, points);
        Ok(())
    }

    /// Whether a pull receiver should read its sources this round: `false` above the memory
    /// limit, counted as a skipped round and logged at most once a minute.
    pub fn admit_round(&self) -> bool {
        let Some(route) = self.route.get() else {
            return true;
        };
        let Some(l) = &route.limiter else { return true };
        if l.admits() {
            return true;
        }
        ComponentStats::add(&self.stats.skipped_rounds, 1);
        l.skipped_rounds.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.skip_log.hit(1) {
            tracing::warn!(receiver = %self.stats.id, rounds = n, usage_mib = l.usage() >> 20, soft_limit_mib = l.soft_limit() >> 20, "above the memory limit: skipping scrapes");
        }
        false
    }

    /// Records a problem the receiver hit but survived (a target down): `/healthz` shows the
    /// latest as the receiver's `last_error`, without marking it failed.
    pub fn report_error(&self, error: impl Into<String>) {
        self.stats.set_error(error);
    }

    /// How many targets a pull receiver scrapes now (`genai_collector_receiver_targets`).
    pub fn set_targets(&self, n: usize) {
        self.stats.targets.store(n as u64, Ordering::Relaxed);
    }
}
