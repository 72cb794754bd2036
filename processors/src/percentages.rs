//! `percentages`: the derived gauges operators alert on, computed per resource.
//!
//! Built in: KV-cache usage from blocks (`gen_ai.server.kv_cache.blocks.used` / `.total`) or
//! tokens (`gen_ai.server.kv_cache.tokens.usage` / `.limit`) where the engine gives no percentage, capacity utilisation (`gen_ai.server.requests.running` /
//! `gen_ai.server.requests.max`, which the configured `max_requests` supplies where the engine
//! reports none) and Ollama's VRAM share; plus any ratio the config defines. GPU memory has
//! none: the `nvml` receiver emits the hardware conventions' `hw.gpu.memory.utilization` (0..1). A derived metric the batch already carries is left alone. Numerator and
//! denominator points pair up by equal attributes; a denominator without attributes applies to
//! every numerator point.

use std::collections::HashMap;

use genai_collector_core::model::{
    any_value, metric, number_point, number_value, Batch, KeyValue, Metric, MetricExt,
    NumberDataPoint,
};
use genai_collector_core::{
    BuildContext, ComponentConfig, ComponentError, Processor, ProcessorFactory, ValidationError,
};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ratio {
    /// The derived gauge's name.
    pub name: String,
    pub numerator: String,
    pub denominator: String,
    #[serde(default = "hundred")]
    pub scale: f64,
    #[serde(default = "percent")]
    pub unit: String,
}

fn hundred() -> f64 {
    100.0
}

fn percent() -> String {
    "%".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PercentagesConfig {
    /// Concurrent requests a server runs at most (vLLM `max_num_seqs`), where the engine does
    /// not report `gen_ai.server.requests.max`.
    pub max_requests: Option<f64>,
    /// Your own ratios.
    pub ratios: Vec<Ratio>,
}

impl ComponentConfig for PercentagesConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.max_requests.is_some_and(|m| m.is_nan() || m <= 0.0) {
            return Err(ValidationError::field(
                "max_requests",
                "must be more than 0",
            ));
        }
        if let Some(r) = self
            .ratios
            .iter()
            .find(|r| r.name.is_empty() || !r.scale.is_finite())
        {
            return Err(ValidationError::field(
                "ratios",
                format!("ratio `{}` needs a name and a finite scale", r.name),
            ));
        }
        Ok(())
    }
}

pub struct PercentagesFactory;

impl ProcessorFactory for PercentagesFactory {
    type Config = PercentagesConfig;

    fn kind(&self) -> &'static str {
        "percentages"
    }

    fn description(&self) -> &'static str {
        "derived percentages: KV cache from blocks or tokens, capacity (running / max), Ollama VRAM share, your own ratios"
    }

    fn build(
        &self,
        config: &PercentagesConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        let mut ratios = vec![
            ratio(
                "gen_ai.server.kv_cache.usage",
                "gen_ai.server.kv_cache.blocks.used",
                "gen_ai.server.kv_cache.blocks.total",
            ),
            // TGI's stand-in: the tokens its running batch may reach, of its budget.
            ratio(
                "gen_ai.server.kv_cache.usage",
                "gen_ai.server.kv_cache.tokens.usage",
                "gen_ai.server.kv_cache.tokens.limit",
            ),
            ratio(
                "gen_ai.server.capacity.usage",
                "gen_ai.server.requests.running",
                "gen_ai.server.requests.max",
            ),
            ratio(
                "ollama.model.vram.share",
                "ollama.model.vram.usage",
                "ollama.model.size",
            ),
        ];
        ratios.extend(config.ratios.iter().cloned());
        Ok(Box::new(Percentages {
            ratios,
            max_requests: config.max_requests,
        }))
    }
}

fn ratio(name: &str, numerator: &str, denominator: &str) -> Ratio {
    Ratio {
        name: name.into(),
        numerator: numerator.into(),
        denominator: denominator.into(),
        scale: 100.0,
        unit: "%".into(),
    }
}

const RUNNING: &str = "gen_ai.server.requests.running";
const MAX: &str = "gen_ai.server.requests.max";

pub struct Percentages {
    ratios: Vec<Ratio>,
    max_requests: Option<f64>,
}

/// The number points of the metric `name` (gauge or sum) in a resource's scopes.
fn points<'a>(metrics: &'a [&'a Metric], name: &str) -> Vec<&'a NumberDataPoint> {
    metrics
        .iter()
        .filter(|m| m.name == name)
        .flat_map(|m| match &m.data {
            Some(metric::Data::Gauge(g)) => g.data_points.iter().collect::<Vec<_>>(),
            Some(metric::Data::Sum(s)) => s.data_points.iter().collect(),
            _ => Vec::new(),
        })
        .collect()
}

fn same_attrs(a: &[KeyValue], b: &[KeyValue]) -> bool {
    a.len() == b.len() && a.iter().all(|kv| b.contains(kv))
}

/// A hash of an attribute set that does not depend on the attributes' order.
fn attrs_hash(attrs: &[KeyValue]) -> u64 {
    use std::hash::{Hash, Hasher};
    // Each attribute hashed alone, then combined by a commutative sum.
    attrs
        .iter()
        .map(|kv| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            kv.key.hash(&mut h);
            match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.hash(&mut h),
                Some(any_value::Value::IntValue(i)) => i.hash(&mut h),
                Some(any_value::Value::BoolValue(b)) => b.hash(&mut h),
                Some(any_value::Value::DoubleValue(d)) => d.to_bits().hash(&mut h),
                // Rare in metric attributes: equality decides.
                _ => {}
            }
            h.finish()
        })
        .fold(attrs.len() as u64, u64::wrapping_add)
}

impl Percentages {
    fn derive(&self, metrics: &[&Metric], derived: &[Metric], r: &Ratio) -> Option<Metric> {
        // Cheap checks first: most ratios do not apply to most resources.
        if !metrics.iter().any(|m| m.name == r.numerator)
            || metrics.iter().any(|m| m.name == r.name)
            || derived.iter().any(|m| m.name == r.name)
        {
            return None;
        }
        let num = points(metrics, &r.numerator);
        if num.is_empty() {
            return None;
        }
        let den = points(metrics, &r.denominator);
        // Denominators by attribute set: one lookup per numerator, however many points.
        let mut by_attrs: HashMap<u64, Vec<&NumberDataPoint>> = HashMap::with_capacity(den.len());
        for d in &den {
            by_attrs
                .entry(attrs_hash(&d.attributes))
                .or_default()
                .push(d);
        }
        let unlabelled = den.iter().find(|d| d.attributes.is_empty());
        let mut out = Vec::new();
        for n in num {
            let denominator = by_attrs
                .get(&attrs_hash(&n.attributes))
                .and_then(|ds| ds.iter().find(|d| same_attrs(&d.attributes, &n.attributes)))
                .or(unlabelled)
                .and_then(|d| number_value(d));
            if let (Some(v), Some(d)) = (number_value(n), denominator) {
                if d > 0.0 {
                    out.push(number_point(
                        n.time_unix_nano,
                        v / d * r.scale,
                        n.attributes.clone(),
                    ));
                }
            }
        }
        (!out.is_empty()).then(|| {
            let mut m = Metric::gauge(&r.name, &r.unit, out);
            m.description = format!("{} / {} x {}", r.numerator, r.denominator, r.scale);
            m
        })
    }
}

impl Processor for Percentages {
    fn process(&mut self, batch: &mut Batch) {
        for rm in &mut batch.resource_metrics {
            let derived: Vec<Metric> = {
                let metrics: Vec<&Metric> =
                    rm.scope_metrics.iter().flat_map(|s| &s.metrics).collect();
                let mut derived: Vec<Metric> = Vec::new();
                // The configured maximum is the engine's `gen_ai.server.requests.max` where it
                // reports none, so pools can add capacities up.
                if let Some(max) = self.max_requests {
                    if !metrics.iter().any(|m| m.name == MAX) {
                        let running = points(&metrics, RUNNING);
                        if !running.is_empty() {
                            let pts = running
                                .iter()
                                .map(|p| number_point(p.time_unix_nano, max, p.attributes.clone()))
                                .collect();
                            let mut m = Metric::gauge(MAX, "{request}", pts);
                            "Concurrent requests a server runs at most (from config)."
                                .clone_into(&mut m.description);
                            derived.push(m);
                        }
                    }
                }
                for r in &self.ratios {
                    // Earlier derivations count as present, so a ratio never doubles up.
                    let with_derived: Vec<&Metric>;
                    let seen = if derived.iter().any(|d| d.name == r.denominator) {
                        with_derived = metrics.iter().copied().chain(derived.iter()).collect();
                        &with_derived
                    } else {
                        &metrics
                    };
                    if let Some(m) = self.derive(seen, &derived, r) {
                        derived.push(m);
                    }
                }
                derived
            };
            if let Some(scope) = rm.scope_metrics.first_mut() {
                scope.metrics.extend(derived);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::kv;

    fn build(config: PercentagesConfig) -> Box<dyn Processor> {
        let ctx = BuildContext {
            id: genai_collector_core::ComponentId::parse("percentages").unwrap(),
            pipeline: None,
            telemetry: Default::default(),
        };
        PercentagesFactory.build(&config, &ctx).unwrap()
    }

    fn g(name: &str, v: f64, attrs: Vec<KeyValue>) -> Metric {
        Metric::gauge(name, "", vec![number_point(1, v, attrs)])
    }

    fn value(b: &Batch, name: &str) -> Option<f64> {
        b.metrics()
            .find(|m| m.name == name)
            .and_then(|m| match &m.data {
                Some(metric::Data::Gauge(g)) => number_value(&g.data_points[0]),
                _ => None,
            })
    }

    #[test]
    fn capacity_from_config_or_engine_and_gpu_memory() {
        let model = || vec![kv("gen_ai.request.model", "m")];
        let mut b = Batch::with_resource(
            vec![],
            vec![g("gen_ai.server.requests.running", 48.0, model())],
        );
        b.push_resource(
            vec![],
            vec![
                g("gen_ai.server.requests.running", 10.0, model()),
                g("gen_ai.server.requests.max", 40.0, model()),
            ],
        );
        b.push_resource(
            vec![],
            vec![
                g("hw.gpu.memory.usage", 20.0, vec![]),
                g("hw.gpu.memory.limit", 80.0, vec![]),
            ],
        );
        build(PercentagesConfig {
            max_requests: Some(64.0),
            ..Default::default()
        })
        .process(&mut b);
        let per: Vec<Option<f64>> = b
            .resource_metrics
            .iter()
            .map(|rm| Batch {
                resource_metrics: vec![rm.clone()],
            })
            .map(|one| value(&one, "gen_ai.server.capacity.usage"))
            .collect();
        assert_eq!(per, vec![Some(75.0), Some(25.0), None]);
        // GPU memory gets no percentage beside the receiver's `hw.gpu.memory.utilization`.
        assert!(b.metrics().all(|m| m.name != "hw.gpu.memory.usage.percent"));
        assert_eq!(
            value(
                &Batch {
                    resource_metrics: vec![b.resource_metrics[0].clone()]
                },
                MAX
            ),
            Some(64.0),
            "the configured max becomes a series"
        );
    }

    #[test]
    fn large_requests_take_linear_time() {
        // 100,000 numerator and denominator points, each with its own attribute set (a pushed
        // request): every numerator finds its own denominator, whatever the attribute order.
        let n = 100_000;
        let points = |name: &str, v: f64, flip: bool| {
            let pts = (0..n)
                .map(|i| {
                    let mut a = vec![
                        kv("gen_ai.request.model", format!("m{i}")),
                        kv("r", i as i64),
                    ];
                    if flip {
                        a.reverse();
                    }
                    number_point(1, v + i as f64, a)
                })
                .collect();
            Metric::gauge(name, "", pts)
        };
        let mut b = Batch::with_resource(
            vec![],
            vec![
                points("gen_ai.server.requests.running", 0.0, false),
                points("gen_ai.server.requests.max", 0.0, true),
            ],
        );
        let started = std::time::Instant::now();
        build(PercentagesConfig::default()).process(&mut b);
        let m = b
            .metrics()
            .find(|m| m.name == "gen_ai.server.capacity.usage")
            .unwrap();
        let Some(metric::Data::Gauge(g)) = &m.data else {
            panic!()
        };
        assert_eq!(g.data_points.len(), n - 1, "all but the 0/0 point");
        assert!(g.data_points.iter().all(|p| number_value(p) == Some(100.0)));
        println!("{n} ratios in {:?}", started.elapsed());
    }

    #[test]
    fn blocks_user_ratios_and_no_overwrite() {
        let mut b = Batch::with_resource(
            vec![],
            vec![
                g("gen_ai.server.kv_cache.blocks.used", 300.0, vec![]),
                g("gen_ai.server.kv_cache.blocks.total", 1200.0, vec![]),
                g("padding_tokens", 5.0, vec![kv("m", "a")]),
                g("batch_tokens", 20.0, vec![kv("m", "a")]),
            ],
        );
        let ratio = Ratio {
            name: "padding.usage".into(),
            numerator: "padding_tokens".into(),
            denominator: "batch_tokens".into(),
            scale: 1.0,
            unit: "1".into(),
        };
        build(PercentagesConfig {
            ratios: vec![ratio],
            ..Default::default()
        })
        .process(&mut b);
        assert_eq!(value(&b, "gen_ai.server.kv_cache.usage"), Some(25.0));
        assert_eq!(value(&b, "padding.usage"), Some(0.25));
        let mut already = Batch::with_resource(
            vec![],
            vec![
                g("gen_ai.server.kv_cache.usage", 40.0, vec![]),
                g("gen_ai.server.kv_cache.blocks.used", 1.0, vec![]),
                g("gen_ai.server.kv_cache.blocks.total", 2.0, vec![]),
            ],
        );
        build(PercentagesConfig::default()).process(&mut already);
        assert_eq!(
            already
                .metrics()
                .filter(|m| m.name == "gen_ai.server.kv_cache.usage")
                .count(),
            1,
            "the engine's own value stays"
        );
        assert_eq!(value(&already, "gen_ai.server.kv_cache.usage"), Some(40.0));
        let mut zero = Batch::with_resource(
            vec![],
            vec![
                g("hw.gpu.memory.usage", 1.0, vec![]),
                g("hw.gpu.memory.limit", 0.0, vec![]),
            ],
        );
        build(PercentagesConfig {
            ratios: vec![super::ratio(
                "hw.gpu.memory.usage.percent",
                "hw.gpu.memory.usage",
                "hw.gpu.memory.limit",
            )],
            ..Default::default()
        })
        .process(&mut zero);
        assert_eq!(
            value(&zero, "hw.gpu.memory.usage.percent"),
            None,
            "no division by zero"
        );
    }
}
