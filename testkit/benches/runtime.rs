//! The runtime's own overhead: points/s through generator → 2 no-op processors → 2 exporters
//! that only count (queues of 16 batches that block when full, so nothing is dropped and memory
//! stays bounded), against building the same batches with no pipeline at all.
//!
//! `cargo bench -p genai-collector-testkit --bench runtime` prints medians of 5 runs and the
//! process's peak RSS. Figures, not assertions: machines here are shared and noisy.

use std::time::Instant;

use genai_collector_core::config::{self, Source};
use genai_collector_core::Service;
use genai_collector_testkit::components::numbered_batch;
use genai_collector_testkit::{components, Capture};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 5;
const BATCHES: u64 = 2000;
const POINTS: usize = 1000;
const PER_METRIC: usize = 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let total = (BATCHES as usize * POINTS) as f64;

    let mut build_only = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        for i in 0..BATCHES {
            std::hint::black_box(numbered_batch(i * POINTS as u64, POINTS, PER_METRIC));
        }
        build_only.push(total / t.elapsed().as_secs_f64());
    }

    let yaml = format!(
        r#"
receivers:
  generator: {{ batches: {BATCHES}, points: {POINTS}, points_per_metric: {PER_METRIC} }}
processors:
  noop: {{}}
  noop/2: {{}}
exporters:
  capture: {{ count_only: true, sending_queue: {{ queue_size: 16, sizer: requests, block_on_overflow: true }} }}
  capture/2: {{ count_only: true, sending_queue: {{ queue_size: 16, sizer: requests, block_on_overflow: true }} }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics:
      receivers: [generator]
      processors: [noop, noop/2]
      exporters: [capture, capture/2]
"#
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut through = Vec::new();
    for _ in 0..RUNS {
        let capture = Capture::new();
        let comps = components(&capture);
        let cfg = config::load(&[Source::new("bench.yaml", yaml.as_str())], &comps).unwrap();
        let service = Service::build(cfg, &comps).unwrap();
        let telemetry = service.telemetry().clone();
        let t = Instant::now();
        let summary = runtime
            .block_on(service.run(std::future::pending()))
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(summary.drained);
        let sent: u64 = telemetry
            .components()
            .iter()
            .filter(|c| c.kind == genai_collector_core::ComponentKind::Exporter)
            .map(|c| c.snapshot().sent)
            .sum();
        assert_eq!(sent as f64, 2.0 * total, "both exporters got every point");
        through.push(total / secs);
    }

    let build = median(build_only);
    let pipe = median(through);
    let overhead_ns = (1e9 / pipe - 1e9 / build).max(0.0);
    println!("runtime benchmark: {BATCHES} batches x {POINTS} points ({PER_METRIC} per metric), median of {RUNS} runs, {} worker threads", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!(
        "  build batches only            {:>8.2} M points/s",
        build / 1e6
    );
    println!(
        "  generator -> 2 proc -> 2 exp  {:>8.2} M points/s (ratio to build-only {:.2})",
        pipe / 1e6,
        pipe / build
    );
    println!("  runtime overhead              {:>8.1} ns/point  => {:.1} M points/s for the runtime alone", overhead_ns, if overhead_ns > 0.0 { 1e3 / overhead_ns } else { f64::INFINITY });
    println!("  peak RSS                      {:>8.1} MB", peak_rss_mb());
}
