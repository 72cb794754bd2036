//! Test components for genai-collector's own tests and benchmarks (dev only).
//!
//! `generator` makes numbered points as fast as asked; `capture` keeps what reaches it; `fail`
//! refuses everything; `file` writes each point's value to a file, slowly if asked; `noop`
//! passes batches through. [`components`] registers them beside the built-in kinds. [`sim`]
//! serves the engines' pages from `tests/fixtures` with moving values and faults on demand.

pub mod components;
pub mod sim;

pub use components::{components, Capture};
