//! Exporters: one module per kind, each with its config, factory and tests.

pub mod debug;
mod endpoint;
pub mod keda_scaler;
pub mod loadbalancing;
pub mod model_server_protocol;
pub mod otlp;
pub mod prometheus;

pub use debug::DebugExporterFactory;
pub use keda_scaler::KedaScalerFactory;
pub use loadbalancing::LoadBalancingFactory;
pub use model_server_protocol::ModelServerProtocolFactory;
pub use otlp::OtlpExporterFactory;
pub use prometheus::PrometheusExporterFactory;
