//! Processors: one module per kind, each with its config, factory and tests.

pub mod genai_normalize;

pub use genai_normalize::GenaiNormalizeFactory;
