//! `debug`: writes batches to stdout, one line per data point, for people reading along.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use genai_collector_core::model::{
    display_value, metric, number_value, resource_attributes, KeyValue, MetricExt,
};
use genai_collector_core::{
    async_trait, Batch, BuildContext, ComponentConfig, ComponentError, ExportError, Exporter,
    ExporterFactory,
};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verbosity {
    /// One summary line per batch.
    Basic,
    /// One line per data point: kind, name, attributes, value, unit.
    #[default]
    Normal,
    /// As `normal`, prefixed with the point's time and followed by the resource's attributes.
    Detailed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    #[default]
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DebugConfig {
    pub verbosity: Verbosity,
    pub output: Stream,
}

impl ComponentConfig for DebugConfig {}

pub struct DebugExporterFactory;

impl ExporterFactory for DebugExporterFactory {
    type Config = DebugConfig;

    fn kind(&self) -> &'static str {
        "debug"
    }

    fn description(&self) -> &'static str {
        "writes every data point as one human-readable line to stdout or stderr"
    }

    fn build(
        &self,
        config: DebugConfig,
        _ctx: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        Ok(Box::new(DebugExporter { config }))
    }
}

pub struct DebugExporter {
    config: DebugConfig,
}

#[async_trait]
impl Exporter for DebugExporter {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        let mut buf = String::new();
        render(batch, self.config.verbosity, &mut buf);
        let result = match self.config.output {
            Stream::Stdout => std::io::stdout().lock().write_all(buf.as_bytes()),
            Stream::Stderr => std::io::stderr().lock().write_all(buf.as_bytes()),
        };
        result.map_err(|e| {
            ExportError::Permanent(format!("cannot write to {:?}: {e}", self.config.output))
        })
    }
}

/// Appends the lines for `batch` to `out`.
pub fn render(batch: &Batch, verbosity: Verbosity, out: &mut String) {
    if verbosity == Verbosity::Basic {
        let metrics = batch.metrics().count();
        let _ = writeln!(
            out,
            "batch: {} resources, {metrics} metrics, {} data points",
            batch.resource_metrics.len(),
            batch.point_count()
        );
        return;
    }
    for rm in &batch.resource_metrics {
        let resource = resource_attributes(rm);
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            let unit = if m.unit.is_empty() {
                String::new()
            } else {
                format!(" {}", m.unit)
            };
            // Where the point came from, so that `up 0` says which target is down.
            let origin: Vec<String> = ["service.name", "service.instance.id"]
                .iter()
                .filter_map(|k| resource.iter().find(|kv| kv.key == *k))
                .filter_map(|kv| kv.value.as_ref().map(display_value))
                .collect();
            let origin = origin.join(" ");
            let mut line = |time: u64, attrs: &[KeyValue], value: &str| {
                if verbosity == Verbosity::Detailed {
                    let t = UNIX_EPOCH + Duration::from_nanos(time);
                    let _ = write!(out, "{} ", humantime::format_rfc3339_millis(t));
                }
                let _ = write!(out, "{} {}", m.kind_name(), m.name);
                write_attrs(out, attrs);
                let _ = write!(out, " {value}{unit}");
                if verbosity == Verbosity::Detailed && !resource.is_empty() {
                    out.push_str(" resource");
                    write_attrs(out, resource);
                } else if !origin.is_empty() {
                    let _ = write!(out, " ({origin})");
                }
                out.push('\n');
            };
            match &m.data {
                Some(metric::Data::Gauge(g)) => {
                    for p in &g.data_points {
                        line(
                            p.time_unix_nano,
                            &p.attributes,
                            &fmt_number(number_value(p)),
                        );
                    }
                }
                Some(metric::Data::Sum(s)) => {
                    for p in &s.data_points {
                        line(
                            p.time_unix_nano,
                            &p.attributes,
                            &fmt_number(number_value(p)),
                        );
                    }
                }
                Some(metric::Data::Histogram(h)) => {
                    for p in &h.data_points {
                        let mut v = format!("count={} sum={}", p.count, fmt_number(p.sum));
                        v.push_str(" buckets=[");
                        for (i, c) in p.bucket_counts.iter().enumerate() {
                            let bound = p
                                .explicit_bounds
                                .get(i)
                                .map_or("+Inf".into(), |b| b.to_string());
                            let _ = write!(v, "{}{bound}:{c}", if i > 0 { "," } else { "" });
                        }
                        v.push(']');
                        line(p.time_unix_nano, &p.attributes, &v);
                    }
                }
                Some(metric::Data::ExponentialHistogram(h)) => {
                    for p in &h.data_points {
                        let v = format!(
                            "count={} sum={} scale={}",
                            p.count,
                            fmt_number(p.sum),
                            p.scale
                        );
                        line(p.time_unix_nano, &p.attributes, &v);
                    }
                }
                Some(metric::Data::Summary(s)) => {
                    for p in &s.data_points {
                        let mut v = format!("count={} sum={}", p.count, p.sum);
                        for q in &p.quantile_values {
                            let _ = write!(v, " q{}={}", q.quantile, q.value);
                        }
                        line(p.time_unix_nano, &p.attributes, &v);
                    }
                }
                None => {}
            }
        }
    }
}

fn fmt_number(v: Option<f64>) -> String {
    v.map_or_else(|| "none".into(), |v| v.to_string())
}

fn write_attrs(out: &mut String, attrs: &[KeyValue]) {
    if attrs.is_empty() {
        return;
    }
    out.push('{');
    for (i, kv) in attrs.iter().enumerate() {
        let value = kv.value.as_ref().map(display_value).unwrap_or_default();
        let _ = write!(out, "{}{}={value:?}", if i > 0 { ", " } else { "" }, kv.key);
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{kv, number_point, Histogram, HistogramDataPoint, Metric};

    fn batch() -> Batch {
        let hist = Metric {
            name: "gen_ai.server.request.duration".into(),
            unit: "s".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    count: 3,
                    sum: Some(1.5),
                    bucket_counts: vec![1, 2],
                    explicit_bounds: vec![0.5],
                    ..Default::default()
                }],
                aggregation_temporality: 2,
            })),
            ..Default::default()
        };
        Batch::with_resource(
            vec![kv("service.name", "vllm")],
            vec![
                Metric::gauge(
                    "gen_ai.server.kv_cache.usage",
                    "%",
                    vec![number_point(
                        1_700_000_000_000_000_000,
                        42.5,
                        vec![kv("gen_ai.request.model", "llama")],
                    )],
                ),
                hist,
            ],
        )
    }

    #[test]
    fn normal_is_one_line_per_point() {
        let mut out = String::new();
        render(&batch(), Verbosity::Normal, &mut out);
        assert_eq!(
            out,
            "gauge gen_ai.server.kv_cache.usage{gen_ai.request.model=\"llama\"} 42.5 % (vllm)\n\
             histogram gen_ai.server.request.duration count=3 sum=1.5 buckets=[0.5:1,+Inf:2] s (vllm)\n"
        );
    }

    #[test]
    fn detailed_adds_time_and_resource() {
        let mut out = String::new();
        render(&batch(), Verbosity::Detailed, &mut out);
        let first = out.lines().next().unwrap();
        assert!(
            first.starts_with("2023-11-14T22:13:20.000Z gauge"),
            "{first}"
        );
        assert!(
            first.ends_with("resource{service.name=\"vllm\"}"),
            "{first}"
        );
    }

    #[test]
    fn basic_is_one_line_per_batch() {
        let mut out = String::new();
        render(&batch(), Verbosity::Basic, &mut out);
        assert_eq!(out, "batch: 1 resources, 2 metrics, 2 data points\n");
    }
}
