//! The data model: batches of metrics in the OTLP shape.
//!
//! A [`Batch`] is a list of OTLP `ResourceMetrics` (resource → scope → metric → points), built on
//! the `opentelemetry-proto` message types so OTLP in and out needs no conversion. The extension
//! traits here cover what processors do all day: walk points, read and set attributes, rename a
//! metric, scale a unit.

use std::time::{SystemTime, UNIX_EPOCH};

mod encode;
mod size;
pub use size::{approx_bytes, decoded_size, worst_case_size, DecodedSize, WireError};

pub use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
pub use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue,
};
pub use opentelemetry_proto::tonic::metrics::v1::{
    exemplar, metric, number_data_point, summary_data_point, AggregationTemporality, Exemplar,
    ExponentialHistogram, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
};
pub use opentelemetry_proto::tonic::resource::v1::Resource;

/// Metric metadata the scrape receivers set on histograms and summaries: whether the page
/// writes whole `le` / `quantile` values with `.0` (`le="1.0"`, as Python's client library
/// does) or without (`le="1"`, Go's). Prometheus 2 keeps such a label's text as it is, so the
/// Prometheus exporter writes them back the same way to keep each series' identity.
pub const WHOLE_FLOATS_WITH_DOT_ZERO: &str = "prometheus.whole_floats_with_dot_zero";

/// The gRPC path of OTLP's `MetricsService/Export`.
pub const GRPC_EXPORT_PATH: &str =
    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// The instrumentation scope the collector stamps on metrics it creates.
pub const SCOPE_NAME: &str = "genai-collector";

/// Current time as Unix nanoseconds.
pub fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The unit of work that flows from receivers through processors to exporters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// OTLP's resources, each with its scopes and metrics.
    pub resource_metrics: Vec<ResourceMetrics>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch holding one resource (with `resource_attrs`) and one scope.
    pub fn with_resource(resource_attrs: Vec<KeyValue>, metrics: Vec<Metric>) -> Self {
        let mut batch = Self::new();
        batch.push_resource(resource_attrs, metrics);
        batch
    }

    /// Appends a resource whose metrics are stamped with the collector's scope.
    pub fn push_resource(&mut self, resource_attrs: Vec<KeyValue>, metrics: Vec<Metric>) {
        self.resource_metrics.push(ResourceMetrics {
            resource: Some(Resource {
                attributes: resource_attrs,
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        });
    }

    /// Number of data points, the unit every self-metric counts in.
    pub fn point_count(&self) -> usize {
        self.metrics().map(MetricExt::point_count).sum()
    }

    /// Whether it holds no resource.
    pub fn is_empty(&self) -> bool {
        self.resource_metrics.is_empty()
    }

    /// Moves every resource of `other` into this batch.
    pub fn append(&mut self, other: &mut Batch) {
        self.resource_metrics.append(&mut other.resource_metrics);
    }

    /// Every metric of every resource and scope.
    pub fn metrics(&self) -> impl Iterator<Item = &Metric> {
        self.resource_metrics
            .iter()
            .flat_map(|rm| rm.scope_metrics.iter())
            .flat_map(|sm| sm.metrics.iter())
    }

    /// Every metric, to change in place.
    pub fn metrics_mut(&mut self) -> impl Iterator<Item = &mut Metric> {
        self.resource_metrics
            .iter_mut()
            .flat_map(|rm| rm.scope_metrics.iter_mut())
            .flat_map(|sm| sm.metrics.iter_mut())
    }

    /// Visits every metric together with the attributes of the resource it belongs to.
    pub fn for_each_metric_mut(&mut self, mut f: impl FnMut(&[KeyValue], &mut Metric)) {
        for rm in &mut self.resource_metrics {
            let attrs = rm.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
            for sm in &mut rm.scope_metrics {
                for m in &mut sm.metrics {
                    f(attrs, m);
                }
            }
        }
    }

    /// Keeps the metrics for which `keep` is true, then drops scopes and resources left empty.
    pub fn retain_metrics(&mut self, mut keep: impl FnMut(&Metric) -> bool) {
        for rm in &mut self.resource_metrics {
            for sm in &mut rm.scope_metrics {
                sm.metrics.retain(&mut keep);
            }
            rm.scope_metrics.retain(|sm| !sm.metrics.is_empty());
        }
        self.resource_metrics
            .retain(|rm| !rm.scope_metrics.is_empty());
    }

    /// Splits the batch into batches of at most `max_points` points, in order; each part
    /// repeats the resource and scope of its points. `0` keeps the batch whole.
    pub fn split(self, max_points: usize) -> Vec<Batch> {
        if max_points == 0 || self.point_count() <= max_points {
            return vec![self];
        }
        let mut parts = Vec::new();
        let mut part = Batch::new();
        let mut room = max_points;
        // The (resource, scope) the part's last scope holds, to append to it rather than repeat.
        let mut open: Option<(usize, usize)> = None;
        for (ri, rm) in self.resource_metrics.into_iter().enumerate() {
            let ResourceMetrics {
                resource,
                scope_metrics,
                schema_url,
            } = rm;
            for (si, sm) in scope_metrics.into_iter().enumerate() {
                let ScopeMetrics {
                    scope,
                    metrics,
                    schema_url: scope_schema,
                } = sm;
                for mut metric in metrics {
                    loop {
                        let rest = (metric.point_count() > room)
                            .then(|| split_off_points(&mut metric, room));
                        room -= metric.point_count();
                        if open != Some((ri, si)) {
                            if open.map(|(r, _)| r) != Some(ri) {
                                part.resource_metrics.push(ResourceMetrics {
                                    resource: resource.clone(),
                                    scope_metrics: Vec::new(),
                                    schema_url: schema_url.clone(),
                                });
                            }
                            let last = part.resource_metrics.last_mut().expect("pushed above");
                            last.scope_metrics.push(ScopeMetrics {
                                scope: scope.clone(),
                                metrics: Vec::new(),
                                schema_url: scope_schema.clone(),
                            });
                            open = Some((ri, si));
                        }
                        let rm = part.resource_metrics.last_mut().expect("opened above");
                        let sm = rm.scope_metrics.last_mut().expect("opened above");
                        sm.metrics.push(metric);
                        if room == 0 {
                            parts.push(std::mem::take(&mut part));
                            room = max_points;
                            open = None;
                        }
                        match rest {
                            Some(r) => metric = r,
                            None => break,
                        }
                    }
                }
            }
        }
        if !part.is_empty() {
            parts.push(part);
        }
        parts
    }

    /// The batch an OTLP request carries, without copying.
    pub fn from_request(request: ExportMetricsServiceRequest) -> Self {
        Self {
            resource_metrics: request.resource_metrics,
        }
    }

    /// The OTLP request for this batch, without copying.
    pub fn into_request(self) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: self.resource_metrics,
        }
    }

    /// The protobuf encoding of the export request holding this batch, written from the
    /// borrowed batch (no copy of its data), each nested length computed once.
    pub fn encode_request(&self) -> Vec<u8> {
        encode::encode_request(&self.resource_metrics)
    }
}

/// Keeps the first `keep` points in `metric` and returns the rest as a metric of their own.
fn split_off_points(metric: &mut Metric, keep: usize) -> Metric {
    let data = metric.data.take();
    let mut rest = metric.clone();
    rest.data = data.map(|mut d| {
        let tail = match &mut d {
            metric::Data::Gauge(g) => metric::Data::Gauge(Gauge {
                data_points: g.data_points.split_off(keep),
            }),
            metric::Data::Sum(s) => metric::Data::Sum(Sum {
                data_points: s.data_points.split_off(keep),
                ..*s
            }),
            metric::Data::Histogram(h) => metric::Data::Histogram(Histogram {
                data_points: h.data_points.split_off(keep),
                ..*h
            }),
            metric::Data::ExponentialHistogram(h) => {
                metric::Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: h.data_points.split_off(keep),
                    ..*h
                })
            }
            metric::Data::Summary(s) => metric::Data::Summary(Summary {
                data_points: s.data_points.split_off(keep),
            }),
        };
        metric.data = Some(d);
        tail
    });
    rest
}

/// Builds a string attribute, the common case.
pub fn kv(key: impl Into<String>, value: impl Into<AttrValue>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(value.into().0),
        ..Default::default()
    }
}

/// An attribute value; converts from the Rust types attributes usually hold.
pub struct AttrValue(pub AnyValue);

macro_rules! attr_from {
    ($($t:ty => $variant:ident($conv:expr)),* $(,)?) => {$(
        impl From<$t> for AttrValue {
            fn from(v: $t) -> Self {
                AttrValue(AnyValue { value: Some(any_value::Value::$variant($conv(v))) })
            }
        }
    )*};
}
attr_from! {
    &str => StringValue(String::from),
    String => StringValue(std::convert::identity),
    &String => StringValue(Clone::clone),
    bool => BoolValue(std::convert::identity),
    i64 => IntValue(std::convert::identity),
    u32 => IntValue(i64::from),
    u16 => IntValue(i64::from),
    f64 => DoubleValue(std::convert::identity),
}

/// Reads and edits a list of attributes (a resource's or a data point's).
pub trait AttributesExt {
    /// The attribute's value, of whatever type.
    fn get_attr(&self, key: &str) -> Option<&AnyValue>;
    /// The attribute's value when it is a string.
    fn get_str(&self, key: &str) -> Option<&str>;
    /// Replaces the attribute's value, or appends it when absent.
    fn set_attr(&mut self, key: &str, value: impl Into<AttrValue>);
    /// Removes the attribute and gives its value.
    fn remove_attr(&mut self, key: &str) -> Option<AnyValue>;
    /// Renames `from` to `to`, replacing any existing `to`. Returns whether `from` existed.
    fn rename_attr(&mut self, from: &str, to: &str) -> bool;
}

/// The attribute `key` of a list (a resource's or a point's), of whatever type: what
/// [`AttributesExt::get_attr`] reads, for a borrowed slice.
pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
}

/// The attribute `key` when it is a string: what [`AttributesExt::get_str`] reads, for a
/// borrowed slice.
pub fn attr_str<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key)?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// Which server a resource stands for: `service.instance.id`, else
/// `server.address:server.port` (as the scrape receivers set them); `None` when it names
/// neither.
pub fn server_identity(attrs: &[KeyValue]) -> Option<String> {
    if let Some(id) = attr(attrs, "service.instance.id") {
        return Some(display_value(id));
    }
    let address = attr(attrs, "server.address").map(display_value)?;
    let port = attr(attrs, "server.port").map(display_value)?;
    Some(format!("{address}:{port}"))
}

impl AttributesExt for Vec<KeyValue> {
    fn get_attr(&self, key: &str) -> Option<&AnyValue> {
        attr(self, key)
    }

    fn get_str(&self, key: &str) -> Option<&str> {
        attr_str(self, key)
    }

    fn set_attr(&mut self, key: &str, value: impl Into<AttrValue>) {
        let value = Some(value.into().0);
        match self.iter_mut().find(|kv| kv.key == key) {
            Some(kv) => kv.value = value,
            None => self.push(KeyValue {
                key: key.to_owned(),
                value,
                ..Default::default()
            }),
        }
    }

    fn remove_attr(&mut self, key: &str) -> Option<AnyValue> {
        let i = self.iter().position(|kv| kv.key == key)?;
        self.remove(i).value
    }

    fn rename_attr(&mut self, from: &str, to: &str) -> bool {
        let Some(i) = self.iter().position(|kv| kv.key == from) else {
            return false;
        };
        if from != to {
            self.retain(|kv| kv.key != to);
            let i = self.iter().position(|kv| kv.key == from).unwrap_or(i);
            self[i].key = to.to_owned();
        }
        true
    }
}

/// The attributes of a resource, or none when it has no resource.
pub fn resource_attributes(rm: &ResourceMetrics) -> &[KeyValue] {
    rm.resource.as_ref().map_or(&[], |r| &r.attributes)
}

/// `key=value` pairs joined by `sep`, values as [`display_value`] shows them.
pub fn display_attrs(list: &[KeyValue], sep: &str) -> String {
    let pairs: Vec<String> = list
        .iter()
        .map(|kv| {
            format!(
                "{}={}",
                kv.key,
                kv.value.as_ref().map(display_value).unwrap_or_default()
            )
        })
        .collect();
    pairs.join(sep)
}

/// Renders an attribute value the way the debug exporter and error messages show it.
pub fn display_value(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(display_value).collect();
            format!("[{}]", items.join(","))
        }
        Some(any_value::Value::KvlistValue(l)) => format!("{{{}}}", display_attrs(&l.values, ",")),
        Some(any_value::Value::BytesValue(b)) => format!("<{} bytes>", b.len()),
        Some(any_value::Value::StringValueStrindex(i)) => format!("<string #{i}>"),
        None => String::new(),
    }
}

/// What processors do to a metric, whatever its kind.
pub trait MetricExt {
    /// A gauge with the given points.
    fn gauge(name: &str, unit: &str, points: Vec<NumberDataPoint>) -> Metric;
    /// A cumulative sum with the given points.
    fn sum(name: &str, unit: &str, monotonic: bool, points: Vec<NumberDataPoint>) -> Metric;
    /// Points of any kind.
    fn point_count(&self) -> usize;
    /// Renames the metric.
    fn rename(&mut self, name: &str);
    /// Multiplies every value by `factor` (a unit conversion: ratio → %, ms → s). Histogram
    /// bucket bounds and sums scale too; counts do not.
    fn scale(&mut self, factor: f64);
    /// Calls `f` with the attributes of every data point.
    fn for_each_point_attrs(&mut self, f: impl FnMut(&mut Vec<KeyValue>));
    /// Keeps the points whose attributes `keep` accepts, whatever the metric's kind.
    fn retain_points(&mut self, keep: impl FnMut(&Vec<KeyValue>) -> bool);
    /// The kind as a word: gauge, sum, histogram, exponential_histogram, summary, empty.
    fn kind_name(&self) -> &'static str;
    /// A gauge's or a sum's points; none for the other kinds.
    fn number_points(&self) -> &[NumberDataPoint];
}

impl MetricExt for Metric {
    fn gauge(name: &str, unit: &str, points: Vec<NumberDataPoint>) -> Metric {
        Metric {
            name: name.to_owned(),
            unit: unit.to_owned(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: points,
            })),
            ..Default::default()
        }
    }

    fn sum(name: &str, unit: &str, monotonic: bool, points: Vec<NumberDataPoint>) -> Metric {
        Metric {
            name: name.to_owned(),
            unit: unit.to_owned(),
            data: Some(metric::Data::Sum(Sum {
                data_points: points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: monotonic,
            })),
            ..Default::default()
        }
    }

    fn point_count(&self) -> usize {
        match &self.data {
            Some(metric::Data::Gauge(g)) => g.data_points.len(),
            Some(metric::Data::Sum(s)) => s.data_points.len(),
            Some(metric::Data::Histogram(h)) => h.data_points.len(),
            Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
            Some(metric::Data::Summary(s)) => s.data_points.len(),
            None => 0,
        }
    }

    fn rename(&mut self, name: &str) {
        name.clone_into(&mut self.name);
    }

    fn scale(&mut self, factor: f64) {
        fn scale_number(points: &mut [NumberDataPoint], factor: f64) {
            for p in points {
                p.value = match p.value {
                    Some(number_data_point::Value::AsDouble(v)) => {
                        Some(number_data_point::Value::AsDouble(v * factor))
                    }
                    Some(number_data_point::Value::AsInt(v)) => {
                        Some(number_data_point::Value::AsDouble(v as f64 * factor))
                    }
                    None => None,
                };
            }
        }
        match &mut self.data {
            Some(metric::Data::Gauge(g)) => scale_number(&mut g.data_points, factor),
            Some(metric::Data::Sum(s)) => scale_number(&mut s.data_points, factor),
            Some(metric::Data::Histogram(h)) => {
                for p in &mut h.data_points {
                    p.explicit_bounds.iter_mut().for_each(|b| *b *= factor);
                    p.sum = p.sum.map(|s| s * factor);
                    p.min = p.min.map(|s| s * factor);
                    p.max = p.max.map(|s| s * factor);
                }
            }
            Some(metric::Data::Summary(s)) => {
                for p in &mut s.data_points {
                    p.sum *= factor;
                    p.quantile_values.iter_mut().for_each(|q| q.value *= factor);
                }
            }
            // Exponential bucket boundaries are powers of a base; a linear factor cannot be
            // applied to them without re-bucketing, so only the scalar fields scale.
            Some(metric::Data::ExponentialHistogram(h)) => {
                for p in &mut h.data_points {
                    p.sum = p.sum.map(|s| s * factor);
                    p.min = p.min.map(|s| s * factor);
                    p.max = p.max.map(|s| s * factor);
                }
            }
            None => {}
        }
    }

    fn for_each_point_attrs(&mut self, mut f: impl FnMut(&mut Vec<KeyValue>)) {
        match &mut self.data {
            Some(metric::Data::Gauge(g)) => {
                g.data_points.iter_mut().for_each(|p| f(&mut p.attributes))
            }
            Some(metric::Data::Sum(s)) => {
                s.data_points.iter_mut().for_each(|p| f(&mut p.attributes))
            }
            Some(metric::Data::Histogram(h)) => {
                h.data_points.iter_mut().for_each(|p| f(&mut p.attributes))
            }
            Some(metric::Data::ExponentialHistogram(h)) => {
                h.data_points.iter_mut().for_each(|p| f(&mut p.attributes))
            }
            Some(metric::Data::Summary(s)) => {
                s.data_points.iter_mut().for_each(|p| f(&mut p.attributes))
            }
            None => {}
        }
    }

    fn retain_points(&mut self, mut keep: impl FnMut(&Vec<KeyValue>) -> bool) {
        match &mut self.data {
            Some(metric::Data::Gauge(g)) => g.data_points.retain(|p| keep(&p.attributes)),
            Some(metric::Data::Sum(s)) => s.data_points.retain(|p| keep(&p.attributes)),
            Some(metric::Data::Histogram(h)) => h.data_points.retain(|p| keep(&p.attributes)),
            Some(metric::Data::ExponentialHistogram(h)) => {
                h.data_points.retain(|p| keep(&p.attributes))
            }
            Some(metric::Data::Summary(s)) => s.data_points.retain(|p| keep(&p.attributes)),
            None => {}
        }
    }

    fn kind_name(&self) -> &'static str {
        match &self.data {
            Some(metric::Data::Gauge(_)) => "gauge",
            Some(metric::Data::Sum(_)) => "sum",
            Some(metric::Data::Histogram(_)) => "histogram",
            Some(metric::Data::ExponentialHistogram(_)) => "exponential_histogram",
            Some(metric::Data::Summary(_)) => "summary",
            None => "empty",
        }
    }

    fn number_points(&self) -> &[NumberDataPoint] {
        match &self.data {
            Some(metric::Data::Gauge(g)) => &g.data_points,
            Some(metric::Data::Sum(s)) => &s.data_points,
            _ => &[],
        }
    }
}

/// A number point with the given attributes at time `time_unix_nano`.
pub fn number_point(time_unix_nano: u64, value: f64, attributes: Vec<KeyValue>) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        time_unix_nano,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    }
}

/// The value of a number point as `f64`.
pub fn number_value(point: &NumberDataPoint) -> Option<f64> {
    match point.value? {
        number_data_point::Value::AsDouble(v) => Some(v),
        number_data_point::Value::AsInt(v) => Some(v as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_request_matches_prost_for_every_kind() {
        let attrs = vec![kv("model", "m"), kv("n", 3i64)];
        let mut metrics = vec![
            Metric::gauge("g", "1", vec![number_point(5, 1.5, attrs.clone())]),
            Metric::sum(
                "s",
                "{token}",
                true,
                vec![number_point(5, 2.0, attrs.clone())],
            ),
            Metric::sum("u", "", false, vec![]),
            Metric {
                name: "h".into(),
                description: "a histogram".into(),
                data: Some(metric::Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint {
                        attributes: attrs.clone(),
                        count: 3,
                        sum: Some(0.5),
                        bucket_counts: vec![1, 2],
                        explicit_bounds: vec![0.1],
                        ..Default::default()
                    }],
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                })),
                metadata: vec![kv("k", "v")],
                ..Default::default()
            },
            Metric {
                name: "q".into(),
                data: Some(metric::Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint::default(); 2],
                })),
                ..Default::default()
            },
            Metric {
                name: "e".into(),
                data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![Default::default()],
                    aggregation_temporality: 1,
                })),
                ..Default::default()
            },
            Metric {
                name: "nodata".into(),
                ..Default::default()
            },
        ];
        let mut batch = Batch::with_resource(vec![kv("service.name", "x")], metrics.clone());
        metrics.truncate(2);
        batch.push_resource(vec![], metrics);
        batch.resource_metrics[1].schema_url = "https://opentelemetry.io/schemas/1.0".into();
        batch.resource_metrics[1].scope_metrics[0].schema_url = "s".into();
        batch.resource_metrics.push(ResourceMetrics::default());
        let ours = batch.encode_request();
        let theirs = prost::Message::encode_to_vec(&batch.clone().into_request());
        let decoded: ExportMetricsServiceRequest = prost::Message::decode(&ours[..]).unwrap();
        assert_eq!(Batch::from_request(decoded), batch);
        assert_eq!(ours, theirs, "byte for byte what prost writes");
        assert!(Batch::new().encode_request().is_empty());
    }

    #[test]
    fn split_keeps_every_point_in_order_under_the_limit() {
        let gauge = |name: &str, from: usize, n: usize| {
            let pts = (from..from + n)
                .map(|i| number_point(1, i as f64, vec![]))
                .collect();
            Metric::gauge(name, "1", pts)
        };
        let mut batch = Batch::with_resource(
            vec![kv("service.name", "a")],
            vec![gauge("x", 0, 7), gauge("y", 7, 2)],
        );
        batch.push_resource(vec![kv("service.name", "b")], vec![gauge("z", 9, 5)]);
        let values = |b: &Batch| -> Vec<(String, String, f64)> {
            b.resource_metrics
                .iter()
                .flat_map(|rm| {
                    let res = display_attrs(&rm.resource.as_ref().unwrap().attributes, ",");
                    rm.scope_metrics.iter().flat_map(move |sm| {
                        let res = res.clone();
                        sm.metrics.iter().flat_map(move |m| {
                            let res = res.clone();
                            let Some(metric::Data::Gauge(g)) = &m.data else {
                                panic!()
                            };
                            g.data_points.iter().map(move |p| {
                                (res.clone(), m.name.clone(), number_value(p).unwrap())
                            })
                        })
                    })
                })
                .collect()
        };
        let all = values(&batch);
        for max in [1, 3, 4, 9, 13] {
            let parts = batch.clone().split(max);
            assert_eq!(parts.len(), 14usize.div_ceil(max), "max {max}");
            assert!(parts
                .iter()
                .all(|p| p.point_count() <= max && !p.is_empty()));
            let joined: Vec<_> = parts.iter().flat_map(&values).collect();
            assert_eq!(joined, all, "max {max}");
        }
        assert_eq!(batch.clone().split(0), vec![batch.clone()]);
        assert_eq!(batch.clone().split(14), vec![batch]);
    }

    #[test]
    fn borrowed_encoding_equals_the_message_encoding() {
        use prost::Message as _;
        let batch = sample();
        let bytes = batch.encode_request();
        assert_eq!(bytes, batch.clone().into_request().encode_to_vec());
        let decoded = ExportMetricsServiceRequest::decode(&bytes[..]).unwrap();
        assert_eq!(Batch::from_request(decoded), batch);
    }

    fn sample() -> Batch {
        Batch::with_resource(
            vec![kv("service.name", "vllm")],
            vec![
                Metric::gauge(
                    "vllm:kv_cache_usage_perc",
                    "1",
                    vec![
                        number_point(1, 0.5, vec![kv("model_name", "llama")]),
                        number_point(1, 0.25, vec![kv("model_name", "qwen")]),
                    ],
                ),
                Metric::sum(
                    "tokens",
                    "{token}",
                    true,
                    vec![number_point(1, 10.0, vec![])],
                ),
            ],
        )
    }

    #[test]
    fn counts_points_across_resources() {
        let mut b = sample();
        b.append(&mut sample());
        assert_eq!(b.point_count(), 6);
        assert_eq!(b.resource_metrics.len(), 2);
    }

    #[test]
    fn rename_scale_and_attributes() {
        let mut b = sample();
        for m in b
            .metrics_mut()
            .filter(|m| m.name == "vllm:kv_cache_usage_perc")
        {
            m.rename("gen_ai.server.kv_cache.usage");
            m.scale(100.0);
            m.for_each_point_attrs(|a| {
                assert!(a.rename_attr("model_name", "gen_ai.request.model"));
                a.set_attr("gen_ai.provider.name", "vllm");
            });
        }
        let m = b.metrics().next().unwrap();
        assert_eq!(m.name, "gen_ai.server.kv_cache.usage");
        let Some(metric::Data::Gauge(g)) = &m.data else {
            panic!("gauge expected")
        };
        assert_eq!(number_value(&g.data_points[0]), Some(50.0));
        assert_eq!(
            g.data_points[1].attributes.get_str("gen_ai.request.model"),
            Some("qwen")
        );
        assert_eq!(
            g.data_points[1].attributes.get_str("gen_ai.provider.name"),
            Some("vllm")
        );
        assert_eq!(g.data_points[1].attributes.get_str("model_name"), None);
    }

    #[test]
    fn rename_attr_replaces_existing_target() {
        let mut attrs = vec![kv("a", "1"), kv("b", "2")];
        assert!(attrs.rename_attr("a", "b"));
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs.get_str("b"), Some("1"));
        assert!(!attrs.rename_attr("zzz", "b"));
        assert_eq!(
            attrs.remove_attr("b").map(|v| display_value(&v)),
            Some("1".into())
        );
    }

    #[test]
    fn scale_histogram_moves_bounds_not_counts() {
        let mut m = Metric {
            name: "latency_ms".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    count: 3,
                    sum: Some(1500.0),
                    bucket_counts: vec![1, 2, 0],
                    explicit_bounds: vec![100.0, 1000.0],
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        };
        m.scale(0.001);
        let Some(metric::Data::Histogram(h)) = &m.data else {
            panic!()
        };
        assert_eq!(h.data_points[0].explicit_bounds, vec![0.1, 1.0]);
        assert_eq!(h.data_points[0].sum, Some(1.5));
        assert_eq!(h.data_points[0].bucket_counts, vec![1, 2, 0]);
    }

    #[test]
    fn retain_drops_empty_containers() {
        let mut b = sample();
        b.retain_metrics(|m| m.name == "nothing");
        assert!(b.is_empty());
        let mut b = sample();
        b.retain_metrics(|m| m.name == "tokens");
        assert_eq!(b.point_count(), 1);
    }
}
