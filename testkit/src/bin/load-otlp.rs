//! Load harness for the OTLP path: pushes vLLM-named metrics over OTLP/gRPC into a collector
//! process (`otlp` receiver → `genai_normalize` → `otlp` exporter, default settings) and, in
//! the same run, into Rotel (the `rotel-agent` binary of PyPI's `rotel` wheel) as the
//! comparison. A counting sink in this process receives what each one delivers. Prints, per
//! round and as medians: points acknowledged to the clients and delivered to the sink per
//! second, delivered points per CPU second of the collector, and its peak RSS; then the totals
//! (delivered / acknowledged).
//!
//! `scripts/load-otlp` installs Rotel, builds and runs this. `--fault-hang-seconds 60` runs the
//! fault scenario instead: the sink accepts connections but answers nothing for that long
//! under full load, then recovers; it prints RSS throughout and counts that every acknowledged
//! point arrived.
//!
//! Figures, not assertions: the machine is shared and this process competes for its cores;
//! the per-core figure counts the collector's own CPU time only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use genai_collector_core::model::{
    decoded_size, kv, number_point, AggregationTemporality, Batch, HistogramDataPoint, Metric,
    MetricExt, GRPC_EXPORT_PATH,
};
use genai_collector_exporters::otlp::EncodedCodec;
use genai_collector_receivers::otlp::{ExportFuture, RawExportService};
use genai_collector_testkit::{free_port, status_kb};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use opentelemetry_proto::tonic::metrics::v1::{metric, Histogram};

#[derive(Parser)]
struct Args {
    /// The collector binary.
    #[arg(long, default_value = "target/release/genai-collector")]
    collector: String,
    /// Rotel's `rotel-agent`; `none` skips the comparison.
    #[arg(long, default_value = ".venv-bench/bin/rotel-agent")]
    rotel: String,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 4.0)]
    round_seconds: f64,
    /// Servers per request; each has 50 points (5 models × 10 metrics).
    #[arg(long, default_value_t = 20)]
    servers: usize,
    /// Clients pushing at once, each waiting for its answer before the next push.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Number points only: no TTFT and latency histograms (which cost several times more each).
    #[arg(long)]
    no_histograms: bool,
    /// Add the `batch` processor to the collector's pipeline (Rotel batches by default).
    #[arg(long)]
    batch: bool,
    /// The collector's `service.worker_threads` (default: one per CPU, as Rotel's runtime).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// The exporters' compression: none or gzip (for both).
    #[arg(long, default_value = "none")]
    compression: String,
    /// Fault run: the sink hangs this long under full load, then recovers (ours only).
    #[arg(long)]
    fault_hang_seconds: Option<u64>,
    /// The collector's `memory_limiter.limit_mib` in the fault run.
    #[arg(long, default_value_t = 256)]
    memory_limit_mib: u64,
}

/// Counts the points exported to it (read from the wire bytes, so that this process's CPU goes
/// to the load, not to decoding); while `hang` is set it answers nothing, and what it held is
/// refused (not counted) once it recovers: the sender has long timed out and retries. It
/// serves through the receiver's raw-bytes gRPC service; the clients send through the
/// exporter's encoded-bytes codec.
#[derive(Clone, Default)]
struct Sink {
    delivered: Arc<AtomicU64>,
    hang: Arc<AtomicBool>,
}

impl Sink {
    async fn export(
        self,
        request: tonic::Request<Bytes>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        if self.hang.load(Ordering::Relaxed) {
            while self.hang.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return Err(tonic::Status::unavailable("was hanging"));
        }
        let size = decoded_size(request.get_ref())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        self.delivered.fetch_add(size.points, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// What a vLLM server's OTLP push looks like: gauges, counters and a TTFT histogram per model.
fn request(servers: usize, histograms: bool) -> Batch {
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
    batch
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A collector (ours or Rotel) under load, with its sink and clients.
struct Run {
    sink: Sink,
    acked: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
    child: std::process::Child,
    peak_rss: Arc<AtomicU64>,
}

async fn start(
    name: &str,
    command: &mut std::process::Command,
    in_port: u16,
    sink: Sink,
    sink_port: u16,
    args: &Args,
) -> Result<Run, Box<dyn std::error::Error>> {
    let handler = sink.clone();
    let service = RawExportService::new(
        move |request| -> ExportFuture { Box::pin(handler.clone().export(request)) },
        64 << 20,
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve(([127, 0, 0, 1], sink_port).into()),
    );
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let endpoint = format!("http://127.0.0.1:{in_port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let connect = || async {
        tonic::transport::Endpoint::from_shared(endpoint.clone())
            .expect("a valid endpoint")
            .connect()
            .await
    };
    // Each client has its own connection, as separate apps would.
    let mut channels = Vec::new();
    while channels.len() < args.clients {
        match connect().await {
            Ok(c) => channels.push(c),
            Err(e) if Instant::now() > deadline => return Err(format!("{name}: {e}").into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let batch = request(args.servers, !args.no_histograms);
    let per_request = batch.point_count() as u64;
    let req = Bytes::from(batch.encode_request());
    let (acked, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for channel in channels {
        let mut client = tonic::client::Grpc::new(channel);
        let req = req.clone();
        let (acked, refused, stop) = (acked.clone(), refused.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_EXPORT_PATH);
            while !stop.load(Ordering::Relaxed) {
                let sent = match client.ready().await {
                    Ok(()) => {
                        client
                            .unary(tonic::Request::new(req.clone()), path.clone(), EncodedCodec)
                            .await
                    }
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                match sent {
                    Ok(_) => {
                        acked.fetch_add(per_request, Ordering::Relaxed);
                    }
                    Err(_) => {
                        // Refused: retry the same data after a pause, as an SDK does.
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    let peak_rss = Arc::new(AtomicU64::new(0));
    let (pid, peak, stopped) = (child.id(), peak_rss.clone(), stop.clone());
    tokio::spawn(async move {
        while !stopped.load(Ordering::Relaxed) {
            peak.fetch_max(status_kb(pid, "VmRSS:"), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok(Run {
        sink,
        acked,
        refused,
        stop,
        clients,
        child,
        peak_rss,
    })
}

/// The medians of one collector's rounds.
struct Figures {
    acked: f64,
    delivered: f64,
    per_cpu: f64,
    rss_mb: f64,
}

async fn measure(name: &str, run: &Run, args: &Args) -> Figures {
    let pid = run.child.id();
    let (mut acked, mut delivered, mut per_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let (a0, d0, c0, t0) = (
            run.acked.load(Ordering::Relaxed),
            run.sink.delivered.load(Ordering::Relaxed),
            cpu_seconds(pid),
            Instant::now(),
        );
        tokio::time::sleep(Duration::from_secs_f64(args.round_seconds)).await;
        let wall = t0.elapsed().as_secs_f64();
        let a = (run.acked.load(Ordering::Relaxed) - a0) as f64;
        let d = (run.sink.delivered.load(Ordering::Relaxed) - d0) as f64;
        let cpu = (cpu_seconds(pid) - c0).max(0.01);
        println!(
            "  {name} round {round}: {:5.2} M acknowledged/s, {:5.2} M delivered/s, {:4.2} cores busy, {:5.2} M delivered per CPU second",
            a / wall / 1e6,
            d / wall / 1e6,
            cpu / wall,
            d / cpu / 1e6
        );
        acked.push(a / wall);
        delivered.push(d / wall);
        per_cpu.push(d / cpu);
    }
    Figures {
        acked: median(acked),
        delivered: median(delivered),
        per_cpu: median(per_cpu),
        rss_mb: 0.0,
    }
}

/// Stops the clients, waits for the collector to deliver what it acknowledged, stops it.
/// Returns (acknowledged, delivered, refused pushes, peak RSS in MB).
async fn finish(mut run: Run, drain: Duration) -> (u64, u64, u64, f64) {
    run.stop.store(true, Ordering::Relaxed);
    for c in run.clients.drain(..) {
        let _ = c.await;
    }
    let acked = run.acked.load(Ordering::Relaxed);
    let deadline = Instant::now() + drain;
    while run.sink.delivered.load(Ordering::Relaxed) < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A moment more: anything still arriving would be a duplicate, counted too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hwm = status_kb(run.child.id(), "VmHWM:");
    let peak = run.peak_rss.load(Ordering::Relaxed).max(hwm) as f64 / 1024.0;
    let _ = run.child.kill();
    let _ = run.child.wait();
    (
        acked,
        run.sink.delivered.load(Ordering::Relaxed),
        run.refused.load(Ordering::Relaxed),
        peak,
    )
}

fn collector_config(args: &Args, in_port: u16, sink_port: u16, memory: &str) -> String {
    let threads = args
        .worker_threads
        .map(|n| format!("  worker_threads: {n}\n"))
        .unwrap_or_default();
    format!(
        "receivers:\n  otlp:\n    protocols:\n      grpc: {{ endpoint: \"127.0.0.1:{in_port}\" }}\n\
         processors:\n  genai_normalize:\n  batch:\n\
         exporters:\n  otlp:\n    endpoint: \"http://127.0.0.1:{sink_port}\"\n    compression: {}\n\
         service:\n  telemetry: {{ endpoint: null }}\n{memory}{threads}  pipelines:\n    metrics: {{ receivers: [otlp], processors: [{}], exporters: [otlp] }}\n",
        args.compression,
        if args.batch { "genai_normalize, batch" } else { "genai_normalize" }
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("load-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let per_request = request(args.servers, !args.no_histograms).point_count();
    println!(
        "load-otlp: {per_request} points per request ({} servers{}), {} clients, exporters' compression {}, pipeline genai_normalize{}",
        args.servers,
        if args.no_histograms { ", no histograms" } else { "" },
        args.clients,
        args.compression,
        if args.batch { " + batch" } else { "" }
    );
    if let Some(n) = args.worker_threads {
        println!("collector worker threads: {n}");
    }
    if let Some(hang) = args.fault_hang_seconds {
        return fault_run(&args, &dir, hang).await;
    }

    let mut results = Vec::new();
    let rotel = (args.rotel != "none").then(|| args.rotel.clone());
    if rotel
        .as_deref()
        .is_some_and(|r| !std::path::Path::new(r).exists())
    {
        return Err(format!(
            "no Rotel at {} (scripts/load-otlp installs it; --rotel none skips it)",
            args.rotel
        )
        .into());
    }
    for name in ["genai-collector", "rotel"] {
        let (in_port, sink_port) = (free_port(), free_port());
        let mut command = if name == "rotel" {
            let Some(path) = &rotel else { continue };
            let mut c = std::process::Command::new(path);
            c.args([
                "start",
                "--otlp-grpc-endpoint",
                &format!("127.0.0.1:{in_port}"),
                "--otlp-http-endpoint",
                &format!("127.0.0.1:{}", free_port()),
                "--exporter",
                "otlp",
                "--otlp-exporter-endpoint",
                &format!("http://127.0.0.1:{sink_port}"),
                "--otlp-exporter-compression",
                &args.compression,
            ]);
            c
        } else {
            let config = dir.join("collector.yaml");
            std::fs::write(&config, collector_config(&args, in_port, sink_port, ""))?;
            let mut c = std::process::Command::new(&args.collector);
            c.arg("-c").arg(&config);
            c
        };
        let run = start(
            name,
            &mut command,
            in_port,
            Sink::default(),
            sink_port,
            &args,
        )
        .await?;
        // Warm-up: connections, allocator, the processor's caches.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut figures = measure(name, &run, &args).await;
        let (acked, delivered, refused, rss) = finish(run, Duration::from_secs(20)).await;
        figures.rss_mb = rss;
        println!(
            "  {name}: {acked} points acknowledged, {delivered} delivered ({:.1} %), {refused} pushes refused and retried, peak RSS {rss:.1} MB",
            100.0 * delivered as f64 / acked.max(1) as f64
        );
        results.push((name, figures, acked, delivered));
    }
    println!("\n| | acknowledged pts/s | delivered pts/s | delivered / acknowledged (totals) | delivered pts per collector CPU-s | peak RSS |\n| --- | --- | --- | --- | --- | --- |");
    for (name, f, acked, delivered) in &results {
        println!(
            "| {name} | {:.2} M | {:.2} M | {:.1} % | {:.2} M | {:.0} MB |",
            f.acked / 1e6,
            f.delivered / 1e6,
            100.0 * *delivered as f64 / (*acked).max(1) as f64,
            f.per_cpu / 1e6,
            f.rss_mb
        );
    }
    if let [(_, ours, ..), (_, rotel, ..)] = &results[..] {
        println!(
            "\nratios, genai-collector / Rotel (medians, same run): delivered per CPU-s {:.2}x, delivered/s {:.2}x, peak RSS {:.2}x",
            ours.per_cpu / rotel.per_cpu,
            ours.delivered / rotel.delivered,
            ours.rss_mb / rotel.rss_mb
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Full load; the sink hangs for `hang` seconds, then recovers; every acknowledged point must
/// arrive, and RSS stays under the memory limit throughout.
async fn fault_run(
    args: &Args,
    dir: &std::path::Path,
    hang: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let (in_port, sink_port) = (free_port(), free_port());
    let config = dir.join("collector.yaml");
    let memory = format!(
        "  memory_limiter: {{ limit_mib: {} }}\n",
        args.memory_limit_mib
    );
    std::fs::write(&config, collector_config(args, in_port, sink_port, &memory))?;
    let mut command = std::process::Command::new(&args.collector);
    command.arg("-c").arg(&config);
    let sink = Sink::default();
    let run = start(
        "genai-collector",
        &mut command,
        in_port,
        sink.clone(),
        sink_port,
        args,
    )
    .await?;
    let pid = run.child.id();
    let report = |phase: &str, run: &Run| {
        println!(
            "  {phase:>9}: RSS {:6.1} MB (peak so far {:6.1}), {:>10} acknowledged, {:>10} delivered, {:>6} pushes refused",
            status_kb(pid, "VmRSS:") as f64 / 1024.0,
            run.peak_rss.load(Ordering::Relaxed) as f64 / 1024.0,
            run.acked.load(Ordering::Relaxed),
            run.sink.delivered.load(Ordering::Relaxed),
            run.refused.load(Ordering::Relaxed)
        );
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    report("loaded", &run);
    sink.hang.store(true, Ordering::Relaxed);
    let hang_start = Instant::now();
    while hang_start.elapsed() < Duration::from_secs(hang) {
        tokio::time::sleep(Duration::from_secs(10).min(Duration::from_secs(hang))).await;
        report("hanging", &run);
    }
    sink.hang.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    report("recovered", &run);
    let (acked, delivered, refused, rss) = finish(run, Duration::from_secs(120)).await;
    println!(
        "fault run: sink hung {hang} s under full load; memory_limiter.limit_mib {}: peak RSS {rss:.1} MB; {refused} pushes refused and retried; {acked} points acknowledged, {delivered} delivered ({:.2} %){}",
        args.memory_limit_mib,
        100.0 * delivered as f64 / acked.max(1) as f64,
        if delivered >= acked { ": every acknowledged point arrived" } else { ": POINTS LOST" }
    );
    Ok(())
}
