//! The memory limiter (`service.memory_limiter`): one bound for the whole process.
//!
//! Usage is the process's resident memory, sampled every `check_interval`, plus what push
//! receivers have reserved for requests they are decoding or waiting on (a request's decoded
//! size is known from its wire bytes before it is decoded, see [`crate::model::decoded_size`]).
//! Above the soft limit (`limit - spike_limit`) push receivers refuse with a retry hint and pull
//! receivers skip their round; above the hard limit the same happens and a warning is logged
//! once per interval. Limits come from the config in MiB, or as percentages of the cgroup's
//! memory limit (of physical memory when there is none).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::warn;

use crate::config::duration;

/// `service.memory_limiter`: soft and hard limits on the process's memory.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryLimiterConfig {
    /// Limit the process at all.
    pub enabled: bool,
    /// How often resident memory is read.
    #[serde(with = "duration")]
    pub check_interval: Duration,
    /// The hard limit in MiB; overrides `limit_percentage`.
    pub limit_mib: Option<u64>,
    /// Headroom below the hard limit where refusing starts; overrides `spike_limit_percentage`.
    pub spike_limit_mib: Option<u64>,
    /// The hard limit as a share of the cgroup limit (or of physical memory).
    pub limit_percentage: u8,
    /// The headroom as a share of the same total.
    pub spike_limit_percentage: u8,
}

impl Default for MemoryLimiterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            check_interval: Duration::from_millis(100),
            limit_mib: None,
            spike_limit_mib: None,
            limit_percentage: 80,
            spike_limit_percentage: 20,
        }
    }
}

impl MemoryLimiterConfig {
    /// Checks the percentages and sizes against each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.limit_percentage > 100 || self.spike_limit_percentage >= 100 {
            return Err("percentages are 0 to 100".into());
        }
        if let (Some(l), Some(s)) = (self.limit_mib, self.spike_limit_mib) {
            if s >= l {
                return Err(format!(
                    "`spike_limit_mib` ({s}) must be below `limit_mib` ({l})"
                ));
            }
        }
        if self.limit_mib == Some(0) {
            return Err("`limit_mib` must be at least 1".into());
        }
        if self.check_interval < Duration::from_millis(10) {
            return Err("`check_interval` must be at least 10ms".into());
        }
        Ok(())
    }

    /// (soft, hard) in bytes, given the memory available to the process.
    pub fn limits(&self, total: u64) -> (u64, u64) {
        let pct = |p: u8| total / 100 * u64::from(p);
        let hard = self
            .limit_mib
            .map_or_else(|| pct(self.limit_percentage), |m| m << 20);
        let spike = self
            .spike_limit_mib
            .map_or_else(|| pct(self.spike_limit_percentage), |m| m << 20)
            .min(hard / 2);
        (hard - spike, hard)
    }
}

/// Where usage stands against the limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    /// Below the soft limit.
    Normal = 0,
    /// Above the soft limit: new data is refused or skipped.
    Soft = 1,
    /// Above the hard limit: the same, and a warning once a second.
    Hard = 2,
}

/// The process-wide limiter, shared by every receiver's [`crate::Output`].
#[derive(Debug)]
pub struct MemoryLimiter {
    soft: u64,
    hard: u64,
    rss: AtomicU64,
    reserved: AtomicU64,
    pressure: AtomicU8,
    /// Points refused or skipped because of it, and rounds skipped by pull receivers.
    pub refused_points: AtomicU64,
    /// Rounds pull receivers skipped.
    pub skipped_rounds: AtomicU64,
}

/// Why a reservation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TooMuch {
    /// It does not fit now; it may once memory is freed.
    NotNow,
    /// It is larger than the whole headroom below the soft limit.
    Never,
}

/// Memory reserved for one request until it is answered.
#[derive(Debug)]
pub struct Reserved {
    limiter: Arc<MemoryLimiter>,
    bytes: u64,
}

impl Reserved {
    /// Holds `bytes` instead, once they are known (the request decoded).
    pub fn resize(&mut self, bytes: u64) {
        let reserved = &self.limiter.reserved;
        if bytes > self.bytes {
            reserved.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            reserved.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.limiter
            .reserved
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl MemoryLimiter {
    /// A limiter with fixed limits in bytes.
    pub fn new(soft: u64, hard: u64) -> Arc<Self> {
        let limiter = Arc::new(Self {
            soft,
            hard,
            rss: AtomicU64::new(resident_bytes().unwrap_or(0)),
            reserved: AtomicU64::new(0),
            pressure: AtomicU8::new(0),
            refused_points: AtomicU64::new(0),
            skipped_rounds: AtomicU64::new(0),
        });
        limiter.update_pressure();
        limiter
    }

    /// A limiter for `config`, or `None` when it is disabled.
    pub fn from_config(config: &MemoryLimiterConfig) -> Option<Arc<Self>> {
        if !config.enabled {
            return None;
        }
        let (soft, hard) = config.limits(available_memory());
        Some(Self::new(soft, hard))
    }

    /// Bytes above which new data is refused.
    pub fn soft_limit(&self) -> u64 {
        self.soft
    }

    /// Bytes above which the collector warns as well.
    pub fn hard_limit(&self) -> u64 {
        self.hard
    }

    /// Resident memory at the last check plus what requests have reserved since.
    pub fn usage(&self) -> u64 {
        self.rss.load(Ordering::Relaxed) + self.reserved.load(Ordering::Relaxed)
    }

    /// Where usage stands against the limits.
    pub fn pressure(&self) -> Pressure {
        match self.pressure.load(Ordering::Relaxed) {
            0 => Pressure::Normal,
            1 => Pressure::Soft,
            _ => Pressure::Hard,
        }
    }

    /// Whether new data may come in now.
    pub fn admits(&self) -> bool {
        self.pressure() == Pressure::Normal
    }

    fn update_pressure(&self) -> Pressure {
        let usage = self.usage();
        let p = if usage >= self.hard {
            Pressure::Hard
        } else if usage >= self.soft {
            Pressure::Soft
        } else {
            Pressure::Normal
        };
        self.pressure.store(p as u8, Ordering::Relaxed);
        p
    }

    /// Reserves `bytes` for a request about to be decoded, if they fit under the soft limit.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reserved, TooMuch> {
        if bytes >= self.soft {
            return Err(TooMuch::Never);
        }
        let before = self.reserved.fetch_add(bytes, Ordering::Relaxed);
        if self.rss.load(Ordering::Relaxed) + before + bytes > self.soft {
            self.reserved.fetch_sub(bytes, Ordering::Relaxed);
            self.update_pressure();
            return Err(TooMuch::NotNow);
        }
        Ok(Reserved {
            limiter: self.clone(),
            bytes,
        })
    }

    /// Reads resident memory and updates the pressure; logs above the hard limit.
    pub fn check(&self) -> Pressure {
        if let Some(rss) = resident_bytes() {
            self.rss.store(rss, Ordering::Relaxed);
        }
        self.update_pressure()
    }

    /// Checks every `interval` until `stop`; above the hard limit, one warning per second.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            if self.check() == Pressure::Hard
                && last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                last_warning = Some(std::time::Instant::now());
                warn!(
                    usage_mib = self.usage() >> 20,
                    hard_limit_mib = self.hard >> 20,
                    refused_points = self.refused_points.load(Ordering::Relaxed),
                    skipped_rounds = self.skipped_rounds.load(Ordering::Relaxed),
                    "memory above the hard limit: refusing pushes and skipping scrapes"
                );
            }
        }
    }
}

/// The process's resident memory (Linux `/proc/self/statm`).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The memory this process may use: its cgroup's limit, else physical memory.
pub fn available_memory() -> u64 {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .find_map(|t| t.trim().parse::<u64>().ok());
    let physical = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    match (cgroup, physical) {
        // cgroup v1 reports "no limit" as a huge number.
        (Some(c), Some(p)) => c.min(p),
        (Some(c), None) => c,
        (None, Some(p)) => p,
        (None, None) => 1 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_from_mib_or_percentages() {
        let c = MemoryLimiterConfig {
            limit_mib: Some(400),
            spike_limit_mib: Some(100),
            ..Default::default()
        };
        assert_eq!(c.limits(1 << 40), (300 << 20, 400 << 20));
        let d = MemoryLimiterConfig::default();
        assert_eq!(d.limits(1000 << 20), (600 << 20, 800 << 20));
        assert!(MemoryLimiterConfig {
            limit_mib: Some(100),
            spike_limit_mib: Some(100),
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn reservations_count_until_dropped() {
        let rss = resident_bytes().unwrap();
        let l = MemoryLimiter::new(rss + (100 << 20), rss + (200 << 20));
        let a = l.reserve(60 << 20).unwrap();
        assert_eq!(l.reserve(60 << 20).unwrap_err(), TooMuch::NotNow);
        assert_eq!(l.reserve(rss + (100 << 20)).unwrap_err(), TooMuch::Never);
        drop(a);
        let _b = l
            .reserve(60 << 20)
            .expect("room again once the first is answered");
        assert!(resident_bytes().is_some() && available_memory() > 0);
    }
}
