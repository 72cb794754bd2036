//! Receivers: one module per kind, each with its config, factory and tests.

pub mod internal;

pub use internal::InternalReceiverFactory;
