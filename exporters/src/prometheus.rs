//! `prometheus`: a pull endpoint serving the latest value of every series.
//!
//! Names follow the OpenTelemetry specification's Prometheus compatibility rules: characters
//! outside `[a-zA-Z0-9_:]` become `_`, the unit becomes a suffix (`%` → `_percent`, `s` →
//! `_seconds`, `By` → `_bytes`; `{annotations}` are dropped), monotonic sums end in `_total`.
//! `service.name` and `service.instance.id` become `job` and `instance`, the attributes in
//! `promote` become labels, and every resource is described by a `target_info` series. Series
//! that stop arriving are dropped after `expire_after`. The text format is 0.0.4, or
//! OpenMetrics when the scraper asks for it; gzip when it accepts it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use genai_collector_core::config::duration;
use genai_collector_core::model::{
    any_value, display_value, metric, number_value, resource_attributes, KeyValue,
    WHOLE_FLOATS_WITH_DOT_ZERO,
};
use genai_collector_core::telemetry::Telemetry;
use genai_collector_core::tls::TlsServerConfig;
use genai_collector_core::{
    async_trait, Batch, BuildContext, CancellationToken, ComponentConfig, ComponentError,
    ExportError, Exporter, ExporterFactory, ValidationError,
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrometheusConfig {
    pub endpoint: String,
    /// Resource attributes that become labels on every series of that resource.
    pub promote: Vec<String>,
    /// Drop a series not updated for this long.
    #[serde(with = "duration")]
    pub expire_after: Duration,
    /// Series held at most; new series past it are dropped and counted.
    pub max_series: usize,
    /// Require `Authorization: Bearer <token>` on scrapes.
    pub bearer_token: Option<String>,
    /// Also serve the collector's own `genai_collector_*` metrics.
    pub self_metrics: bool,
    /// Serve over HTTPS with this certificate (and optionally require client certificates).
    pub tls: Option<TlsServerConfig>,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Self {
            endpoint: "localhost:9464".into(),
            promote: vec!["gen_ai.pool.name".into(), "gen_ai.provider.name".into()],
            expire_after: Duration::from_secs(300),
            max_series: 200_000,
            bearer_token: None,
            self_metrics: true,
            tls: None,
        }
    }
}

impl ComponentConfig for PrometheusConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.endpoint.is_empty() {
            return Err(ValidationError::field("endpoint", "must be host:port"));
        }
        if self.expire_after < Duration::from_secs(1) {
            return Err(ValidationError::field(
                "expire_after",
                "must be at least 1s",
            ));
        }
        if let Some(tls) = &self.tls {
            tls.server_config()
                .map_err(|e| ValidationError::field("tls", e))?;
        }
        Ok(())
    }
}

pub struct PrometheusExporterFactory;

impl ExporterFactory for PrometheusExporterFactory {
    type Config = PrometheusConfig;

    fn kind(&self) -> &'static str {
        "prometheus"
    }

    fn description(&self) -> &'static str {
        "serves the latest value of every series on a Prometheus /metrics endpoint (0.0.4 or OpenMetrics, gzip)"
    }

    fn build(
        &self,
        config: PrometheusConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        let listener = crate::endpoint::bind(&config.endpoint)?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Mutex::new(Store::new(
            config.expire_after,
            config.max_series,
        )));
        let shared = Shared {
            store: store.clone(),
            token: config.bearer_token.clone().filter(|t| !t.is_empty()),
            telemetry: config.self_metrics.then(|| ctx.telemetry.clone()),
        };
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/metrics", get(serve))
            .with_state(shared);
        crate::endpoint::spawn_http(
            listener,
            app,
            config.tls.as_ref(),
            stop.clone(),
            "prometheus",
        )?;
        Ok(Box::new(PrometheusExporter {
            config,
            store,
            stop,
            addr,
        }))
    }
}

pub struct PrometheusExporter {
    config: PrometheusConfig,
    store: Arc<Mutex<Store>>,
    stop: CancellationToken,
    pub addr: SocketAddr,
}

#[async_trait]
impl Exporter for PrometheusExporter {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        let now = Instant::now();
        // A panic elsewhere while holding the lock leaves a store still worth serving.
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.update(batch, &self.config.promote, now);
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), ExportError> {
        self.stop.cancel();
        Ok(())
    }
}

/// The page the endpoint would serve holding `batch` alone (OpenMetrics without its `# EOF`),
/// for tests and fuzzing of the rendering.
pub fn render_batch(batch: &Batch, promote: &[String], openmetrics: bool) -> String {
    let mut store = Store::default();
    store.update(batch, promote, Instant::now());
    store.render(openmetrics)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
    Histogram,
    Summary,
}

impl Kind {
    /// The names a family of this kind uses in OpenMetrics: its own and its samples'.
    fn sample_names(self, family: &str, name: &str) -> Vec<String> {
        let with = |suffixes: &[&str]| {
            std::iter::once(family.to_owned())
                .chain(suffixes.iter().map(|s| format!("{family}{s}")))
                .collect()
        };
        match self {
            Kind::Counter => with(&["_total", "_created"]),
            Kind::Gauge if name == "target_info" => with(&["_info"]),
            Kind::Gauge => with(&[]),
            Kind::Histogram => with(&["_bucket", "_sum", "_count", "_created"]),
            Kind::Summary => with(&["_sum", "_count", "_created"]),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Value {
    Number(f64),
    Histogram {
        bounds: Vec<f64>,
        counts: Vec<u64>,
        sum: Option<f64>,
        count: u64,
        /// How the scraped source wrote whole bounds: `1.0` (true) or `1`; `None` when the
        /// data was not scraped.
        dot_zero: Option<bool>,
    },
    Summary {
        quantiles: Vec<(f64, f64)>,
        sum: f64,
        count: u64,
        dot_zero: Option<bool>,
    },
}

impl Value {
    /// Whether OpenMetrics can show it: counters, counts and sums are never negative there,
    /// except a histogram's sum when it has negative buckets. 0.0.4 shows everything.
    fn openmetrics_valid(&self, kind: Kind) -> bool {
        let count_like = |v: f64| v >= 0.0;
        match self {
            Value::Number(v) => kind != Kind::Counter || count_like(*v),
            // With negative buckets the sum is left out; without, it must be a count's.
            Value::Histogram { bounds, sum, .. } => {
                bounds.first().is_some_and(|b| *b < 0.0) || sum.is_none_or(count_like)
            }
            Value::Summary { quantiles, sum, .. } => {
                count_like(*sum) && quantiles.iter().all(|(_, v)| v.is_nan() || *v >= 0.0)
            }
        }
    }
}

struct Series {
    labels: Vec<(String, String)>,
    value: Value,
    /// OpenMetrics exemplars: a counter's at index 0, a histogram's by bucket.
    exemplars: Vec<Option<Ex>>,
    updated: Instant,
}

/// An exemplar as OpenMetrics writes it after a counter or bucket sample.
#[derive(Clone, Debug, PartialEq)]
struct Ex {
    labels: Vec<(String, String)>,
    value: f64,
    /// Seconds since the Unix epoch.
    time: Option<f64>,
}

/// OpenMetrics caps an exemplar's label names and values at 128 characters in all.
const EXEMPLAR_LABEL_CHARS: usize = 128;

impl Ex {
    /// The trace and span ids first (what the exemplar is for), then the attributes that fit.
    fn from_otlp(e: &genai_collector_core::model::Exemplar) -> Option<Ex> {
        use genai_collector_core::model::exemplar::Value as V;
        let value = match e.value? {
            V::AsDouble(v) => v,
            V::AsInt(v) => v as f64,
        };
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut labels = Vec::new();
        if !e.trace_id.is_empty() {
            labels.push(("trace_id".to_owned(), hex(&e.trace_id)));
        }
        if !e.span_id.is_empty() {
            labels.push(("span_id".to_owned(), hex(&e.span_id)));
        }
        let mut used: usize = labels
            .iter()
            .map(|(k, v)| k.len() + v.chars().count())
            .sum();
        for kv in &e.filtered_attributes {
            let (k, v) = (sanitize(&kv.key, false), label_value(&kv.value));
            let n = k.len() + v.chars().count();
            if used + n <= EXEMPLAR_LABEL_CHARS {
                used += n;
                labels.push((k, v));
            }
        }
        Some(Ex {
            labels,
            value,
            time: (e.time_unix_nano > 0).then(|| e.time_unix_nano as f64 / 1e9),
        })
    }

    /// Writes ` # {labels} value [timestamp]`, the end of a sample line.
    fn write(&self, out: &mut String) {
        out.push_str(" # {");
        for (i, (k, v)) in self.labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        let _ = write!(out, "}} {}", fmt_float(self.value));
        if let Some(t) = self.time {
            let _ = write!(out, " {t:.3}");
        }
    }
}

struct Family {
    kind: Kind,
    help: String,
    /// The OpenTelemetry name, the help text of last resort.
    source: String,
    series: BTreeMap<String, Series>,
}

/// What a family is, for `Store::set`.
struct Meta<'a> {
    kind: Kind,
    help: &'a str,
    /// The OpenTelemetry name.
    source: &'a str,
}

struct Store {
    families: BTreeMap<String, Family>,
    expire_after: Duration,
    last_expire: Option<Instant>,
    max_series: usize,
    /// Series held now.
    series: usize,
    /// New series dropped at `max_series`.
    dropped_series: u64,
    /// Points dropped because no valid page could show them (a histogram whose buckets do not
    /// add up, a summary with a quantile outside 0..1).
    invalid_points: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(Duration::from_secs(300), 200_000)
    }
}

/// `[a-zA-Z0-9_:]`, not starting with a digit.
pub fn sanitize(name: &str, colons: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, if colons { "_" } else { "key_" });
    }
    out
}

/// What an OpenTelemetry metric is, as far as its Prometheus name goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instrument {
    Gauge,
    /// A monotonic sum.
    Counter,
    /// A non-monotonic sum (UpDownCounter), a histogram or a summary.
    Other,
}

/// The Prometheus name of a metric with `unit`, by the OpenTelemetry specification's rules:
/// counters end in `_total`, and only gauges of unit `1` in `_ratio`.
pub fn metric_name(name: &str, unit: &str, instrument: Instrument) -> String {
    let mut n = sanitize(name, true);
    let suffix = match unit {
        "%" => "percent",
        "s" => "seconds",
        "ms" => "milliseconds",
        "By" => "bytes",
        "By/s" => "bytes_per_second",
        "W" => "watts",
        // Annotations in braces drop out: joules per token reads `..._per_token_joules`.
        "J" | "J/{token}" => "joules",
        "Cel" => "celsius",
        "MHz" => "megahertz",
        "1" if instrument == Instrument::Gauge => "ratio",
        _ => "",
    };
    if !suffix.is_empty() && !n.ends_with(suffix) && !n.contains(&format!("_{suffix}_")) {
        n = format!("{n}_{suffix}");
    }
    if instrument == Instrument::Counter && !n.ends_with("_total") {
        n.push_str("_total");
    }
    n
}

fn label_value(v: &Option<genai_collector_core::model::AnyValue>) -> String {
    v.as_ref().map(display_value).unwrap_or_default()
}

/// Whether a histogram point can be shown as a valid Prometheus histogram: bounds finite and
/// increasing, one more count than bounds (or none), and the counts adding up to `count`.
fn valid_histogram(bounds: &[f64], counts: &[u64], count: u64) -> bool {
    let bounds_ok = bounds.iter().all(|b| b.is_finite()) && bounds.windows(2).all(|w| w[0] < w[1]);
    let total = counts.iter().try_fold(0u64, |acc, c| acc.checked_add(*c));
    bounds_ok && (counts.is_empty() || (counts.len() == bounds.len() + 1 && total == Some(count)))
}

/// Adds `key=value` to `labels`, replacing a label of the same name; keys that sanitize to
/// nothing, and the names the format gives its own meaning, are left out.
fn push_label(labels: &mut Vec<(String, String)>, key: &str, value: String, reserved: &str) {
    let key = sanitize(key, false);
    if key.is_empty() || key == reserved {
        return;
    }
    labels.retain(|(k, _)| k != &key);
    labels.push((key, value));
}

impl Store {
    fn new(expire_after: Duration, max_series: usize) -> Self {
        Self {
            families: BTreeMap::new(),
            expire_after,
            last_expire: None,
            max_series,
            series: 0,
            dropped_series: 0,
            invalid_points: 0,
        }
    }

    fn update(&mut self, batch: &Batch, promote: &[String], now: Instant) {
        // Expiry runs here too, not only when someone scrapes: an endpoint nobody reads must
        // not grow for ever.
        if self
            .last_expire
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.expire(now);
            self.last_expire = Some(now);
        }
        for rm in &batch.resource_metrics {
            let resource = resource_attributes(rm);
            let mut base: Vec<(String, String)> = Vec::new();
            for kv in resource {
                match kv.key.as_str() {
                    "service.name" => base.push(("job".into(), label_value(&kv.value))),
                    "service.instance.id" => base.push(("instance".into(), label_value(&kv.value))),
                    k if promote.iter().any(|p| p == k) => {
                        push_label(&mut base, k, label_value(&kv.value), "")
                    }
                    _ => {}
                }
            }
            if !resource.is_empty() {
                let mut info_labels = base.clone();
                for kv in resource {
                    if !matches!(kv.key.as_str(), "service.name" | "service.instance.id")
                        && !promote.contains(&kv.key)
                    {
                        push_label(&mut info_labels, &kv.key, label_value(&kv.value), "");
                    }
                }
                self.set(
                    "target_info",
                    Meta {
                        kind: Kind::Gauge,
                        help: "Target metadata",
                        source: "target_info",
                    },
                    info_labels,
                    Value::Number(1.0),
                    Vec::new(),
                    now,
                );
            }
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                let labels = |attrs: &[KeyValue], reserved: &str| {
                    let mut l = base.clone();
                    for kv in attrs {
                        push_label(&mut l, &kv.key, label_value(&kv.value), reserved);
                    }
                    l
                };
                let meta = |kind| Meta {
                    kind,
                    help: &m.description,
                    source: &m.name,
                };
                let numbers = match &m.data {
                    Some(metric::Data::Gauge(g)) => {
                        Some((Kind::Gauge, Instrument::Gauge, &g.data_points))
                    }
                    Some(metric::Data::Sum(s)) if s.is_monotonic => {
                        Some((Kind::Counter, Instrument::Counter, &s.data_points))
                    }
                    Some(metric::Data::Sum(s)) => {
                        Some((Kind::Gauge, Instrument::Other, &s.data_points))
                    }
                    _ => None,
                };
                if let Some((kind, instrument, points)) = numbers {
                    let name = metric_name(&m.name, &m.unit, instrument);
                    for p in points {
                        if let Some(v) = number_value(p) {
                            // Only counters carry exemplars in OpenMetrics.
                            let ex = match kind {
                                Kind::Counter => p.exemplars.last().and_then(Ex::from_otlp),
                                _ => None,
                            };
                            self.set(
                                &name,
                                meta(kind),
                                labels(&p.attributes, ""),
                                Value::Number(v),
                                ex.map(Some).into_iter().collect(),
                                now,
                            );
                        }
                    }
                    continue;
                }
                let dot_zero = m
                    .metadata
                    .iter()
                    .find(|kv| kv.key == WHOLE_FLOATS_WITH_DOT_ZERO)
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        any_value::Value::BoolValue(b) => Some(*b),
                        _ => None,
                    });
                match &m.data {
                    Some(metric::Data::Histogram(h)) => {
                        let name = metric_name(&m.name, &m.unit, Instrument::Other);
                        for p in &h.data_points {
                            if !valid_histogram(&p.explicit_bounds, &p.bucket_counts, p.count) {
                                self.invalid_points += 1;
                                continue;
                            }
                            let value = Value::Histogram {
                                bounds: p.explicit_bounds.clone(),
                                counts: p.bucket_counts.clone(),
                                sum: p.sum,
                                count: p.count,
                                dot_zero,
                            };
                            // Each exemplar goes with the bucket its value falls in; the
                            // latest wins.
                            let mut by_bucket = vec![None; p.explicit_bounds.len() + 1];
                            for e in &p.exemplars {
                                if let Some(ex) = Ex::from_otlp(e) {
                                    let i = p
                                        .explicit_bounds
                                        .iter()
                                        .position(|b| ex.value <= *b)
                                        .unwrap_or(p.explicit_bounds.len());
                                    by_bucket[i] = Some(ex);
                                }
                            }
                            if by_bucket.iter().all(Option::is_none) {
                                by_bucket.clear();
                            }
                            self.set(
                                &name,
                                meta(Kind::Histogram),
                                labels(&p.attributes, "le"),
                                value,
                                by_bucket,
                                now,
                            );
                        }
                    }
                    Some(metric::Data::Summary(s)) => {
                        let name = metric_name(&m.name, &m.unit, Instrument::Other);
                        for p in &s.data_points {
                            if !p
                                .quantile_values
                                .iter()
                                .all(|q| (0.0..=1.0).contains(&q.quantile))
                            {
                                self.invalid_points += 1;
                                continue;
                            }
                            let mut quantiles: Vec<(f64, f64)> = p
                                .quantile_values
                                .iter()
                                .map(|q| (q.quantile, q.value))
                                .collect();
                            // One series per quantile: a repeated one keeps its last value.
                            quantiles.reverse();
                            quantiles.sort_by(|a, b| a.0.total_cmp(&b.0));
                            quantiles.dedup_by(|later, first| later.0 == first.0);
                            let value = Value::Summary {
                                quantiles,
                                sum: p.sum,
                                count: p.count,
                                dot_zero,
                            };
                            self.set(
                                &name,
                                meta(Kind::Summary),
                                labels(&p.attributes, "quantile"),
                                value,
                                Vec::new(),
                                now,
                            );
                        }
                    }
                    // Exponential histograms have no classic Prometheus form.
                    _ => {}
                }
            }
        }
    }

    fn set(
        &mut self,
        name: &str,
        meta: Meta<'_>,
        mut labels: Vec<(String, String)>,
        value: Value,
        mut exemplars: Vec<Option<Ex>>,
        now: Instant,
    ) {
        let Meta { kind, help, source } = meta;
        let full = self.series >= self.max_series;
        labels.sort();
        let key: String = labels
            .iter()
            .map(|(k, v)| format!("{k}\u{1}{v}\u{2}"))
            .collect();
        if full
            && !self
                .families
                .get(name)
                .is_some_and(|f| f.series.contains_key(&key))
        {
            self.dropped_series += 1;
            return;
        }
        let family = self
            .families
            .entry(name.to_owned())
            .or_insert_with(|| Family {
                kind,
                help: help.to_owned(),
                source: source.to_owned(),
                series: BTreeMap::new(),
            });
        // A name reused with another kind keeps the first kind; the other series are skipped.
        if family.kind != kind {
            return;
        }
        if family.help.is_empty() && !help.is_empty() {
            help.clone_into(&mut family.help);
        }
        // Exemplars are samples: a bucket keeps its last one until a newer one arrives (an SDK
        // sends each only once, in the export after the measurement).
        if let Some(old) = family.series.get(&key) {
            if exemplars.is_empty() {
                exemplars.clone_from(&old.exemplars);
            } else if exemplars.len() == old.exemplars.len() {
                for (new, old) in exemplars.iter_mut().zip(&old.exemplars) {
                    if new.is_none() {
                        new.clone_from(old);
                    }
                }
            }
        }
        let new = family
            .series
            .insert(
                key,
                Series {
                    labels,
                    value,
                    exemplars,
                    updated: now,
                },
            )
            .is_none();
        self.series += usize::from(new);
    }

    /// Drops the series not updated for `expire_after`.
    fn expire(&mut self, now: Instant) {
        let after = self.expire_after;
        for f in self.families.values_mut() {
            f.series
                .retain(|_, s| now.duration_since(s.updated) < after);
        }
        self.families.retain(|_, f| !f.series.is_empty());
        self.series = self.families.values().map(|f| f.series.len()).sum();
    }

    /// What the store dropped, as self-metrics on its own page.
    fn render_own(&self, out: &mut String) {
        let _ = write!(
            out,
            "# HELP genai_collector_prometheus_series Series the prometheus exporter holds.\n# TYPE genai_collector_prometheus_series gauge\ngenai_collector_prometheus_series {}\n\
             # HELP genai_collector_prometheus_dropped_series_total New series dropped at max_series.\n# TYPE genai_collector_prometheus_dropped_series_total counter\ngenai_collector_prometheus_dropped_series_total {}\n\
             # HELP genai_collector_prometheus_invalid_points_total Points no valid page could show (histogram buckets that do not add up, quantiles outside 0..1).\n# TYPE genai_collector_prometheus_invalid_points_total counter\ngenai_collector_prometheus_invalid_points_total {}\n",
            self.series, self.dropped_series, self.invalid_points
        );
    }

    fn render(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(64 * 1024);
        let mut taken = std::collections::HashSet::new();
        for (name, f) in &self.families {
            let (mut family_name, mut kind) = match f.kind {
                Kind::Counter if openmetrics => {
                    (name.strip_suffix("_total").unwrap_or(name), "counter")
                }
                Kind::Counter => (name.as_str(), "counter"),
                Kind::Gauge if openmetrics && name == "target_info" => ("target", "info"),
                Kind::Gauge => (name.as_str(), "gauge"),
                Kind::Histogram => (name.as_str(), "histogram"),
                Kind::Summary => (name.as_str(), "summary"),
            };
            // Every family has a help line, as promtool's linter wants; the source name serves
            // where the source gave none.
            let help = if f.help.is_empty() {
                &f.source
            } else {
                &f.help
            };
            if openmetrics {
                // One name, one family: a gauge `x_sum` beside a summary `x` would make the
                // page invalid; the family met first (in name order) keeps the name. A
                // counter `x_total` beside a gauge `x` (Go's `go_memstats_alloc_bytes`) is
                // written as an `unknown` family of its full name instead: its series keep
                // their name, only the type is lost.
                let names = f.kind.sample_names(family_name, name);
                if names.iter().any(|n| taken.contains(n)) {
                    if f.kind != Kind::Counter || taken.contains(name) {
                        continue;
                    }
                    (family_name, kind) = (name.as_str(), "unknown");
                    taken.insert(name.clone());
                } else {
                    taken.extend(names);
                }
            }
            let typed = kind != "unknown";
            let _ = writeln!(out, "# HELP {family_name} {}", escape_help(help));
            let _ = writeln!(out, "# TYPE {family_name} {kind}");
            for s in f.series.values() {
                if openmetrics && !s.value.openmetrics_valid(f.kind) {
                    continue;
                }
                // Exemplars exist in OpenMetrics only.
                let exemplar = |i: usize| {
                    s.exemplars
                        .get(i)
                        .and_then(Option::as_ref)
                        .filter(|_| openmetrics && typed)
                };
                match &s.value {
                    Value::Number(v) => {
                        sample_with(&mut out, name, &s.labels, None, *v, exemplar(0));
                    }
                    Value::Histogram {
                        bounds,
                        counts,
                        sum,
                        count,
                        dot_zero,
                    } => {
                        let mut cumulative = 0u64;
                        for (i, c) in counts.iter().enumerate() {
                            cumulative = cumulative.saturating_add(*c);
                            let le = bounds.get(i).map_or_else(
                                || "+Inf".to_owned(),
                                |b| label_float(*b, openmetrics, *dot_zero),
                            );
                            sample_with(
                                &mut out,
                                &format!("{name}_bucket"),
                                &s.labels,
                                Some(("le", &le)),
                                cumulative as f64,
                                exemplar(i),
                            );
                        }
                        if counts.len() <= bounds.len() {
                            sample_with(
                                &mut out,
                                &format!("{name}_bucket"),
                                &s.labels,
                                Some(("le", "+Inf")),
                                *count as f64,
                                exemplar(bounds.len()),
                            );
                        }
                        // OpenMetrics has `_count` and `_sum` together or neither (an OTLP
                        // histogram may come without a sum), and neither with negative buckets.
                        let negative = bounds.first().is_some_and(|b| *b < 0.0);
                        let sum = sum.filter(|_| !(openmetrics && negative));
                        if let Some(sum) = sum {
                            sample(&mut out, &format!("{name}_sum"), &s.labels, None, sum);
                        }
                        if sum.is_some() || !openmetrics {
                            sample(
                                &mut out,
                                &format!("{name}_count"),
                                &s.labels,
                                None,
                                *count as f64,
                            );
                        }
                    }
                    Value::Summary {
                        quantiles,
                        sum,
                        count,
                        dot_zero,
                    } => {
                        for (q, v) in quantiles {
                            sample(
                                &mut out,
                                name,
                                &s.labels,
                                Some(("quantile", &label_float(*q, openmetrics, *dot_zero))),
                                *v,
                            );
                        }
                        sample(&mut out, &format!("{name}_sum"), &s.labels, None, *sum);
                        sample(
                            &mut out,
                            &format!("{name}_count"),
                            &s.labels,
                            None,
                            *count as f64,
                        );
                    }
                }
            }
        }
        out
    }
}

/// A float as a label value (`le`, `quantile`). Prometheus 2 keeps such a label's text as it
/// is, so a scraped series keeps the identity a direct scrape gives it only if its values are
/// written as its source wrote them (`style`): as Go's client libraries do
/// (`strconv.FormatFloat(v, 'g', -1, 64)`: `0`, `0.25`, `1e-05`, `1e+06`), or with whole
/// numbers as `1.0` (Python's client). Data that was not scraped is written as Go does in
/// 0.0.4 and in OpenMetrics' canonical `1.0` form.
fn label_float(v: f64, openmetrics: bool, style: Option<bool>) -> String {
    if !v.is_finite() || (openmetrics && style.is_none()) {
        return fmt_float(v);
    }
    let dot_zero = style.unwrap_or(false);
    let e = format!("{v:e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if v == 0.0 || (-4..6).contains(&exp) {
        let whole = v.fract() == 0.0;
        format!("{v}{}", if whole && dot_zero { ".0" } else { "" })
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.unsigned_abs())
    }
}

fn fmt_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v:?}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample line, with an OpenMetrics exemplar at its end where one is given.
fn sample_with(
    out: &mut String,
    name: &str,
    labels: &[(String, String)],
    extra: Option<(&str, &str)>,
    value: f64,
    exemplar: Option<&Ex>,
) {
    out.push_str(name);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        let mut first = true;
        for (k, v) in labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra)
        {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = write!(out, " {}", fmt_float(value));
    if let Some(e) = exemplar {
        e.write(out);
    }
    out.push('\n');
}

fn sample(
    out: &mut String,
    name: &str,
    labels: &[(String, String)],
    extra: Option<(&str, &str)>,
    value: f64,
) {
    sample_with(out, name, labels, extra, value, None);
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    token: Option<String>,
    telemetry: Option<Telemetry>,
}

async fn serve(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !genai_collector_core::auth::bearer_matches(s.token.as_deref(), given) {
        return (StatusCode::UNAUTHORIZED, "bearer token required").into_response();
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let openmetrics = accept.contains("application/openmetrics-text");
    let mut store = s.store.lock().unwrap_or_else(|p| p.into_inner());
    store.expire(Instant::now());
    let mut body = store.render(openmetrics);
    if let (Some(t), false) = (&s.telemetry, openmetrics) {
        store.render_own(&mut body);
        body.push_str(&t.render_prometheus());
    }
    drop(store);
    if openmetrics {
        body.push_str("# EOF\n");
    }
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"));
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        if enc.write_all(body.as_bytes()).is_ok() {
            if let Ok(compressed) = enc.finish() {
                return (
                    [
                        (header::CONTENT_TYPE, content_type),
                        (header::CONTENT_ENCODING, "gzip"),
                    ],
                    compressed,
                )
                    .into_response();
            }
        }
    }
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{
        kv, number_point, Histogram, HistogramDataPoint, Metric, MetricExt as _,
    };

    #[test]
    fn label_floats_as_go_writes_them_in_0_0_4() {
        let cases = [
            (0.0, "0"),
            (1.0, "1"),
            (0.25, "0.25"),
            (0.99, "0.99"),
            (0.005, "0.005"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (2.5e-7, "2.5e-07"),
            (10.0, "10"),
            (123456.0, "123456"),
            (1e6, "1e+06"),
            (1234567.0, "1.234567e+06"),
            (-2.5, "-2.5"),
        ];
        for (v, go) in cases {
            assert_eq!(label_float(v, false, None), go, "{v}");
            assert_eq!(
                label_float(v, true, Some(false)),
                go,
                "{v}: a Go page in OpenMetrics"
            );
        }
        assert_eq!(label_float(0.0, true, None), "0.0");
        assert_eq!(label_float(1.0, true, None), "1.0");
        assert_eq!(label_float(f64::INFINITY, false, None), "+Inf");
        // As Python's client writes them.
        for (v, python) in [
            (0.0, "0.0"),
            (1.0, "1.0"),
            (2560.0, "2560.0"),
            (0.005, "0.005"),
            (1e6, "1e+06"),
            (1e-5, "1e-05"),
        ] {
            assert_eq!(label_float(v, false, Some(true)), python, "{v}");
            assert_eq!(label_float(v, true, Some(true)), python, "{v}");
        }
    }

    fn valid_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    proptest::proptest! {
        /// Whatever an OTLP client names a metric or an attribute, what we render is a valid
        /// Prometheus name; an empty one is dropped before rendering (M4).
        #[test]
        fn rendered_names_are_always_valid(name in "\\PC{0,24}", unit in "\\PC{0,4}", counter: bool) {
            let instrument = if counter { Instrument::Counter } else { Instrument::Gauge };
            if !name.is_empty() {
                let label = sanitize(&name, false);
                proptest::prop_assert!(valid_name(&label) && !label.contains(':'), "{label}");
                proptest::prop_assert!(valid_name(&metric_name(&name, &unit, instrument)));
            }
        }
    }

    fn batch() -> Batch {
        let hist = Metric {
            name: "gen_ai.server.request.duration".into(),
            unit: "s".into(),
            description: "End-to-end duration".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: vec![kv("gen_ai.request.model", "llama")],
                    count: 6,
                    sum: Some(4.5),
                    bucket_counts: vec![1, 2, 3],
                    explicit_bounds: vec![0.5, 1.0],
                    ..Default::default()
                }],
                aggregation_temporality: 2,
            })),
            ..Default::default()
        };
        Batch::with_resource(
            vec![
                kv("service.name", "vllm/chat"),
                kv("service.instance.id", "10.0.0.5:8000"),
                kv("gen_ai.pool.name", "chat"),
                kv("url.full", "http://10.0.0.5:8000/metrics"),
            ],
            vec![
                Metric::gauge(
                    "gen_ai.server.kv_cache.usage",
                    "%",
                    vec![number_point(
                        1,
                        43.75,
                        vec![kv("gen_ai.request.model", "llama")],
                    )],
                ),
                Metric::sum(
                    "gen_ai.server.token.usage",
                    "{token}",
                    true,
                    vec![number_point(
                        1,
                        100.0,
                        vec![kv("gen_ai.token.type", "input")],
                    )],
                ),
                hist,
            ],
        )
    }

    #[test]
    fn names_follow_the_specification() {
        use Instrument::*;
        let cases = [
            (
                "gen_ai.server.kv_cache.usage",
                "%",
                Gauge,
                "gen_ai_server_kv_cache_usage_percent",
            ),
            (
                "gen_ai.server.token.usage",
                "{token}",
                Counter,
                "gen_ai_server_token_usage_total",
            ),
            (
                "vllm:prompt_tokens_total",
                "",
                Counter,
                "vllm:prompt_tokens_total",
            ),
            (
                "hw.gpu.memory.usage",
                "By",
                Other,
                "hw_gpu_memory_usage_bytes",
            ),
            ("hw.gpu.utilization", "1", Gauge, "hw_gpu_utilization_ratio"),
            ("hw.energy", "J", Counter, "hw_energy_joules_total"),
            (
                "gen_ai.server.energy.per_output_token",
                "J/{token}",
                Gauge,
                "gen_ai_server_energy_per_output_token_joules",
            ),
            // `_ratio` is for gauges only: an UpDownCounter of unit 1 keeps its name.
            ("hw.status", "1", Other, "hw_status"),
        ];
        for (name, unit, instrument, want) in cases {
            assert_eq!(metric_name(name, unit, instrument), want);
        }
        assert_eq!(sanitize("9lives", false), "key_9lives");
    }

    #[test]
    fn exemplars_in_openmetrics_only() {
        use genai_collector_core::model::{exemplar, Exemplar};
        let mut b = batch();
        let ex = |v: f64| Exemplar {
            trace_id: vec![0xab; 16],
            span_id: vec![0x01; 8],
            time_unix_nano: 1_700_000_000_500_000_000,
            value: Some(exemplar::Value::AsDouble(v)),
            filtered_attributes: vec![kv("user", "x".repeat(200))],
        };
        let metrics = &mut b.resource_metrics[0].scope_metrics[0].metrics;
        for m in metrics.iter_mut() {
            match &mut m.data {
                Some(metric::Data::Histogram(h)) => h.data_points[0].exemplars = vec![ex(0.7)],
                Some(metric::Data::Sum(s)) => s.data_points[0].exemplars = vec![ex(3.0)],
                _ => {}
            }
        }
        let mut store = Store::default();
        store.update(&b, &[], Instant::now());
        let om = store.render(true);
        let trace = "ab".repeat(16);
        let tail = format!(
            " # {{trace_id=\"{trace}\",span_id=\"0101010101010101\"}} 0.7 1700000000.500\n"
        );
        assert!(
            om.contains(&format!("le=\"1.0\"}} 3.0{tail}")),
            "0.7 falls in the 1.0 bucket; the oversized attribute is left out:\n{om}"
        );
        assert!(
            om.contains(&format!("}} 100.0{}", tail.replace(" 0.7 ", " 3.0 "))),
            "{om}"
        );
        assert_eq!(om.matches(" # {").count(), 2, "{om}");
        assert!(!store.render(false).contains(" # {"));
        // The next export without exemplars keeps them; a new one on the counter replaces it.
        store.update(&batch(), &[], Instant::now());
        assert_eq!(store.render(true), om);
        let mut b = batch();
        if let Some(metric::Data::Sum(s)) =
            &mut b.resource_metrics[0].scope_metrics[0].metrics[1].data
        {
            s.data_points[0].exemplars = vec![Exemplar {
                value: Some(exemplar::Value::AsInt(9)),
                ..Default::default()
            }];
        }
        store.update(&b, &[], Instant::now());
        let om = store.render(true);
        assert!(om.contains("} 100.0 # {} 9.0\n"), "{om}");
        assert_eq!(om.matches(" # {").count(), 2, "{om}");
    }

    #[test]
    fn renders_both_formats() {
        let mut store = Store::default();
        store.update(&batch(), &["gen_ai.pool.name".to_string()], Instant::now());
        let text = store.render(false);
        assert!(text.contains("gen_ai_server_kv_cache_usage_percent{gen_ai_pool_name=\"chat\",gen_ai_request_model=\"llama\",instance=\"10.0.0.5:8000\",job=\"vllm/chat\"} 43.75"), "{text}");
        assert!(text.contains("# TYPE gen_ai_server_token_usage_total counter"));
        // Not scraped: whole bounds as Go writes them in 0.0.4.
        assert!(text.contains("gen_ai_server_request_duration_seconds_bucket{gen_ai_pool_name=\"chat\",gen_ai_request_model=\"llama\",instance=\"10.0.0.5:8000\",job=\"vllm/chat\",le=\"1\"} 3"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 6"));
        assert!(text.contains("target_info{gen_ai_pool_name=\"chat\",instance=\"10.0.0.5:8000\",job=\"vllm/chat\",url_full=\"http://10.0.0.5:8000/metrics\"} 1"));
        let om = format!("{}# EOF\n", store.render(true));
        assert!(om.contains("# TYPE gen_ai_server_token_usage counter\n"));
        assert!(om.contains("# TYPE target info\n"));
    }

    #[test]
    fn series_are_capped_and_expire_without_scrapes() {
        let gauges = |n: usize| {
            Batch::with_resource(
                vec![kv("service.name", "app")],
                vec![Metric::gauge(
                    "g",
                    "",
                    (0..n)
                        .map(|i| number_point(1, 1.0, vec![kv("id", i as i64)]))
                        .collect(),
                )],
            )
        };
        let mut store = Store::new(Duration::from_secs(60), 100);
        let t0 = Instant::now();
        store.update(&gauges(250), &[], t0);
        assert_eq!(store.series, 100, "target_info and 99 of the gauges");
        assert_eq!(store.dropped_series, 151);
        store.update(&gauges(10), &[], t0 + Duration::from_secs(2));
        assert_eq!(
            store.dropped_series, 151,
            "updates of held series are never dropped"
        );
        // Nobody scrapes: the next export expires what stopped arriving.
        store.update(&gauges(0), &[], t0 + Duration::from_secs(61));
        assert_eq!(
            store.series, 11,
            "the series updated at 2 s and target_info remain"
        );
        let mut page = String::new();
        store.render_own(&mut page);
        assert!(
            page.contains("genai_collector_prometheus_dropped_series_total 151"),
            "{page}"
        );
    }

    #[test]
    fn series_expire() {
        let mut store = Store::new(Duration::from_secs(60), 200_000);
        let t0 = Instant::now();
        store.update(&batch(), &[], t0);
        store.expire(t0 + Duration::from_secs(10));
        assert!(!store.families.is_empty());
        store.expire(t0 + Duration::from_secs(61));
        assert!(
            store.families.is_empty(),
            "series that stop arriving go away"
        );
    }
}
