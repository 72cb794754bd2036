//! What every pull receiver shares: the text-format parser, the conversion to OTLP, and the
//! scrape scheduler (targets, interval with jitter, timeouts, bounded concurrency, limits,
//! auth, TLS, health series).

pub mod convert;
mod fetch;
pub mod kubernetes;
mod scheduler;
pub mod text;

pub use fetch::{ScrapeError, TlsConfig};
pub use scheduler::{
    run, scrape_once, BasicAuth, Engine, ScrapeConfig, ScrapeReceiver, Target, TextFormat,
};
