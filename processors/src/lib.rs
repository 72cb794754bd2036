//! Processors: one module per kind, each with its config, factory and tests.
