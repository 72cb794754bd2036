//! What every pull receiver shares: the text-format parser, the conversion to OTLP, and the
//! scrape scheduler (targets, interval with jitter, timeouts, bounded concurrency, limits,
//! auth, TLS, health series).

pub mod convert;
mod factory;
pub(crate) mod fetch;
mod identity;
pub mod kubernetes;
mod scheduler;
pub mod text;

pub use factory::{Provider, ScrapeFactory};
pub use fetch::{ScrapeError, TlsConfig};
pub use identity::{IdentifiedEngine, Identity};
pub use scheduler::{
    run, scrape_once, BasicAuth, Discovered, Engine, ScrapeConfig, ScrapeReceiver, Target,
    TextFormat,
};
