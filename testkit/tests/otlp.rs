//! The `otlp` receiver against the official OpenTelemetry Python SDK (tests/peers/otlp_push.py)
//! pushing over gRPC and over HTTP: every point, attribute, temporality and bucket arrives.

mod common;

use std::time::Duration;

use genai_collector_core::model::{metric, number_value, AggregationTemporality, AttributesExt};
use genai_collector_testkit::Capture;

use common::{free_port, Sink};

async fn push_and_capture(protocol: &str) -> (Capture, serde_json::Value) {
    let (grpc, http) = (free_port(), free_port());
    let yaml = format!(
        "receivers:\n  otlp:\n    protocols:\n      grpc: {{ endpoint: \"127.0.0.1:{grpc}\" }}\n      http: {{ endpoint: \"127.0.0.1:{http}\" }}\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [capture] }}\n"
    );
    let run = common::Background::start(&yaml);
    common::listening(grpc).await;
    common::listening(http).await;
    let endpoint = if protocol == "grpc" {
        format!("127.0.0.1:{grpc}")
    } else {
        format!("http://127.0.0.1:{http}/v1/metrics")
    };
    let summary = common::otlp_push_summary(&[
        "--endpoint",
        &endpoint,
        "--protocol",
        protocol,
        "--series",
        "5",
        "--rounds",
        "2",
    ])
    .await;
    // Every push was answered once queued: stopping drains the queues into the capture.
    (run.stop().await, summary)
}

async fn check(protocol: &str) {
    let (capture, summary) = push_and_capture(protocol).await;
    let (series, rounds) = (
        summary["series"].as_u64().unwrap() as usize,
        summary["rounds"].as_u64().unwrap() as usize,
    );
    // Cumulative temporality: every flush re-sends every series; shutdown flushes once more.
    assert_eq!(
        capture.point_count(),
        3 * series * (rounds + 1),
        "{protocol}"
    );
    let batches = capture.batches();
    let last = batches.last().unwrap();
    assert_eq!(
        last.resource_metrics[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .get_str("service.name"),
        Some("otlp-push")
    );
    let find = |name: &str| {
        last.metrics()
            .find(|m| m.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("{protocol}: no {name}"))
    };
    let Some(metric::Data::Sum(tokens)) = find("gen_ai.server.token.usage").data else {
        panic!("sum")
    };
    assert!(tokens.is_monotonic);
    assert_eq!(
        tokens.aggregation_temporality,
        AggregationTemporality::Cumulative as i32
    );
    let total: f64 = tokens.data_points.iter().filter_map(number_value).sum();
    assert_eq!(
        total,
        summary["tokens_total"].as_f64().unwrap(),
        "{protocol}: every token counted"
    );
    assert!(tokens
        .data_points
        .iter()
        .all(|p| p.attributes.get_str("gen_ai.token.type") == Some("output")));
    let Some(metric::Data::Histogram(h)) = find("gen_ai.server.request.duration").data else {
        panic!("histogram")
    };
    assert_eq!(h.data_points.len(), series);
    for p in &h.data_points {
        assert_eq!(p.explicit_bounds.len(), 14, "the advised bucket bounds");
        assert_eq!(p.bucket_counts.len(), 15);
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), p.count);
        assert_eq!(p.count, rounds as u64);
    }
    assert_eq!(find("gen_ai.server.request.duration").unit, "s");
    let Some(metric::Data::Gauge(g)) = find("gen_ai.server.requests.running").data else {
        panic!("gauge")
    };
    let model4 = g
        .data_points
        .iter()
        .find(|p| p.attributes.get_str("gen_ai.request.model") == Some("model-4"))
        .unwrap();
    assert_eq!(number_value(model4), Some((4 + rounds - 1) as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_pushes_over_grpc() {
    check("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_pushes_over_http() {
    check("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_answers_429_and_counts_the_refusal() {
    use genai_collector_core::config::{self, Source};
    use genai_collector_core::{ComponentKind, Service};
    use prost::Message as _;

    let http = free_port();
    // An exporter that never answers and a queue that blocks: the pipeline fills up.
    let yaml = format!(
        "receivers:\n  otlp:\n    protocols:\n      http: {{ endpoint: \"127.0.0.1:{http}\" }}\nexporters:\n  fail: {{ mode: hang, timeout: 1h, sending_queue: {{ queue_size: 1, sizer: requests, block_on_overflow: true }} }}\nservice:\n  telemetry: {{ endpoint: null }}\n  shutdown_timeout: 300ms\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [fail] }}\n"
    );
    let comps = genai_collector_testkit::components(&Capture::new());
    let service = Service::build(
        config::load(&[Source::new("t.yaml", yaml)], &comps).unwrap(),
        &comps,
    )
    .unwrap();
    let telemetry = service.telemetry().clone();
    let running = service.start().await.unwrap();
    let body = genai_collector_testkit::components::numbered_batch(0, 10, 10)
        .into_request()
        .encode_to_vec();
    common::install_tls_provider();
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let r = client
            .post(format!("http://127.0.0.1:{http}/v1/metrics"))
            .header("Content-Type", "application/x-protobuf")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        statuses.push((r.status().as_u16(), retry_after));
    }
    let refused = statuses.iter().filter(|(s, _)| *s == 429).count();
    assert!(statuses[0].0 == 200, "{statuses:?}");
    assert!(refused > 0, "a full pipeline refuses: {statuses:?}");
    assert!(
        statuses
            .iter()
            .filter(|(s, _)| *s == 429)
            .all(|(_, r)| r.as_deref() == Some("1")),
        "with a retry hint"
    );
    let stats = telemetry.find(ComponentKind::Receiver, "otlp").unwrap();
    assert_eq!(
        stats.snapshot().refused,
        refused as u64 * 10,
        "refused points are counted"
    );
    assert_eq!(stats.snapshot().accepted, (100 - refused) as u64 * 10);
    let summary = running.run_until(async {}).await;
    assert!(!summary.drained, "the hung exporter cannot drain");
}

/// Runs the independent Python sink, the collector sending it numbered points, and returns
/// the values the sink wrote and the exporter's stats.
async fn send_to_sink(protocol: &str, fail_first: u32) -> (Vec<f64>, u64, u64) {
    use genai_collector_core::ComponentKind;
    let dir = std::env::temp_dir().join(format!("sink-{protocol}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut sink = Sink::start(dir.join("points.jsonl"), fail_first).await;
    let endpoint = if protocol == "grpc" {
        format!("http://127.0.0.1:{}", sink.grpc)
    } else {
        format!("http://127.0.0.1:{}", sink.http)
    };
    let yaml = format!(
        "receivers:\n  generator: {{ batches: 20, points: 50, points_per_metric: 10 }}\nexporters:\n  otlp:\n    endpoint: \"{endpoint}\"\n    protocol: {protocol}\n    headers: {{ x-tenant: team-a }}\n    retry_on_failure: {{ initial_interval: 50ms, max_interval: 100ms }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [generator], exporters: [otlp] }}\n"
    );
    let capture = Capture::new();
    let comps = genai_collector_testkit::components(&capture);
    let cfg = genai_collector_core::config::load(
        &[genai_collector_core::config::Source::new("t.yaml", yaml)],
        &comps,
    )
    .unwrap();
    let service = genai_collector_core::Service::build(cfg, &comps).unwrap();
    let telemetry = service.telemetry().clone();
    let summary = service.run(std::future::pending()).await.unwrap();
    assert!(summary.drained);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sink.stop();
    let values = sink.values();
    let stats = telemetry.find(ComponentKind::Exporter, "otlp").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        values,
        stats.snapshot().sent,
        stats.snapshot().attempt_failures,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_otlp_exporter_delivers_to_an_independent_sink_through_failures() {
    for protocol in ["grpc", "http"] {
        let (mut values, sent, failures) = send_to_sink(protocol, 3).await;
        values.sort_by(f64::total_cmp);
        assert_eq!(values.len(), 1000, "{protocol}: every point arrived once");
        assert!(
            values.iter().enumerate().all(|(i, v)| *v == i as f64),
            "{protocol}: the values sent"
        );
        assert_eq!(sent, 1000);
        assert_eq!(
            failures, 3,
            "{protocol}: the sink's three refusals were retried"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_guards_both_protocols() {
    let (grpc, http) = (free_port(), free_port());
    let yaml = format!(
        "receivers:\n  otlp:\n    bearer_token: s3cret\n    protocols:\n      grpc: {{ endpoint: \"127.0.0.1:{grpc}\" }}\n      http: {{ endpoint: \"127.0.0.1:{http}\" }}\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [capture] }}\n"
    );
    let run = common::Background::start(&yaml);
    common::listening(grpc).await;
    common::listening(http).await;
    let push = move |token: Option<&'static str>| {
        tokio::task::spawn_blocking(move || {
            let endpoint = format!("127.0.0.1:{grpc}");
            let mut cmd = common::otlp_push(&[
                "--endpoint",
                &endpoint,
                "--protocol",
                "grpc",
                "--series",
                "2",
            ]);
            if let Some(t) = token {
                // The SDK's standard variable for export headers.
                cmd.env(
                    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
                    format!("authorization=Bearer%20{t}"),
                );
            }
            cmd.output().unwrap().status.success()
        })
    };
    assert!(
        push(Some("s3cret")).await.unwrap(),
        "the right token is accepted over gRPC"
    );
    // The SDK only logs the refusal; otlp_push.py counts it and fails.
    assert!(
        !push(None).await.unwrap(),
        "without the token the export fails"
    );
    common::install_tls_provider();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}/v1/metrics");
    let post = |auth: Option<&str>| {
        let mut r = client
            .post(&url)
            .header("Content-Type", "application/x-protobuf")
            .body(Vec::new());
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status().as_u16(), 401);
    assert_eq!(
        post(Some("Bearer wrong")).await.unwrap().status().as_u16(),
        401
    );
    assert_eq!(
        post(Some("Bearer s3cret")).await.unwrap().status().as_u16(),
        200
    );
    let capture = run.stop().await;
    assert_eq!(
        capture.point_count(),
        3 * 2 * 2,
        "only the authorized gRPC push arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_never_hold_the_shutdown_hostage() {
    use genai_collector_core::config::{self, Source};
    use genai_collector_core::Service;
    use tokio::io::AsyncWriteExt;

    let (grpc, http) = (free_port(), free_port());
    let yaml = format!(
        "receivers:\n  otlp:\n    protocols:\n      grpc: {{ endpoint: \"127.0.0.1:{grpc}\" }}\n      http: {{ endpoint: \"127.0.0.1:{http}\" }}\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  shutdown_timeout: 30s\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [capture] }}\n"
    );
    let capture = Capture::new();
    let comps = genai_collector_testkit::components(&capture);
    let cfg = config::load(&[Source::new("test.yaml", yaml)], &comps).unwrap();
    let running = Service::build(cfg, &comps).unwrap().start().await.unwrap();
    // One client stops halfway through a request head, another halfway through a body, and a
    // third only opens an HTTP/2 connection to the gRPC port.
    let mut head = tokio::net::TcpStream::connect(("127.0.0.1", http))
        .await
        .unwrap();
    head.write_all(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut body = tokio::net::TcpStream::connect(("127.0.0.1", http))
        .await
        .unwrap();
    body.write_all(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 100000\r\n\r\n\x0a\x05")
        .await
        .unwrap();
    let mut h2 = tokio::net::TcpStream::connect(("127.0.0.1", grpc))
        .await
        .unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // Meanwhile a well-behaved client's points are taken.
    common::otlp_push_summary(&[
        "--endpoint",
        &format!("http://127.0.0.1:{http}/v1/metrics"),
        "--protocol",
        "http",
        "--series",
        "2",
    ])
    .await;
    let started = std::time::Instant::now();
    let summary = running.run_until(async {}).await;
    let took = started.elapsed();
    assert!(summary.drained, "{summary:?}");
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    assert_eq!(
        capture.point_count(),
        12,
        "the good client's points were delivered"
    );
    drop((head, body, h2));
}
