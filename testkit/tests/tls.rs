//! TLS on every network edge: the OTLP receiver (gRPC, and HTTP with client certificates),
//! the OTLP exporter sending to it over both, and the Prometheus endpoint.

mod common;

use std::time::Duration;

use common::free_port;
use genai_collector_core::config::{self, Source};
use genai_collector_core::{ComponentKind, Service};
use genai_collector_testkit::{components, Capture};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_tls_and_mutual_tls() {
    let c = common::certificates("otlp-tls");
    let (g, h) = (free_port(), free_port());
    let (ca, cert, key) = (
        c.ca.display(),
        c.server_cert.display(),
        c.server_key.display(),
    );
    let (ccert, ckey) = (c.client_cert.display(), c.client_key.display());
    let no_retry = "retry_on_failure: { enabled: false }";
    let yaml = format!(
        r#"
receivers:
  generator: {{ batches: 10, points: 50, points_per_metric: 10, interval: 20ms }}
  otlp:
    protocols:
      grpc: {{ endpoint: "127.0.0.1:{g}", tls: {{ cert_file: "{cert}", key_file: "{key}" }} }}
      http:
        endpoint: "127.0.0.1:{h}"
        tls: {{ cert_file: "{cert}", key_file: "{key}", client_ca_file: "{ca}" }}
exporters:
  otlp/grpc: {{ endpoint: "https://localhost:{g}", tls: {{ ca_file: "{ca}" }} }}
  otlp/http:
    endpoint: "https://localhost:{h}"
    protocol: http
    tls: {{ ca_file: "{ca}", cert_file: "{ccert}", key_file: "{ckey}" }}
  otlp/unknown-ca: {{ endpoint: "https://localhost:{g}", {no_retry} }}
  otlp/no-client-cert:
    endpoint: "https://localhost:{h}"
    protocol: http
    tls: {{ ca_file: "{ca}" }}
    {no_retry}
  otlp/plaintext: {{ endpoint: "http://localhost:{g}", {no_retry} }}
  capture:
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics/out:
      receivers: [generator]
      exporters: [otlp/grpc, otlp/http, otlp/unknown-ca, otlp/no-client-cert, otlp/plaintext]
    metrics/in: {{ receivers: [otlp], exporters: [capture] }}
"#
    );
    let capture = Capture::new();
    let comps = components(&capture);
    let cfg =
        config::load(&[Source::new("tls.yaml", yaml)], &comps).unwrap_or_else(|e| panic!("{e}"));
    let service = Service::build(cfg, &comps).unwrap_or_else(|e| panic!("{e}"));
    let telemetry = service.telemetry().clone();
    let running = service.start().await.unwrap_or_else(|e| panic!("{e}"));
    let stat = |id: &str| {
        let s = telemetry.find(ComponentKind::Exporter, id).unwrap();
        (s.snapshot().sent, s.snapshot().failed)
    };
    let exporters = [
        "otlp/grpc",
        "otlp/http",
        "otlp/unknown-ca",
        "otlp/no-client-cert",
        "otlp/plaintext",
    ];
    genai_collector_testkit::eventually(
        Duration::from_secs(20),
        "every exporter settled its 500 points",
        || {
            exporters
                .iter()
                .all(|id| {
                    let (sent, failed) = stat(id);
                    sent + failed >= 500
                })
                .then_some(())
        },
    )
    .await;
    running.run_until(async {}).await;
    assert_eq!(stat("otlp/grpc"), (500, 0), "gRPC over TLS with our CA");
    assert_eq!(stat("otlp/http"), (500, 0), "HTTP over mutual TLS");
    assert_eq!(
        stat("otlp/unknown-ca"),
        (0, 500),
        "a server the client cannot verify"
    );
    assert_eq!(
        stat("otlp/no-client-cert"),
        (0, 500),
        "mutual TLS without a client certificate"
    );
    assert_eq!(stat("otlp/plaintext"), (0, 500), "plaintext to a TLS port");
    let points: usize = capture.batches().iter().map(|b| b.point_count()).sum();
    assert_eq!(
        points, 1000,
        "exactly what the two good exporters sent arrived"
    );
    let _ = std::fs::remove_dir_all(&c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_endpoint_over_tls() {
    common::install_tls_provider();
    let c = common::certificates("prom-tls");
    let port = free_port();
    let yaml = format!(
        r#"
receivers:
  generator: {{ batches: 0, points: 3, points_per_metric: 3, interval: 100ms }}
exporters:
  prometheus:
    endpoint: "127.0.0.1:{port}"
    tls: {{ cert_file: "{}", key_file: "{}" }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [generator], exporters: [prometheus] }}
"#,
        c.server_cert.display(),
        c.server_key.display()
    );
    let comps = components(&Capture::new());
    let cfg = config::load(&[Source::new("prom.yaml", yaml)], &comps).unwrap();
    let running = Service::build(cfg, &comps).unwrap().start().await.unwrap();
    common::listening(port).await;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&c.ca).unwrap()).unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/metrics");
    let body = common::get_text(&trusting, &url).await;
    assert!(body.contains("test_metric_0_ratio{"), "{body}");
    let unknown = reqwest::Client::new().get(&url).send().await;
    assert!(unknown.is_err(), "a client without the CA is refused");
    let plain = reqwest::get(format!("http://localhost:{port}/metrics")).await;
    assert!(
        !plain.is_ok_and(|r| r.status().is_success()),
        "plain HTTP gets no metrics"
    );
    running.run_until(std::future::ready(())).await;
    let _ = std::fs::remove_dir_all(&c.dir);
}
