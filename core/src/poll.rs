//! The loop of a receiver that asks something on an interval (a driver, an HTTP API, a file):
//! wait for the tick, poll within a deadline, send the batch, report what failed. A receiver
//! implements [`Poll`] and hands it to [`run`]; the interval, deadline, start jitter, logging,
//! `/healthz` errors and shutdown are the same for all of them.
//!
//! ```
//! use std::time::Duration;
//! use genai_collector_core::model::{kv, now_unix_nanos, number_point, Metric, MetricExt};
//! use genai_collector_core::poll::{Poll, PollError, Schedule};
//! use genai_collector_core::{async_trait, Batch};
//!
//! /// Reads the load average from `/proc/loadavg`.
//! struct LoadAverage;
//!
//! #[async_trait]
//! impl Poll for LoadAverage {
//!     async fn poll(&mut self) -> Result<Batch, PollError> {
//!         let text = std::fs::read_to_string("/proc/loadavg")
//!             .map_err(|e| PollError::new(format!("cannot read /proc/loadavg: {e}")))?;
//!         let one: f64 = text
//!             .split_whitespace()
//!             .next()
//!             .and_then(|v| v.parse().ok())
//!             .ok_or_else(|| PollError::new("no load average in /proc/loadavg"))?;
//!         let point = number_point(now_unix_nanos(), one, vec![]);
//!         Ok(Batch::with_resource(
//!             vec![kv("service.name", "loadavg")],
//!             vec![Metric::gauge("system.cpu.load_average.1m", "{thread}", vec![point])],
//!         ))
//!     }
//! }
//!
//! // In `Receiver::run`: `poll::run(LoadAverage, Schedule::every(interval), ctx).await`.
//! let schedule = Schedule::every(Duration::from_secs(10)).with_timeout(Duration::from_secs(2));
//! assert_eq!(schedule.timeout, Duration::from_secs(2));
//! ```

use std::time::Duration;

use tracing::{debug, info, warn};

use crate::{async_trait, Batch, ComponentError, ReceiverContext};

/// One poll of a polling receiver.
#[async_trait]
pub trait Poll: Send {
    /// Asks once. An error is logged when polling starts failing and when it recovers (not on
    /// every tick), shown as the receiver's `last_error` on `/healthz`, and the next tick asks
    /// again; a batch it carries (an `up` of 0, say) is still sent.
    async fn poll(&mut self) -> Result<Batch, PollError>;
}

/// A failed poll: what went wrong, and optionally what to send all the same.
#[derive(Debug, Default)]
pub struct PollError {
    /// What went wrong, for the log and `/healthz`.
    pub message: String,
    /// Sent all the same, when set.
    pub batch: Option<Batch>,
}

impl PollError {
    /// A failed poll that sends nothing.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            batch: None,
        }
    }

    /// Sends `batch` although the poll failed: readings that say the target is down.
    pub fn with_batch(mut self, batch: Batch) -> Self {
        self.batch = Some(batch);
        self
    }
}

/// When to poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// From the start of one poll to the start of the next.
    pub interval: Duration,
    /// A poll that runs longer fails with "timed out"; the interval unless set lower.
    pub timeout: Duration,
    /// Start after a random part of the interval, so that agents started together (a
    /// DaemonSet rollout) do not all poll their targets in step.
    pub jitter: bool,
}

impl Schedule {
    /// Every `interval`, each poll given the whole interval, without jitter.
    pub fn every(interval: Duration) -> Self {
        Self {
            interval,
            timeout: interval,
            jitter: false,
        }
    }

    /// Gives up a poll after `timeout` (never more than the interval).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.min(self.interval);
        self
    }

    /// Starts after a random part of the interval.
    pub fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }
}

/// A random share of `interval`.
fn jitter(interval: Duration) -> Duration {
    interval.mul_f64(crate::random_fraction())
}

/// Polls on `schedule` until shutdown or until no pipeline takes the batches any more.
pub async fn run(
    mut poller: impl Poll,
    schedule: Schedule,
    ctx: ReceiverContext,
) -> Result<(), ComponentError> {
    if schedule.jitter {
        tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(jitter(schedule.interval)) => {}
        }
    }
    let mut tick = tokio::time::interval(schedule.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `None` until the first poll: a first failure is news, as is a first success after one.
    let mut failing: Option<bool> = None;
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let polled = tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            p = tokio::time::timeout(schedule.timeout, poller.poll()) => p.unwrap_or_else(|_| {
                Err(PollError::new(format!("timed out after {:?}", schedule.timeout)))
            }),
        };
        let batch = match polled {
            Ok(batch) => {
                if failing == Some(true) {
                    info!(receiver = %ctx.id, "polling works again");
                }
                failing = Some(false);
                Some(batch)
            }
            Err(e) => {
                if failing == Some(true) {
                    debug!(receiver = %ctx.id, error = %e.message, "polling still fails");
                } else {
                    warn!(receiver = %ctx.id, error = %e.message, "polling fails; retrying every interval");
                }
                failing = Some(true);
                ctx.output.report_error(e.message);
                e.batch
            }
        };
        if let Some(batch) = batch.filter(|b| !b.resource_metrics.is_empty()) {
            if ctx.output.send(batch).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{kv, number_point, Metric, MetricExt};
    use crate::runtime::Output;
    use crate::ComponentId;

    /// Fails every third poll, with an `up` of 0, and hangs on the fifth.
    struct Flaky(u32);

    #[async_trait]
    impl Poll for Flaky {
        async fn poll(&mut self) -> Result<Batch, PollError> {
            self.0 += 1;
            let batch = |up: f64| {
                Batch::with_resource(
                    vec![kv("service.name", "flaky")],
                    vec![Metric::gauge("up", "", vec![number_point(1, up, vec![])])],
                )
            };
            match self.0 {
                5 => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    unreachable!()
                }
                n if n % 3 == 0 => Err(PollError::new("refused").with_batch(batch(0.0))),
                _ => Ok(batch(1.0)),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn polls_on_time_reports_failures_and_gives_up_a_hung_poll() {
        let stats = crate::telemetry::Telemetry::new().register(
            crate::ComponentKind::Receiver,
            "flaky",
            None,
        );
        let (output, mut captured) = Output::capture(64, stats.clone());
        let shutdown = crate::CancellationToken::new();
        let ctx = ReceiverContext {
            id: ComponentId::parse("flaky").unwrap(),
            output,
            shutdown: shutdown.clone(),
        };
        let schedule =
            Schedule::every(Duration::from_secs(10)).with_timeout(Duration::from_secs(2));
        let task = tokio::spawn(run(Flaky(0), schedule, ctx));
        // Ticks at 0, 10, ..., 60 s: seven polls.
        tokio::time::sleep(Duration::from_secs(65)).await;
        shutdown.cancel();
        task.await.unwrap().unwrap();
        let mut ups = Vec::new();
        while let Some(b) = captured.try_recv() {
            let m = b.metrics().next().unwrap();
            let Some(crate::model::metric::Data::Gauge(g)) = &m.data else {
                panic!("gauge")
            };
            ups.push(crate::model::number_value(&g.data_points[0]).unwrap());
        }
        // Polls 3 and 6 failed but still sent `up` 0; poll 5 hung, timed out and sent nothing.
        assert_eq!(ups, [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        assert_eq!(stats.last_error().as_deref(), Some("refused"));
    }

    #[test]
    fn jitter_stays_within_the_interval() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(10)) < Duration::from_secs(10));
        }
        let s = Schedule::every(Duration::from_secs(5)).with_timeout(Duration::from_secs(60));
        assert_eq!(
            s.timeout,
            Duration::from_secs(5),
            "never longer than the interval"
        );
    }
}
