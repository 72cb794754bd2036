//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs` call them under libFuzzer on
//! nightly; `testkit/tests/fuzz_corpora.rs` replays every committed corpus file through them on
//! stable). Each takes arbitrary bytes: it must never panic, and it checks what must hold for
//! any input (a rendered page re-parses, the wire-size forecast agrees with the decoder).

use std::sync::OnceLock;

use genai_collector::Builtin as _;
use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{decoded_size, Batch, ExportMetricsServiceRequest};
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
];

/// A scraped page in both formats: parse, convert (twice, as consecutive scrapes), render.
pub fn scrape_page(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for format in [Format::Prometheus, Format::OpenMetrics] {
        if let Ok(page) = parse(text, format) {
            let mut converter = Converter::new();
            let (first, _) = converter.convert(&page, 1_700_000_000_000_000_000, Vec::new());
            let (second, _) = converter.convert(&page, 1_700_000_001_000_000_000, Vec::new());
            check_render(&first);
            check_render(&second);
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
        processor(GenaiNormalizeFactory, "{}"),
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
