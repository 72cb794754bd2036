//! Exporters: one module per kind, each with its config, factory and tests.

pub mod debug;
pub mod keda_scaler;
pub mod otlp;
pub mod prometheus;

pub use debug::DebugExporterFactory;
pub use keda_scaler::KedaScalerFactory;
pub use otlp::OtlpExporterFactory;
pub use prometheus::PrometheusExporterFactory;
