//! `ollama`: polls Ollama's `GET /api/ps` for the models it has loaded.
//!
//! Per model: its size (with its parameter count and quantization), the part in VRAM and that
//! share, the share offloaded to the CPU, context length, seconds until Ollama unloads it, and
//! `gen_ai.server.kv_cache.usage`: the model's VRAM as a percentage of the GPUs' total VRAM.
//! That is a static allocation, not how full a KV cache is: its points say so
//! (`gen_ai.server.kv_cache.basis` = `vram_allocation`), and the KV alert and pool averages
//! leave them out. The total comes from, in order: `max_vram_gb` in config or
//! `GENAI_OLLAMA_MAX_VRAM_GB` (GiB, as GPUs are sold: 24 for a 24 GB card), NVML,
//! `nvidia-smi`; with none of them there is no usage figure (a model's share of its own size is
//! 100 % whenever it is fully loaded, which says nothing of use), and a log line says so.

use std::time::Duration;

use genai_collector_core::config::duration;
use genai_collector_core::model::{
    kv, now_unix_nanos, number_point, Batch, KeyValue, Metric, MetricExt,
};
use genai_collector_core::poll::{self, Poll, PollError, Schedule};
use genai_collector_core::{
    async_trait, BuildContext, ComponentConfig, ComponentError, Receiver, ReceiverContext,
    ReceiverFactory, ValidationError,
};
use serde::Deserialize;
use tracing::info;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OllamaConfig {
    pub endpoint: String,
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Limit on one poll; by default 2 s, or less for an interval under 2.5 s (as Prometheus
    /// clamps `scrape_timeout` to the interval).
    #[serde(with = "duration::option")]
    pub timeout: Option<Duration>,
    /// Total GPU memory in GiB (24 for a 24 GB card); else `GENAI_OLLAMA_MAX_VRAM_GB`, NVML,
    /// `nvidia-smi`.
    pub max_vram_gb: Option<f64>,
    /// `gen_ai.pool.name` on every series.
    pub pool: Option<String>,
}

impl Default for OllamaConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://localhost:11434".into(),
            interval: Duration::from_secs(5),
            timeout: None,
            max_vram_gb: None,
            pool: None,
        }
    }
}

impl OllamaConfig {
    /// The configured timeout, or the default that fits the interval.
    pub fn timeout(&self) -> Duration {
        self.timeout
            .unwrap_or_else(|| Duration::from_secs(2).min(self.interval.mul_f64(0.8)))
    }
}

impl ComponentConfig for OllamaConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        reqwest::Url::parse(&self.endpoint).map_err(|e| {
            ValidationError::field("endpoint", format!("`{}` is not a URL: {e}", self.endpoint))
        })?;
        if self.interval < Duration::from_millis(100) {
            return Err(ValidationError::field("interval", "must be at least 100ms"));
        }
        if self.timeout.is_some_and(|t| t >= self.interval) {
            return Err(ValidationError::field(
                "timeout",
                format!("must be shorter than the interval ({:?})", self.interval),
            ));
        }
        if self.max_vram_gb.is_some_and(|g| g.is_nan() || g <= 0.0) {
            return Err(ValidationError::field("max_vram_gb", "must be more than 0"));
        }
        Ok(())
    }
}

/// Where the total VRAM came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VramSource {
    Config,
    Environment,
    Nvml,
    NvidiaSmi,
    /// None found: usage is the model's VRAM share of its own size.
    ModelSize,
}

/// The total VRAM in bytes and where it came from, trying each source in order.
pub fn total_vram(
    configured_gb: Option<f64>,
    env: Option<String>,
    nvml: impl FnOnce() -> Option<u64>,
    smi: impl FnOnce() -> Option<u64>,
) -> (Option<u64>, VramSource) {
    if let Some(gb) = configured_gb {
        return (Some((gb * GIB) as u64), VramSource::Config);
    }
    if let Some(gb) = env
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|g| *g > 0.0)
    {
        return (Some((gb * GIB) as u64), VramSource::Environment);
    }
    if let Some(b) = nvml() {
        return (Some(b), VramSource::Nvml);
    }
    if let Some(b) = smi() {
        return (Some(b), VramSource::NvidiaSmi);
    }
    (None, VramSource::ModelSize)
}

/// The sum of `nvidia-smi --query-gpu=memory.total` in bytes.
fn nvidia_smi_total() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let mib: f64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .sum();
    (mib > 0.0).then_some((mib * 1024.0 * 1024.0) as u64)
}

pub struct OllamaReceiverFactory;

impl ReceiverFactory for OllamaReceiverFactory {
    type Config = OllamaConfig;

    fn kind(&self) -> &'static str {
        "ollama"
    }

    fn description(&self) -> &'static str {
        "polls Ollama's /api/ps: loaded models, VRAM use and share, context length, time to unload, KV-cache usage"
    }

    fn build(
        &self,
        config: OllamaConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(config.timeout())
            .build()
            .map_err(|e| ComponentError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Box::new(OllamaReceiver { config, client }))
    }
}

struct OllamaReceiver {
    config: OllamaConfig,
    client: reqwest::Client,
}

#[derive(Debug, Deserialize)]
pub struct Ps {
    #[serde(default)]
    pub models: Vec<LoadedModel>,
}

#[derive(Debug, Deserialize)]
pub struct LoadedModel {
    pub name: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub size_vram: u64,
    #[serde(default)]
    pub context_length: Option<u64>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub details: Option<ModelDetails>,
}

/// What `/api/ps` says of a model's make.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelDetails {
    /// `8.0B`, `4.3B`.
    #[serde(default)]
    pub parameter_size: Option<String>,
    /// `Q4_K_M`, `F16`.
    #[serde(default)]
    pub quantization_level: Option<String>,
}

/// On Ollama's `gen_ai.server.kv_cache.usage` points: the figure is a VRAM allocation.
pub const KV_CACHE_BASIS: &str = "gen_ai.server.kv_cache.basis";

#[derive(Deserialize)]
struct Version {
    version: String,
}

#[async_trait]
impl Receiver for OllamaReceiver {
    async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError> {
        let c = &self.config;
        let (total, source) = tokio::task::spawn_blocking({
            let configured = c.max_vram_gb;
            move || {
                total_vram(
                    configured,
                    std::env::var("GENAI_OLLAMA_MAX_VRAM_GB").ok(),
                    crate::nvml::total_gpu_memory,
                    nvidia_smi_total,
                )
            }
        })
        .await
        .unwrap_or((None, VramSource::ModelSize));
        match total {
            Some(b) => {
                info!(receiver = %ctx.id, source = ?source, total_vram_gib = b as f64 / GIB, "KV-cache usage is VRAM over the GPUs' total")
            }
            None => {
                info!(receiver = %ctx.id, "no VRAM total (max_vram_gb, GENAI_OLLAMA_MAX_VRAM_GB, NVML, nvidia-smi): no gen_ai.server.kv_cache.usage; ollama.model.vram.share and cpu_offload still come")
            }
        }
        let base = c.endpoint.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base).map_err(|e| ComponentError::Config(e.to_string()))?;
        let (host, port) = (
            url.host_str().unwrap_or(""),
            url.port_or_known_default().unwrap_or(11434),
        );
        // `service.instance.id` as the scrapers set it: `instance` in Prometheus, and one
        // server for `pool_aggregate`.
        let mut resource = vec![
            kv("service.name", ctx.id.to_string()),
            kv("service.instance.id", format!("{host}:{port}")),
            kv("gen_ai.provider.name", "ollama"),
            kv("server.address", host),
            kv("server.port", port),
        ];
        if let Some(p) = &c.pool {
            resource.push(kv("gen_ai.pool.name", p.as_str()));
        }
        let schedule = Schedule::every(c.interval);
        let poller = OllamaPoll {
            receiver: *self,
            base,
            resource,
            total,
            version: None,
            was_up: false,
        };
        poll::run(poller, schedule, ctx).await
    }
}

/// One `/api/ps` per tick; the version once per connection (after a start and after every
/// outage).
struct OllamaPoll {
    receiver: OllamaReceiver,
    base: String,
    resource: Vec<KeyValue>,
    total: Option<u64>,
    version: Option<String>,
    was_up: bool,
}

#[async_trait]
impl Poll for OllamaPoll {
    async fn poll(&mut self) -> Result<Batch, PollError> {
        let now = now_unix_nanos();
        let base = &self.base;
        let polled = self.receiver.get::<Ps>(&format!("{base}/api/ps")).await;
        let up = polled.is_ok();
        if up && !self.was_up {
            self.version = self
                .receiver
                .get::<Version>(&format!("{base}/api/version"))
                .await
                .ok()
                .map(|v| v.version);
        }
        self.was_up = up;
        let mut attrs = self.resource.clone();
        if let (true, Some(v)) = (up, &self.version) {
            attrs.push(kv("service.version", v.as_str()));
        }
        let (models, error) = match polled {
            Ok(p) => (p.models, None),
            Err(e) => (Vec::new(), Some(format!("{base}: {e}"))),
        };
        let mut metrics = model_metrics(&models, self.total, now, up);
        metrics.push(Metric::gauge(
            "up",
            "",
            vec![number_point(now, if up { 1.0 } else { 0.0 }, Vec::new())],
        ));
        // Down, the batch still goes out: `up` 0 and no per-model series.
        let batch = Batch::with_resource(attrs, metrics);
        match error {
            Some(e) => Err(PollError::new(e).with_batch(batch)),
            None => Ok(batch),
        }
    }
}

impl OllamaReceiver {
    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let response = self.client.get(url).send().await.map_err(|e| {
            if e.is_timeout() {
                format!("timed out after {:?}", self.config.timeout())
            } else {
                format!("cannot connect: {e}")
            }
        })?;
        if !response.status().is_success() {
            return Err(format!("answered HTTP {}", response.status().as_u16()));
        }
        let body = crate::scrape::fetch::read_limited(response, crate::scrape::fetch::SIDE_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&body).map_err(|e| format!("not the JSON Ollama sends: {e}"))
    }
}

/// Seconds from `now` (Unix ns) until an RFC 3339 `expires_at`.
fn seconds_until(expires_at: &str, now: u64) -> Option<f64> {
    let t = humantime::parse_rfc3339_weak(expires_at.get(..19)?).ok()?;
    let mut secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    // The offset Ollama writes after the seconds (`+02:00`, `Z`), and any fraction.
    let rest = &expires_at[19..];
    let frac_end = rest
        .find(|c: char| c != '.' && !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if let Some(f) = rest[..frac_end].strip_prefix('.').filter(|f| !f.is_empty()) {
        secs += format!("0.{f}").parse::<f64>().unwrap_or(0.0);
    }
    let offset = &rest[frac_end..];
    if let (Some(sign), Some(hm)) = (
        offset.chars().next().filter(|c| *c == '+' || *c == '-'),
        offset.get(1..),
    ) {
        let (h, m) = hm.split_once(':').unwrap_or((hm, "0"));
        let off = h.parse::<f64>().unwrap_or(0.0) * 3600.0 + m.parse::<f64>().unwrap_or(0.0) * 60.0;
        secs += if sign == '+' { -off } else { off };
    }
    Some(secs - now as f64 / 1e9)
}

/// The per-model series and the count of loaded models. A poll that failed reports no models
/// rather than the last ones seen, so nothing stale survives an outage.
pub fn model_metrics(
    models: &[LoadedModel],
    total_vram: Option<u64>,
    now: u64,
    up: bool,
) -> Vec<Metric> {
    let mut size = Vec::new();
    let mut vram = Vec::new();
    let mut share = Vec::new();
    let mut offload = Vec::new();
    let mut kv_cache = Vec::new();
    let mut context = Vec::new();
    let mut expires = Vec::new();
    for m in models {
        let attrs = || -> Vec<KeyValue> {
            vec![kv(
                "gen_ai.request.model",
                m.model.as_deref().unwrap_or(&m.name),
            )]
        };
        let mut make = attrs();
        let details = m.details.clone().unwrap_or_default();
        if let Some(p) = details.parameter_size {
            make.push(kv("ollama.model.parameter_size", p));
        }
        if let Some(q) = details.quantization_level {
            make.push(kv("ollama.model.quantization_level", q));
        }
        size.push(number_point(now, m.size as f64, make));
        vram.push(number_point(now, m.size_vram as f64, attrs()));
        if m.size > 0 {
            let own_share = (m.size_vram as f64 / m.size as f64 * 100.0).min(100.0);
            share.push(number_point(now, own_share, attrs()));
            offload.push(number_point(now, 100.0 - own_share, attrs()));
        }
        if let Some(t) = total_vram.filter(|t| *t > 0) {
            // The conventions want the provider on every point of a `gen_ai.*` metric.
            let mut gen_ai_attrs = attrs();
            gen_ai_attrs.push(kv("gen_ai.provider.name", "ollama"));
            gen_ai_attrs.push(kv(KV_CACHE_BASIS, "vram_allocation"));
            let usage = m.size_vram as f64 / t as f64 * 100.0;
            kv_cache.push(number_point(now, usage, gen_ai_attrs));
        }
        if let Some(c) = m.context_length {
            context.push(number_point(now, c as f64, attrs()));
        }
        if let Some(s) = m.expires_at.as_deref().and_then(|e| seconds_until(e, now)) {
            expires.push(number_point(now, s.max(0.0), attrs()));
        }
    }
    let mut out = Vec::new();
    if up {
        out.push(Metric::gauge(
            "ollama.models.loaded",
            "{model}",
            vec![number_point(now, models.len() as f64, Vec::new())],
        ));
    }
    for (name, unit, points) in [
        ("ollama.model.size", "By", size),
        ("ollama.model.vram.usage", "By", vram),
        ("ollama.model.vram.share", "%", share),
        ("ollama.model.cpu_offload", "%", offload),
        ("gen_ai.server.kv_cache.usage", "%", kv_cache),
        ("ollama.model.context_length", "{token}", context),
        ("ollama.model.expires_in", "s", expires),
    ] {
        if !points.is_empty() {
            out.push(Metric::gauge(name, unit, points));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{metric, number_value, AttributesExt};

    #[test]
    fn the_default_timeout_follows_a_short_interval() {
        let c = |interval: u64, timeout: Option<u64>| OllamaConfig {
            interval: Duration::from_millis(interval),
            timeout: timeout.map(Duration::from_millis),
            ..Default::default()
        };
        assert_eq!(c(5000, None).timeout(), Duration::from_secs(2));
        assert_eq!(c(1000, None).timeout(), Duration::from_millis(800));
        assert!(c(1000, None).validate().is_ok());
        assert_eq!(
            c(1000, Some(1000)).validate().unwrap_err().field.as_deref(),
            Some("timeout")
        );
    }

    fn fixture(name: &str) -> Ps {
        let text = std::fs::read_to_string(format!(
            "{}/../tests/fixtures/ollama/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn values(metrics: &[Metric], name: &str) -> Vec<(String, f64)> {
        let m = metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        let Some(metric::Data::Gauge(g)) = &m.data else {
            panic!()
        };
        g.data_points
            .iter()
            .map(|p| {
                (
                    p.attributes
                        .get_str("gen_ai.request.model")
                        .unwrap_or("")
                        .to_owned(),
                    number_value(p).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn two_models_one_partly_offloaded() {
        let ps = fixture("ps-two-models.json");
        let total = 24.0 * GIB;
        let m = model_metrics(
            &ps.models,
            Some(total as u64),
            1_795_359_780_000_000_000,
            true,
        );
        assert_eq!(
            values(&m, "ollama.models.loaded"),
            vec![(String::new(), 2.0)]
        );
        let share = values(&m, "ollama.model.vram.share");
        assert_eq!(share[0], ("llama3.1:8b".into(), 100.0));
        assert!(
            (share[1].1 - 14010000000.0 / 23345103872.0 * 100.0).abs() < 1e-9,
            "partly offloaded: {share:?}"
        );
        let make = m
            .iter()
            .find(|x| x.name == "ollama.model.size")
            .map(|x| match &x.data {
                Some(metric::Data::Gauge(g)) => g.data_points[1].attributes.clone(),
                _ => Vec::new(),
            })
            .unwrap();
        assert_eq!(make.get_str("ollama.model.parameter_size"), Some("32.8B"));
        assert_eq!(
            make.get_str("ollama.model.quantization_level"),
            Some("Q4_K_M")
        );
        let offload = values(&m, "ollama.model.cpu_offload");
        assert!((offload[1].1 - (100.0 - 14010000000.0 / 23345103872.0 * 100.0)).abs() < 1e-9);
        let usage = values(&m, "gen_ai.server.kv_cache.usage");
        assert!((usage[0].1 - 6654289920.0 / total * 100.0).abs() < 1e-9);
        let kv_point = m
            .iter()
            .find(|x| x.name == "gen_ai.server.kv_cache.usage")
            .map(|x| match &x.data {
                Some(metric::Data::Gauge(g)) => g.data_points[0].attributes.clone(),
                _ => Vec::new(),
            })
            .unwrap();
        assert_eq!(kv_point.get_str(KV_CACHE_BASIS), Some("vram_allocation"));
        assert_eq!(kv_point.get_str("gen_ai.provider.name"), Some("ollama"));
        assert_eq!(
            values(&m, "ollama.model.context_length")[1],
            ("qwen2.5:32b".into(), 4096.0)
        );
        // 2026-11-22T15:04:05.123456789Z is 65.123456789 s after 15:03:00Z.
        let expires = values(&m, "ollama.model.expires_in");
        assert!((expires[0].1 - 65.123_456_789).abs() < 1e-3, "{expires:?}");
    }

    #[test]
    fn older_ollama_and_empty_answers() {
        let ps = fixture("ps-real-nirmato-issue13.json");
        let m = model_metrics(&ps.models, None, 0, true);
        assert!(
            !m.iter().any(|x| x.name == "gen_ai.server.kv_cache.usage"),
            "no VRAM total, no usage figure (a share of its own size is no usage)"
        );
        assert_eq!(
            values(&m, "ollama.model.vram.share"),
            vec![("gemma3:latest".into(), 100.0)]
        );
        assert_eq!(
            values(&m, "ollama.model.cpu_offload"),
            vec![("gemma3:latest".into(), 0.0)]
        );
        assert!(
            !m.iter().any(|x| x.name == "ollama.model.context_length"),
            "no context_length in older Ollama"
        );
        let empty = fixture("ps-empty.json");
        let m = model_metrics(&empty.models, None, 0, true);
        assert_eq!(m.len(), 1, "only the count, no stale per-model series");
        assert!(model_metrics(&[], None, 0, false).is_empty());
    }

    #[test]
    fn vram_sources_in_order() {
        let none = || None;
        assert_eq!(
            total_vram(Some(24.0), Some("80".into()), || Some(1), none),
            (Some(24 * (1 << 30)), VramSource::Config)
        );
        assert_eq!(
            total_vram(None, Some("80".into()), || Some(1), none),
            (Some(80 * (1 << 30)), VramSource::Environment)
        );
        assert_eq!(
            total_vram(None, Some("junk".into()), || Some(7), none),
            (Some(7), VramSource::Nvml)
        );
        assert_eq!(
            total_vram(None, None, none, || Some(9)),
            (Some(9), VramSource::NvidiaSmi)
        );
        assert_eq!(
            total_vram(None, None, none, none),
            (None, VramSource::ModelSize)
        );
    }

    #[test]
    fn expiry_with_offsets() {
        let now = 1_754_604_446_000_000_000; // 2025-08-07T22:07:26Z
        let s = seconds_until("2025-08-08T00:07:26.817827822+02:00", now).unwrap();
        assert!((s - 0.817827822).abs() < 1e-3, "{s}");
        assert_eq!(seconds_until("soon", now), None);
    }
}
