//! Exporters: one module per kind, each with its config, factory and tests.

pub mod debug;

pub use debug::DebugExporterFactory;
