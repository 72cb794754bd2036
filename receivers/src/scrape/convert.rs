//! From a parsed page to an OTLP batch.
//!
//! Counters become monotonic cumulative sums with a start time (from `_created`, else when the
//! series was first seen, reset when the value goes down); gauges and untyped samples become
//! gauges; histograms become explicit-bucket histograms (cumulative buckets de-accumulated,
//! `+Inf` last, `_sum` and `_count`); summaries become summaries; `info` and `stateset` become
//! gauges. Metric names stay as the engine serves them: the mapping tables of `genai_normalize`
//! match on them.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use genai_collector_core::model::{
    exemplar, kv, metric, summary_data_point, AggregationTemporality, Batch, Exemplar, Histogram,
    HistogramDataPoint, KeyValue, Metric, MetricExt, NumberDataPoint, Summary, SummaryDataPoint,
    WHOLE_FLOATS_WITH_DOT_ZERO,
};

use super::text::{Family, Kind, Label, Page, Sample};

/// What a conversion found besides the batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConvertStats {
    pub samples: usize,
    /// Samples of a series already seen on the page (the first one is kept).
    pub duplicates: usize,
    /// Histogram series whose buckets did not add up (kept, with counts clamped).
    pub malformed: usize,
}

#[derive(Clone, Copy, Debug)]
struct SeriesState {
    start: u64,
    last: f64,
}

/// Per-target state that makes cumulative series correct across scrapes. Holds only the series
/// of the last page, so its size follows the target's.
#[derive(Debug, Default)]
pub struct Converter {
    series: HashMap<u64, SeriesState>,
}

/// Seconds as Unix nanoseconds; `None` for what no nanosecond count can hold (negative, not
/// finite, or past 2554: a page that wrote nanoseconds where seconds belong).
fn ns(seconds: f64) -> Option<u64> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds < u64::MAX as f64 / 1e9) {
        return None;
    }
    // Whole seconds apart from the fraction: `1700000000.25 * 1e9` rounds 128 ns off.
    let whole = seconds.trunc();
    (whole as u64)
        .checked_mul(1_000_000_000)?
        .checked_add(((seconds - whole) * 1e9).round() as u64)
}

fn series_hash(name: &str, labels: &[Label<'_>], skip: &str) -> u64 {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    for l in labels
        .iter()
        .filter(|l| l.name != skip && !l.value.is_empty())
    {
        l.name.hash(&mut h);
        l.value.hash(&mut h);
    }
    h.finish()
}

/// An OpenMetrics exemplar as OTLP's: `trace_id` and `span_id` labels (hex) become the ids, as
/// the OpenTelemetry Collector's Prometheus receiver does; the other labels stay attributes.
fn exemplar(e: &super::text::Exemplar<'_>, now: u64) -> Exemplar {
    // Read as bytes: a label value may hold any UTF-8, and slicing it as text could split a char.
    let hex = |v: &str, len: usize| {
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        (v.len() == len * 2)
            .then(|| {
                v.as_bytes()
                    .chunks_exact(2)
                    .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
                    .collect::<Option<Vec<u8>>>()
            })
            .flatten()
    };
    let mut out = Exemplar {
        time_unix_nano: e.timestamp.and_then(ns).unwrap_or(now),
        value: Some(exemplar::Value::AsDouble(e.value)),
        ..Default::default()
    };
    for l in &e.labels {
        let id_len = match l.name {
            "trace_id" => Some(16),
            "span_id" => Some(8),
            _ => None,
        };
        match id_len.and_then(|len| hex(&l.value, len)) {
            Some(id) if l.name == "trace_id" => out.trace_id = id,
            Some(id) => out.span_id = id,
            None => out.filtered_attributes.push(kv(l.name, l.value.as_ref())),
        }
    }
    out
}

/// A label with an empty value is no label, as in Prometheus: `x{model=""}` is `x`.
fn attrs(labels: &[Label<'_>], skip: &str) -> Vec<KeyValue> {
    labels
        .iter()
        .filter(|l| l.name != skip && !l.value.is_empty())
        .map(|l| kv(l.name, l.value.as_ref()))
        .collect()
}

impl Converter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Converts `page`, scraped at `now` (Unix ns), into a batch with `resource` attributes.
    pub fn convert(
        &mut self,
        page: &Page<'_>,
        now: u64,
        resource: Vec<KeyValue>,
    ) -> (Batch, ConvertStats) {
        let mut stats = ConvertStats::default();
        let mut next = HashMap::with_capacity(self.series.len());
        let mut metrics = Vec::with_capacity(page.families.len());
        for f in &page.families {
            stats.samples += f.samples.len();
            let metric = match f.kind {
                Kind::Counter => self.counter(page, f, now, &mut next, &mut stats),
                Kind::Histogram | Kind::GaugeHistogram => {
                    self.histogram(page, f, now, &mut next, &mut stats)
                }
                Kind::Summary => self.summary(page, f, now, &mut next, &mut stats),
                Kind::Info => gauge(
                    page,
                    f,
                    &format!("{}_info", f.name.trim_end_matches("_info")),
                    now,
                    &mut stats,
                ),
                Kind::Gauge | Kind::StateSet | Kind::Unknown => {
                    gauge(page, f, f.name, now, &mut stats)
                }
            };
            if let Some(mut m) = metric {
                if let Some(help) = &f.help {
                    m.description = help.to_string();
                }
                if let Some(unit) = f.unit {
                    m.unit = unit.to_owned();
                }
                metrics.push(m);
            }
        }
        self.series = next;
        (Batch::with_resource(resource, metrics), stats)
    }

    /// The start time of a cumulative series: kept from earlier scrapes unless the value went
    /// down (a restart), in which case the series starts again now.
    fn start(
        &self,
        key: u64,
        value: f64,
        created: Option<u64>,
        now: u64,
        next: &mut HashMap<u64, SeriesState>,
    ) -> u64 {
        let start = match (created, self.series.get(&key)) {
            (Some(c), _) => c,
            (None, Some(prev)) if value >= prev.last => prev.start,
            _ => now,
        };
        next.insert(key, SeriesState { start, last: value });
        start
    }

    fn counter(
        &self,
        page: &Page<'_>,
        f: &Family<'_>,
        now: u64,
        next: &mut HashMap<u64, SeriesState>,
        stats: &mut ConvertStats,
    ) -> Option<Metric> {
        let created: HashMap<u64, u64> = f
            .samples
            .iter()
            .filter(|s| f.suffix(s) == "_created")
            .filter_map(|s| Some((series_hash("", page.labels_of(s), ""), ns(s.value)?)))
            .collect();
        let mut name = None;
        let mut seen = std::collections::HashSet::new();
        let mut points = Vec::with_capacity(f.samples.len());
        for s in f.samples.iter().filter(|s| f.suffix(s) != "_created") {
            let labels = page.labels_of(s);
            let series = series_hash("", labels, "");
            if !seen.insert(series) {
                stats.duplicates += 1;
                continue;
            }
            name.get_or_insert(s.name);
            let key = series_hash(s.name, labels, "");
            let time = s.timestamp.and_then(ns).unwrap_or(now);
            let start = self.start(key, s.value, created.get(&series).copied(), time, next);
            points.push(NumberDataPoint {
                start_time_unix_nano: start,
                exemplars: s.exemplar.iter().map(|e| exemplar(e, time)).collect(),
                ..genai_collector_core::model::number_point(time, s.value, attrs(labels, ""))
            });
        }
        let name = name?;
        Some(Metric::sum(name, "", true, points))
    }

    fn histogram(
        &self,
        page: &Page<'_>,
        f: &Family<'_>,
        now: u64,
        next: &mut HashMap<u64, SeriesState>,
        stats: &mut ConvertStats,
    ) -> Option<Metric> {
        let gauge = f.kind == Kind::GaugeHistogram;
        let (count_suffix, sum_suffix) = if gauge {
            ("_gcount", "_gsum")
        } else {
            ("_count", "_sum")
        };
        let groups = group_by_series(page, f, "le", |g: &mut HistGroup<'_, '_>, s, labels| {
            g.labels = labels;
            let suffix = f.suffix(s);
            if suffix == "_bucket" {
                let le = labels
                    .iter()
                    .find(|l| l.name == "le")
                    .and_then(|l| l.value.parse::<f64>().ok());
                match le {
                    Some(le) if !le.is_nan() => {
                        if g.buckets.iter().any(|(b, _)| *b == le) {
                            stats.duplicates += 1;
                        } else {
                            g.buckets.push((le, s.value));
                            if let Some(e) = &s.exemplar {
                                g.exemplars.push(exemplar(e, now));
                            }
                        }
                    }
                    _ => stats.malformed += 1,
                }
            } else if suffix == count_suffix {
                g.count = Some(s.value);
            } else if suffix == sum_suffix {
                g.sum = Some(s.value);
            } else if suffix == "_created" {
                g.created = ns(s.value);
            }
            g.time = g.time.max(s.timestamp.and_then(ns).unwrap_or(now));
        });
        let mut points = Vec::with_capacity(groups.len());
        for g in groups {
            let mut buckets = g.buckets;
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let inf = buckets
                .last()
                .filter(|(le, _)| le.is_infinite())
                .map(|(_, c)| *c);
            let count = g
                .count
                .or(inf)
                .unwrap_or_else(|| buckets.last().map_or(0.0, |b| b.1));
            let mut bounds = Vec::with_capacity(buckets.len());
            let mut counts = Vec::with_capacity(buckets.len() + 1);
            let mut prev = 0.0;
            for (le, cumulative) in &buckets {
                if le.is_infinite() && *le > 0.0 {
                    break;
                }
                if *cumulative < prev {
                    stats.malformed += 1;
                }
                bounds.push(*le);
                counts.push((cumulative - prev).max(0.0) as u64);
                prev = cumulative.max(prev);
            }
            counts.push((count - prev).max(0.0) as u64);
            let series = series_hash(f.name, g.labels, "le");
            let start = if gauge {
                0
            } else {
                self.start(series, count, g.created, g.time, next)
            };
            points.push(HistogramDataPoint {
                attributes: attrs(g.labels, "le"),
                start_time_unix_nano: start,
                time_unix_nano: g.time,
                count: count.max(0.0) as u64,
                sum: g.sum.filter(|s| s.is_finite()),
                bucket_counts: counts,
                explicit_bounds: bounds,
                exemplars: g.exemplars,
                ..Default::default()
            });
        }
        Some(Metric {
            name: f.name.to_owned(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            metadata: float_style(page, f, "le"),
            ..Default::default()
        })
    }

    fn summary(
        &self,
        page: &Page<'_>,
        f: &Family<'_>,
        now: u64,
        next: &mut HashMap<u64, SeriesState>,
        _stats: &mut ConvertStats,
    ) -> Option<Metric> {
        let groups = group_by_series(
            page,
            f,
            "quantile",
            |g: &mut SummaryGroup<'_, '_>, s, labels| {
                g.labels = labels;
                match f.suffix(s) {
                    "_count" => g.count = Some(s.value),
                    "_sum" => g.sum = Some(s.value),
                    "_created" => g.created = ns(s.value),
                    _ => {
                        if let Some(q) = labels
                            .iter()
                            .find(|l| l.name == "quantile")
                            .and_then(|l| l.value.parse::<f64>().ok())
                        {
                            g.quantiles.push(summary_data_point::ValueAtQuantile {
                                quantile: q,
                                value: s.value,
                            });
                        }
                    }
                }
                g.time = g.time.max(s.timestamp.and_then(ns).unwrap_or(now));
            },
        );
        let points = groups
            .into_iter()
            .map(|g| {
                let count = g.count.unwrap_or(0.0);
                let start = self.start(
                    series_hash(f.name, g.labels, "quantile"),
                    count,
                    g.created,
                    g.time,
                    next,
                );
                SummaryDataPoint {
                    attributes: attrs(g.labels, "quantile"),
                    start_time_unix_nano: start,
                    time_unix_nano: g.time,
                    count: count.max(0.0) as u64,
                    sum: g.sum.unwrap_or(0.0),
                    quantile_values: g.quantiles,
                    ..Default::default()
                }
            })
            .collect();
        Some(Metric {
            name: f.name.to_owned(),
            data: Some(metric::Data::Summary(Summary {
                data_points: points,
            })),
            metadata: float_style(page, f, "quantile"),
            ..Default::default()
        })
    }
}

/// How the page writes whole values of `label` (`le`, `quantile`), for the metric's metadata:
/// with `.0` (`1.0`, Python's client) or without (`1`, Go's clients), so that the Prometheus
/// exporter writes them the same way again.
fn float_style(page: &Page<'_>, f: &Family<'_>, label: &str) -> Vec<KeyValue> {
    let dot_zero = |v: &str| {
        v.strip_suffix(".0")
            .is_some_and(|whole| !whole.is_empty() && whole.bytes().all(|b| b.is_ascii_digit()))
    };
    let written = f.samples.iter().any(|s| {
        page.labels_of(s)
            .iter()
            .any(|l| l.name == label && dot_zero(&l.value))
    });
    vec![kv(WHOLE_FLOATS_WITH_DOT_ZERO, written)]
}

/// A family's samples folded per series (labels without `skip`), in first-seen order: in
/// 0.0.4 the samples of one series need not be adjacent.
fn group_by_series<'p, 'a, G: Default>(
    page: &'p Page<'a>,
    f: &'p Family<'a>,
    skip: &str,
    mut fold: impl FnMut(&mut G, &'p Sample<'a>, &'p [Label<'a>]),
) -> Vec<G> {
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut groups: Vec<G> = Vec::new();
    for s in &f.samples {
        let labels = page.labels_of(s);
        let i = *index
            .entry(series_hash("", labels, skip))
            .or_insert_with(|| {
                groups.push(G::default());
                groups.len() - 1
            });
        fold(&mut groups[i], s, labels);
    }
    groups
}

#[derive(Default)]
struct HistGroup<'p, 'a> {
    labels: &'p [Label<'a>],
    buckets: Vec<(f64, f64)>,
    exemplars: Vec<Exemplar>,
    count: Option<f64>,
    sum: Option<f64>,
    created: Option<u64>,
    time: u64,
}

#[derive(Default)]
struct SummaryGroup<'p, 'a> {
    labels: &'p [Label<'a>],
    quantiles: Vec<summary_data_point::ValueAtQuantile>,
    count: Option<f64>,
    sum: Option<f64>,
    created: Option<u64>,
    time: u64,
}

fn gauge(
    page: &Page<'_>,
    f: &Family<'_>,
    name: &str,
    now: u64,
    stats: &mut ConvertStats,
) -> Option<Metric> {
    let mut seen = std::collections::HashSet::new();
    let mut points = Vec::with_capacity(f.samples.len());
    for s in &f.samples {
        let labels = page.labels_of(s);
        if !seen.insert(series_hash(s.name, labels, "")) {
            stats.duplicates += 1;
            continue;
        }
        points.push(genai_collector_core::model::number_point(
            s.timestamp.and_then(ns).unwrap_or(now),
            s.value,
            attrs(labels, ""),
        ));
    }
    if points.is_empty() {
        return None;
    }
    Some(Metric::gauge(name, "", points))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::text::{parse, Format};
    use genai_collector_core::model::{number_value, AttributesExt};

    proptest::proptest! {
        /// Any timestamp a page may carry converts or is refused; it never overflows (S2).
        #[test]
        fn seconds_to_nanoseconds_never_overflows(seconds in proptest::num::f64::ANY) {
            if let Some(n) = ns(seconds) {
                proptest::prop_assert!(seconds > 0.0);
                let back = n as f64 / 1e9;
                proptest::prop_assert!((back - seconds).abs() <= seconds * 1e-9 + 1e-9);
            }
        }
    }

    fn one(batch: &Batch, name: &str) -> Metric {
        batch
            .metrics()
            .find(|m| m.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn vllm_page_converts() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/vllm/v1-composed.prom"
        ))
        .unwrap();
        let page = parse(&text, Format::Prometheus).unwrap();
        let (batch, stats) =
            Converter::new().convert(&page, 1_000, vec![kv("service.name", "vllm")]);
        assert_eq!(stats.duplicates, 0);
        assert_eq!(stats.samples, page.sample_count());

        let kv_cache = one(&batch, "vllm:kv_cache_usage_perc");
        let Some(metric::Data::Gauge(g)) = &kv_cache.data else {
            panic!("gauge")
        };
        assert_eq!(number_value(&g.data_points[0]), Some(0.4375));
        assert_eq!(
            g.data_points[0].attributes.get_str("model_name"),
            Some("meta-llama/Llama-3.1-8B-Instruct")
        );

        let tokens = one(&batch, "vllm:prompt_tokens_total");
        let Some(metric::Data::Sum(s)) = &tokens.data else {
            panic!("sum")
        };
        assert!(s.is_monotonic);
        assert_eq!(s.data_points[0].start_time_unix_nano, 1_000);

        let ttft = one(&batch, "vllm:time_to_first_token_seconds");
        let Some(metric::Data::Histogram(h)) = &ttft.data else {
            panic!("histogram")
        };
        let p = &h.data_points[0];
        assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
        assert_eq!(
            p.bucket_counts.iter().sum::<u64>(),
            p.count,
            "de-accumulated buckets add up to the count"
        );
        assert!(p.sum.is_some());
        assert!(p.attributes.get_str("le").is_none());
    }

    #[test]
    fn counter_start_time_survives_scrapes_and_resets() {
        let mut c = Converter::new();
        let scrape = |c: &mut Converter, v: &str, now: u64| {
            let text = format!("# TYPE x_total counter\nx_total{{a=\"1\"}} {v}\n");
            let page = parse(&text, Format::Prometheus).unwrap();
            let (b, _) = c.convert(&page, now, vec![]);
            let Some(metric::Data::Sum(s)) = &b.metrics().next().unwrap().data else {
                panic!()
            };
            s.data_points[0].start_time_unix_nano
        };
        assert_eq!(scrape(&mut c, "5", 100), 100);
        assert_eq!(scrape(&mut c, "7", 200), 100, "same series keeps its start");
        assert_eq!(scrape(&mut c, "2", 300), 300, "a lower value is a reset");
        assert_eq!(scrape(&mut c, "3", 400), 300);
    }

    #[test]
    fn openmetrics_created_and_summary() {
        let text = "# TYPE a counter\na_total 3\na_created 1700000000.5\n# TYPE s summary\ns{quantile=\"0.5\"} 0.2\ns_sum 4\ns_count 10\n# EOF\n";
        let page = parse(text, Format::OpenMetrics).unwrap();
        let (b, _) = Converter::new().convert(&page, 9, vec![]);
        let Some(metric::Data::Sum(sum)) = &one(&b, "a_total").data else {
            panic!()
        };
        assert_eq!(
            sum.data_points[0].start_time_unix_nano,
            1_700_000_000_500_000_000
        );
        let Some(metric::Data::Summary(s)) = &one(&b, "s").data else {
            panic!()
        };
        assert_eq!((s.data_points[0].count, s.data_points[0].sum), (10, 4.0));
        assert_eq!(s.data_points[0].quantile_values[0].value, 0.2);
    }

    #[test]
    fn exemplars_carry_their_trace() {
        let text = "# TYPE r counter\nr_total 7 # {trace_id=\"0af7651916cd43dd8448eb211c80319c\",span_id=\"b7ad6b7169203331\"} 1 1700000000.25\n# TYPE d histogram\nd_bucket{le=\"0.5\"} 2\nd_bucket{le=\"1.0\"} 5 # {trace_id=\"not-hex\",user=\"a\"} 0.8\nd_bucket{le=\"+Inf\"} 6\nd_count 6\nd_sum 4.1\n# EOF\n";
        let page = parse(text, Format::OpenMetrics).unwrap();
        let (b, _) = Converter::new().convert(&page, 9, vec![]);
        let Some(metric::Data::Sum(sum)) = &one(&b, "r_total").data else {
            panic!()
        };
        let e = &sum.data_points[0].exemplars[0];
        assert_eq!(e.trace_id.len(), 16);
        assert_eq!(e.trace_id[0], 0x0a);
        assert_eq!(e.span_id, [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]);
        assert!(e.filtered_attributes.is_empty());
        assert_eq!(e.time_unix_nano, 1_700_000_000_250_000_000);
        assert_eq!(e.value, Some(exemplar::Value::AsDouble(1.0)));
        let Some(metric::Data::Histogram(h)) = &one(&b, "d").data else {
            panic!()
        };
        let e = &h.data_points[0].exemplars;
        assert_eq!(e.len(), 1);
        assert!(
            e[0].trace_id.is_empty(),
            "not a trace id: kept as an attribute"
        );
        assert_eq!(e[0].filtered_attributes.len(), 2);
        assert_eq!(
            (e[0].time_unix_nano, &e[0].value),
            (9, &Some(exemplar::Value::AsDouble(0.8)))
        );
    }

    #[test]
    fn hostile_exemplar_ids_and_timestamps_do_not_panic() {
        // '€' is 3 bytes: the id has the hex length, but slicing it as text splits a char.
        let text = "# TYPE r counter\nr_total 7 # {trace_id=\"\u{20ac}aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\",span_id=\"\u{20ac}aaaaaaaaaaaaa\"} 1\nr_created 1e300\n# TYPE g gauge\ng 1 1e300\n# EOF\n";
        let page = parse(text, Format::OpenMetrics).unwrap();
        let (b, _) = Converter::new().convert(&page, 9, vec![]);
        let Some(metric::Data::Sum(sum)) = &one(&b, "r_total").data else {
            panic!()
        };
        let p = &sum.data_points[0];
        assert!(p.exemplars[0].trace_id.is_empty() && p.exemplars[0].span_id.is_empty());
        assert_eq!(
            p.exemplars[0].filtered_attributes.len(),
            2,
            "kept as attributes"
        );
        assert_eq!(
            p.start_time_unix_nano, 9,
            "an impossible _created is ignored"
        );
        // A 0.0.4 page that wrote nanoseconds where milliseconds belong.
        let page = parse("x 1 1700000000000000000\n", Format::Prometheus).unwrap();
        let (b, _) = Converter::new().convert(&page, 9, vec![]);
        let Some(metric::Data::Gauge(g)) = &one(&b, "x").data else {
            panic!()
        };
        assert_eq!(g.data_points[0].time_unix_nano, 9, "scrape time instead");
        assert_eq!(ns(1700000000.25), Some(1_700_000_000_250_000_000));
        assert_eq!(ns(2e10), None);
        assert_eq!(ns(f64::NAN), None);
    }

    #[test]
    fn duplicates_and_broken_histograms_are_counted() {
        let text = "g 1\ng 2\n# TYPE h histogram\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"2\"} 3\nh_bucket{le=\"+Inf\"} 6\nh_count 6\n";
        let page = parse(text, Format::Prometheus).unwrap();
        let (b, stats) = Converter::new().convert(&page, 1, vec![]);
        assert_eq!(stats.duplicates, 1);
        assert_eq!(stats.malformed, 1);
        let Some(metric::Data::Histogram(h)) = &one(&b, "h").data else {
            panic!()
        };
        assert_eq!(h.data_points[0].bucket_counts, vec![5, 0, 1]);
        assert_eq!(one(&b, "g").point_count(), 1);
    }
}
