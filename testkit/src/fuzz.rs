//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs` call them under libFuzzer on
//! nightly; `testkit/tests/fuzz_corpora.rs` replays every committed corpus file through them on
//! stable). Each takes arbitrary bytes: it must never panic, and it checks what must hold for
//! any input (a rendered page re-parses, the wire-size forecast agrees with the decoder).

use std::sync::OnceLock;

use genai_collector::Builtin as _;
use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{
    decoded_size, worst_case_size, Batch, ExportMetricsServiceRequest,
};
use genai_collector_core::{BuildContext, ComponentId, Components, Processor, ProcessorFactory};
use genai_collector_exporters::prometheus::render_batch;
use genai_collector_processors::{
    AttributesFactory, FilterFactory, GenaiNormalizeFactory, PercentagesFactory,
    PoolAggregateFactory,
};
use genai_collector_receivers::scrape::convert::Converter;
use genai_collector_receivers::scrape::text::{parse, Format};
use prost::Message as _;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("scrape_page", scrape_page),
    ("otlp_pipeline", otlp_pipeline),
    ("config", config),
    ("ollama_ps", ollama_ps),
    ("pod_resources", pod_resources),
    ("retry_hint", retry_hint),
    ("otlp_http", otlp_http),
    ("disk_queue", disk_queue),
];

/// A scraped page in both formats: parse, convert (twice, as consecutive scrapes), render.
pub fn scrape_page(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for format in [Format::Prometheus, Format::OpenMetrics] {
        if let Ok(page) = parse(text, format) {
            if format == Format::Prometheus {
                differential(text, &page);
            }
            let mut converter = Converter::new();
            let (first, _) = converter.convert(&page, 1_700_000_000_000_000_000, Vec::new());
            let (second, _) = converter.convert(&page, 1_700_000_001_000_000_000, Vec::new());
            check_render(&first);
            check_render(&second);
            // vLLM's engine facts from the same page (cache config and LoRA labels).
            let mut metrics: Vec<_> = second.metrics().cloned().collect();
            genai_collector_receivers::scrape::Engine::enrich(
                &genai_collector_receivers::vllm::Vllm,
                &page,
                &mut metrics,
                1_700_000_001_000_000_000,
            );
            check_render(&Batch::with_resource(vec![], metrics));
        }
    }
}

/// Every sample line of a 0.0.4 page we accept reads the same with the reference parser
/// (`prometheus-parse`), where that parser's regular expressions can read it at all: plain
/// names, no whitespace or escapes inside braces, integer millisecond timestamps.
fn differential(text: &str, page: &genai_collector_receivers::scrape::text::Page<'_>) {
    use prometheus_parse::LineInfo;
    let lines: Vec<&str> = text.lines().collect();
    let plain =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    for family in &page.families {
        for sample in &family.samples {
            let Some(raw) = lines.get(sample.line as usize - 1) else {
                continue;
            };
            let labels = page.labels_of(sample);
            let readable = plain(sample.name)
                && !raw.starts_with(char::is_whitespace)
                && labels.iter().all(|l| plain(l.name) && plain(&l.value))
                && raw
                    .split('}')
                    .next()
                    .is_some_and(|head| !head.contains(char::is_whitespace))
                // Its expression wants at least one character between braces.
                && !raw.contains("{}");
            if !readable {
                continue;
            }
            let LineInfo::Sample {
                metric_name,
                labels: theirs,
                value,
                timestamp,
            } = LineInfo::parse(raw)
            else {
                panic!(
                    "line {}: the reference parser reads no sample in {raw:?}",
                    sample.line
                );
            };
            assert_eq!(metric_name, sample.name, "line {}: name", sample.line);
            let their_labels: Vec<(&str, &str)> = theirs
                .map(|t| {
                    t.split(',')
                        .filter(|kv| !kv.is_empty())
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k, v.trim_matches('"')))
                        .collect()
                })
                .unwrap_or_default();
            let ours: Vec<(&str, &str)> = labels.iter().map(|l| (l.name, &*l.value)).collect();
            assert_eq!(
                their_labels, ours,
                "line {}: labels of {raw:?}",
                sample.line
            );
            if let Ok(v) = value.to_lowercase().parse::<f64>() {
                assert!(
                    v == sample.value || (v.is_nan() && sample.value.is_nan()),
                    "line {}: value {v} vs ours {} in {raw:?}",
                    sample.line,
                    sample.value
                );
            }
            if let (Some(ms), Some(ours)) = (
                timestamp.and_then(|t| t.parse::<i64>().ok()),
                sample.timestamp,
            ) {
                assert!(
                    ((ms as f64) / 1000.0 - ours).abs() <= ours.abs() * 1e-12 + 1e-9,
                    "line {}: timestamp {ms} ms vs ours {ours} s",
                    sample.line
                );
            }
        }
    }
}

fn processor<F: ProcessorFactory>(factory: F, yaml: &str) -> Box<dyn Processor> {
    let config: F::Config = serde_saphyr::from_str(yaml).expect("a valid processor config");
    let ctx = BuildContext {
        id: ComponentId::parse(factory.kind()).expect("a valid id"),
        pipeline: Some("metrics".into()),
        telemetry: Default::default(),
    };
    factory.build(&config, &ctx).expect("the processor builds")
}

/// An OTLP export request (protobuf, or JSON when the first byte is `{`) through every
/// processor and into the Prometheus page, which must re-parse in both formats.
pub fn otlp_pipeline(data: &[u8]) {
    let request = if data.first() == Some(&b'{') {
        match serde_json::from_slice::<ExportMetricsServiceRequest>(data) {
            Ok(r) => r,
            Err(_) => return,
        }
    } else {
        let forecast = decoded_size(data);
        let Ok(request) = ExportMetricsServiceRequest::decode(data) else {
            return;
        };
        // What prost decodes, the forecast must have sized, with the same points.
        let forecast = forecast.expect("a request prost decodes is sized");
        assert!(
            forecast.bytes <= worst_case_size(data.len()),
            "the forecast above the worst case for the request's size"
        );
        let points = Batch::from_request(request.clone()).point_count() as u64;
        assert_eq!(forecast.points, points, "forecast points");
        request
    };
    let mut batch = Batch::from_request(request);
    batch.retain_metrics(|m| m.data.is_some() && !m.name.is_empty());
    let mut chain = [
        processor(
            AttributesFactory,
            "actions: [{ key: k8s.node.name, action: insert, value: n, context: resource }]",
        ),
        processor(GenaiNormalizeFactory::default(), "{}"),
        processor(PercentagesFactory, "{ max_requests: 64 }"),
        processor(PoolAggregateFactory, "{}"),
        processor(FilterFactory, "{ exclude: { names: [\"drop_me\"] } }"),
    ];
    for p in &mut chain {
        p.process(&mut batch);
    }
    for p in &mut chain {
        if let Some(flushed) = p.flush() {
            check_render(&flushed);
        }
    }
    check_render(&batch);
    let split = batch.clone().split(7);
    assert_eq!(
        split.iter().map(Batch::point_count).sum::<usize>(),
        batch.point_count(),
        "split keeps every point"
    );
    let encoded = batch.encode_request();
    let back = ExportMetricsServiceRequest::decode(&encoded[..]).expect("our encoding decodes");
    assert_eq!(Batch::from_request(back), batch, "encode/decode round trip");
}

/// A page we serve re-parses with our strict parser, in both formats.
fn check_render(batch: &Batch) {
    let promote = ["gen_ai.pool.name".to_owned()];
    let text = render_batch(batch, &promote, false);
    if let Err(e) = parse(&text, Format::Prometheus) {
        panic!("our 0.0.4 page does not parse: {e}\n{text}");
    }
    let om = format!("{}# EOF\n", render_batch(batch, &promote, true));
    if let Err(e) = parse(&om, Format::OpenMetrics) {
        panic!("our OpenMetrics page does not parse: {e}\n{om}");
    }
}

/// A config file, with `${env:...}` substitution from a fixed environment.
pub fn config(data: &[u8]) {
    static COMPONENTS: OnceLock<Components> = OnceLock::new();
    let components = COMPONENTS.get_or_init(Components::builtin);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |name: &str| (name == "HOME").then(|| "/root".to_owned());
    if let Err(e) = config::load_with_env(&[Source::new("fuzz.yaml", text)], components, &env) {
        // Every error is located in the file it names.
        assert_eq!(e.file, "fuzz.yaml");
    }
}

/// Ollama's `/api/ps` answer into its series.
pub fn ollama_ps(data: &[u8]) {
    use genai_collector_receivers::ollama::{model_metrics, Ps};
    if let Ok(ps) = serde_json::from_slice::<Ps>(data) {
        let metrics = model_metrics(&ps.models, Some(24 << 30), 1_700_000_000_000_000_000, true);
        check_render(&Batch::with_resource(vec![], metrics));
    }
}

/// The kubelet's pod-resources answer into GPU allocations.
pub fn pod_resources(data: &[u8]) {
    use genai_collector_receivers::nvml::pod_resources::{allocations, ListPodResourcesResponse};
    if let Ok(list) = ListPodResourcesResponse::decode(data) {
        let _ = allocations(list);
    }
}

/// A gRPC status's details into the wait before the next export attempt.
pub fn retry_hint(data: &[u8]) {
    if let Some(wait) = genai_collector_core::retry_info::decode(data) {
        // Any hint, however large, gives a wait the runtime can sleep.
        let _ =
            std::time::Instant::now().checked_add(wait.min(std::time::Duration::from_secs(300)));
    }
}

/// An OTLP/HTTP request with arbitrary headers and body. The first byte picks the
/// `Content-Type`, the `Content-Encoding` (gzip of the body, or a body that only claims to be
/// gzip) and the `Authorization`; the rest is the body. The answer is one of the statuses the
/// protocol allows, a protobuf body that decodes is taken (200) and one that does not is a 400.
pub fn otlp_http(data: &[u8]) {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tower::ServiceExt as _;

    struct Server {
        runtime: tokio::runtime::Runtime,
        router: axum::Router,
        points: Arc<AtomicU64>,
    }
    thread_local! {
        static SERVER: Server = {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let stats = genai_collector_core::telemetry::Telemetry::new().register(
                genai_collector_core::ComponentKind::Receiver,
                "otlp",
                None,
            );
            let (output, mut captured) = genai_collector_core::Output::capture(16, stats);
            let points = Arc::new(AtomicU64::new(0));
            let counted = points.clone();
            runtime.spawn(async move {
                while let Some(b) = captured.recv().await {
                    counted.fetch_add(b.point_count() as u64, Ordering::Relaxed);
                }
            });
            let router = genai_collector_receivers::otlp::http_router(
                output,
                1 << 20,
                Some(Arc::from("fuzz-token")),
            );
            Server { runtime, router, points }
        };
    }
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let content_type = [
        "application/x-protobuf",
        "application/json",
        "text/plain",
        "",
    ][usize::from(flags & 3)];
    let encoding = (flags >> 2) & 3;
    let auth = ["Bearer fuzz-token", "bearer fuzz-token", "Bearer wrong", ""]
        [usize::from((flags >> 4) & 3)];
    let payload = if encoding == 1 {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = gz.write_all(body);
        gz.finish().unwrap_or_default()
    } else {
        body.to_vec()
    };
    let mut request = axum::http::Request::post("/v1/metrics");
    if !content_type.is_empty() {
        request = request.header("content-type", content_type);
    }
    match encoding {
        1 | 2 => request = request.header("content-encoding", "gzip"),
        3 => request = request.header("content-encoding", "br"),
        _ => {}
    }
    if !auth.is_empty() {
        request = request.header("authorization", auth);
    }
    let request = request
        .body(axum::body::Body::from(payload))
        .expect("a request");
    SERVER.with(|server| {
        let before = server.points.load(Ordering::Relaxed);
        let response = server
            .runtime
            .block_on(server.router.clone().oneshot(request))
            .expect("the router never fails");
        let status = response.status().as_u16();
        assert!(
            matches!(status, 200 | 400 | 401 | 413 | 415 | 429 | 503),
            "status {status}"
        );
        let authorized = auth.eq_ignore_ascii_case("bearer fuzz-token");
        if !authorized {
            assert_eq!(status, 401, "no valid token, no entry");
            return;
        }
        let plain_protobuf = content_type != "application/json"
            && !content_type.starts_with("application/json")
            && matches!(encoding, 0 | 1);
        if plain_protobuf && status != 429 && status != 503 {
            match ExportMetricsServiceRequest::decode(body) {
                Ok(r) => {
                    assert_eq!(status, 200, "a request that decodes is taken");
                    // Let the receiving task count what the pipeline got.
                    server.runtime.block_on(tokio::task::yield_now());
                    let taken = server.points.load(Ordering::Relaxed) - before;
                    let sent = Batch::from_request(r).point_count() as u64;
                    assert!(taken <= sent, "took {taken} of {sent} points");
                }
                Err(_) => assert_eq!(status, 400, "a body that does not decode is a 400"),
            }
        }
    });
}

/// A persistent-queue directory with arbitrary files: entries of (name length, name, content
/// length (2 bytes), content). Opening never panics, lists only names this queue writes, in
/// order; a file that reads back holds the points its name says; numbering goes on after
/// every file found.
pub fn disk_queue(data: &[u8]) {
    use genai_collector_core::disk_queue::{DiskQueue, Stored};
    use genai_collector_core::model::{number_point, Metric, MetricExt as _};
    thread_local! {
        static ROOT: std::path::PathBuf = std::env::temp_dir()
            .join(format!("fuzz-disk-queue-{}-{:?}", std::process::id(), std::thread::current().id()));
    }
    ROOT.with(|root| {
        let _ = std::fs::remove_dir_all(root);
        let dir = root.join("otlp");
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let mut rest = data;
        while let Some((&n, tail)) = rest.split_first() {
            let (name, tail) = tail.split_at(usize::from(n).min(tail.len()));
            let Some(len) = tail
                .get(..2)
                .map(|l| usize::from(u16::from_le_bytes([l[0], l[1]])))
            else {
                break;
            };
            let (content, tail) = tail[2..].split_at(len.min(tail.len() - 2));
            rest = tail;
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            if name.is_empty()
                || name.contains(['/', '\0'])
                || name == "."
                || name == ".."
                || name == ".lock"
            {
                continue;
            }
            let _ = std::fs::write(dir.join(name), content);
        }
        let limit = 1 << 20;
        let Ok((queue, stored)) = DiskQueue::open(root, "otlp", false, limit) else {
            return;
        };
        assert!(
            stored.windows(2).all(|w| w[0].seq <= w[1].seq),
            "oldest first"
        );
        let listed: u64 = stored.iter().map(|s| s.bytes).sum();
        assert_eq!(
            queue.bytes(),
            listed,
            "the directory's size is what it lists"
        );
        for s in &stored {
            if let Ok(batch) = queue.read(s) {
                assert_eq!(batch.point_count() as u64, s.points, "points as named");
            }
        }
        let batch = Batch::with_resource(
            vec![],
            vec![Metric::gauge("g", "1", vec![number_point(1, 1.0, vec![])])],
        );
        if let Ok(seq) = queue.write(&batch) {
            assert!(
                stored.iter().all(|s| s.seq < seq),
                "numbering goes on after the last"
            );
            let back = queue
                .read(&Stored {
                    seq,
                    points: 1,
                    bytes: 0,
                    queued_at_ms: 0,
                })
                .expect("what we wrote reads back");
            assert_eq!(back, batch);
        } else {
            assert!(listed + 64 > limit, "only a full directory refuses a write");
        }
    });
}
