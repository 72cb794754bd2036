//! Queueing, retry and timeout settings every exporter takes (`sending_queue`,
//! `retry_on_failure`, `timeout`): a leaf of its own, so that component factories can be told
//! them without depending on the config loader.

use std::time::Duration;

use serde::Deserialize;

use super::{duration, size};

/// Queueing, retry and timeout settings every exporter takes, handled by the runtime.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExporterSettings {
    /// The exporter's queue: size, sizer, consumers, persistence.
    pub sending_queue: QueueSettings,
    /// Retries with exponential backoff.
    pub retry_on_failure: RetrySettings,
    /// Limit on one export attempt.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for ExporterSettings {
    fn default() -> Self {
        Self {
            sending_queue: QueueSettings::default(),
            retry_on_failure: RetrySettings::default(),
            timeout: Duration::from_secs(5),
        }
    }
}

pub use crate::delivery::queue::Sizer;

/// `sending_queue`: what an exporter queues before refusing more.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// What the queue holds at most, queued and in flight, in `sizer` units (`32MiB` for
    /// bytes); `None` takes the sizer's default.
    #[serde(with = "size::option")]
    pub queue_size: Option<u64>,
    /// What `queue_size` counts: `requests`, `items` (points) or `bytes`.
    pub sizer: Sizer,
    /// Export requests in flight at once; their order is not kept.
    pub num_consumers: usize,
    /// Wait for room instead of dropping scraped data: no loss, but a stuck exporter then
    /// holds up its pipelines (and, through backpressure, their receivers).
    pub block_on_overflow: bool,
    /// A directory for the persistent queue: queued batches are written there and survive a
    /// restart or a kill; none keeps the queue in memory only.
    pub storage: Option<std::path::PathBuf>,
    /// With `storage`: flush each batch's file and the directory to the disk before the batch
    /// counts as queued, so that a power cut loses nothing acknowledged (slower writes).
    pub fsync: bool,
    /// With `storage`: the most the exporter's directory holds, files left by earlier runs
    /// included (`1GiB`); past it, batches are queued in memory only, counted in
    /// `genai_collector_exporter_persistent_queue_skipped_points`.
    #[serde(deserialize_with = "size::deserialize")]
    pub storage_limit: u64,
    /// Batches with more points are split into requests of at most this many; 0 sends
    /// batches as they come.
    pub max_batch_points: usize,
}

impl QueueSettings {
    /// The capacity in sizer units: the configured one or the sizer's default.
    pub fn capacity(&self) -> u64 {
        self.queue_size.unwrap_or(match self.sizer {
            Sizer::Requests => 1000,
            Sizer::Items => 1_000_000,
            Sizer::Bytes => 32 << 20,
        })
    }

    /// Refuses settings that cannot work (no consumer, a size that holds nothing).
    pub fn validate(&self) -> Result<(), String> {
        if self.num_consumers == 0 {
            return Err("`sending_queue.num_consumers` must be at least 1".into());
        }
        if self.storage_limit < 1 << 20 {
            return Err(format!(
                "`sending_queue.storage_limit` {} is counted in bytes and holds almost nothing: give a size like `1GiB`",
                self.storage_limit
            ));
        }
        match self.queue_size {
            Some(0) => Err("`sending_queue.queue_size` must be at least 1".into()),
            Some(n) if self.sizer == Sizer::Bytes && n < 64 << 10 => Err(format!(
                "`sending_queue.queue_size` {n} is counted in bytes (the default `sizer`), which holds almost nothing: give a size like `32MiB`, or set `sizer: requests` to count batches"
            )),
            _ => Ok(()),
        }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            queue_size: None,
            sizer: Sizer::Bytes,
            num_consumers: 10,
            block_on_overflow: false,
            storage: None,
            fsync: false,
            storage_limit: 1 << 30,
            max_batch_points: 0,
        }
    }
}

/// `retry_on_failure`: retries with exponential backoff and jitter.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Retry at all; off drops a failed batch at once (counted).
    pub enabled: bool,
    /// The first wait.
    #[serde(with = "duration")]
    pub initial_interval: Duration,
    /// The longest wait between two attempts.
    #[serde(with = "duration")]
    pub max_interval: Duration,
    /// Give up on a batch after this long; `0s` retries until shutdown.
    #[serde(with = "duration")]
    pub max_elapsed_time: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            initial_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
            max_elapsed_time: Duration::from_secs(300),
        }
    }
}
