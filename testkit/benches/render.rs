//! The Prometheus endpoint's answer time for 100,000 series: a generator fills the `prometheus`
//! exporter once, then `/metrics` is fetched repeatedly as 0.0.4 text, as OpenMetrics and
//! gzip-compressed; prints the median and spread of each, and the answer's size.
//!
//! `cargo bench -p genai-collector-testkit --bench render`

use std::time::{Duration, Instant};

use genai_collector_core::config::{self, Source};
use genai_collector_core::Service;
use genai_collector_testkit::{components, Capture};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SERIES: usize = 100_000;
const RUNS: usize = 15;

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = genai_collector_testkit::free_port();
    // One batch of 100 metrics × 1,000 series, then nothing for an hour.
    let yaml = format!(
        "receivers:\n  generator: {{ batches: 0, points: {SERIES}, points_per_metric: 1000, interval: 1h }}\n\
         exporters:\n  prometheus: {{ endpoint: \"127.0.0.1:{port}\", self_metrics: false }}\n\
         service:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [generator], exporters: [prometheus] }}\n"
    );
    let comps = components(&Capture::new());
    let cfg = config::load(&[Source::new("render.yaml", yaml)], &comps).unwrap();
    let service = Service::build(cfg, &comps).unwrap();
    let telemetry = service.telemetry().clone();
    let running = service.start().await.unwrap();
    let stats = telemetry
        .find(genai_collector_core::ComponentKind::Exporter, "prometheus")
        .unwrap();
    while stats.snapshot().sent < SERIES as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/metrics");
    println!("prometheus endpoint, {SERIES} series, {RUNS} fetches each (median [min, max]):");
    for (name, accept, encoding) in [
        ("0.0.4 text", "text/plain;version=0.0.4", "identity"),
        (
            "OpenMetrics",
            "application/openmetrics-text;version=1.0.0",
            "identity",
        ),
        ("0.0.4 gzip", "text/plain;version=0.0.4", "gzip"),
    ] {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..RUNS {
            let start = Instant::now();
            let body = client
                .get(&url)
                .header("accept", accept)
                .header("accept-encoding", encoding)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            times.push(start.elapsed().as_secs_f64() * 1000.0);
            size = body.len();
        }
        times.sort_by(f64::total_cmp);
        println!(
            "  {name:12} {:7.1} ms [{:.1}, {:.1}]  {:.1} MB of text  ({:.0} ns per series)",
            times[RUNS / 2],
            times[0],
            times[RUNS - 1],
            size as f64 / 1e6,
            times[RUNS / 2] * 1e6 / SERIES as f64
        );
    }
    running.run_until(std::future::ready(())).await;
}
