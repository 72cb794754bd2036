//! The delivery contract with real peers: the OpenTelemetry Python SDK pushes through the
//! collector to the independent Python sink, which is slow; every export the SDK was told OK
//! for arrives (what was refused is retried by the SDK, which gives up after six tries), and
//! nothing it was not told OK for. And the memory
//! bound: requests of the worst amplification (empty histogram points) from several clients
//! leave the process under its configured limit, refused and counted.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::{ComponentKind, Service};
use genai_collector_testkit::{components, status_kb, Capture};

use common::{free_port, Sink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_point_the_sdk_was_told_ok_for_reaches_a_slow_backend() {
    let dir = std::env::temp_dir().join(format!("delivery-peers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Each export takes the sink 0.3 s; the exporter's queue holds 2 requests, queued and in
    // flight: four SDK clients pushing at once must be refused and retry.
    let mut sink = Sink::start_slow(dir.join("points.jsonl"), 0, 0.3).await;
    let (grpc, http) = (free_port(), free_port());
    let yaml = format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "127.0.0.1:{grpc}" }}
      http: {{ endpoint: "127.0.0.1:{http}" }}
exporters:
  otlp:
    endpoint: "http://127.0.0.1:{sink_grpc}"
    sending_queue: {{ queue_size: 2, sizer: requests, num_consumers: 2 }}
    # The slow sink must not be mistaken for a dead one: no timeouts, so no retried duplicates.
    timeout: 30s
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [otlp], exporters: [otlp] }}
"#,
        sink_grpc = sink.grpc
    );
    let comps = components(&Capture::new());
    let cfg = config::load(&[Source::new("test.yaml", yaml)], &comps).unwrap();
    let svc = Service::build(cfg, &comps).unwrap();
    let telemetry = svc.telemetry().clone();
    let running = svc.start().await.unwrap();

    let (series, rounds) = (5, 3);
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (protocol, endpoint) = if i % 2 == 0 {
                ("grpc", format!("127.0.0.1:{grpc}"))
            } else {
                ("http", format!("http://127.0.0.1:{http}/v1/metrics"))
            };
            let service = format!("app-{i}");
            tokio::spawn(async move {
                common::otlp_push_summary(&[
                    "--endpoint",
                    &endpoint,
                    "--protocol",
                    protocol,
                    "--series",
                    &series.to_string(),
                    "--rounds",
                    &rounds.to_string(),
                    "--service",
                    &service,
                    "--allow-failed",
                ])
                .await
            })
        })
        .collect();
    let mut summaries = Vec::new();
    for c in clients {
        summaries.push(c.await.unwrap());
    }
    let summary = running.run_until(async {}).await;
    assert!(summary.drained, "{summary:?}");
    sink.stop();

    let receiver = telemetry.find(ComponentKind::Receiver, "otlp").unwrap();
    let refused = receiver.snapshot().refused;
    assert!(refused > 0, "the slow sink made the collector refuse");
    let per_service = sink.rows().into_iter().fold(BTreeMap::new(), |mut m, row| {
        let service = row["resource"]["service.name"].as_str().unwrap().to_owned();
        *m.entry(service).or_insert(0usize) += 1;
        m
    });
    let exporter = telemetry.find(ComponentKind::Exporter, "otlp").unwrap();
    let (sent, retried) = (
        exporter.snapshot().sent,
        exporter.snapshot().attempt_failures,
    );
    let (mut acknowledged, mut given_up) = (0, 0);
    for s in &summaries {
        let service = s["service"].as_str().unwrap();
        let got = per_service.get(service).copied().unwrap_or(0);
        // Every export re-sends all series (cumulative temporality): 3 points per series.
        let exports = s["exports_ok"].as_u64().unwrap() as usize;
        let expected = 3 * series * exports;
        acknowledged += expected;
        given_up += s["exports_failed"].as_u64().unwrap();
        // At-least-once: a retried export may arrive twice, and only then.
        let ok = if retried == 0 {
            got == expected
        } else {
            got >= expected
        };
        assert!(
            ok,
            "{service}: {got} points arrived of {expected} the SDK was told OK for ({refused} points refused and retried by the SDKs; the exporter sent {sent}, {retried} attempts failed); all services: {per_service:?}"
        );
    }
    assert_eq!(sent as usize, acknowledged);
    assert!(
        acknowledged > 0,
        "the SDKs gave up on every export: {summaries:?}"
    );
    println!(
        "4 SDK clients: {refused} points refused and retried, {sent} delivered, {given_up} exports given up by the SDKs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An export request of `points` empty histogram points: 2 bytes each on the wire, the most
/// memory per wire byte OTLP allows.
fn empty_histograms(points: usize) -> Vec<u8> {
    use genai_collector_core::model::{metric, Batch, Histogram, HistogramDataPoint, Metric};
    let m = Metric {
        name: "h".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint::default(); points],
            aggregation_temporality: 2,
        })),
        ..Default::default()
    };
    Batch::with_resource(vec![], vec![m]).encode_request()
}

fn self_metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_amplifying_requests_stay_under_the_memory_limit() {
    let (grpc, http, telemetry_port) = (free_port(), free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("delivery-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("collector.yaml");
    // A backend that is down: what is taken stays queued (32 MiB of it at most).
    std::fs::write(
        &config,
        format!(
            r#"
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "127.0.0.1:{grpc}" }}
      http: {{ endpoint: "127.0.0.1:{http}" }}
exporters:
  otlp:
    endpoint: "http://127.0.0.1:{dead}"
    protocol: http
service:
  telemetry: {{ endpoint: "127.0.0.1:{telemetry_port}" }}
  memory_limiter: {{ limit_mib: 200, spike_limit_mib: 50, check_interval: 20ms }}
  pipelines:
    metrics: {{ receivers: [otlp], exporters: [otlp] }}
"#,
            dead = free_port()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_testkit-collector"))
        .arg("-c")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let url = format!("http://127.0.0.1:{http}/v1/metrics");
    common::install_tls_provider();
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 3.6 MB of empty points would decode to ~450 MB: never taken. 0.5 MB (~57 MB) fits alone.
    let (huge, big) = (empty_histograms(1_800_000), empty_histograms(1 << 18));
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut tasks = Vec::new();
    for c in 0..4 {
        let (client, url) = (client.clone(), url.clone());
        let body = if c == 0 { huge.clone() } else { big.clone() };
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..15 {
                let r = client
                    .post(&url)
                    .header("content-type", "application/x-protobuf")
                    .body(body.clone())
                    .send()
                    .await;
                seen.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            seen
        }));
    }
    for t in tasks {
        for s in t.await.unwrap() {
            *statuses.entry(s).or_default() += 1;
        }
    }
    let peak_mb = status_kb(pid, "VmHWM:") / 1024;
    let page = common::get_text(
        &client,
        &format!("http://127.0.0.1:{telemetry_port}/metrics"),
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!("statuses {statuses:?}, peak RSS {peak_mb} MB");
    assert!(
        peak_mb < 200,
        "peak RSS {peak_mb} MB over the 200 MiB limit"
    );
    assert_eq!(
        statuses.get(&413),
        Some(&15),
        "the 3.6 MB requests could never fit: {statuses:?}"
    );
    assert!(statuses.get(&429).is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(statuses.get(&200).is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(
        self_metric(
            &page,
            "genai_collector_receiver_memory_refused_points_total"
        ) >= (15 << 20) as f64,
        "{page}"
    );
}
