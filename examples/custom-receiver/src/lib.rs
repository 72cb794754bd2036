//! `textfile`: a receiver a team writes in its own crate. Every `interval` it reads a file of
//! `name value` lines (`#` starts a comment) and emits one gauge per line.
//!
//! It depends on `genai-collector-core` alone; `main.rs` registers it beside the built-in kinds.

use std::path::PathBuf;
use std::time::Duration;

use genai_collector_core::config::duration;
use genai_collector_core::model::{kv, now_unix_nanos, number_point, Metric, MetricExt};
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
        let mut tick = tokio::time::interval(self.0.interval);
        loop {
            tokio::select! {
                () = ctx.shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            // A missing or unreadable file is logged and retried next tick, never fatal.
            let text = match tokio::fs::read_to_string(&self.0.path).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("textfile: cannot read {}: {e}", self.0.path.display());
                    continue;
                }
            };
            let batch = parse(&text, &self.0.path.display().to_string());
            if ctx.output.send(batch).await.is_err() {
                return Ok(());
            }
        }
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
