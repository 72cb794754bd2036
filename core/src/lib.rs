//! The core of genai-collector: the data model, component traits and factories, config loading,
//! the pipeline runtime and self-telemetry. Receivers, processors and exporters depend on this
//! crate alone; a team's own receiver crate does too.

#![warn(missing_docs)]

pub mod auth;
pub mod component;
pub mod config;
pub mod delivery;
/// The persistent queue's file format: public only with the `internals` feature, for the fuzz
/// targets and their corpus replay; exporters get it through `sending_queue`.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod disk_queue;
#[cfg(not(feature = "internals"))]
pub(crate) mod disk_queue;
mod http;
pub mod id;
#[cfg(feature = "k8s")]
pub mod kubernetes;
pub mod memory;
pub mod model;
pub mod poll;
pub mod registry;
pub mod retry_info;
pub mod runtime;
pub mod telemetry;
pub mod tls;

pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use component::{
    BuildContext, ComponentConfig, ComponentError, ExportError, Exporter, ExporterFactory,
    NoConfig, Processor, ProcessorFactory, Receiver, ReceiverContext, ReceiverFactory,
    ValidationError,
};
pub use delivery::{Captured, Output, SendError};
pub use id::{ComponentId, ComponentKind};
pub use model::Batch;
pub use registry::{Components, KindInfo};
pub use runtime::{Kept, RunSummary, RunningService, Service};
pub use tokio_util::sync::CancellationToken;

/// A random number in `[0, 1)` from the standard library's randomly seeded hasher: enough to
/// keep many collectors' polls and retries out of step.
pub(crate) fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(0u8) % 1_000_000) as f64 / 1_000_000.0
}
