//! The `prometheus` exporter against real peers: `promtool check metrics` on what it serves,
//! our strict OpenMetrics parser on its OpenMetrics answer, and a real Prometheus scraping it
//! and answering queries with the values, and the exemplars the OpenTelemetry SDK attached. Prometheus comes from Debian's `prometheus` package
//! (CI installs it); without it the test says so and checks the rest.

mod common;

use common::free_port;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use genai_collector_receivers::scrape::text::{parse, Format};
use genai_collector_testkit::sim::{self, EngineKind};

async fn get(url: &str, accept: &str) -> String {
    common::install_tls_provider();
    let client = reqwest::Client::new();
    client
        .get(url)
        .header("Accept", accept)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_our_parser_and_a_real_prometheus() {
    let vllm = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let port = free_port();
    let yaml = format!(
        "receivers:\n  vllm: {{ targets: [\"{}\"], interval: 500ms, pool: chat }}\nprocessors:\n  genai_normalize: {{}}\n  percentages: {{ max_requests: 64 }}\nexporters:\n  prometheus: {{ endpoint: \"127.0.0.1:{port}\" }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [vllm], processors: [genai_normalize, percentages], exporters: [prometheus] }}\n",
        vllm.metrics_url()
    );
    let run = common::Background::start(&yaml);
    let url = format!("http://127.0.0.1:{port}/metrics");
    // Until the first scrape went through the processors to the endpoint.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !get(&url, "text/plain")
        .await
        .contains("gen_ai_server_kv_cache_usage_percent")
    {
        assert!(std::time::Instant::now() < deadline, "no page");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let text = get(&url, "text/plain").await;
    let page = parse(&text, Format::Prometheus).unwrap();
    assert!(
        page.families
            .iter()
            .any(|f| f.name == "gen_ai_server_kv_cache_usage_percent"),
        "{text}"
    );
    let om = get(&url, "application/openmetrics-text;version=1.0.0").await;
    parse(&om, Format::OpenMetrics).unwrap_or_else(|e| panic!("strict OpenMetrics: {e}\n{om}"));

    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write as _;
            // vLLM's own names keep their `:`, which promtool's linter flags by design.
            let ours: String = text
                .lines()
                .filter(|l| {
                    let family = match l.strip_prefix("# ") {
                        Some(meta) => meta.split(' ').nth(1).unwrap_or(""),
                        None => l,
                    };
                    !family.starts_with("vllm:")
                })
                .map(|l| format!("{l}\n"))
                .collect();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(ours.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "promtool check metrics:\n{report}");
        }
        Err(_) => eprintln!("promtool not installed: `apt-get install prometheus` (CI does)"),
    }

    let Some(prom) = common::Prometheus::start("prom-e2e", port, &[]) else {
        eprintln!("prometheus not installed: skipping the scrape by a real Prometheus");
        run.stop().await;
        return;
    };
    let prom_port = prom.port;
    let query = |q: &str| {
        format!(
            "http://127.0.0.1:{prom_port}/api/v1/query?query={}",
            q.replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace(' ', "%20")
        )
    };
    // The engine fact as the simulated page gives it in `vllm:cache_config_info`.
    let page =
        std::fs::read_to_string(sim::fixtures_dir().join("vllm/v0.33.0-loggers.prom")).unwrap();
    let blocks = page
        .split("num_gpu_blocks=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    let mut answer = String::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        answer = match reqwest::get(query("vllm:num_gpu_blocks")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if answer.contains(&blocks) {
            break;
        }
    }
    let max = common::fetch(&query(
        "gen_ai_server_requests_max{gen_ai_pool_name=\"chat\"}",
    ))
    .await;
    let buckets = common::fetch(&query(
        "count(gen_ai_server_time_to_first_token_seconds_bucket)",
    ))
    .await;
    let tokens = common::fetch(&query(
        "gen_ai_server_token_usage_total{gen_ai_token_type=\"input\"} > 0",
    ))
    .await;
    drop(prom);
    run.stop().await;
    assert!(
        answer.contains(&format!("\"{blocks}\"")),
        "Prometheus scraped the engine fact: {answer}"
    );
    assert!(
        max.contains("\"64\"") && max.contains("\"job\":\"vllm\""),
        "labels and values arrive: {max}"
    );
    assert!(
        buckets.contains("\"23\""),
        "every TTFT bucket, +Inf included: {buckets}"
    );
    assert!(
        tokens.contains("gen_ai_server_token_usage_total"),
        "counters: {tokens}"
    );
}

/// The OpenTelemetry SDK records inside spans and pushes OTLP; the OpenMetrics answer carries
/// its exemplars on the counter and on the bucket each value fell in, our strict parser accepts
/// them, and a real Prometheus with exemplar storage answers `query_exemplars` with the SDK's
/// trace ids. The 0.0.4 answer has none (the format has no exemplars).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemplars_from_the_sdk_reach_a_real_prometheus() {
    let (grpc, port) = (free_port(), free_port());
    let yaml = format!(
        "receivers:\n  otlp: {{ protocols: {{ grpc: {{ endpoint: \"127.0.0.1:{grpc}\" }} }} }}\nexporters:\n  prometheus: {{ endpoint: \"127.0.0.1:{port}\" }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [prometheus] }}\n"
    );
    let run = common::Background::start(&yaml);
    common::listening(grpc).await;
    common::listening(port).await;
    let endpoint = format!("127.0.0.1:{grpc}");
    let sent =
        common::otlp_push_summary(&["--endpoint", &endpoint, "--series", "3", "--traced"]).await;
    let trace_ids: Vec<String> = sent["trace_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(trace_ids.len(), 3);

    let url = format!("http://127.0.0.1:{port}/metrics");
    let om = get(&url, "application/openmetrics-text;version=1.0.0").await;
    parse(&om, Format::OpenMetrics).unwrap_or_else(|e| panic!("strict OpenMetrics: {e}\n{om}"));
    // model-1 recorded 0.2 s: its exemplar sits on the 0.32 bucket, with model-1's trace.
    let bucket = om
        .lines()
        .find(|l| {
            l.starts_with("gen_ai_server_request_duration_seconds_bucket{")
                && l.contains("model-1")
                && l.contains("le=\"0.32\"")
        })
        .unwrap_or_else(|| panic!("{om}"));
    assert!(
        bucket.contains(&format!("trace_id=\"{}\"", trace_ids[1])),
        "{bucket}"
    );
    assert!(
        bucket.contains("} 0.2 "),
        "the recorded value and its time: {bucket}"
    );
    let counter = om
        .lines()
        .find(|l| l.starts_with("gen_ai_server_token_usage_total{") && l.contains("model-2"))
        .unwrap();
    assert!(
        counter.contains(&format!("trace_id=\"{}\"", trace_ids[2])),
        "{counter}"
    );
    let text = get(&url, "text/plain").await;
    assert!(!text.contains(" # {"), "no exemplars in 0.0.4");

    let Some(prom) = common::Prometheus::start(
        "prom-exemplars",
        port,
        &["--enable-feature=exemplar-storage"],
    ) else {
        eprintln!("prometheus not installed: skipping the scrape by a real Prometheus");
        run.stop().await;
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let answer = loop {
        let q = format!(
            "http://127.0.0.1:{}/api/v1/query_exemplars?query=gen_ai_server_request_duration_seconds_bucket&start={}&end={}",
            prom.port,
            now - 60,
            now + 60
        );
        let answer = match reqwest::get(q).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if trace_ids.iter().all(|t| answer.contains(t.as_str())) || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    drop(prom);
    run.stop().await;
    for t in &trace_ids {
        assert!(
            answer.contains(t.as_str()),
            "Prometheus stored the exemplar of {t}: {answer}"
        );
    }
}

/// What a hostile or buggy OTLP client can send that has no valid Prometheus form.
fn invalid_batch() -> genai_collector_core::model::Batch {
    use genai_collector_core::model::{
        kv, metric, number_point, Batch, Histogram, HistogramDataPoint, KeyValue, Metric,
        MetricExt, Summary, SummaryDataPoint,
    };
    use opentelemetry_proto::tonic::metrics::v1::summary_data_point::ValueAtQuantile;
    let hist = |name: &str, bounds: Vec<f64>, counts: Vec<u64>, count: u64| Metric {
        name: name.into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                explicit_bounds: bounds,
                bucket_counts: counts,
                count,
                attributes: vec![kv("le", "spoofed"), kv("model", "m")],
                ..Default::default()
            }],
            aggregation_temporality: 2,
        })),
        ..Default::default()
    };
    let mut empty_key = vec![kv("", "nameless"), kv("ok", "1")];
    empty_key.push(KeyValue {
        key: "!!!".into(),
        ..Default::default()
    });
    let mut batch = Batch::with_resource(
        vec![
            kv("service.name", "app"),
            kv("a.b", "1"),
            kv("a_b", "2"),
            kv("", "x"),
        ],
        vec![
            hist("too_many_buckets", vec![1.0], vec![1, 2, 3], 6),
            hist("unsorted", vec![2.0, 1.0], vec![1, 1, 1], 3),
            hist("nan_bound", vec![f64::NAN], vec![1, 1], 2),
            hist("overflow", vec![1.0], vec![u64::MAX, 1], 0),
            hist("count_mismatch", vec![1.0], vec![1, 1], 5),
            hist("good", vec![1.0], vec![1, 1], 2),
            Metric::gauge("g", "", vec![number_point(1, 1.0, empty_key)]),
            Metric {
                name: "bad_summary".into(),
                data: Some(metric::Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint {
                        quantile_values: vec![ValueAtQuantile {
                            quantile: 7.0,
                            value: 1.0,
                        }],
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            },
        ],
    );
    batch.push_resource(
        vec![kv("service.name", "other")],
        vec![hist("good", vec![1.0], vec![0, 0], 0)],
    );
    batch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_data_never_breaks_the_page() {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
    let (grpc, port) = (free_port(), free_port());
    let yaml = format!(
        "receivers:\n  otlp: {{ protocols: {{ grpc: {{ endpoint: \"127.0.0.1:{grpc}\" }} }} }}\nexporters:\n  prometheus: {{ endpoint: \"127.0.0.1:{port}\" }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [prometheus] }}\n"
    );
    let run = common::Background::start(&yaml);
    let mut client = loop {
        match MetricsServiceClient::connect(format!("http://127.0.0.1:{grpc}")).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    client.export(invalid_batch().into_request()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let text = get(&url, "text/plain").await;
    let om = get(&url, "application/openmetrics-text;version=1.0.0").await;
    run.stop().await;
    parse(&text, Format::Prometheus).unwrap_or_else(|e| panic!("0.0.4: {e}\n{text}"));
    parse(&om, Format::OpenMetrics).unwrap_or_else(|e| panic!("strict OpenMetrics: {e}\n{om}"));
    for dropped in [
        "too_many_buckets",
        "unsorted",
        "nan_bound",
        "overflow",
        "count_mismatch",
        "bad_summary",
    ] {
        assert!(
            !text.contains(dropped),
            "{dropped} has no valid form:\n{text}"
        );
    }
    assert!(text.contains("good_bucket"), "{text}");
    assert!(
        text.contains("genai_collector_prometheus_invalid_points_total 6"),
        "{text}"
    );
    assert!(
        !text.contains("{=") && !text.contains(",=\""),
        "no empty label names:\n{text}"
    );
    assert!(
        !text.contains("spoofed"),
        "a point's `le` never shadows the bucket's:\n{text}"
    );
}

/// Whole `le` / `quantile` values come back as the scraped page wrote them, `1.0` (Python's
/// client: vLLM, SGLang) or `1` (Go's), in both formats, so that a Prometheus 2 scraping the
/// collector stores the series under the name a direct scrape gives it.
#[test]
fn whole_bounds_come_back_as_the_page_wrote_them() {
    use genai_collector_exporters::prometheus::render_batch;
    use genai_collector_receivers::scrape::convert::Converter;
    let python = "# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 3\nh_count 3\nh_sum 4\n# TYPE s summary\ns{quantile=\"0.0\"} 1\ns{quantile=\"1.0\"} 2\ns_sum 3\ns_count 2\n";
    let go = python.replace("1.0\"", "1\"").replace("0.0\"", "0\"");
    for (page, bound, quantile) in [
        (python, "le=\"1.0\"", "quantile=\"0.0\""),
        (go.as_str(), "le=\"1\"", "quantile=\"0\""),
    ] {
        let parsed = parse(page, Format::Prometheus).unwrap();
        let (batch, _) = Converter::new().convert(&parsed, 1, Vec::new());
        for openmetrics in [false, true] {
            let text = render_batch(&batch, &[], openmetrics);
            assert!(
                text.contains(bound) && text.contains(quantile) && text.contains("le=\"0.5\""),
                "{bound}, {quantile} (OpenMetrics: {openmetrics}):\n{text}"
            );
        }
    }
}
