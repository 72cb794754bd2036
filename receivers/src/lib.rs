//! Receivers: one module per kind, each with its config, factory and tests. `scrape` holds
//! what the pull receivers share.

pub mod internal;
pub mod llamacpp;
pub mod nvml;
pub mod ollama;
pub mod otlp;
pub mod prometheus;
pub mod scrape;
pub mod tgi;
pub mod vllm;

pub use internal::InternalReceiverFactory;
pub use nvml::NvmlReceiverFactory;
pub use ollama::OllamaReceiverFactory;
pub use otlp::OtlpReceiverFactory;
