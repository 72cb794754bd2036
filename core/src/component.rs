//! Component traits, their factories and the registry of known kinds.
//!
//! A factory names a kind (`vllm`), owns a config type (serde, `deny_unknown_fields`, defaults,
//! [`ComponentConfig::validate`]) and builds the component. The service only wires factories.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::node::{DeError, Node};
use crate::model::Batch;
use crate::runtime::Output;
use crate::telemetry::Telemetry;

/// Receiver, processor or exporter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentKind {
    /// Pulls or accepts samples.
    Receiver,
    /// Transforms batches within a pipeline.
    Processor,
    /// Sends batches out.
    Exporter,
}

impl ComponentKind {
    /// `receiver`, `processor` or `exporter`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Receiver => "receiver",
            Self::Processor => "processor",
            Self::Exporter => "exporter",
        }
    }

    /// The config section that holds components of this kind.
    pub fn section(self) -> &'static str {
        match self {
            Self::Receiver => "receivers",
            Self::Processor => "processors",
            Self::Exporter => "exporters",
        }
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A component instance's name in config: `kind` or `kind/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComponentId {
    kind: String,
    name: Option<String>,
}

impl ComponentId {
    /// Parses `kind` or `kind/name`; the kind is lowercase letters, digits and `_`.
    pub fn parse(id: &str) -> Result<Self, String> {
        let (kind, name) = match id.split_once('/') {
            Some((k, n)) => (k, Some(n)),
            None => (id, None),
        };
        let kind_ok = !kind.is_empty()
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !kind_ok {
            return Err(format!(
                "`{id}` is not a valid component id: expected `kind` or `kind/name`, where kind is lowercase letters, digits and `_`"
            ));
        }
        if name.is_some_and(|n| n.is_empty() || n.contains(char::is_whitespace)) {
            return Err(format!(
                "`{id}` is not a valid component id: the name after `/` must be non-empty and have no spaces"
            ));
        }
        Ok(Self {
            kind: kind.to_owned(),
            name: name.map(str::to_owned),
        })
    }

    /// The part before the `/`: the registered kind (`vllm`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The part after the `/`, which tells instances of one kind apart (`chat`).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

impl fmt::Display for ComponentId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{}/{}", self.kind, n),
            None => f.write_str(&self.kind),
        }
    }
}

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

/// Transforms batches in place: synchronous and CPU-only.
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
}

/// Sends batches to a backend. The runtime owns queueing, retries and timeouts, and calls
/// `export` from `sending_queue.num_consumers` tasks at once: keep per-request state local.
#[async_trait]
pub trait Exporter: Send + Sync {
    /// Sends one batch; the error decides between a retry and a drop.
    async fn export(&self, batch: &Batch) -> Result<(), ExportError>;

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
}

/// A parsed, validated config whose concrete type only its factory knows.
pub(crate) type AnyConfig = Box<dyn Any + Send>;

/// What the registry keeps of a factory: its config type erased behind `parse`.
pub(crate) trait DynFactory<T: ?Sized>: Send + Sync {
    fn kind(&self) -> &'static str;
    fn description(&self) -> &'static str;
    fn parse(&self, node: &Node) -> Result<AnyConfig, DeError>;
    fn build(&self, config: &mut AnyConfig, ctx: &BuildContext) -> Result<Box<T>, ComponentError>;
}

fn parse_config<C: ComponentConfig>(node: &Node) -> Result<AnyConfig, DeError> {
    let config: C = node.deserialize()?;
    config.validate().map_err(|e| {
        let pos = e
            .field
            .as_deref()
            .and_then(|f| node.key_node(f))
            .map_or(node.pos, |k| k.pos);
        let message = match e.field {
            Some(f) => format!("`{f}`: {}", e.message),
            None => e.message,
        };
        DeError::at(message, pos)
    })?;
    Ok(Box::new(Some(config)))
}

// Receivers and exporters are built once and take their config by value; processors are
// built once per pipeline and borrow it.
fn take_config<C: 'static>(config: &mut AnyConfig) -> Result<C, ComponentError> {
    config
        .downcast_mut::<Option<C>>()
        .and_then(Option::take)
        .ok_or_else(|| ComponentError::Config("config already consumed".into()))
}

struct Erased<F>(F);

impl<F: ReceiverFactory> DynFactory<dyn Receiver> for Erased<F> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn parse(&self, node: &Node) -> Result<AnyConfig, DeError> {
        parse_config::<F::Config>(node)
    }
    fn build(
        &self,
        config: &mut AnyConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        self.0.build(take_config(config)?, ctx)
    }
}

impl<F: ProcessorFactory> DynFactory<dyn Processor> for Erased<F> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn parse(&self, node: &Node) -> Result<AnyConfig, DeError> {
        parse_config::<F::Config>(node)
    }
    fn build(
        &self,
        config: &mut AnyConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        let config = config
            .downcast_ref::<Option<F::Config>>()
            .and_then(Option::as_ref)
            .ok_or_else(|| ComponentError::Config("config of the wrong type".into()))?;
        self.0.build(config, ctx)
    }
}

impl<F: ExporterFactory> DynFactory<dyn Exporter> for Erased<F> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn parse(&self, node: &Node) -> Result<AnyConfig, DeError> {
        parse_config::<F::Config>(node)
    }
    fn build(
        &self,
        config: &mut AnyConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        self.0.build(take_config(config)?, ctx)
    }
}

type Registry<T> = BTreeMap<&'static str, Arc<dyn DynFactory<T>>>;

/// The component kinds a collector binary knows. The binary's `builtin()` fills it; a custom
/// build adds its own with `with_receiver` and friends.
#[derive(Clone, Default)]
pub struct Components {
    pub(crate) receivers: Registry<dyn Receiver>,
    pub(crate) processors: Registry<dyn Processor>,
    pub(crate) exporters: Registry<dyn Exporter>,
}

/// One registered kind, as `genai-collector components` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindInfo {
    /// Receiver, processor or exporter.
    pub kind: ComponentKind,
    /// The kind's name in the config.
    pub name: &'static str,
    /// Its factory's one-line description.
    pub description: &'static str,
}

impl Components {
    /// No kinds at all; the binary's `Components::builtin()` has every built-in one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a receiver kind; a later registration of the same kind replaces the earlier.
    pub fn with_receiver(mut self, factory: impl ReceiverFactory) -> Self {
        self.receivers
            .insert(factory.kind(), Arc::new(Erased(factory)));
        self
    }

    /// Registers a processor kind; a later registration of the same kind replaces the earlier.
    pub fn with_processor(mut self, factory: impl ProcessorFactory) -> Self {
        self.processors
            .insert(factory.kind(), Arc::new(Erased(factory)));
        self
    }

    /// Registers an exporter kind; a later registration of the same kind replaces the earlier.
    pub fn with_exporter(mut self, factory: impl ExporterFactory) -> Self {
        self.exporters
            .insert(factory.kind(), Arc::new(Erased(factory)));
        self
    }

    /// Every registered kind, receivers first, each group sorted by name.
    pub fn list(&self) -> Vec<KindInfo> {
        fn infos<T: ?Sized>(
            kind: ComponentKind,
            r: &Registry<T>,
        ) -> impl Iterator<Item = KindInfo> + '_ {
            r.values().map(move |f| KindInfo {
                kind,
                name: f.kind(),
                description: f.description(),
            })
        }
        infos(ComponentKind::Receiver, &self.receivers)
            .chain(infos(ComponentKind::Processor, &self.processors))
            .chain(infos(ComponentKind::Exporter, &self.exporters))
            .collect()
    }

    pub(crate) fn kind_names(&self, kind: ComponentKind) -> Vec<&'static str> {
        match kind {
            ComponentKind::Receiver => self.receivers.keys().copied().collect(),
            ComponentKind::Processor => self.processors.keys().copied().collect(),
            ComponentKind::Exporter => self.exporters.keys().copied().collect(),
        }
    }

    pub(crate) fn parse(
        &self,
        kind: ComponentKind,
        id: &ComponentId,
        node: &Node,
    ) -> Option<Result<AnyConfig, DeError>> {
        let name = id.kind();
        Some(match kind {
            ComponentKind::Receiver => self.receivers.get(name)?.parse(node),
            ComponentKind::Processor => self.processors.get(name)?.parse(node),
            ComponentKind::Exporter => self.exporters.get(name)?.parse(node),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_ids() {
        let id = ComponentId::parse("vllm/chat").unwrap();
        assert_eq!((id.kind(), id.name()), ("vllm", Some("chat")));
        assert_eq!(id.to_string(), "vllm/chat");
        assert_eq!(ComponentId::parse("nvml").unwrap().name(), None);
        assert_eq!(
            ComponentId::parse("pool_aggregate/a/b").unwrap().name(),
            Some("a/b")
        );
        for bad in ["", "/x", "Vllm", "vllm/", "v llm", "vllm/a b"] {
            assert!(
                ComponentId::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
