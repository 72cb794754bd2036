//! `vllm`: scrapes vLLM's `/metrics` (V0 and V1 engines) and reads its engine facts.

use std::sync::Arc;
use std::time::Duration;

use genai_collector_core::model::{kv, number_point, Metric, MetricExt};

use crate::scrape::text::Page;
use crate::scrape::{Engine, ScrapeFactory};

/// vLLM's additions to plain scraping (public for the fuzz targets).
pub struct Vllm;

impl Engine for Vllm {
    fn provider(&self) -> Option<&'static str> {
        Some("vllm")
    }

    fn default_interval(&self) -> Duration {
        Duration::from_secs(5)
    }

    /// `vllm:cache_config_info` carries the KV cache's size as labels, and
    /// `vllm:lora_requests_info` the adapters in use as a comma-separated label: both become
    /// plain gauges (`vllm:num_gpu_blocks`, `vllm:block_size`, their product
    /// `vllm:kv_cache_max_tokens`, `vllm:lora_adapters_running`, `vllm:lora_adapters_max`).
    fn enrich(&self, page: &Page<'_>, metrics: &mut Vec<Metric>, now: u64) {
        for f in &page.families {
            match f.name {
                "vllm:cache_config_info" => {
                    for s in &f.samples {
                        let labels = page.labels_of(s);
                        let model = labels
                            .iter()
                            .find(|l| l.name == "model_name")
                            .map(|l| l.value.as_ref());
                        let number = |label: &str| {
                            labels
                                .iter()
                                .find(|l| l.name == label)
                                .and_then(|l| l.value.parse::<f64>().ok())
                        };
                        let (blocks, block_size) = (number("num_gpu_blocks"), number("block_size"));
                        for (name, unit, value) in [
                            ("vllm:num_gpu_blocks", "{block}", blocks),
                            ("vllm:block_size", "{token}", block_size),
                            // The KV cache's capacity in tokens.
                            (
                                "vllm:kv_cache_max_tokens",
                                "{token}",
                                blocks.zip(block_size).map(|(b, s)| b * s),
                            ),
                        ] {
                            if let Some(v) = value {
                                let attrs =
                                    model.map(|m| vec![kv("model_name", m)]).unwrap_or_default();
                                metrics.push(Metric::gauge(
                                    name,
                                    unit,
                                    vec![number_point(now, v, attrs)],
                                ));
                            }
                        }
                    }
                }
                "vllm:lora_requests_info" => {
                    if let Some(s) = f.samples.iter().max_by(|a, b| a.value.total_cmp(&b.value)) {
                        let labels = page.labels_of(s);
                        let running = labels
                            .iter()
                            .find(|l| l.name == "running_lora_adapters")
                            .map_or(0, |l| {
                                l.value.split(',').filter(|a| !a.trim().is_empty()).count()
                            });
                        let max = labels
                            .iter()
                            .find(|l| l.name == "max_lora")
                            .and_then(|l| l.value.parse::<f64>().ok());
                        metrics.push(Metric::gauge(
                            "vllm:lora_adapters_running",
                            "{adapter}",
                            vec![number_point(now, running as f64, vec![])],
                        ));
                        if let Some(max) = max {
                            metrics.push(Metric::gauge(
                                "vllm:lora_adapters_max",
                                "{adapter}",
                                vec![number_point(now, max, vec![])],
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

pub const FACTORY: ScrapeFactory = ScrapeFactory {
    kind: "vllm",
    description: "scrapes vLLM's /metrics (V0 and V1 engines): model from `model_name`, KV-cache size, LoRA adapters",
    engine: |_| Arc::new(Vllm),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::text::{parse, Format};
    use genai_collector_core::model::{metric, number_value};

    fn gauge(metrics: &[Metric], name: &str) -> f64 {
        let m = metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        let Some(metric::Data::Gauge(g)) = &m.data else {
            panic!()
        };
        number_value(&g.data_points[0]).unwrap()
    }

    #[test]
    fn engine_facts_from_the_v1_page() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/vllm/v1-composed.prom"
        ))
        .unwrap();
        let page = parse(&text, Format::Prometheus).unwrap();
        let mut metrics = Vec::new();
        Vllm.enrich(&page, &mut metrics, 1);
        assert!(gauge(&metrics, "vllm:num_gpu_blocks") > 0.0);
        assert!(gauge(&metrics, "vllm:block_size") > 0.0);
        assert_eq!(
            gauge(&metrics, "vllm:kv_cache_max_tokens"),
            gauge(&metrics, "vllm:num_gpu_blocks") * gauge(&metrics, "vllm:block_size")
        );
        assert!(metrics
            .iter()
            .any(|m| m.name == "vllm:lora_adapters_running"));
    }
}
