//! The `loadbalancing` exporter's cost and movement:
//! - the rendezvous pick per resource, for 3 and 16 backends;
//! - one agent batch (120 servers in 60 pools, 30 points each) exported through
//!   `loadbalancing` to three local gateways until its backends' queues have sent every part,
//!   against the `otlp` exporter sending it whole to one of them: medians of 200 exports
//!   each, per point, and their ratio; and the process's CPU time per point for the same
//!   exports (the gateways, in process, decode the same points either way; the waiter sleeps
//!   between looks instead of polling, so that it costs next to nothing);
//! - the fraction of 10,000 pools that move when a fourth gateway joins three (aim: 1/4).
//!
//! `cargo bench -p genai-collector-testkit --bench loadbalancing`

use std::time::Instant;

use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{kv, number_point, Metric, MetricExt};
use genai_collector_core::telemetry::Telemetry;
use genai_collector_core::{
    Batch, BuildContext, ComponentConfig, ComponentId, Exporter, ExporterFactory, RunningService,
    Service,
};
use genai_collector_exporters::loadbalancing::{pick, LoadBalancingConfig, LoadBalancingFactory};
use genai_collector_exporters::otlp::OtlpExporterFactory;
use genai_collector_testkit::{components, free_port, Capture};

const ROUNDS: usize = 200;

fn agent_batch() -> Batch {
    let mut b = Batch::new();
    for server in 0..120 {
        let metrics = (0..30)
            .map(|m| {
                Metric::gauge(
                    &format!("gen_ai.server.metric_{m}"),
                    "1",
                    vec![number_point(1, m as f64, vec![])],
                )
            })
            .collect();
        b.push_resource(
            vec![
                kv("gen_ai.pool.name", format!("pool-{}", server / 2)),
                kv("service.instance.id", format!("10.0.{server}.1:8000")),
            ],
            metrics,
        );
    }
    b
}

async fn gateway(port: u16) -> RunningService {
    let yaml = format!(
        "receivers:\n  otlp: {{ protocols: {{ grpc: {{ endpoint: \"127.0.0.1:{port}\" }} }} }}\nexporters:\n  file: {{ path: /dev/null }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [file] }}\n"
    );
    let comps = components(&Capture::new());
    let cfg = config::load(&[Source::new("gateway.yaml", yaml)], &comps).unwrap();
    let running = Service::build(cfg, &comps).unwrap().start().await.unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    running
}

fn ctx(id: &str, telemetry: &Telemetry) -> BuildContext {
    BuildContext {
        id: ComponentId::parse(id).unwrap(),
        pipeline: None,
        telemetry: telemetry.clone(),
    }
}

/// This process's CPU time so far (user and system), from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here. Linux ticks
    // are 1/100 s.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// CPU seconds per point over `ROUNDS` exports of `batch`, each waited for until delivered.
async fn cpu_per_point(exporter: &dyn Exporter, batch: &Batch, telemetry: &Telemetry) -> f64 {
    let queues = telemetry.components();
    let started = cpu_seconds();
    for _ in 0..ROUNDS {
        exporter.export(batch).await.unwrap();
        while queues.iter().any(|c| c.snapshot().queued > 0) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    (cpu_seconds() - started) / (ROUNDS * batch.point_count()) as f64
}

/// Exports `batch` and waits until nothing is queued in `telemetry`'s exporters (the
/// `loadbalancing` backends' queues): the time until the gateways have it.
async fn export_delivered(exporter: &dyn Exporter, batch: &Batch, telemetry: &Telemetry) {
    exporter.export(batch).await.unwrap();
    let queues = telemetry.components();
    while queues.iter().any(|c| c.snapshot().queued > 0) {
        tokio::task::yield_now().await;
    }
}

async fn median_us(exporter: &dyn Exporter, batch: &Batch, telemetry: &Telemetry) -> f64 {
    for _ in 0..20 {
        export_delivered(exporter, batch, telemetry).await;
    }
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        export_delivered(exporter, batch, telemetry).await;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    times[ROUNDS / 2]
}

#[derive(Clone, Copy)]
enum Measure {
    /// Median wall time of one delivered export.
    Wall,
    /// CPU time per point.
    Cpu,
}

async fn measure(what: Measure, (e, t): (&dyn Exporter, &Telemetry), batch: &Batch) -> f64 {
    match what {
        Measure::Wall => median_us(e, batch, t).await,
        Measure::Cpu => cpu_per_point(e, batch, t).await,
    }
}

/// `what` of the two exporters, alternated three times so that drift on a shared machine hits
/// both; the medians.
async fn alternate(
    what: Measure,
    a: (&dyn Exporter, &Telemetry),
    b: (&dyn Exporter, &Telemetry),
    batch: &Batch,
) -> (f64, f64) {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        xs.push(measure(what, a, batch).await);
        ys.push(measure(what, b, batch).await);
    }
    xs.sort_by(f64::total_cmp);
    ys.sort_by(f64::total_cmp);
    (xs[1], ys[1])
}

fn main() {
    let keys: Vec<String> = (0..10_000).map(|i| format!("pool-{i}")).collect();
    for n in [3, 16] {
        let backends: Vec<String> = (0..n).map(|i| format!("http://gateway-{i}:4317")).collect();
        let started = Instant::now();
        let mut sum = 0;
        for k in &keys {
            sum += pick(k, &backends).unwrap();
        }
        std::hint::black_box(sum);
        println!(
            "pick over {n:>2} backends: {:.0} ns per resource",
            started.elapsed().as_secs_f64() * 1e9 / keys.len() as f64
        );
    }
    let three: Vec<String> = (0..3).map(|i| format!("http://gateway-{i}:4317")).collect();
    let four: Vec<String> = (0..4).map(|i| format!("http://gateway-{i}:4317")).collect();
    let moved = keys
        .iter()
        .filter(|k| three[pick(k, &three).unwrap()] != four[pick(k, &four).unwrap()])
        .count();
    println!(
        "3 -> 4 gateways: {moved} of {} pools moved ({:.1} %, aim 25 %)",
        keys.len(),
        100.0 * moved as f64 / keys.len() as f64
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ports = [free_port(), free_port(), free_port()];
        let mut gateways = Vec::new();
        for p in ports {
            gateways.push(gateway(p).await);
        }
        let batch = agent_batch();
        let points = batch.point_count() as f64;
        let otlp_config = serde_saphyr::from_str(&format!(
            "endpoint: \"http://127.0.0.1:{}\"\ncompression: none\n",
            ports[0]
        ))
        .unwrap();
        let (otlp_telemetry, lb_telemetry) = (Telemetry::new(), Telemetry::new());
        let otlp = OtlpExporterFactory
            .build(otlp_config, &ctx("otlp", &otlp_telemetry))
            .unwrap();
        let hostnames: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let lb_config: LoadBalancingConfig = serde_saphyr::from_str(&format!(
            "protocol: {{ otlp: {{ compression: none }} }}\nresolver: {{ static: {{ hostnames: [{}] }} }}\n",
            hostnames.join(", ")
        ))
        .unwrap();
        lb_config.validate().unwrap();
        let lb = LoadBalancingFactory
            .build(lb_config, &ctx("loadbalancing", &lb_telemetry))
            .unwrap();
        let otlp = (otlp.as_ref(), &otlp_telemetry);
        let balanced = (lb.as_ref(), &lb_telemetry);
        let (a, b) = alternate(Measure::Wall, otlp, balanced, &batch).await;
        println!("one agent batch of {points} points (120 servers, 60 pools), median of {ROUNDS} exports:");
        println!("  otlp, whole to one gateway:        {:.2} µs per point", a / points);
        println!("  loadbalancing over three gateways: {:.2} µs per point", b / points);
        println!("  ratio loadbalancing / otlp:        {:.2}", b / a);
        let (a, b) = alternate(Measure::Cpu, otlp, balanced, &batch).await;
        println!("the same, CPU time of the process (agent side and gateways), median of three:");
        println!("  otlp:                              {:.2} µs per point", a * 1e6);
        println!("  loadbalancing:                     {:.2} µs per point", b * 1e6);
        println!("  ratio loadbalancing / otlp:        {:.2}", b / a);
        lb.shutdown().await.unwrap();
        for g in gateways {
            g.run_until(std::future::ready(())).await;
        }
    });
}
