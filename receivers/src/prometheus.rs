//! `prometheus`: scrapes any Prometheus or OpenMetrics page.

use std::sync::Arc;
use std::time::Duration;

use genai_collector_core::{BuildContext, ComponentError, Receiver, ReceiverFactory};

use crate::scrape::{Engine, ScrapeConfig, ScrapeReceiver};

pub struct PrometheusReceiverFactory;

struct Generic;

impl Engine for Generic {
    fn provider(&self) -> Option<&'static str> {
        None
    }

    fn default_interval(&self) -> Duration {
        Duration::from_secs(15)
    }
}

impl ReceiverFactory for PrometheusReceiverFactory {
    type Config = ScrapeConfig;

    fn kind(&self) -> &'static str {
        "prometheus"
    }

    fn description(&self) -> &'static str {
        "scrapes any Prometheus (0.0.4) or OpenMetrics page; static and file-based targets"
    }

    fn build(
        &self,
        config: ScrapeConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(Box::new(ScrapeReceiver {
            engine: Arc::new(Generic),
            config,
        }))
    }
}
