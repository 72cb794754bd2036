//! Test components for genai-collector's own tests and benchmarks (dev only).
//!
//! `generator` makes numbered points as fast as asked; `capture` keeps what reaches it; `fail`
//! refuses everything; `file` writes each point's value to a file, slowly if asked; `noop`
//! passes batches through. [`components`] registers them beside the built-in kinds.

pub mod components;

pub use components::{components, Capture};
