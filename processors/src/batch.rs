//! `batch`: gathers small batches into larger ones, by point count or after a timeout, so
//! exporters send fewer, fuller requests.

use std::time::Duration;

use genai_collector_core::config::duration;
use genai_collector_core::{
    Batch, BuildContext, ComponentConfig, ComponentError, Processor, ProcessorFactory,
    ValidationError,
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Send once this many points are held.
    pub send_batch_size: usize,
    /// Send what is held at least this often.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            send_batch_size: 8192,
            timeout: Duration::from_millis(200),
        }
    }
}

impl ComponentConfig for BatchConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.send_batch_size == 0 {
            return Err(ValidationError::field(
                "send_batch_size",
                "must be at least 1",
            ));
        }
        if self.timeout < Duration::from_millis(1) {
            return Err(ValidationError::field("timeout", "must be at least 1ms"));
        }
        Ok(())
    }
}

pub struct BatchFactory;

impl ProcessorFactory for BatchFactory {
    type Config = BatchConfig;

    fn kind(&self) -> &'static str {
        "batch"
    }

    fn description(&self) -> &'static str {
        "gathers batches until send_batch_size points or the timeout"
    }

    fn build(
        &self,
        config: &BatchConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        Ok(Box::new(Batcher {
            config: config.clone(),
            held: Batch::new(),
            points: 0,
        }))
    }
}

struct Batcher {
    config: BatchConfig,
    held: Batch,
    points: usize,
}

impl Processor for Batcher {
    fn process(&mut self, batch: &mut Batch) {
        self.points += batch.point_count();
        self.held.append(batch);
        if self.points >= self.config.send_batch_size {
            // The full batch continues down the pipeline in place of the one that came in.
            *batch = std::mem::take(&mut self.held);
            self.points = 0;
        }
    }

    fn flush_interval(&self) -> Option<Duration> {
        Some(self.config.timeout)
    }

    fn flush_when_idle(&self) -> bool {
        true
    }

    fn flush(&mut self) -> Option<Batch> {
        self.points = 0;
        let held = std::mem::take(&mut self.held);
        (!held.is_empty()).then_some(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{number_point, Metric, MetricExt};

    fn points(n: usize) -> Batch {
        Batch::with_resource(
            vec![],
            vec![Metric::gauge(
                "g",
                "",
                (0..n).map(|i| number_point(1, i as f64, vec![])).collect(),
            )],
        )
    }

    #[test]
    fn holds_until_size_then_flushes_the_rest() {
        let ctx = BuildContext {
            id: genai_collector_core::ComponentId::parse("batch").unwrap(),
            pipeline: None,
            telemetry: Default::default(),
        };
        let mut b = BatchFactory
            .build(
                &BatchConfig {
                    send_batch_size: 10,
                    ..Default::default()
                },
                &ctx,
            )
            .unwrap();
        let mut first = points(4);
        b.process(&mut first);
        assert!(first.is_empty(), "held");
        let mut second = points(7);
        b.process(&mut second);
        assert_eq!(second.point_count(), 11, "both go out together");
        let mut third = points(3);
        b.process(&mut third);
        assert!(third.is_empty());
        assert_eq!(b.flush().map(|x| x.point_count()), Some(3));
        assert!(b.flush().is_none());
    }
}
