//! The runtime end to end, in process: receiver → processors → exporters.

use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::telemetry::ComponentStats;
use genai_collector_core::{ComponentKind, Service};
use genai_collector_testkit::{components, Capture};

fn service(yaml: &str, capture: &Capture) -> Service {
    let comps = components(capture);
    let cfg =
        config::load(&[Source::new("test.yaml", yaml)], &comps).unwrap_or_else(|e| panic!("{e}"));
    Service::build(cfg, &comps).unwrap_or_else(|e| panic!("{e}"))
}

fn stat(
    svc: &genai_collector_core::telemetry::Telemetry,
    kind: ComponentKind,
    id: &str,
) -> std::sync::Arc<ComponentStats> {
    svc.find(kind, id)
        .unwrap_or_else(|| panic!("no stats for {kind} {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_exporter_gets_everything_while_a_failing_one_counts_its_losses() {
    let capture = Capture::new();
    let svc = service(
        r#"
receivers:
  generator: { batches: 40, points: 500 }
processors:
  noop: {}
  noop/second: {}
exporters:
  capture: {}
  fail:
    mode: retryable
    retry_on_failure: { initial_interval: 5ms, max_interval: 10ms, max_elapsed_time: 25ms }
    sending_queue: { queue_size: 100, sizer: requests }
service:
  telemetry: { endpoint: null }
  pipelines:
    metrics:
      receivers: [generator]
      processors: [noop, noop/second]
      exporters: [capture, fail]
"#,
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    let summary = svc.run(std::future::pending()).await.unwrap();
    assert!(summary.drained, "{summary:?}");

    let total = 40 * 500;
    assert_eq!(capture.point_count(), total);
    let mut values = capture.values();
    values.sort_by(f64::total_cmp);
    assert!(
        values.iter().enumerate().all(|(i, v)| *v == i as f64),
        "every point exactly once"
    );

    let recv = stat(&telemetry, ComponentKind::Receiver, "generator");
    assert_eq!(recv.snapshot().accepted, total as u64);
    let noop = stat(&telemetry, ComponentKind::Processor, "noop/second");
    assert_eq!(
        (noop.snapshot().accepted, noop.snapshot().sent),
        (total as u64, total as u64)
    );
    let ok = stat(&telemetry, ComponentKind::Exporter, "capture");
    assert_eq!(
        (
            ok.snapshot().sent,
            ok.snapshot().failed,
            ok.snapshot().refused
        ),
        (total as u64, 0, 0)
    );
    let bad = stat(&telemetry, ComponentKind::Exporter, "fail");
    assert_eq!(bad.snapshot().sent, 0);
    assert_eq!(
        bad.snapshot().failed + bad.snapshot().refused,
        total as u64,
        "every lost point is counted"
    );
    assert!(
        bad.snapshot().attempt_failures >= 2 * bad.snapshot().accepted / 500,
        "retried before giving up"
    );
    assert_eq!(bad.snapshot().queued, 0);
    assert!(bad.last_error().unwrap().contains("connection refused"));

    let text = telemetry.render_prometheus();
    let line = format!(
        "genai_collector_exporter_send_failed_points_total{{exporter=\"fail\"}} {}",
        bad.snapshot().failed
    );
    assert!(text.contains(&line), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_exporter_drops_at_its_queue_and_never_stalls_the_others() {
    let capture = Capture::new();
    let svc = service(
        r#"
receivers:
  generator: { batches: 50, points: 100 }
exporters:
  capture: {}
  fail/hang:
    mode: hang
    timeout: 1h
    sending_queue: { queue_size: 2, sizer: requests }
service:
  telemetry: { endpoint: null }
  shutdown_timeout: 300ms
  pipelines:
    metrics: { receivers: [generator], exporters: [capture, fail/hang] }
"#,
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    let summary = svc.run(std::future::pending()).await.unwrap();
    assert_eq!(
        capture.point_count(),
        5000,
        "the healthy exporter got everything"
    );

    let hung = stat(&telemetry, ComponentKind::Exporter, "fail/hang");
    let (accepted, refused) = (hung.snapshot().accepted, hung.snapshot().refused);
    assert_eq!(accepted + refused, 5000);
    assert!(
        accepted <= 300,
        "the queue holds 2 batches plus one in flight, took {accepted}"
    );
    assert!(!summary.drained);
    assert_eq!(
        summary.lost_points, accepted,
        "points stuck in the hung exporter are reported lost"
    );
    assert_eq!(hung.snapshot().failed, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_receiver_feeds_two_pipelines() {
    let capture = Capture::new();
    let svc = service(
        r#"
receivers:
  generator: { batches: 10, points: 100 }
processors:
  noop: {}
exporters:
  capture: {}
  capture/second: {}
service:
  telemetry: { endpoint: null }
  pipelines:
    metrics/a: { receivers: [generator], processors: [noop], exporters: [capture] }
    metrics/b: { receivers: [generator], processors: [noop], exporters: [capture/second] }
"#,
        &capture,
    );
    let telemetry = svc.telemetry().clone();
    svc.run(std::future::pending()).await.unwrap();
    assert_eq!(capture.point_count(), 2000);
    let per_pipeline: Vec<_> = telemetry
        .components()
        .into_iter()
        .filter(|c| c.kind == ComponentKind::Processor)
        .map(|c| (c.pipeline.clone().unwrap(), c.snapshot().accepted))
        .collect();
    assert_eq!(
        per_pipeline,
        vec![("metrics/a".into(), 1000), ("metrics/b".into(), 1000)]
    );
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_endpoint_serves_health_and_metrics() {
    let capture = Capture::new();
    let svc = service(
        r#"
receivers:
  generator: { batches: 0, points: 10, interval: 10ms }
exporters:
  capture: {}
  fail: { mode: permanent }
service:
  telemetry: { endpoint: "127.0.0.1:0" }
  pipelines:
    metrics: { receivers: [generator], exporters: [capture, fail] }
"#,
        &capture,
    );
    let running = svc.start().await.unwrap();
    let addr = running.telemetry_addr().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"id\":\"generator\",\"state\":\"running\""),
        "{body}"
    );
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"last_error\":\"400 bad request (test)\""),
        "{body}"
    );
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let failed: u64 = body
        .lines()
        .find_map(|l| {
            l.strip_prefix("genai_collector_exporter_send_failed_points_total{exporter=\"fail\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        failed >= 10,
        "permanent errors are dropped and counted without retries: {failed}"
    );

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(running.run_until(async {
        let _ = rx.await;
    }));
    tx.send(()).unwrap();
    let summary = handle.await.unwrap();
    assert!(summary.drained);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the endpoint closes at shutdown"
    );
}
