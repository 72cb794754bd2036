//! How much memory a batch takes: measured on a decoded batch ([`approx_bytes`]), or foretold
//! from an OTLP request's wire bytes before it is decoded ([`decoded_size`]).
//!
//! Decoding amplifies: an empty histogram point is 2 bytes on the wire and a 144-byte struct
//! in a vector that doubles as it grows. Push receivers read the wire once with
//! [`decoded_size`] (no allocation) so that a request is refused before it can take the memory.

use std::cell::Cell;
use std::mem::size_of;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric, summary_data_point::ValueAtQuantile,
    Exemplar, ExponentialHistogramDataPoint, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, SummaryDataPoint,
};
use prost::encoding::decode_varint;

use super::Batch;

/// The heap bytes `batch` holds, counting each vector's and string's capacity.
pub fn approx_bytes(batch: &Batch) -> u64 {
    vec_bytes(&batch.resource_metrics)
        + batch
            .resource_metrics
            .iter()
            .map(|rm| {
                let resource = rm.resource.as_ref().map_or(0, |r| {
                    kvs(&r.attributes) + vec_bytes(&r.entity_refs) + 64 * r.entity_refs.len() as u64
                });
                resource
                    + str_bytes(&rm.schema_url)
                    + vec_bytes(&rm.scope_metrics)
                    + rm.scope_metrics.iter().map(scope_bytes).sum::<u64>()
            })
            .sum::<u64>()
}

fn scope_bytes(sm: &ScopeMetrics) -> u64 {
    let scope = sm.scope.as_ref().map_or(0, |s| {
        str_bytes(&s.name) + str_bytes(&s.version) + kvs(&s.attributes)
    });
    scope
        + str_bytes(&sm.schema_url)
        + vec_bytes(&sm.metrics)
        + sm.metrics.iter().map(metric_bytes).sum::<u64>()
}

fn metric_bytes(m: &Metric) -> u64 {
    let head = str_bytes(&m.name) + str_bytes(&m.description) + str_bytes(&m.unit);
    let number = |p: &NumberDataPoint| kvs(&p.attributes) + exemplars(&p.exemplars);
    let data = match &m.data {
        None => 0,
        Some(metric::Data::Gauge(g)) => points(&g.data_points, number),
        Some(metric::Data::Sum(s)) => points(&s.data_points, number),
        Some(metric::Data::Histogram(h)) => points(&h.data_points, |p| {
            kvs(&p.attributes)
                + exemplars(&p.exemplars)
                + vec_bytes(&p.bucket_counts)
                + vec_bytes(&p.explicit_bounds)
        }),
        Some(metric::Data::ExponentialHistogram(h)) => points(&h.data_points, |p| {
            let buckets =
                |b: &Option<Buckets>| b.as_ref().map_or(0, |b| vec_bytes(&b.bucket_counts));
            kvs(&p.attributes)
                + exemplars(&p.exemplars)
                + buckets(&p.positive)
                + buckets(&p.negative)
        }),
        Some(metric::Data::Summary(s)) => points(&s.data_points, |p| {
            kvs(&p.attributes) + vec_bytes(&p.quantile_values)
        }),
    };
    head + kvs(&m.metadata) + data
}

fn points<T>(v: &Vec<T>, heap: impl Fn(&T) -> u64) -> u64 {
    vec_bytes(v) + v.iter().map(heap).sum::<u64>()
}

fn exemplars(v: &Vec<Exemplar>) -> u64 {
    points(v, |e| {
        kvs(&e.filtered_attributes) + e.span_id.capacity() as u64 + e.trace_id.capacity() as u64
    })
}

fn kvs(v: &Vec<KeyValue>) -> u64 {
    points(v, |kv| {
        str_bytes(&kv.key) + kv.value.as_ref().map_or(0, any_bytes)
    })
}

fn any_bytes(v: &AnyValue) -> u64 {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => str_bytes(s),
        Some(any_value::Value::BytesValue(b)) => b.capacity() as u64,
        Some(any_value::Value::ArrayValue(a)) => points(&a.values, any_bytes),
        Some(any_value::Value::KvlistValue(l)) => kvs(&l.values),
        _ => 0,
    }
}

fn vec_bytes<T>(v: &Vec<T>) -> u64 {
    (v.capacity() * size_of::<T>()) as u64
}

fn str_bytes(s: &String) -> u64 {
    s.capacity() as u64
}

/// Not an OTLP metrics request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed protobuf: {0}")]
pub struct WireError(&'static str);

/// What decoding a request would produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedSize {
    /// Heap bytes, the request's own bytes included.
    pub bytes: u64,
    /// Data points.
    pub points: u64,
}

/// The most any request of `wire_len` bytes can decode to, by [`decoded_size`]'s count,
/// known without reading it. An element of a repeated field takes at least 2 bytes on the
/// wire (a packed number 1 byte for 8) and its vector at most 4 times its size per element;
/// strings at most 8 bytes for 3; the largest vector's last growth adds at most half.
pub fn worst_case_size(wire_len: usize) -> u64 {
    const LARGEST: usize = max(&[
        size_of::<ResourceMetrics>(),
        size_of::<ScopeMetrics>(),
        size_of::<Metric>(),
        size_of::<NumberDataPoint>(),
        size_of::<HistogramDataPoint>(),
        size_of::<ExponentialHistogramDataPoint>(),
        size_of::<SummaryDataPoint>(),
        size_of::<ValueAtQuantile>(),
        size_of::<Exemplar>(),
        size_of::<KeyValue>(),
        size_of::<AnyValue>(),
        // An entity ref: its struct and the 64 bytes counted beyond its wire bytes.
        size_of::<opentelemetry_proto::tonic::common::v1::EntityRef>() + 64,
        32,
    ]);
    const fn max(sizes: &[usize]) -> usize {
        let (mut i, mut m) = (0, 0);
        while i < sizes.len() {
            if sizes[i] > m {
                m = sizes[i];
            }
            i += 1;
        }
        m
    }
    // Per wire byte: the request itself, 2 × the largest element (4 × its size for 2 bytes),
    // and half of that again for growth.
    wire_len as u64 * (1 + 3 * LARGEST as u64)
}

/// What decoding the OTLP `ExportMetricsServiceRequest` in `request` would take: heap bytes
/// (an upper bound: vectors are counted at the capacity their growth reaches, plus the
/// request itself) and data points. Reads the wire format without allocating.
pub fn decoded_size(request: &[u8]) -> Result<DecodedSize, WireError> {
    GROWTH.with(|g| g.set(0));
    let (mut rms, mut points) = (Rep::default(), 0);
    walk(request, |tag, f| {
        if let (1, Field::Len(b)) = (tag, f) {
            rms.add(resource_metrics(b, &mut points)?);
        }
        Ok(())
    })?;
    let total = rms.total(size_of::<ResourceMetrics>());
    Ok(DecodedSize {
        bytes: request.len() as u64 + total + GROWTH.with(Cell::get),
        points,
    })
}

thread_local! {
    /// The largest vector's last growth: while a vector doubles, its old buffer (half the new
    /// one) is still held, so the peak is the total plus this.
    static GROWTH: Cell<u64> = const { Cell::new(0) };
}

/// A repeated field: how many elements and what they hold on the heap.
#[derive(Default)]
struct Rep {
    n: u64,
    heap: u64,
}

impl Rep {
    fn add(&mut self, heap: u64) {
        self.n += 1;
        self.heap += heap;
    }

    /// A vector grown by pushes holds at most the next power of two, and at least 4.
    fn total(&self, elem: usize) -> u64 {
        let cap = match self.n {
            0 => 0,
            n => n.next_power_of_two().max(4),
        };
        let bytes = cap * elem as u64;
        GROWTH.with(|g| g.set(g.get().max(bytes / 2)));
        bytes + self.heap
    }
}

enum Field<'a> {
    Varint,
    Fixed,
    Len(&'a [u8]),
}

/// Calls `f` with every field of the message in `buf`.
fn walk<'a>(
    mut buf: &'a [u8],
    mut f: impl FnMut(u64, Field<'a>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let tag = key >> 3;
        let field = match key & 7 {
            0 => {
                varint(&mut buf)?;
                Field::Varint
            }
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                buf = buf.get(n..).ok_or(WireError("buffer underflow"))?;
                Field::Fixed
            }
            2 => {
                let len =
                    usize::try_from(varint(&mut buf)?).map_err(|_| WireError("length overflow"))?;
                if len > buf.len() {
                    return Err(WireError("buffer underflow"));
                }
                let (payload, rest) = buf.split_at(len);
                buf = rest;
                Field::Len(payload)
            }
            3 => {
                // A group (a deprecated encoding prost still skips): nothing it holds is kept.
                skip_group(&mut buf, tag, 0)?;
                Field::Fixed
            }
            _ => return Err(WireError("unsupported wire type")),
        };
        if tag == 0 {
            return Err(WireError("invalid tag 0"));
        }
        f(tag, field)?;
    }
    Ok(())
}

/// Skips the fields of a group started with `tag`, through its end.
fn skip_group(buf: &mut &[u8], tag: u64, depth: u32) -> Result<(), WireError> {
    if depth > 100 {
        return Err(WireError("recursion limit reached"));
    }
    loop {
        let key = varint(buf)?;
        match key & 7 {
            0 => {
                varint(buf)?;
            }
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                *buf = buf.get(n..).ok_or(WireError("buffer underflow"))?;
            }
            2 => {
                let len =
                    usize::try_from(varint(buf)?).map_err(|_| WireError("length overflow"))?;
                *buf = buf.get(len..).ok_or(WireError("buffer underflow"))?;
            }
            3 => skip_group(buf, key >> 3, depth + 1)?,
            4 if key >> 3 == tag => return Ok(()),
            _ => return Err(WireError("unexpected end of group")),
        }
    }
}

fn varint(buf: &mut &[u8]) -> Result<u64, WireError> {
    decode_varint(buf).map_err(|_| WireError("bad varint"))
}

/// A string or bytes field: prost reserves the length, at least 8 bytes.
fn string(b: &[u8]) -> u64 {
    if b.is_empty() {
        0
    } else {
        b.len().max(8) as u64
    }
}

fn resource_metrics(buf: &[u8], points: &mut u64) -> Result<u64, WireError> {
    let (mut scopes, mut heap) = (Rep::default(), 0);
    walk(buf, |tag, f| {
        match (tag, f) {
            (1, Field::Len(b)) => heap += resource(b)?,
            (2, Field::Len(b)) => scopes.add(scope_metrics(b, points)?),
            (3, Field::Len(b)) => heap += string(b),
            _ => {}
        }
        Ok(())
    })?;
    Ok(heap + scopes.total(size_of::<ScopeMetrics>()))
}

fn resource(buf: &[u8]) -> Result<u64, WireError> {
    let (mut attrs, mut refs) = (Rep::default(), Rep::default());
    walk(buf, |tag, f| {
        match (tag, f) {
            (1, Field::Len(b)) => attrs.add(key_value(b)?),
            // Entity refs: strings and repeated strings; their bytes bound what they hold.
            (3, Field::Len(b)) => refs.add(2 * b.len() as u64 + 64),
            _ => {}
        }
        Ok(())
    })?;
    Ok(attrs.total(size_of::<KeyValue>())
        + refs.total(size_of::<opentelemetry_proto::tonic::common::v1::EntityRef>()))
}

fn scope_metrics(buf: &[u8], points: &mut u64) -> Result<u64, WireError> {
    let (mut metrics, mut heap) = (Rep::default(), 0);
    walk(buf, |tag, f| {
        match (tag, f) {
            (1, Field::Len(b)) => heap += scope(b)?,
            (2, Field::Len(b)) => metrics.add(metric(b, points)?),
            (3, Field::Len(b)) => heap += string(b),
            _ => {}
        }
        Ok(())
    })?;
    Ok(heap + metrics.total(size_of::<Metric>()))
}

fn scope(buf: &[u8]) -> Result<u64, WireError> {
    let (mut attrs, mut heap) = (Rep::default(), 0);
    walk(buf, |tag, f| {
        match (tag, f) {
            (1 | 2, Field::Len(b)) => heap += string(b),
            (3, Field::Len(b)) => attrs.add(key_value(b)?),
            _ => {}
        }
        Ok(())
    })?;
    Ok(heap + attrs.total(size_of::<KeyValue>()))
}

fn metric(buf: &[u8], points: &mut u64) -> Result<u64, WireError> {
    let (mut metadata, mut heap) = (Rep::default(), 0);
    walk(buf, |tag, f| {
        match (tag, f) {
            (1..=3, Field::Len(b)) => heap += string(b),
            (5 | 7, Field::Len(b)) => {
                heap += data(b, size_of::<NumberDataPoint>(), number_point, points)?;
            }
            (9, Field::Len(b)) => {
                heap += data(b, size_of::<HistogramDataPoint>(), histogram_point, points)?;
            }
            (10, Field::Len(b)) => {
                heap += data(
                    b,
                    size_of::<ExponentialHistogramDataPoint>(),
                    exp_point,
                    points,
                )?;
            }
            (11, Field::Len(b)) => {
                heap += data(b, size_of::<SummaryDataPoint>(), summary_point, points)?;
            }
            (12, Field::Len(b)) => metadata.add(key_value(b)?),
            _ => {}
        }
        Ok(())
    })?;
    Ok(heap + metadata.total(size_of::<KeyValue>()))
}

/// A gauge, sum, histogram or summary: its points are field 1.
fn data(
    buf: &[u8],
    point_size: usize,
    point: fn(&[u8]) -> Result<u64, WireError>,
    count: &mut u64,
) -> Result<u64, WireError> {
    let mut points = Rep::default();
    walk(buf, |tag, f| {
        if let (1, Field::Len(b)) = (tag, f) {
            points.add(point(b)?);
        }
        Ok(())
    })?;
    *count += points.n;
    Ok(points.total(point_size))
}

fn number_point(buf: &[u8]) -> Result<u64, WireError> {
    let (mut attrs, mut ex) = (Rep::default(), Rep::default());
    walk(buf, |tag, f| {
        match (tag, f) {
            (7, Field::Len(b)) => attrs.add(key_value(b)?),
            (5, Field::Len(b)) => ex.add(exemplar(b)?),
            _ => {}
        }
        Ok(())
    })?;
    Ok(attrs.total(size_of::<KeyValue>()) + ex.total(size_of::<Exemplar>()))
}

/// A packed or unpacked repeated 8-byte field.
fn fixed64s(rep: &mut Rep, f: Field) {
    match f {
        Field::Len(b) => rep.n += b.len() as u64 / 8,
        Field::Fixed => rep.n += 1,
        Field::Varint => {}
    }
}

fn histogram_point(buf: &[u8]) -> Result<u64, WireError> {
    let (mut attrs, mut ex) = (Rep::default(), Rep::default());
    let (mut counts, mut bounds) = (Rep::default(), Rep::default());
    walk(buf, |tag, f| {
        match (tag, f) {
            (9, Field::Len(b)) => attrs.add(key_value(b)?),
            (8, Field::Len(b)) => ex.add(exemplar(b)?),
            (6, f) => fixed64s(&mut counts, f),
            (7, f) => fixed64s(&mut bounds, f),
            _ => {}
        }
        Ok(())
    })?;
    Ok(attrs.total(size_of::<KeyValue>())
        + ex.total(size_of::<Exemplar>())
        + counts.total(8)
        + bounds.total(8))
}

fn exp_point(buf: &[u8]) -> Result<u64, WireError> {
    let (mut attrs, mut ex, mut heap) = (Rep::default(), Rep::default(), 0);
    walk(buf, |tag, f| {
        match (tag, f) {
            (1, Field::Len(b)) => attrs.add(key_value(b)?),
            (11, Field::Len(b)) => ex.add(exemplar(b)?),
            (8 | 9, Field::Len(b)) => heap += buckets(b)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(heap + attrs.total(size_of::<KeyValue>()) + ex.total(size_of::<Exemplar>()))
}

fn buckets(buf: &[u8]) -> Result<u64, WireError> {
    let mut counts = Rep::default();
    walk(buf, |tag, f| {
        match (tag, f) {
            // Packed varints: one ends at each byte below 0x80.
            (2, Field::Len(b)) => counts.n += b.iter().filter(|&&x| x < 0x80).count() as u64,
            (2, Field::Varint) => counts.n += 1,
            _ => {}
        }
        Ok(())
    })?;
    Ok(counts.total(8))
}

fn summary_point(buf: &[u8]) -> Result<u64, WireError> {
    let (mut attrs, mut quantiles) = (Rep::default(), Rep::default());
    walk(buf, |tag, f| {
        match (tag, f) {
            (7, Field::Len(b)) => attrs.add(key_value(b)?),
            (6, Field::Len(_)) => quantiles.add(0),
            _ => {}
        }
        Ok(())
    })?;
    Ok(attrs.total(size_of::<KeyValue>()) + quantiles.total(size_of::<ValueAtQuantile>()))
}

fn exemplar(buf: &[u8]) -> Result<u64, WireError> {
    let (mut attrs, mut heap) = (Rep::default(), 0);
    walk(buf, |tag, f| {
        match (tag, f) {
            (7, Field::Len(b)) => attrs.add(key_value(b)?),
            (4 | 5, Field::Len(b)) => heap += string(b),
            _ => {}
        }
        Ok(())
    })?;
    Ok(heap + attrs.total(size_of::<KeyValue>()))
}

fn key_value(buf: &[u8]) -> Result<u64, WireError> {
    key_value_at(buf, 0)
}

fn key_value_at(buf: &[u8], depth: u32) -> Result<u64, WireError> {
    let mut heap = 0;
    walk(buf, |tag, f| {
        match (tag, f) {
            (1, Field::Len(b)) => heap += string(b),
            (2, Field::Len(b)) => heap += any_value(b, depth + 1)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(heap)
}

fn any_value(buf: &[u8], depth: u32) -> Result<u64, WireError> {
    // prost refuses deeper nesting; so does this walk, before the stack can overflow.
    if depth > 100 {
        return Err(WireError("recursion limit reached"));
    }
    let mut heap = 0;
    walk(buf, |tag, f| {
        match (tag, f) {
            (1 | 7, Field::Len(b)) => heap += string(b),
            (5, Field::Len(b)) => {
                let mut values = Rep::default();
                walk(b, |t, f| {
                    if let (1, Field::Len(v)) = (t, f) {
                        values.add(any_value(v, depth + 1)?);
                    }
                    Ok(())
                })?;
                heap += values.total(size_of::<AnyValue>());
            }
            (6, Field::Len(b)) => {
                let mut values = Rep::default();
                walk(b, |t, f| {
                    if let (1, Field::Len(v)) = (t, f) {
                        values.add(key_value_at(v, depth + 1)?);
                    }
                    Ok(())
                })?;
                heap += values.total(size_of::<KeyValue>());
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(heap)
}
