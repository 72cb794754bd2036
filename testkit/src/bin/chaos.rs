//! Chaos run: the release collector under everything at once, for `--minutes` (10 by default).
//!
//! - 200 scrape targets (engine simulators serving the captured vLLM page): 10 % hang, 10 %
//!   serve garbage, HTML, truncated pages, 1 GB pages or 1 GB gzip bombs, one flaps between
//!   healthy and broken every 20 s;
//! - OTLP/gRPC clients pushing valid requests (each tagged with a unique `chaos.request`), and
//!   one replaying every file of the committed fuzz corpora (`fuzz/corpus/otlp_*`) as raw
//!   request bodies;
//! - the OTLP backend, a sink process of this binary, killed (SIGKILL) and restarted every
//!   minute, down 10 s each time.
//!
//! The sink writes what it receives to a file before it answers, so the count survives its
//! kills. At the end it prints the collector's peak and final RSS against its memory limit,
//! panics in its log, the healthy targets' schedule jitter (from the `up` samples' timestamps
//! the backend received) and whether every acknowledged push arrived. Figures, not assertions;
//! `scripts/chaos` builds and runs it.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use genai_collector_core::model::{kv, number_point, Batch, Metric, MetricExt, GRPC_EXPORT_PATH};
use genai_collector_exporters::otlp::EncodedCodec;
use genai_collector_receivers::otlp::{ExportFuture, RawExportService};
use genai_collector_testkit::sim::{self, EngineKind, Fault};
use genai_collector_testkit::{free_port, status_kb};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message as _;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "target/release/genai-collector")]
    collector: String,
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    #[arg(long, default_value_t = 200)]
    targets: usize,
    /// The scrape interval.
    #[arg(long, default_value_t = 2)]
    interval_seconds: u64,
    /// The collector's `memory_limiter.limit_mib`.
    #[arg(long, default_value_t = 256)]
    memory_limit_mib: u64,
    /// Internal: run as the OTLP sink on this port, appending what arrives to `--sink-out`.
    #[arg(long)]
    sink_port: Option<u16>,
    #[arg(long)]
    sink_out: Option<PathBuf>,
}

/// The sink process: one line per request, written before the answer.
/// `p <request id> <points>` for a tagged push; `u <url> <unix ns>` per `up` sample; `o
/// <points>` for anything else.
async fn sink(port: u16, out: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let file = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?,
    ));
    let handler = move |request: tonic::Request<Bytes>| -> ExportFuture {
        let file = file.clone();
        Box::pin(async move {
            let request = ExportMetricsServiceRequest::decode(&request.get_ref()[..])
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            let mut lines = String::new();
            for rm in Batch::from_request(request).resource_metrics {
                let attrs = rm.resource.map(|r| r.attributes).unwrap_or_default();
                let attr = |k: &str| {
                    attrs
                        .iter()
                        .find(|a| a.key == k)
                        .and_then(|a| a.value.as_ref()?.value.clone())
                };
                let points: usize = rm
                    .scope_metrics
                    .iter()
                    .flat_map(|s| &s.metrics)
                    .map(MetricExt::point_count)
                    .sum();
                if let Some(Value::IntValue(id)) = attr("chaos.request") {
                    lines.push_str(&format!("p {id} {points}\n"));
                    continue;
                }
                lines.push_str(&format!("o {points}\n"));
                let Some(Value::StringValue(url)) = attr("url.full") else {
                    continue;
                };
                for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                    if let (true, Some(metric::Data::Gauge(g))) = (m.name == "up", &m.data) {
                        for p in &g.data_points {
                            lines.push_str(&format!("u {url} {}\n", p.time_unix_nano));
                        }
                    }
                }
            }
            file.lock()
                .map_err(|_| tonic::Status::internal("poisoned"))?
                .write_all(lines.as_bytes())
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
        })
    };
    tonic::transport::Server::builder()
        .add_service(RawExportService::new(handler, 64 << 20))
        .serve(([127, 0, 0, 1], port).into())
        .await?;
    Ok(())
}

/// A vLLM server's push of 500 points, tagged with its request id.
fn push(id: u64) -> Bytes {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let metrics = (0..10)
        .map(|m| {
            let points = (0..50)
                .map(|i| number_point(now, i as f64, vec![kv("model_name", format!("m{i}"))]))
                .collect();
            Metric::gauge(&format!("vllm:chaos_{m}"), "", points)
        })
        .collect();
    let batch = Batch::with_resource(
        vec![
            kv("service.name", "chaos-push"),
            kv("chaos.request", id as i64),
        ],
        metrics,
    );
    Bytes::from(batch.encode_request())
}

fn corpus_bodies() -> Vec<Bytes> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut out = Vec::new();
    for (dir, skip) in [("otlp_pipeline", 0), ("otlp_http", 1)] {
        for e in std::fs::read_dir(root.join(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(b) = std::fs::read(e.path()) {
                out.push(Bytes::from(b.get(skip..).unwrap_or_default().to_vec()));
            }
        }
    }
    out
}

fn start_sink(port: u16, out: &Path) -> std::io::Result<std::process::Child> {
    std::process::Command::new(std::env::current_exe()?)
        .arg("--sink-port")
        .arg(port.to_string())
        .arg("--sink-out")
        .arg(out)
        .spawn()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let (Some(port), Some(out)) = (args.sink_port, &args.sink_out) {
        return sink(port, out.clone()).await;
    }
    let dir = std::env::temp_dir().join(format!("chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let received = dir.join("sink.log");

    // Targets: 10 % hang, 10 % broken in the other ways, one flaps, the rest healthy.
    let mut healthy = HashSet::new();
    let mut sims = Vec::new();
    let broken = [
        Fault::Garbage,
        Fault::Html,
        Fault::Truncated,
        Fault::Huge(1 << 30),
        Fault::GzipBomb(1 << 30),
    ];
    for i in 0..args.targets {
        let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await?;
        match i % 10 {
            0 => s.set_fault(Fault::Hang),
            1 => s.set_fault(broken[(i / 10) % broken.len()].clone()),
            _ if i == 2 => {}
            _ => {
                healthy.insert(s.metrics_url());
            }
        }
        sims.push(s);
    }

    let (in_port, sink_port, telemetry) = (free_port(), free_port(), free_port());
    let targets: Vec<String> = sims
        .iter()
        .map(|s| format!("\"{}\"", s.metrics_url()))
        .collect();
    let config = dir.join("collector.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  prometheus:\n    targets: [{}]\n    interval: {}s\n  otlp:\n    protocols:\n      grpc: {{ endpoint: \"127.0.0.1:{in_port}\" }}\n\
             exporters:\n  otlp:\n    endpoint: \"http://127.0.0.1:{sink_port}\"\n    compression: none\n    retry_on_failure: {{ max_elapsed_time: 0s }}\n\
             service:\n  memory_limiter: {{ limit_mib: {} }}\n  telemetry: {{ endpoint: \"127.0.0.1:{telemetry}\" }}\n  pipelines:\n    metrics/scrape: {{ receivers: [prometheus], exporters: [otlp] }}\n    metrics/push: {{ receivers: [otlp], exporters: [otlp] }}\n",
            targets.join(", "),
            args.interval_seconds,
            args.memory_limit_mib
        ),
    )?;
    let mut backend = start_sink(sink_port, &received)?;
    let log = dir.join("collector.log");
    let mut collector = std::process::Command::new(&args.collector)
        .arg("-c")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.collector))?;
    let pid = collector.id();
    println!(
        "chaos: {} targets ({} healthy, 1 flapping), interval {} s, memory_limiter {} MiB, {} min; backend killed every minute for 10 s",
        args.targets,
        healthy.len(),
        args.interval_seconds,
        args.memory_limit_mib,
        args.minutes
    );

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let (refused, fuzz_sent, fuzz_ok) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let endpoint = format!("http://127.0.0.1:{in_port}");
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(endpoint.clone())?
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) if collector.try_wait()?.is_none() => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => {
                return Err(format!("the collector exited: {e}; see {}", log.display()).into())
            }
        }
    };
    let path = || tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_EXPORT_PATH);
    let next_id = Arc::new(AtomicU64::new(1));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut client = tonic::client::Grpc::new(channel.clone());
        let (stop, acked, refused, next_id) = (
            stop.clone(),
            acked.clone(),
            refused.clone(),
            next_id.clone(),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let body = push(id);
                // An SDK retries a refused push; each try carries the same id.
                loop {
                    let answer = match client.ready().await {
                        Ok(()) => {
                            client
                                .unary(tonic::Request::new(body.clone()), path(), EncodedCodec)
                                .await
                        }
                        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                    };
                    if answer.is_ok() {
                        acked.lock().unwrap().push((id, 500));
                        break;
                    }
                    refused.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    {
        let bodies = corpus_bodies();
        let mut client = tonic::client::Grpc::new(channel.clone());
        let (stop, sent, ok) = (stop.clone(), fuzz_sent.clone(), fuzz_ok.clone());
        clients.push(tokio::spawn(async move {
            for body in bodies.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                if client.ready().await.is_ok()
                    && client
                        .unary(tonic::Request::new(body.clone()), path(), EncodedCodec)
                        .await
                        .is_ok()
                {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    let started = Instant::now();
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let mut peak_kb = 0u64;
    let mut last_kill = Instant::now();
    let mut down_since: Option<Instant> = None;
    let mut last_flap = Instant::now();
    let mut flap_broken = false;
    let mut last_report = Instant::now();
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_kb = peak_kb.max(status_kb(pid, "VmRSS:"));
        if collector.try_wait()?.is_some() {
            println!("the collector exited; see {}", log.display());
            break;
        }
        if down_since.is_none() && last_kill.elapsed() >= Duration::from_secs(60) {
            let _ = backend.kill();
            let _ = backend.wait();
            down_since = Some(Instant::now());
        }
        if down_since.is_some_and(|d| d.elapsed() >= Duration::from_secs(10)) {
            backend = start_sink(sink_port, &received)?;
            down_since = None;
            last_kill = Instant::now();
        }
        if last_flap.elapsed() >= Duration::from_secs(20) {
            flap_broken = !flap_broken;
            sims[2].set_fault(if flap_broken {
                Fault::Hang
            } else {
                Fault::None
            });
            last_flap = Instant::now();
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            println!(
                "  {:>4.0} s: RSS {:6.1} MB (peak {:6.1}), {:>7} pushes acknowledged, {:>6} refused and retried, backend {}",
                started.elapsed().as_secs_f64(),
                status_kb(pid, "VmRSS:") as f64 / 1024.0,
                peak_kb as f64 / 1024.0,
                acked.lock().unwrap().len(),
                refused.load(Ordering::Relaxed),
                if down_since.is_some() { "down" } else { "up" }
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    if down_since.is_some() {
        backend = start_sink(sink_port, &received)?;
    }
    for c in clients {
        let _ = c.await;
    }
    let final_kb = status_kb(pid, "VmRSS:");
    // What was acknowledged drains to the backend within the retries' reach.
    let acked = acked.lock().unwrap().clone();
    let want: HashSet<u64> = acked.iter().map(|(id, _)| *id).collect();
    let mut missing = want.len();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = std::fs::read_to_string(&received).unwrap_or_default();
        let got: HashSet<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("p ")?.split(' ').next()?.parse().ok())
            .collect();
        missing = want.difference(&got).count();
        if missing == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = collector.kill();
    let _ = collector.wait();
    let _ = backend.kill();
    let _ = backend.wait();

    let mut ups: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut duplicates = 0usize;
    let mut seen = HashSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("u ") {
            if let Some((url, t)) = rest.rsplit_once(' ') {
                if let Ok(t) = t.parse() {
                    ups.entry(url).or_default().push(t);
                }
            }
        } else if let Some(rest) = l.strip_prefix("p ") {
            if !seen.insert(rest.split(' ').next().unwrap_or_default()) {
                duplicates += 1;
            }
        }
    }
    let interval = args.interval_seconds as f64;
    let mut jitter = Vec::new();
    let mut scrapes = Vec::new();
    for (url, times) in &mut ups {
        if !healthy.contains(*url) {
            continue;
        }
        times.sort_unstable();
        times.dedup();
        scrapes.push(times.len() as f64);
        // Off the schedule by this much: a scrape dropped at a full queue (by policy, while
        // the backend is down) leaves a gap of whole intervals, not jitter.
        jitter.extend(times.windows(2).map(|w| {
            let gap = (w[1] - w[0]) as f64 / 1e9;
            (gap - (gap / interval).round() * interval).abs() * 1000.0
        }));
    }
    let panics = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("panicked"))
        .count();
    let ran = started.elapsed().as_secs_f64();
    println!("\nchaos run, {ran:.0} s:");
    println!(
        "  collector RSS: peak {:.1} MB, final {:.1} MB (memory_limiter.limit_mib {})",
        peak_kb as f64 / 1024.0,
        final_kb as f64 / 1024.0,
        args.memory_limit_mib
    );
    println!("  panics in the collector's log: {panics}");
    println!(
        "  healthy targets: {} of {} reached the backend; scrapes delivered each (median) {:.0} of ~{:.0} (the rest dropped by policy at the full queue while the backend was down); schedule jitter (gap to the nearest whole interval) median {:.1} ms, p99 {:.1} ms",
        scrapes.len(),
        healthy.len(),
        percentile(&mut scrapes.clone(), 0.5),
        ran / interval,
        percentile(&mut jitter.clone(), 0.5),
        percentile(&mut jitter, 0.99)
    );
    println!(
        "  fuzz-corpus requests: {} sent, {} answered OK (the rest refused as invalid or while full)",
        fuzz_sent.load(Ordering::Relaxed),
        fuzz_ok.load(Ordering::Relaxed)
    );
    println!(
        "  pushes: {} acknowledged ({} points), {} tries refused and retried; {} acknowledged pushes missing at the backend{}; {duplicates} delivered twice (at-least-once)",
        want.len(),
        acked.iter().map(|(_, n)| n).sum::<u64>(),
        refused.load(Ordering::Relaxed),
        missing,
        if missing == 0 { ": every acknowledged point arrived" } else { ": POINTS LOST" }
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
