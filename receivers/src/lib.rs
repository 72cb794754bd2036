//! Receivers: one module per kind, each with its config, factory and tests.

pub mod internal;
pub mod scrape;

pub use internal::InternalReceiverFactory;
