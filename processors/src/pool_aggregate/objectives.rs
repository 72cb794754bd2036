//! The Gateway API Inference Extension's per-model ("objective") series, derived on the gateway
//! from the normalised engine metrics passing through, so that the Extension's dashboard works
//! on a cluster whose engines run without its endpoint picker:
//!
//! | series (`model_name`, `target_model_name`) | from |
//! | --- | --- |
//! | `inference_objective_request_total` | `gen_ai.server.requests.finished` |
//! | `inference_objective_request_error_total` (`error_code`) | `gen_ai.server.requests.failed` (`error.type`) |
//! | `inference_objective_request_duration_seconds` | `gen_ai.server.request.duration` |
//! | `inference_objective_input_tokens`, `_output_tokens` | `gen_ai.server.request.input_tokens`, `.output_tokens` |
//! | `inference_objective_running_requests` | `gen_ai.server.requests.running` |
//!
//! Counters and histograms are the gateway's own cumulative sums of what the servers' counters
//! added since it first saw each of them (a server's history before that is not counted; a
//! counter that went back restarted from 0). Histograms add up only where the servers' bucket
//! layouts are equal: the first layout seen for a model wins, others are left out (logged).
//! `normalized_time_per_output_token_seconds` (each request's duration over its output tokens)
//! is not derivable exactly from engine histograms, so it is not emitted.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use genai_collector_core::model::{
    kv, metric, number_point, number_value, AggregationTemporality, AttributesExt, Histogram,
    HistogramDataPoint, KeyValue, Metric, MetricExt,
};

const FINISHED: &str = "gen_ai.server.requests.finished";
const FAILED: &str = "gen_ai.server.requests.failed";
const RUNNING: &str = "gen_ai.server.requests.running";
/// The engine histogram behind each objective histogram, and its unit.
const HISTOGRAMS: [(&str, &str, &str); 3] = [
    (
        "gen_ai.server.request.duration",
        "inference_objective_request_duration_seconds",
        "s",
    ),
    (
        "gen_ai.server.request.input_tokens",
        "inference_objective_input_tokens",
        "",
    ),
    (
        "gen_ai.server.request.output_tokens",
        "inference_objective_output_tokens",
        "",
    ),
];

#[derive(Debug, Clone, Default, PartialEq)]
struct Hist {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

/// One model's totals in one pool.
#[derive(Debug, Default)]
struct Totals {
    requests: f64,
    errors: BTreeMap<String, f64>,
    histograms: [Option<Hist>; 3],
    /// Each server's latest running requests of this model, and when.
    running: HashMap<String, (f64, Instant)>,
}

/// A series of one server: metric, model and the label that splits it (`error.type`).
type SeriesKey = (&'static str, String, String);

#[derive(Debug, Clone)]
enum Last {
    Counter(f64),
    Hist(Hist),
}

#[derive(Default)]
pub struct Objectives {
    totals: BTreeMap<(String, String), Totals>,
    last: HashMap<String, HashMap<SeriesKey, Last>>,
    /// When the gateway started counting: the counters' start time.
    start: u64,
    warned_layout: bool,
}

/// How much a cumulative counter added since `before`: a counter that went back restarted.
fn added(before: f64, now: f64) -> f64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

impl Objectives {
    pub fn new(start: u64) -> Self {
        Self {
            start,
            ..Default::default()
        }
    }

    /// Folds one server's metrics in.
    pub fn observe(&mut self, pool: &str, server: &str, metrics: &[&Metric], now: Instant) {
        let last = self.last.entry(server.to_owned()).or_default();
        for m in metrics {
            let name = m.name.as_str();
            match &m.data {
                Some(metric::Data::Sum(s)) if name == FINISHED || name == FAILED => {
                    let key_name = if name == FINISHED { FINISHED } else { FAILED };
                    for p in &s.data_points {
                        let Some(v) = number_value(p) else { continue };
                        let model = p.attributes.get_str("gen_ai.request.model").unwrap_or("");
                        let split = if name == FAILED {
                            p.attributes.get_str("error.type").unwrap_or("_OTHER")
                        } else {
                            // Finish reasons are kept apart, then added into one total.
                            p.attributes
                                .get_str("gen_ai.response.finish_reason")
                                .unwrap_or("")
                        };
                        let key = (key_name, model.to_owned(), split.to_owned());
                        // A series seen for the first time only sets where it starts.
                        let delta = match last.insert(key, Last::Counter(v)) {
                            Some(Last::Counter(before)) => added(before, v),
                            _ => continue,
                        };
                        let t = self
                            .totals
                            .entry((pool.to_owned(), model.to_owned()))
                            .or_default();
                        if name == FINISHED {
                            t.requests += delta;
                        } else {
                            *t.errors.entry(split.to_owned()).or_default() += delta;
                        }
                    }
                }
                Some(metric::Data::Histogram(h)) => {
                    let Some(slot) = HISTOGRAMS.iter().position(|(from, _, _)| *from == name)
                    else {
                        continue;
                    };
                    for p in &h.data_points {
                        let model = p.attributes.get_str("gen_ai.request.model").unwrap_or("");
                        let now_h = Hist {
                            bounds: p.explicit_bounds.clone(),
                            counts: p.bucket_counts.clone(),
                            count: p.count,
                            sum: p.sum.unwrap_or(0.0),
                        };
                        let key = (HISTOGRAMS[slot].0, model.to_owned(), String::new());
                        let before = match last.insert(key, Last::Hist(now_h.clone())) {
                            Some(Last::Hist(b)) => b,
                            _ => continue,
                        };
                        let restarted = now_h.count < before.count
                            || now_h.bounds != before.bounds
                            || now_h.counts.len() != before.counts.len();
                        let delta = if restarted {
                            now_h
                        } else {
                            Hist {
                                counts: now_h
                                    .counts
                                    .iter()
                                    .zip(&before.counts)
                                    .map(|(a, b)| a.saturating_sub(*b))
                                    .collect(),
                                count: now_h.count - before.count,
                                sum: now_h.sum - before.sum,
                                bounds: now_h.bounds,
                            }
                        };
                        let t = self
                            .totals
                            .entry((pool.to_owned(), model.to_owned()))
                            .or_default();
                        let acc = t.histograms[slot].get_or_insert_with(|| Hist {
                            bounds: delta.bounds.clone(),
                            counts: vec![0; delta.counts.len()],
                            ..Hist::default()
                        });
                        if acc.bounds != delta.bounds || acc.counts.len() != delta.counts.len() {
                            if !self.warned_layout {
                                tracing::warn!(pool, model, metric = name, "pool_aggregate: servers of one model bucket a histogram differently; the objective histogram keeps the first layout");
                                self.warned_layout = true;
                            }
                            continue;
                        }
                        for (a, d) in acc.counts.iter_mut().zip(&delta.counts) {
                            *a += d;
                        }
                        acc.count += delta.count;
                        acc.sum += delta.sum;
                    }
                }
                Some(metric::Data::Gauge(g)) if name == RUNNING => {
                    let mut by_model: HashMap<&str, f64> = HashMap::new();
                    for p in &g.data_points {
                        let model = p.attributes.get_str("gen_ai.request.model").unwrap_or("");
                        *by_model.entry(model).or_default() += number_value(p).unwrap_or(0.0);
                    }
                    for (model, v) in by_model {
                        self.totals
                            .entry((pool.to_owned(), model.to_owned()))
                            .or_default()
                            .running
                            .insert(server.to_owned(), (v, now));
                    }
                }
                _ => {}
            }
        }
    }

    /// Forgets servers gone for `stale_after`, as the pools do.
    pub fn expire(&mut self, live: &dyn Fn(&str) -> bool, now: Instant, stale_after: Duration) {
        self.last.retain(|server, _| live(server));
        for t in self.totals.values_mut() {
            t.running
                .retain(|_, (_, at)| now.duration_since(*at) < stale_after);
        }
    }

    /// The series of `pool`, every model it serves (models without a name are left out).
    pub fn emit(&self, pool: &str, now_ns: u64) -> Vec<Metric> {
        let mut out = Vec::new();
        let models = self
            .totals
            .range((pool.to_owned(), String::new())..)
            .take_while(|((p, _), _)| p == pool)
            .filter(|((_, m), _)| !m.is_empty());
        for ((_, model), t) in models {
            let labels = || {
                vec![
                    kv("model_name", model.as_str()),
                    kv("target_model_name", model.as_str()),
                ]
            };
            let counter = |v: f64, extra: Vec<KeyValue>| {
                let mut attrs = labels();
                attrs.extend(extra);
                let mut p = number_point(now_ns, v, attrs);
                p.start_time_unix_nano = self.start;
                p
            };
            out.push(Metric::sum(
                "inference_objective_request_total",
                "",
                true,
                vec![counter(t.requests, vec![])],
            ));
            if !t.errors.is_empty() {
                let points = t
                    .errors
                    .iter()
                    .map(|(code, v)| counter(*v, vec![kv("error_code", code.as_str())]))
                    .collect();
                out.push(Metric::sum(
                    "inference_objective_request_error_total",
                    "",
                    true,
                    points,
                ));
            }
            for (slot, (_, name, unit)) in HISTOGRAMS.iter().enumerate() {
                let Some(h) = &t.histograms[slot] else {
                    continue;
                };
                out.push(Metric {
                    name: (*name).to_owned(),
                    unit: (*unit).to_owned(),
                    data: Some(metric::Data::Histogram(Histogram {
                        data_points: vec![HistogramDataPoint {
                            attributes: labels(),
                            start_time_unix_nano: self.start,
                            time_unix_nano: now_ns,
                            count: h.count,
                            sum: Some(h.sum),
                            bucket_counts: h.counts.clone(),
                            explicit_bounds: h.bounds.clone(),
                            ..Default::default()
                        }],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    })),
                    ..Default::default()
                });
            }
            if !t.running.is_empty() {
                let running: f64 = t.running.values().map(|(v, _)| v).sum();
                out.push(Metric::gauge(
                    "inference_objective_running_requests",
                    "",
                    vec![number_point(now_ns, running, labels())],
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Vec<KeyValue> {
        vec![kv("gen_ai.request.model", "llama")]
    }

    fn hist(bounds: &[f64], counts: &[u64], sum: f64) -> Metric {
        Metric {
            name: "gen_ai.server.request.duration".into(),
            unit: "s".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: model(),
                    count: counts.iter().sum(),
                    sum: Some(sum),
                    bucket_counts: counts.to_vec(),
                    explicit_bounds: bounds.to_vec(),
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        }
    }

    /// A server's metrics: finished requests, failed ones, running, a duration histogram.
    fn server(finished: f64, failed: f64, running: f64, h: Metric) -> Vec<Metric> {
        let mut err = model();
        err.push(kv("error.type", "overloaded"));
        vec![
            Metric::sum(FINISHED, "", true, vec![number_point(1, finished, model())]),
            Metric::sum(FAILED, "", true, vec![number_point(1, failed, err)]),
            Metric::gauge(RUNNING, "", vec![number_point(1, running, model())]),
            h,
        ]
    }

    fn feed(o: &mut Objectives, id: &str, metrics: Vec<Metric>) {
        let refs: Vec<&Metric> = metrics.iter().collect();
        o.observe("chat", id, &refs, Instant::now());
    }

    fn value(out: &[Metric], name: &str) -> Option<f64> {
        out.iter()
            .find(|m| m.name == name)
            .and_then(|m| match &m.data {
                Some(metric::Data::Sum(s)) => number_value(&s.data_points[0]),
                Some(metric::Data::Gauge(g)) => number_value(&g.data_points[0]),
                Some(metric::Data::Histogram(h)) => Some(h.data_points[0].count as f64),
                _ => None,
            })
    }

    #[test]
    fn counts_what_servers_added_since_first_seen_and_merges_equal_layouts() {
        let mut o = Objectives::new(7);
        let b = [0.1, 1.0];
        feed(
            &mut o,
            "a",
            server(100.0, 5.0, 3.0, hist(&b, &[10, 5, 1], 4.0)),
        );
        feed(
            &mut o,
            "b",
            server(50.0, 0.0, 2.0, hist(&b, &[1, 1, 1], 2.0)),
        );
        let first = o.emit("chat", 9);
        assert_eq!(
            value(&first, "inference_objective_request_total"),
            Some(0.0),
            "history before is not counted"
        );
        assert_eq!(
            value(&first, "inference_objective_running_requests"),
            Some(5.0)
        );
        feed(
            &mut o,
            "a",
            server(110.0, 6.0, 4.0, hist(&b, &[12, 6, 1], 5.0)),
        );
        // `b` restarted: its counters start from 0 again.
        feed(
            &mut o,
            "b",
            server(4.0, 1.0, 1.0, hist(&b, &[1, 0, 0], 0.05)),
        );
        // A server whose histogram buckets differ is left out of the histogram only.
        feed(
            &mut o,
            "c",
            server(0.0, 0.0, 0.0, hist(&[0.5], &[1, 0], 0.1)),
        );
        feed(
            &mut o,
            "c",
            server(3.0, 0.0, 0.0, hist(&[0.5], &[2, 1], 1.0)),
        );
        let out = o.emit("chat", 9);
        assert_eq!(
            value(&out, "inference_objective_request_total"),
            Some(10.0 + 4.0 + 3.0)
        );
        assert_eq!(
            value(&out, "inference_objective_request_error_total"),
            Some(1.0 + 1.0)
        );
        assert_eq!(
            value(&out, "inference_objective_running_requests"),
            Some(4.0 + 1.0)
        );
        let h = out
            .iter()
            .find(|m| m.name == "inference_objective_request_duration_seconds")
            .unwrap();
        let Some(metric::Data::Histogram(h)) = &h.data else {
            panic!()
        };
        let p = &h.data_points[0];
        assert_eq!(p.bucket_counts, [2 + 1, 1, 0]);
        assert_eq!(p.count, 4);
        assert!((p.sum.unwrap() - 1.05).abs() < 1e-9);
        assert_eq!(p.start_time_unix_nano, 7);
        let labels: Vec<(&str, String)> = p
            .attributes
            .iter()
            .map(|a| {
                (
                    a.key.as_str(),
                    genai_collector_core::model::display_value(a.value.as_ref().unwrap()),
                )
            })
            .collect();
        assert_eq!(
            labels,
            [
                ("model_name", "llama".into()),
                ("target_model_name", "llama".into())
            ]
        );
        assert!(o.emit("other", 9).is_empty());
    }
}
