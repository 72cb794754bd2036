//! Component traits and their factories. A factory names a kind (`vllm`), owns a config type
//! (serde, `deny_unknown_fields`, defaults, [`ComponentConfig::validate`]) and builds the
//! component; [`crate::registry::Components`] holds the known kinds and the service wires them.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::delivery::Output;
use crate::model::Batch;
use crate::telemetry::Telemetry;

pub use crate::id::{ComponentId, ComponentKind};

/// Why a component could not be built or stopped running.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// The config cannot work (a bad address, a missing driver with `required: true`).
    #[error("{0}")]
    Config(String),
    /// A socket, file or listener failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else, with its source.
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}

/// Why an export failed; decides whether the batch is tried again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExportError {
    /// The backend may accept the batch later (down, overloaded, timed out).
    #[error("{message}")]
    Retryable {
        /// What went wrong, for the log and `/healthz`.
        message: String,
        /// The backend's own hint (`Retry-After`, gRPC `RetryInfo`).
        retry_after: Option<Duration>,
    },
    /// The backend will never accept this batch (bad request): it is dropped and counted.
    #[error("{0}")]
    Permanent(String),
}

impl ExportError {
    /// A retryable error without a hint from the backend.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A config field that fails a check beyond its type; `field` lets the error point at its line.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationError {
    /// The field at fault, relative to the component's node (`interval`, `tls.cert_file`).
    pub field: Option<String>,
    /// What is wrong with it and, where it helps, what would do.
    pub message: String,
}

impl ValidationError {
    /// An error about the component's config as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            field: None,
            message: message.into(),
        }
    }

    /// An error about one field: the message points at that field's line and column.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// A component's config: deserialized from its YAML node, then validated.
pub trait ComponentConfig: DeserializeOwned + Send + 'static {
    /// Checks beyond the types (ranges, combinations); runs on `validate` and before a start.
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

/// The config of a component that takes no settings; `kind: {}` or `kind:`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

impl ComponentConfig for NoConfig {}

/// What a factory knows when it builds a component.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The instance being built (`vllm/chat`).
    pub id: ComponentId,
    /// The pipeline a processor is built for; each pipeline gets its own processor instance.
    pub pipeline: Option<String>,
    /// The collector's own counters, for components that report on the collector itself.
    pub telemetry: Telemetry,
}

/// What a running receiver is handed.
pub struct ReceiverContext {
    /// The receiver's instance id, for logs and `service.name`.
    pub id: ComponentId,
    /// Where batches go: every pipeline that lists this receiver.
    pub output: Output,
    /// Cancelled when the collector shuts down; the receiver returns soon after.
    pub shutdown: CancellationToken,
}

/// Pulls or accepts samples and pushes batches until shutdown. A receiver that asks something
/// on an interval is simpler written with [`crate::poll`]; one that listens runs its own loop:
///
/// ```
/// use genai_collector_core::model::{now_unix_nanos, number_point, Metric, MetricExt};
/// use genai_collector_core::{async_trait, Batch, ComponentError, Receiver, ReceiverContext};
///
/// /// Sends one heartbeat gauge a second until shutdown.
/// struct Heartbeat;
///
/// #[async_trait]
/// impl Receiver for Heartbeat {
///     async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError> {
///         loop {
///             tokio::select! {
///                 () = ctx.shutdown.cancelled() => return Ok(()),
///                 () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
///             }
///             let point = number_point(now_unix_nanos(), 1.0, vec![]);
///             let batch = Batch::with_resource(vec![], vec![Metric::gauge("heartbeat", "", vec![point])]);
///             // Waits while the pipelines are full; an error means none takes batches any more.
///             if ctx.output.send(batch).await.is_err() {
///                 return Ok(());
///             }
///         }
///     }
/// }
/// ```
#[async_trait]
pub trait Receiver: Send {
    /// Runs until `ctx.shutdown` is cancelled (then returns `Ok`) or the receiver cannot go
    /// on (an `Err` marks it failed on `/healthz`; the rest of the collector keeps running).
    async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError>;
}

/// Transforms batches in place: synchronous and CPU-only. A processor takes one batch at a
/// time, in the pipeline's task or, for a push through a pipeline none of whose processors has a
/// [`Processor::flush_interval`], in the pushing receiver's task.
///
/// ```
/// use genai_collector_core::model::{number_point, Metric, MetricExt};
/// use genai_collector_core::{Batch, Processor};
///
/// /// Milliseconds to seconds, for a server that reports its latency in ms.
/// struct MsToSeconds;
///
/// impl Processor for MsToSeconds {
///     fn process(&mut self, batch: &mut Batch) {
///         for m in batch.metrics_mut().filter(|m| m.unit == "ms") {
///             m.scale(0.001);
///             m.unit = "s".into();
///         }
///     }
/// }
///
/// let mut batch = Batch::with_resource(
///     vec![],
///     vec![Metric::gauge("latency", "ms", vec![number_point(1, 250.0, vec![])])],
/// );
/// MsToSeconds.process(&mut batch);
/// let m = batch.metrics().next().unwrap();
/// assert_eq!(m.unit, "s");
/// ```
pub trait Processor: Send {
    /// Transforms `batch`; leaving it empty stops it here (dropped, or held for a later flush).
    fn process(&mut self, batch: &mut Batch);

    /// How often [`Processor::flush`] is called, for processors that emit on a timer.
    fn flush_interval(&self) -> Option<Duration> {
        None
    }

    /// Emits what the processor holds; called on its timer and once at shutdown. The batch
    /// continues with the processors after this one.
    fn flush(&mut self) -> Option<Batch> {
        None
    }

    /// Whether [`Processor::flush`] may also run as soon as no more input is waiting while a
    /// pushing client waits for an answer on what the processor holds. Right for a processor
    /// that only gathers (`batch`): a client that sends its next request only once answered
    /// would otherwise wait out the timer on every request. Wrong for one whose flush emits
    /// what an interval gathered (`pool_aggregate`): the default.
    fn flush_when_idle(&self) -> bool {
        false
    }
}

/// Sends batches to a backend. The runtime owns queueing, retries and timeouts, and calls
/// `export` from `sending_queue.num_consumers` tasks at once: keep per-request state local.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use genai_collector_core::model::MetricExt;
/// use genai_collector_core::{async_trait, Batch, ExportError, Exporter};
///
/// /// Counts points; a real one sends them and maps the backend's answer to an `ExportError`.
/// #[derive(Default)]
/// struct Counter(AtomicU64);
///
/// #[async_trait]
/// impl Exporter for Counter {
///     async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
///         let points: usize = batch.metrics().map(|m| m.point_count()).sum();
///         self.0.fetch_add(points as u64, Ordering::Relaxed);
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Exporter: Send + Sync {
    /// Sends one batch; the error decides between a retry and a drop.
    async fn export(&self, batch: &Batch) -> Result<(), ExportError>;

    /// The request `batch` becomes, for an exporter that sends bytes built from the batch
    /// alone (OTLP). The runtime builds it once, as the batch is queued (in the pipeline's
    /// task, usually on the core that decoded the batch, so it is freed where its memory is
    /// warm), queues the request instead of the batch, and sends the same bytes on every
    /// attempt with [`Exporter::export_encoded`]. Keep it cheap: compression belongs in
    /// `export_encoded`, which the exporter's consumers run in parallel. `None`, the default:
    /// every attempt is [`Exporter::export`]. A persistent queue stores batches; their
    /// requests are built as they are taken from it.
    fn encode(&self, batch: &Batch) -> Option<Bytes> {
        let _ = batch;
        None
    }

    /// Sends a request [`Exporter::encode`] built.
    async fn export_encoded(&self, request: Bytes) -> Result<(), ExportError> {
        let _ = request;
        Err(ExportError::Permanent(
            "this exporter sends batches, not encoded requests".into(),
        ))
    }

    /// Flushes anything buffered; called once after the last batch.
    async fn shutdown(&self) -> Result<(), ExportError> {
        Ok(())
    }
}

/// Builds receivers of one kind.
pub trait ReceiverFactory: Send + Sync + 'static {
    /// The receiver's config, as its YAML node deserializes.
    type Config: ComponentConfig;
    /// The name the config uses (`vllm` in `receivers: { vllm: ... }`).
    fn kind(&self) -> &'static str;
    /// One line for `genai-collector components`.
    fn description(&self) -> &'static str;
    /// A receiver for one instance; errors here stop the start with the instance named.
    fn build(
        &self,
        config: Self::Config,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError>;
}

/// Builds processors of one kind.
pub trait ProcessorFactory: Send + Sync + 'static {
    /// The processor's config, as its YAML node deserializes.
    type Config: ComponentConfig;
    /// The name the config uses.
    fn kind(&self) -> &'static str;
    /// One line for `genai-collector components`.
    fn description(&self) -> &'static str;
    /// A processor for one pipeline: each pipeline that lists it gets its own.
    fn build(
        &self,
        config: &Self::Config,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError>;
}

/// Builds exporters of one kind.
pub trait ExporterFactory: Send + Sync + 'static {
    /// The exporter's own config; `sending_queue`, `retry_on_failure` and `timeout` are the
    /// runtime's and taken out of the node before it reaches this type.
    type Config: ComponentConfig;
    /// The name the config uses.
    fn kind(&self) -> &'static str;
    /// One line for `genai-collector components`.
    fn description(&self) -> &'static str;
    /// An exporter for one instance, shared by all pipelines that list it.
    fn build(
        &self,
        config: Self::Config,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError>;

    /// What the runtime calls: [`ExporterFactory::build`], also told the instance's
    /// `sending_queue`, `retry_on_failure` and `timeout`, for an exporter that keeps queues of
    /// its own ([`crate::runtime::QueuedExporter`]) and gives them the same settings.
    fn build_with_settings(
        &self,
        config: Self::Config,
        ctx: &BuildContext,
        settings: &crate::config::exporter::ExporterSettings,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        let _ = settings;
        self.build(config, ctx)
    }
}

/// An error and its causes, joined with `: ` (HTTP and gRPC clients keep the useful part, such
/// as "connection refused", in a source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
