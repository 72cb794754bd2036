//! Load harness for the OTLP path: pushes vLLM-named metrics over OTLP/gRPC into a collector
//! process (`otlp` receiver → `genai_normalize` → `otlp` exporter) and receives its exports in a
//! counting sink in this process. Prints, per round and as medians, the points delivered per
//! second, per CPU second of the collector (points/s per core), and its peak RSS.
//!
//! `cargo build --release && cargo run --release -p genai-collector-testkit --bin load-otlp`
//!
//! Figures, not assertions: the machine is shared and this process competes for its cores;
//! the per-core figure counts the collector's own CPU time only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use genai_collector_core::model::{
    kv, number_point, AggregationTemporality, Batch, HistogramDataPoint, Metric, MetricExt,
};
use genai_collector_testkit::free_port;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::{metric, Histogram};

#[derive(Parser)]
struct Args {
    /// The collector binary.
    #[arg(long, default_value = "target/release/genai-collector")]
    collector: String,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 4.0)]
    round_seconds: f64,
    /// Servers per request; each has 50 points (5 models × 10 metrics).
    #[arg(long, default_value_t = 20)]
    servers: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Number points only: no TTFT and latency histograms (which cost several times more each).
    #[arg(long)]
    no_histograms: bool,
    /// The exporter's compression: gzip or none.
    #[arg(long, default_value = "none")]
    compression: String,
}

/// Counts the points the collector exports.
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let batch = Batch::from_request(request.into_inner());
        self.0
            .fetch_add(batch.point_count() as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// What a vLLM server's OTLP push looks like: gauges, counters and a TTFT histogram per model.
fn request(servers: usize, histograms: bool) -> ExportMetricsServiceRequest {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut batch = Batch::new();
    for s in 0..servers {
        let models: Vec<_> = (0..5).map(|m| format!("model-{m}")).collect();
        let points = |v: f64| {
            models
                .iter()
                .map(|m| number_point(now, v, vec![kv("model_name", m.as_str())]))
                .collect::<Vec<_>>()
        };
        let mut metrics = vec![
            Metric::gauge("vllm:num_requests_running", "", points(3.0)),
            Metric::gauge("vllm:num_requests_waiting", "", points(1.0)),
            Metric::gauge("vllm:kv_cache_usage_perc", "", points(0.42)),
            Metric::gauge("vllm:num_preemptions", "", points(0.0)),
            Metric::sum("vllm:prompt_tokens_total", "", true, points(1e6)),
            Metric::sum("vllm:generation_tokens_total", "", true, points(2e6)),
            Metric::sum("vllm:request_success_total", "", true, points(1e4)),
            Metric::gauge("vllm:lora_requests_info", "", points(1.0)),
        ];
        let histogram_names = if histograms {
            &[
                "vllm:time_to_first_token_seconds",
                "vllm:e2e_request_latency_seconds",
            ][..]
        } else {
            metrics.push(Metric::gauge("vllm:num_gpu_blocks", "", points(8192.0)));
            metrics.push(Metric::gauge("vllm:block_size", "", points(16.0)));
            &[]
        };
        for name in histogram_names {
            let bounds = vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
            let data_points = models
                .iter()
                .map(|m| HistogramDataPoint {
                    attributes: vec![kv("model_name", m.as_str())],
                    start_time_unix_nano: now - 60_000_000_000,
                    time_unix_nano: now,
                    count: 100,
                    sum: Some(12.5),
                    bucket_counts: vec![5, 10, 30, 30, 15, 8, 2],
                    explicit_bounds: bounds.clone(),
                    ..Default::default()
                })
                .collect();
            metrics.push(Metric {
                name: (*name).into(),
                unit: "s".into(),
                data: Some(metric::Data::Histogram(Histogram {
                    data_points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                })),
                ..Default::default()
            });
        }
        batch.push_resource(
            vec![
                kv("service.name", "vllm"),
                kv(
                    "service.instance.id",
                    format!("10.0.{}.{}:8000", s / 250, s % 250),
                ),
            ],
            metrics,
        );
    }
    batch.into_request()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime + stime, in clock ticks of 1/100 s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let delivered = Arc::new(AtomicU64::new(0));
    let sink_port = free_port();
    let sink = MetricsServiceServer::new(Sink(delivered.clone()))
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(64 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(sink)
            .serve(([127, 0, 0, 1], sink_port).into()),
    );

    let in_port = free_port();
    let dir = std::env::temp_dir().join(format!("load-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("collector.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  otlp:\n    protocols:\n      grpc: {{ endpoint: \"127.0.0.1:{in_port}\", max_recv_msg_size_mib: 16 }}\n\
             processors:\n  genai_normalize:\n\
             exporters:\n  otlp:\n    endpoint: \"http://127.0.0.1:{sink_port}\"\n    compression: {}\n    sending_queue: {{ queue_size: 64, block_on_overflow: true }}\n\
             service:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], processors: [genai_normalize], exporters: [otlp] }}\n",
            args.compression
        ),
    )?;
    let mut collector = std::process::Command::new(&args.collector)
        .arg("-c")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (cargo build --release first)",
                args.collector
            )
        })?;
    let pid = collector.id();
    let endpoint = format!("http://127.0.0.1:{in_port}");
    let mut client = loop {
        match MetricsServiceClient::connect(endpoint.clone()).await {
            Ok(c) => break c.max_encoding_message_size(64 << 20),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let req = request(args.servers, !args.no_histograms);
    let per_request = Batch::from_request(req.clone()).point_count() as u64;

    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pushers = Vec::new();
    for _ in 0..args.concurrency {
        let (mut client, req) = (client.clone(), req.clone());
        let (sent, refused, stop) = (sent.clone(), refused.clone(), stop.clone());
        pushers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.export(req.clone()).await {
                    Ok(_) => {
                        sent.fetch_add(per_request, Ordering::Relaxed);
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    // Warm-up: connections, allocator, the processor's caches.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "load-otlp: {} points per request ({} servers{}), {} in flight, exporter compression {}",
        per_request,
        args.servers,
        if args.no_histograms {
            ", no histograms"
        } else {
            ""
        },
        args.concurrency,
        args.compression
    );
    let (mut rates, mut per_core) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let (d0, c0, t0) = (
            delivered.load(Ordering::Relaxed),
            cpu_seconds(pid),
            Instant::now(),
        );
        tokio::time::sleep(Duration::from_secs_f64(args.round_seconds)).await;
        let (d1, c1, wall) = (
            delivered.load(Ordering::Relaxed),
            cpu_seconds(pid),
            t0.elapsed(),
        );
        let points = (d1 - d0) as f64;
        let rate = points / wall.as_secs_f64();
        let core = points / (c1 - c0).max(0.01);
        println!(
            "  round {round}: {:6.2} M points/s delivered, collector {:4.2} cores busy, {:6.2} M points per CPU second",
            rate / 1e6,
            (c1 - c0) / wall.as_secs_f64(),
            core / 1e6
        );
        rates.push(rate);
        per_core.push(core);
    }
    stop.store(true, Ordering::Relaxed);
    for p in pushers {
        let _ = p.await;
    }
    let _ = client.export(request(1, false)).await;
    let rss = peak_rss_mb(pid);
    let _ = collector.kill();
    let _ = collector.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "median: {:.2} M points/s delivered, {:.2} M points/s per core of collector CPU; collector peak RSS {rss:.1} MB; {} pushes refused (pipeline full, retried)",
        median(rates) / 1e6,
        median(per_core) / 1e6,
        refused.load(Ordering::Relaxed)
    );
    Ok(())
}
