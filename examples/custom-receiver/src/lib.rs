//! `textfile`: a receiver a team writes in its own crate. Every `interval` it reads a file of
//! `name value` lines (`#` starts a comment) and emits one gauge per line.
//!
//! It depends on `genai-collector-core` alone; `main.rs` registers it beside the built-in kinds.

use std::path::PathBuf;
use std::time::Duration;

use genai_collector_core::config::duration;
use genai_collector_core::model::{kv, now_unix_nanos, number_point, Metric, MetricExt};
use genai_collector_core::poll::{self, Poll, PollError, Schedule};
use genai_collector_core::{
    async_trait, Batch, BuildContext, ComponentConfig, ComponentError, Receiver, ReceiverContext,
    ReceiverFactory, ValidationError,
};
use serde::Deserialize;

/// The config: `deny_unknown_fields` so typos are errors with their line and column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextfileConfig {
    pub path: PathBuf,
    #[serde(default = "default_interval", with = "duration")]
    pub interval: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

impl ComponentConfig for TextfileConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.interval.is_zero() {
            return Err(ValidationError::field("interval", "must be more than 0s"));
        }
        Ok(())
    }
}

pub struct TextfileReceiverFactory;

impl ReceiverFactory for TextfileReceiverFactory {
    type Config = TextfileConfig;

    fn kind(&self) -> &'static str {
        "textfile"
    }

    fn description(&self) -> &'static str {
        "example: gauges read from a file of `name value` lines"
    }

    fn build(
        &self,
        config: TextfileConfig,
        _ctx: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        Ok(Box::new(TextfileReceiver(config)))
    }
}

struct TextfileReceiver(TextfileConfig);

#[async_trait]
impl Receiver for TextfileReceiver {
    async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError> {
        // The core's polling loop: the interval, a deadline, logging and `/healthz` errors.
        let schedule = Schedule::every(self.0.interval);
        poll::run(TextfilePoll(self.0.path), schedule, ctx).await
    }
}

struct TextfilePoll(PathBuf);

#[async_trait]
impl Poll for TextfilePoll {
    /// A missing or unreadable file fails this poll only; the next tick reads it again.
    async fn poll(&mut self) -> Result<Batch, PollError> {
        let text = tokio::fs::read_to_string(&self.0)
            .await
            .map_err(|e| PollError::new(format!("cannot read {}: {e}", self.0.display())))?;
        Ok(parse(&text, &self.0.display().to_string()))
    }
}

/// One gauge per well-formed `name value` line; other lines are skipped.
pub fn parse(text: &str, source: &str) -> Batch {
    let now = now_unix_nanos();
    let metrics = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(char::is_whitespace)?;
            let value: f64 = value.trim().parse().ok()?;
            Some(Metric::gauge(
                name,
                "",
                vec![number_point(now, value, vec![])],
            ))
        })
        .collect();
    Batch::with_resource(
        vec![kv("service.name", "textfile"), kv("file.path", source)],
        metrics,
    )
}

/// The code in docs/writing-a-receiver.md, compiled as this crate's doctests so the page
/// cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/writing-a-receiver.md")]
pub struct WritingAReceiverPage;
