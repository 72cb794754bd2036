//! `model_server_protocol`: one engine's normalised signals, served on a `/metrics` page in the
//! names the Gateway API Inference Extension's endpoint picker reads by default (its "model
//! server protocol", which vLLM speaks), so that a TGI, SGLang, llama.cpp or Ollama pod can sit
//! in an InferencePool. Run as a sidecar beside the engine, scraping it.
//!
//! | picker's signal | served as | from |
//! | --- | --- | --- |
//! | TotalQueuedRequests | `vllm:num_requests_waiting` | `gen_ai.server.requests.waiting` |
//! | TotalRunningRequests | `vllm:num_requests_running` | `gen_ai.server.requests.running` |
//! | KVCacheUtilization (0..1) | `vllm:kv_cache_usage_perc`, `vllm:gpu_cache_usage_perc` | `gen_ai.server.kv_cache.usage` / 100 |
//! | LoRA info | `vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}` | `gen_ai.server.lora.adapters.max` |
//!
//! Both KV names are served: older pickers read `gpu_cache_usage_perc`, newer ones
//! `kv_cache_usage_perc`. A figure the engine does not give is left out rather than made up
//! (Ollama's VRAM share is no KV usage); with no report for `stale_after`, the page is empty, so
//! the picker sees the pod's metrics go missing instead of freezing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use genai_collector_core::config::duration;
use genai_collector_core::model::{number_value, AttributesExt, Batch, MetricExt};
use genai_collector_core::tls::TlsServerConfig;
use genai_collector_core::{
    async_trait, BuildContext, CancellationToken, ComponentConfig, ComponentError, ExportError,
    Exporter, ExporterFactory, ValidationError,
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelServerProtocolConfig {
    /// Where the picker scrapes (`--model-server-metrics-port`).
    pub endpoint: String,
    pub tls: Option<TlsServerConfig>,
    pub bearer_token: Option<String>,
    /// Past this without a report from the engine, the page is empty.
    #[serde(with = "duration")]
    pub stale_after: Duration,
}

impl Default for ModelServerProtocolConfig {
    fn default() -> Self {
        Self {
            endpoint: "localhost:9400".into(),
            tls: None,
            bearer_token: None,
            stale_after: Duration::from_secs(30),
        }
    }
}

impl ComponentConfig for ModelServerProtocolConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.stale_after.is_zero() {
            return Err(ValidationError::field(
                "stale_after",
                "must be more than 0s",
            ));
        }
        Ok(())
    }
}

pub struct ModelServerProtocolFactory;

impl ExporterFactory for ModelServerProtocolFactory {
    type Config = ModelServerProtocolConfig;

    fn kind(&self) -> &'static str {
        "model_server_protocol"
    }

    fn description(&self) -> &'static str {
        "serves an engine's queue, running requests, KV cache (0..1) and LoRA info in the names the Inference Extension's endpoint picker reads"
    }

    fn build(
        &self,
        config: ModelServerProtocolConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        let listener = crate::endpoint::bind(&config.endpoint)?;
        let shared = Arc::new(Shared {
            latest: Mutex::new(None),
            token: config.bearer_token.clone().filter(|t| !t.is_empty()),
            stale_after: config.stale_after,
        });
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/metrics", get(serve))
            .with_state(shared.clone());
        let tls = config.tls.as_ref();
        crate::endpoint::spawn_http(listener, app, tls, stop.clone(), "model_server_protocol")?;
        Ok(Box::new(ModelServerProtocol { shared, stop }))
    }
}

/// The engine's latest figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Signals {
    pub waiting: Option<f64>,
    pub running: Option<f64>,
    /// 0..1.
    pub kv_cache: Option<f64>,
    pub lora_max: Option<f64>,
    /// The model, where every point names the same one.
    pub model: Option<String>,
}

impl Signals {
    /// The figures in `batch`, from every resource with `gen_ai.server.*` metrics: requests
    /// add up across them, the KV cache is the fullest.
    pub fn from_batch(batch: &Batch) -> Option<Self> {
        let mut s = Signals::default();
        let mut models: Vec<&str> = Vec::new();
        let mut found = false;
        for m in batch.metrics() {
            for p in m.number_points() {
                let Some(v) = number_value(p) else { continue };
                let slot = match m.name.as_str() {
                    "gen_ai.server.requests.waiting" => &mut s.waiting,
                    "gen_ai.server.requests.running" => &mut s.running,
                    "gen_ai.server.lora.adapters.max" => &mut s.lora_max,
                    "gen_ai.server.kv_cache.usage"
                        if p.attributes
                            .get_str("gen_ai.server.kv_cache.basis")
                            .is_none() =>
                    {
                        let kv = s.kv_cache.get_or_insert(0.0);
                        *kv = kv.max(v / 100.0);
                        found = true;
                        continue;
                    }
                    _ => continue,
                };
                *slot.get_or_insert(0.0) += v;
                found = true;
                if let Some(model) = p.attributes.get_str("gen_ai.request.model") {
                    if !models.contains(&model) {
                        models.push(model);
                    }
                }
            }
        }
        if let [one] = models.as_slice() {
            s.model = Some((*one).to_owned());
        }
        found.then_some(s)
    }

    /// The page: the picker's names, gauges, each figure the engine gave.
    pub fn render(&self, now_unix_s: f64) -> String {
        let mut out = String::new();
        let label = self
            .model
            .as_ref()
            .map(|m| format!("{{model_name=\"{}\"}}", escape(m)))
            .unwrap_or_default();
        let mut gauge = |name: &str, help: &str, labels: &str, v: f64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{labels} {v}\n"
            ));
        };
        if let Some(v) = self.waiting {
            gauge(
                "vllm:num_requests_waiting",
                "Requests waiting (gen_ai.server.requests.waiting).",
                &label,
                v,
            );
        }
        if let Some(v) = self.running {
            gauge(
                "vllm:num_requests_running",
                "Requests running (gen_ai.server.requests.running).",
                &label,
                v,
            );
        }
        if let Some(v) = self.kv_cache {
            let help = "KV-cache usage, 0..1 (gen_ai.server.kv_cache.usage / 100).";
            gauge("vllm:kv_cache_usage_perc", help, &label, v);
            gauge("vllm:gpu_cache_usage_perc", help, &label, v);
        }
        if let Some(max) = self.lora_max {
            // The adapters' names are not among the normalised signals: the lists stay empty.
            let labels = format!(
                "{{max_lora=\"{max}\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}}"
            );
            gauge(
                "vllm:lora_requests_info",
                "LoRA adapters (max from gen_ai.server.lora.adapters.max); the value is when it was last updated.",
                &labels,
                now_unix_s,
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Shared {
    latest: Mutex<Option<(Signals, Instant)>>,
    token: Option<String>,
    stale_after: Duration,
}

struct ModelServerProtocol {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

#[async_trait]
impl Exporter for ModelServerProtocol {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        if let Some(s) = Signals::from_batch(batch) {
            if let Ok(mut latest) = self.shared.latest.lock() {
                *latest = Some((s, Instant::now()));
            }
        }
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), ExportError> {
        self.stop.cancel();
        Ok(())
    }
}

async fn serve(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !genai_collector_core::auth::bearer_matches(s.token.as_deref(), given) {
        return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
    }
    let latest = s.latest.lock().map(|l| l.clone()).unwrap_or_default();
    let body = match latest {
        Some((signals, at)) if at.elapsed() < s.stale_after => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            signals.render(now)
        }
        _ => String::new(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The metric names this page may hold, for tests.
pub const NAMES: [&str; 5] = [
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:lora_requests_info",
];

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{kv, number_point, Metric, MetricExt};

    fn point(
        v: f64,
        extra: Vec<genai_collector_core::model::KeyValue>,
    ) -> Vec<genai_collector_core::model::NumberDataPoint> {
        let mut attrs = vec![kv("gen_ai.request.model", "m\"1")];
        attrs.extend(extra);
        vec![number_point(1, v, attrs)]
    }

    #[test]
    fn engines_add_up_the_fullest_cache_counts_and_ollamas_share_is_no_kv() {
        let mut b = Batch::with_resource(
            vec![kv("service.instance.id", "a")],
            vec![
                Metric::gauge("gen_ai.server.requests.waiting", "", point(2.0, vec![])),
                Metric::gauge("gen_ai.server.kv_cache.usage", "%", point(40.0, vec![])),
            ],
        );
        b.push_resource(
            vec![kv("service.instance.id", "a")],
            vec![
                Metric::gauge("gen_ai.server.requests.waiting", "", point(3.0, vec![])),
                Metric::gauge("gen_ai.server.kv_cache.usage", "%", point(70.0, vec![])),
                Metric::gauge(
                    "gen_ai.server.kv_cache.usage",
                    "%",
                    point(
                        99.0,
                        vec![kv("gen_ai.server.kv_cache.basis", "vram_allocation")],
                    ),
                ),
            ],
        );
        let s = Signals::from_batch(&b).unwrap();
        assert_eq!(s.waiting, Some(5.0));
        assert_eq!(s.kv_cache, Some(0.7));
        assert_eq!(s.running, None, "not given, not made up");
        let page = s.render(0.0);
        assert!(
            page.contains("vllm:num_requests_waiting{model_name=\"m\\\"1\"} 5\n"),
            "{page}"
        );
        assert!(page.contains("vllm:gpu_cache_usage_perc{model_name=\"m\\\"1\"} 0.7\n"));
        assert!(!page.contains("num_requests_running"));
        let nothing =
            Batch::with_resource(vec![], vec![Metric::gauge("up", "", point(1.0, vec![]))]);
        assert_eq!(
            Signals::from_batch(&nothing),
            None,
            "a batch without signals changes nothing"
        );
    }
}
