use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use genai_collector::Builtin;
use genai_collector_core::config::duration;
use genai_collector_core::model::{
    kv, metric, now_unix_nanos, number_point, number_value, Metric, MetricExt,
};
use genai_collector_core::{
    async_trait, Batch, BuildContext, ComponentConfig, ComponentError, Components, ExportError,
    Exporter, ExporterFactory, Processor, ProcessorFactory, Receiver, ReceiverContext,
    ReceiverFactory,
};
use serde::Deserialize;

/// The built-in kinds plus the test kinds; `capture` exporters deliver into `capture`.
pub fn components(capture: &Capture) -> Components {
    Components::builtin()
        .with_receiver(GeneratorFactory)
        .with_processor(NoopFactory)
        .with_exporter(CaptureFactory(capture.clone()))
        .with_exporter(FailFactory)
        .with_exporter(FileFactory)
}

/// Emits `batches` batches (0: until shutdown) of `points` gauge points each; point values
/// count up from 0 so a test can tell which arrived.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorConfig {
    pub batches: u64,
    pub points: usize,
    /// Points per metric; a batch has `points / points_per_metric` metrics.
    pub points_per_metric: usize,
    /// Pause between batches; none means as fast as the pipeline takes them.
    #[serde(with = "duration::option")]
    pub interval: Option<Duration>,
    /// Where to write how many points were accepted, once the receiver stops.
    pub report: Option<PathBuf>,
    /// Push like an OTLP client (`Output::push`): each batch is retried until it is taken.
    pub push: bool,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            batches: 100,
            points: 1000,
            points_per_metric: 10,
            interval: None,
            report: None,
            push: false,
        }
    }
}

impl ComponentConfig for GeneratorConfig {}

pub struct GeneratorFactory;

impl ReceiverFactory for GeneratorFactory {
    type Config = GeneratorConfig;
    fn kind(&self) -> &'static str {
        "generator"
    }
    fn description(&self) -> &'static str {
        "test: emits numbered gauge points"
    }
    fn build(
        &self,
        config: GeneratorConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(Box::new(Generator(config)))
    }
}

struct Generator(GeneratorConfig);

/// One batch of `points` points numbered from `first`.
pub fn numbered_batch(first: u64, points: usize, points_per_metric: usize) -> Batch {
    let now = now_unix_nanos();
    let per = points_per_metric.max(1);
    let metrics = (0..points.div_ceil(per))
        .map(|m| {
            let pts = (m * per..((m + 1) * per).min(points))
                .map(|i| {
                    number_point(
                        now,
                        (first + i as u64) as f64,
                        vec![kv("series", (i % per) as i64)],
                    )
                })
                .collect();
            Metric::gauge(&format!("test_metric_{m}"), "1", pts)
        })
        .collect();
    Batch::with_resource(vec![kv("service.name", "generator")], metrics)
}

#[async_trait]
impl Receiver for Generator {
    async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError> {
        let c = &self.0;
        let mut sent = 0u64;
        let mut n = 0u64;
        while c.batches == 0 || n < c.batches {
            if ctx.shutdown.is_cancelled() {
                break;
            }
            let batch = numbered_batch(sent, c.points, c.points_per_metric);
            if c.push {
                // A client that retries what it is refused, as OTLP SDKs do.
                loop {
                    match PUSHING.scope((), ctx.output.push(batch.clone())).await {
                        Ok(()) => break,
                        Err(e) if e.is_retryable() && !ctx.shutdown.is_cancelled() => {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Err(_) => {
                            write_report(c, sent)?;
                            return Ok(());
                        }
                    }
                }
            } else {
                tokio::select! {
                    r = ctx.output.send(batch) => if r.is_err() { break },
                    () = ctx.shutdown.cancelled() => break,
                }
            }
            sent += c.points as u64;
            n += 1;
            if let Some(i) = c.interval {
                tokio::select! {
                    () = tokio::time::sleep(i) => {}
                    () = ctx.shutdown.cancelled() => break,
                }
            }
        }
        write_report(c, sent)?;
        Ok(())
    }
}

fn write_report(c: &GeneratorConfig, sent: u64) -> std::io::Result<()> {
    match &c.report {
        Some(path) => std::fs::write(path, sent.to_string()),
        None => Ok(()),
    }
}

tokio::task_local! {
    /// Set around each push of a pushing `generator`.
    static PUSHING: ();
}

/// Per `noop` `name`: batches it processed in a pushing receiver's task, and elsewhere.
static NOOP_SEEN: Mutex<BTreeMap<String, (usize, usize)>> = Mutex::new(BTreeMap::new());

/// How many batches the `noop` named `name` processed in a pushing `generator`'s own task, and
/// how many elsewhere (the pipeline's task).
pub fn noop_seen(name: &str) -> (usize, usize) {
    NOOP_SEEN
        .lock()
        .unwrap()
        .get(name)
        .copied()
        .unwrap_or_default()
}

pub struct NoopFactory;

/// `noop`: passes batches through, after `sleep` (a slow processor, for tests of what queues
/// up before it); with a `name`, counts where it ran ([`noop_seen`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoopConfig {
    #[serde(with = "duration::option")]
    pub sleep: Option<Duration>,
    pub name: Option<String>,
}

impl ComponentConfig for NoopConfig {}

impl ProcessorFactory for NoopFactory {
    type Config = NoopConfig;
    fn kind(&self) -> &'static str {
        "noop"
    }
    fn description(&self) -> &'static str {
        "test: passes batches through untouched, optionally after a sleep"
    }
    fn build(
        &self,
        config: &NoopConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        Ok(Box::new(Noop(config.clone())))
    }
}

struct Noop(NoopConfig);

impl Processor for Noop {
    fn process(&mut self, batch: &mut Batch) {
        if let Some(d) = self.0.sleep {
            std::thread::sleep(d);
        }
        if let Some(name) = &self.0.name {
            let mut seen = NOOP_SEEN.lock().unwrap();
            let (pushing, elsewhere) = seen.entry(name.clone()).or_default();
            match PUSHING.try_with(|_| ()) {
                Ok(()) => *pushing += 1,
                Err(_) => *elsewhere += 1,
            }
        }
        std::hint::black_box(batch);
    }
}

/// What `capture` exporters received, shared with the test.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<Arc<Batch>>>>, Arc<InFlight>);

/// Exports running now and the most ever at once.
#[derive(Default)]
struct InFlight {
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

impl Capture {
    pub fn new() -> Self {
        Self::default()
    }

    /// The most exports that ran at once.
    pub fn max_in_flight(&self) -> usize {
        self.1.max.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn batches(&self) -> Vec<Arc<Batch>> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn point_count(&self) -> usize {
        self.batches().iter().map(|b| b.point_count()).sum()
    }

    /// Every gauge value received, in arrival order.
    pub fn values(&self) -> Vec<f64> {
        self.batches()
            .iter()
            .flat_map(|b| gauge_values(b))
            .collect()
    }
}

/// The values of every gauge point in `batch`.
pub fn gauge_values(batch: &Batch) -> Vec<f64> {
    batch
        .metrics()
        .filter_map(|m| match &m.data {
            Some(metric::Data::Gauge(g)) => Some(g.data_points.iter().filter_map(number_value)),
            _ => None,
        })
        .flatten()
        .collect()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// Keep only counts, not batches (for benchmarks).
    pub count_only: bool,
    /// How long each export takes (a slow backend).
    #[serde(with = "duration::option")]
    pub delay: Option<Duration>,
}

impl ComponentConfig for CaptureConfig {}

pub struct CaptureFactory(pub Capture);

impl ExporterFactory for CaptureFactory {
    type Config = CaptureConfig;
    fn kind(&self) -> &'static str {
        "capture"
    }
    fn description(&self) -> &'static str {
        "test: keeps every batch for the test to inspect"
    }
    fn build(
        &self,
        config: CaptureConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        Ok(Box::new(CaptureExporter {
            capture: self.0.clone(),
            count_only: config.count_only,
            delay: config.delay,
            points: Default::default(),
        }))
    }
}

struct CaptureExporter {
    capture: Capture,
    count_only: bool,
    delay: Option<Duration>,
    points: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Exporter for CaptureExporter {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        if let Some(d) = self.delay {
            use std::sync::atomic::Ordering::Relaxed;
            let flight = &self.capture.1;
            let now = flight.now.fetch_add(1, Relaxed) + 1;
            flight.max.fetch_max(now, Relaxed);
            tokio::time::sleep(d).await;
            flight.now.fetch_sub(1, Relaxed);
        }
        if self.count_only {
            self.points
                .fetch_add(batch.point_count(), std::sync::atomic::Ordering::Relaxed);
        } else if let Ok(mut b) = self.capture.0.lock() {
            b.push(Arc::new(batch.clone()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Answers a retryable error (a backend that is down).
    #[default]
    Retryable,
    /// Answers a permanent error (a backend that rejects the data).
    Permanent,
    /// Never answers (a backend that hangs).
    Hang,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailConfig {
    pub mode: FailMode,
}

impl ComponentConfig for FailConfig {}

pub struct FailFactory;

impl ExporterFactory for FailFactory {
    type Config = FailConfig;
    fn kind(&self) -> &'static str {
        "fail"
    }
    fn description(&self) -> &'static str {
        "test: a backend that is down, rejects, or hangs"
    }
    fn build(
        &self,
        config: FailConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        Ok(Box::new(FailExporter(config.mode)))
    }
}

struct FailExporter(FailMode);

#[async_trait]
impl Exporter for FailExporter {
    async fn export(&self, _: &Batch) -> Result<(), ExportError> {
        match self.0 {
            FailMode::Retryable => Err(ExportError::retryable("connection refused (test)")),
            FailMode::Permanent => Err(ExportError::Permanent("400 bad request (test)".into())),
            FailMode::Hang => std::future::pending().await,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: PathBuf,
    /// Pause after each batch, to keep batches in flight.
    #[serde(default, with = "duration::option")]
    pub delay: Option<Duration>,
}

impl ComponentConfig for FileConfig {}

pub struct FileFactory;

impl ExporterFactory for FileFactory {
    type Config = FileConfig;
    fn kind(&self) -> &'static str {
        "file"
    }
    fn description(&self) -> &'static str {
        "test: appends each gauge value as a line to a file"
    }
    fn build(
        &self,
        config: FileConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)?;
        Ok(Box::new(FileExporter {
            file,
            delay: config.delay,
        }))
    }
}

struct FileExporter {
    file: std::fs::File,
    delay: Option<Duration>,
}

#[async_trait]
impl Exporter for FileExporter {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        let mut text = String::new();
        for v in gauge_values(batch) {
            text.push_str(&format!("{v}\n"));
        }
        (&self.file)
            .write_all(text.as_bytes())
            .map_err(|e| ExportError::Permanent(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_batches() {
        let b = numbered_batch(10, 25, 10);
        assert_eq!(b.point_count(), 25);
        assert_eq!(b.metrics().count(), 3);
        let values = gauge_values(&b);
        assert_eq!(values.first(), Some(&10.0));
        assert_eq!(values.last(), Some(&34.0));
        assert_eq!(b.metrics().next().map(MetricExt::kind_name), Some("gauge"));
    }
}
