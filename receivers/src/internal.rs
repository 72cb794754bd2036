//! `internal`: the collector's own counters as metrics, so they can flow to any exporter.

use std::time::Duration;

use genai_collector_core::config::duration;
use genai_collector_core::poll::{self, Poll, PollError, Schedule};
use genai_collector_core::telemetry::Telemetry;
use genai_collector_core::{
    async_trait, Batch, BuildContext, ComponentConfig, ComponentError, Receiver, ReceiverContext,
    ReceiverFactory, ValidationError,
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InternalConfig {
    /// How often the counters are read.
    #[serde(with = "duration")]
    pub interval: Duration,
}

impl Default for InternalConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
        }
    }
}

impl ComponentConfig for InternalConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.interval < Duration::from_millis(100) {
            return Err(ValidationError::field("interval", "must be at least 100ms"));
        }
        Ok(())
    }
}

pub struct InternalReceiverFactory;

impl ReceiverFactory for InternalReceiverFactory {
    type Config = InternalConfig;

    fn kind(&self) -> &'static str {
        "internal"
    }

    fn description(&self) -> &'static str {
        "the collector's own counters (points accepted, sent, dropped; queue fill) as metrics"
    }

    fn build(
        &self,
        config: InternalConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(Box::new(InternalReceiver {
            interval: config.interval,
            telemetry: ctx.telemetry.clone(),
        }))
    }
}

struct InternalReceiver {
    interval: Duration,
    telemetry: Telemetry,
}

#[async_trait]
impl Receiver for InternalReceiver {
    async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError> {
        poll::run(
            SelfMetrics(self.telemetry),
            Schedule::every(self.interval),
            ctx,
        )
        .await
    }
}

struct SelfMetrics(Telemetry);

#[async_trait]
impl Poll for SelfMetrics {
    async fn poll(&mut self) -> Result<Batch, PollError> {
        Ok(self.0.to_batch())
    }
}
