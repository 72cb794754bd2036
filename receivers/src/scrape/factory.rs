//! The factory every scrape receiver shares: a kind, a description and how its engine is made
//! from the config. The built-in scrapers are each one `ScrapeFactory`; a team's scraper for its
//! own serving stack is one too, with [`Provider`] as its engine and a mapping table for
//! `genai_normalize` (see `examples/custom-scraper`).

use std::sync::Arc;
use std::time::Duration;

use genai_collector_core::{BuildContext, ComponentError, Receiver, ReceiverFactory};

use super::{Engine, ScrapeConfig, ScrapeReceiver};

pub struct ScrapeFactory {
    pub kind: &'static str,
    /// One line for `genai-collector components`.
    pub description: &'static str,
    pub engine: fn(&ScrapeConfig) -> Arc<dyn Engine>,
}

impl ReceiverFactory for ScrapeFactory {
    type Config = ScrapeConfig;

    fn kind(&self) -> &'static str {
        self.kind
    }

    fn description(&self) -> &'static str {
        self.description
    }

    fn build(
        &self,
        config: ScrapeConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(Box::new(ScrapeReceiver {
            engine: (self.engine)(&config),
            config,
        }))
    }
}

/// Plain scraping under a provider name (`None`: the generic `prometheus` receiver), every
/// `interval` (default 15 s, as Prometheus's).
pub struct Provider(pub Option<&'static str>);

impl Engine for Provider {
    fn provider(&self) -> Option<&'static str> {
        self.0
    }

    fn default_interval(&self) -> Duration {
        Duration::from_secs(15)
    }
}
