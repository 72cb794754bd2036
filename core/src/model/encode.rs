//! Encoding a batch as an OTLP export request, each nested length computed once.
//!
//! prost writes a nested message as its length, then its fields, and finds that length by
//! walking the whole subtree; every level does it again, so a point's attributes are measured
//! once per level above them (seven times). Here a first pass measures resource, scope, metric
//! and point once each, in the order the second pass writes them; points and the small
//! messages under them are written by prost.

use opentelemetry_proto::tonic::metrics::v1::{metric, Metric, ResourceMetrics, ScopeMetrics};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;

/// The `ExportMetricsServiceRequest` holding `resources`, as protobuf bytes.
pub(super) fn encode_request<'a, I>(resources: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a ResourceMetrics> + Clone,
{
    let mut lens = Vec::new();
    let total: usize = resources
        .clone()
        .into_iter()
        .map(|rm| field(resource_metrics_len(rm, &mut lens)))
        .sum();
    let mut buf = Vec::with_capacity(total);
    let mut lens = lens.into_iter();
    for rm in resources {
        put_resource_metrics(rm, &mut lens, &mut buf);
    }
    buf
}

/// A length-delimited field of `len` bytes with a one-byte key (every tag here is below 16).
fn field(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn string_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        field(s.len())
    }
}

/// Measures `m` into `lens` (`m` first, then what is under it) and returns its length.
fn measured(lens: &mut Vec<usize>, m: impl FnOnce(&mut Vec<usize>) -> usize) -> usize {
    let at = lens.len();
    lens.push(0);
    let len = m(lens);
    lens[at] = len;
    len
}

fn resource_metrics_len(rm: &ResourceMetrics, lens: &mut Vec<usize>) -> usize {
    measured(lens, |lens| {
        rm.resource.as_ref().map_or(0, |r| field(r.encoded_len()))
            + rm.scope_metrics
                .iter()
                .map(|sm| field(scope_metrics_len(sm, lens)))
                .sum::<usize>()
            + string_len(&rm.schema_url)
    })
}

fn scope_metrics_len(sm: &ScopeMetrics, lens: &mut Vec<usize>) -> usize {
    measured(lens, |lens| {
        sm.scope.as_ref().map_or(0, |s| field(s.encoded_len()))
            + sm.metrics
                .iter()
                .map(|m| field(metric_len(m, lens)))
                .sum::<usize>()
            + string_len(&sm.schema_url)
    })
}

fn points_len<P: Message>(points: &[P], lens: &mut Vec<usize>) -> usize {
    points
        .iter()
        .map(|p| {
            let len = p.encoded_len();
            lens.push(len);
            field(len)
        })
        .sum()
}

fn temporality_len(t: i32) -> usize {
    if t == 0 {
        0
    } else {
        1 + encoded_len_varint(i64::from(t) as u64)
    }
}

fn metric_len(m: &Metric, lens: &mut Vec<usize>) -> usize {
    measured(lens, |lens| {
        let data = match &m.data {
            None => 0,
            Some(d) => field(measured(lens, |lens| match d {
                metric::Data::Gauge(g) => points_len(&g.data_points, lens),
                metric::Data::Sum(s) => {
                    points_len(&s.data_points, lens)
                        + temporality_len(s.aggregation_temporality)
                        + if s.is_monotonic { 2 } else { 0 }
                }
                metric::Data::Histogram(h) => {
                    points_len(&h.data_points, lens) + temporality_len(h.aggregation_temporality)
                }
                metric::Data::ExponentialHistogram(h) => {
                    points_len(&h.data_points, lens) + temporality_len(h.aggregation_temporality)
                }
                metric::Data::Summary(s) => points_len(&s.data_points, lens),
            })),
        };
        string_len(&m.name)
            + string_len(&m.description)
            + string_len(&m.unit)
            + data
            + m.metadata
                .iter()
                .map(|kv| field(kv.encoded_len()))
                .sum::<usize>()
    })
}

type Lens = std::vec::IntoIter<usize>;

fn put_len(tag: u32, len: usize, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_string(tag: u32, s: &str, buf: &mut Vec<u8>) {
    if !s.is_empty() {
        put_len(tag, s.len(), buf);
        buf.extend_from_slice(s.as_bytes());
    }
}

fn put_message(tag: u32, m: &impl Message, buf: &mut Vec<u8>) {
    put_len(tag, m.encoded_len(), buf);
    m.encode_raw(buf);
}

fn next(lens: &mut Lens) -> usize {
    // The first pass pushed one length for every one the second pass takes.
    lens.next().unwrap_or_default()
}

fn put_resource_metrics(rm: &ResourceMetrics, lens: &mut Lens, buf: &mut Vec<u8>) {
    put_len(1, next(lens), buf);
    if let Some(r) = &rm.resource {
        put_message(1, r, buf);
    }
    for sm in &rm.scope_metrics {
        put_len(2, next(lens), buf);
        if let Some(s) = &sm.scope {
            put_message(1, s, buf);
        }
        for m in &sm.metrics {
            put_metric(m, lens, buf);
        }
        put_string(3, &sm.schema_url, buf);
    }
    put_string(3, &rm.schema_url, buf);
}

fn put_points<P: Message>(points: &[P], lens: &mut Lens, buf: &mut Vec<u8>) {
    for p in points {
        put_len(1, next(lens), buf);
        p.encode_raw(buf);
    }
}

fn put_temporality(t: i32, buf: &mut Vec<u8>) {
    if t != 0 {
        encode_key(2, WireType::Varint, buf);
        encode_varint(i64::from(t) as u64, buf);
    }
}

fn put_metric(m: &Metric, lens: &mut Lens, buf: &mut Vec<u8>) {
    put_len(2, next(lens), buf);
    put_string(1, &m.name, buf);
    put_string(2, &m.description, buf);
    put_string(3, &m.unit, buf);
    if let Some(d) = &m.data {
        let tag = match d {
            metric::Data::Gauge(_) => 5,
            metric::Data::Sum(_) => 7,
            metric::Data::Histogram(_) => 9,
            metric::Data::ExponentialHistogram(_) => 10,
            metric::Data::Summary(_) => 11,
        };
        put_len(tag, next(lens), buf);
        match d {
            metric::Data::Gauge(g) => put_points(&g.data_points, lens, buf),
            metric::Data::Sum(s) => {
                put_points(&s.data_points, lens, buf);
                put_temporality(s.aggregation_temporality, buf);
                if s.is_monotonic {
                    encode_key(3, WireType::Varint, buf);
                    buf.push(1);
                }
            }
            metric::Data::Histogram(h) => {
                put_points(&h.data_points, lens, buf);
                put_temporality(h.aggregation_temporality, buf);
            }
            metric::Data::ExponentialHistogram(h) => {
                put_points(&h.data_points, lens, buf);
                put_temporality(h.aggregation_temporality, buf);
            }
            metric::Data::Summary(s) => put_points(&s.data_points, lens, buf),
        }
    }
    for kv in &m.metadata {
        put_message(12, kv, buf);
    }
}
