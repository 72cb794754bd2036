//! What decoding an OTLP request really allocates, measured by a counting allocator, against
//! what `decoded_size` foretells from the wire bytes: the forecast must never be lower, or the
//! memory limiter would let a request in that does not fit. Prints the amplification.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use genai_collector_core::model::{
    approx_bytes, decoded_size, kv, metric, number_point, worst_case_size, Batch,
    ExportMetricsServiceRequest, Histogram, HistogramDataPoint, Metric, MetricExt,
};
use prost::Message;

struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak heap bytes held while decoding `wire`, above what was held before.
fn measure(wire: &[u8]) -> (u64, ExportMetricsServiceRequest) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let request = ExportMetricsServiceRequest::decode(wire).unwrap();
    (PEAK.load(Ordering::Relaxed) - before, request)
}

fn histogram(points: Vec<HistogramDataPoint>) -> Metric {
    Metric {
        name: "h".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: points,
            aggregation_temporality: 2,
        })),
        ..Default::default()
    }
}

fn cases() -> Vec<(&'static str, Batch)> {
    let empty_hist = histogram(vec![HistogramDataPoint::default(); 200_000]);
    let full_hist = histogram(
        (0..5_000)
            .map(|i| HistogramDataPoint {
                attributes: vec![kv("model", format!("m{}", i % 7)), kv("le_set", "a")],
                count: 10,
                sum: Some(1.5),
                bucket_counts: vec![1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                explicit_bounds: vec![0.1; 13],
                time_unix_nano: 1,
                ..Default::default()
            })
            .collect(),
    );
    let gauges: Vec<Metric> = (0..200)
        .map(|m| {
            Metric::gauge(
                &format!("vllm:num_requests_running_{m}"),
                "",
                (0..5)
                    .map(|i| {
                        number_point(1, i as f64, vec![kv("model_name", format!("model-{i}"))])
                    })
                    .collect(),
            )
        })
        .collect();
    let empty_points = Metric::gauge("g", "", vec![Default::default(); 300_000]);
    let mut resources = Batch::new();
    for r in 0..2_000 {
        resources.push_resource(
            vec![kv("service.instance.id", format!("10.0.0.{r}:8000"))],
            vec![],
        );
    }
    // Every vector holds one element, at the capacity of four: the most per wire byte.
    let mut singles = Batch::new();
    for _ in 0..2_000 {
        singles.push_resource(vec![], vec![histogram(vec![Default::default()])]);
    }
    vec![
        ("one element per vector", singles),
        (
            "empty histogram points",
            Batch::with_resource(vec![], vec![empty_hist]),
        ),
        (
            "empty number points",
            Batch::with_resource(vec![], vec![empty_points]),
        ),
        (
            "histograms with buckets",
            Batch::with_resource(vec![kv("service.name", "vllm")], vec![full_hist]),
        ),
        (
            "vLLM-style gauges",
            Batch::with_resource(vec![kv("service.name", "vllm")], gauges),
        ),
        ("many resources", resources),
    ]
}

#[test]
fn decoded_size_is_an_upper_bound_of_what_decoding_allocates() {
    for (name, batch) in cases() {
        let wire = batch.encode_request();
        let forecast = decoded_size(&wire).unwrap();
        let (measured, request) = measure(&wire);
        let decoded = Batch::from_request(request);
        assert_eq!(forecast.points, decoded.point_count() as u64, "{name}");
        println!(
            "{name}: wire {} B, decoding allocated {} B ({:.1}x), forecast {} B ({:.2}x of measured)",
            wire.len(),
            measured,
            measured as f64 / wire.len() as f64,
            forecast.bytes - wire.len() as u64,
            (forecast.bytes - wire.len() as u64) as f64 / measured as f64
        );
        assert!(
            forecast.bytes - wire.len() as u64 >= measured,
            "{name}: forecast {} under the {measured} bytes decoding took",
            forecast.bytes
        );
        assert!(
            forecast.bytes <= 3 * measured + wire.len() as u64,
            "{name}: forecast {} too far above {measured}",
            forecast.bytes
        );
        let worst = worst_case_size(wire.len());
        assert!(
            forecast.bytes <= worst && measured <= worst,
            "{name}: the worst case {worst} under the forecast {} or the {measured} allocated",
            forecast.bytes
        );
        println!(
            "  worst case for its size: {:.1}x the forecast",
            worst as f64 / forecast.bytes as f64
        );
        let held = approx_bytes(&decoded);
        assert!(
            held <= measured,
            "{name}: {held} held, {measured} allocated at peak"
        );
    }
}

#[test]
fn malformed_wire_bytes_are_an_error_not_a_panic() {
    for bad in [
        &[0x0a, 0xff][..],
        &[0x0a, 0x05, 0x01],
        &[0xff; 12],
        &[0x0b, 0x00],
        &[0x00],
    ] {
        assert!(decoded_size(bad).is_err(), "{bad:?}");
    }
    // Nesting deeper than prost allows is refused before the stack can run out.
    let mut value = vec![0x0a, 0x00]; // AnyValue { string_value: "" }
    for _ in 0..200 {
        let mut array = vec![0x0a];
        prost::encoding::encode_varint(value.len() as u64, &mut array);
        array.extend(&value);
        value = vec![0x2a];
        prost::encoding::encode_varint(array.len() as u64, &mut value);
        value.extend(&array);
    }
    let mut kvs = vec![0x12];
    prost::encoding::encode_varint(value.len() as u64, &mut kvs);
    kvs.extend(&value);
    let mut resource = vec![0x0a];
    prost::encoding::encode_varint(kvs.len() as u64, &mut resource);
    resource.extend(&kvs);
    let mut rm = vec![0x0a];
    prost::encoding::encode_varint(resource.len() as u64, &mut rm);
    rm.extend(&resource);
    let mut request = vec![0x0a];
    prost::encoding::encode_varint(rm.len() as u64, &mut request);
    request.extend(&rm);
    assert!(decoded_size(&request).is_err());
}
