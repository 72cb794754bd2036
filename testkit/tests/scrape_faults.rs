//! Every kind of broken target at once, beside a healthy one: each broken target reports
//! `up` = 0 with a clear error, memory stays bounded (a 1 GB page and a gzip bomb stop at the
//! size limit), and the healthy target is scraped on time throughout. Its own process, so the
//! peak RSS measured is this test's.

mod common;

use std::time::Duration;

use common::{run_for, run_until, scrape_counts, scrapes};
use genai_collector_testkit::sim::{self, EngineKind, Fault};

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_targets_are_isolated_and_memory_stays_bounded() {
    const GB: u64 = 1 << 30;
    let healthy = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let faults = [
        ("hang", Fault::Hang),
        ("slow", Fault::Slow(Duration::from_secs(2))),
        ("500", Fault::Status500),
        ("garbage", Fault::Garbage),
        ("html", Fault::Html),
        ("truncated", Fault::Truncated),
        ("huge", Fault::Huge(GB)),
        ("gzip-bomb", Fault::GzipBomb(GB)),
    ];
    let mut broken = Vec::new();
    for (name, fault) in faults {
        let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
        s.set_fault(fault);
        broken.push((name, s));
    }
    let mut targets = vec![format!("\"{}\"", healthy.metrics_url())];
    targets.extend(
        broken
            .iter()
            .map(|(_, s)| format!("\"{}\"", s.metrics_url())),
    );
    let yaml = format!(
        "receivers:\n  vllm:\n    targets: [{}]\n    interval: 400ms\n    timeout: 300ms\n    max_response_bytes: 8388608\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [vllm], exporters: [capture] }}\n",
        targets.join(", ")
    );
    let before = peak_rss_mb();
    let capture = run_for(&yaml, 2.5).await;
    let by_target = scrapes(&capture);

    let ok = &by_target[&healthy.metrics_url()];
    assert!(
        ok.len() >= 5,
        "the healthy target kept its 400ms schedule: {} scrapes",
        ok.len()
    );
    assert!(ok.iter().all(|s| s.gauge("up") == Some(1.0)));
    assert!(ok
        .iter()
        .all(|s| s.gauge("scrape_duration_seconds").unwrap() < 0.3));
    for (name, s) in &broken {
        let got = by_target
            .get(&s.metrics_url())
            .unwrap_or_else(|| panic!("{name}: no health series"));
        assert!(!got.is_empty(), "{name}");
        assert!(
            got.iter().all(|s| s.gauge("up") == Some(0.0)),
            "{name}: up must be 0"
        );
        assert!(
            got.iter()
                .all(|s| !s.metrics.contains_key("vllm:num_requests_running")),
            "{name}: no partial data"
        );
    }
    let peak = peak_rss_mb();
    eprintln!("peak RSS {before:.0} MB before, {peak:.0} MB after");
    assert!(
        peak < 400.0,
        "a 1 GB page and a 1 GB gzip bomb must not be buffered: peak RSS {peak:.0} MB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_gets_a_clear_error() {
    use genai_collector_receivers::scrape::{scrape_once, ScrapeConfig};
    let config = ScrapeConfig {
        timeout: Some(Duration::from_millis(300)),
        max_response_bytes: 8 << 20,
        ..Default::default()
    };
    let cases = [
        (Fault::Hang, "timed out after 300ms"),
        (Fault::Status500, "answered HTTP 500"),
        (
            Fault::Garbage,
            "malformed page: line 1: expected a metric name",
        ),
        (Fault::Html, "answered `text/html`, not a metrics page"),
        (Fault::Truncated, "malformed page: line"),
        (Fault::Huge(1 << 30), "larger than the 8388608-byte limit"),
        (
            Fault::GzipBomb(256 << 20),
            "larger than the 8388608-byte limit",
        ),
    ];
    for (fault, expected) in cases {
        let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
        s.set_fault(fault.clone());
        let err = scrape_once(&s.metrics_url(), &config)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expected),
            "{fault:?}: `{err}` should say `{expected}`"
        );
    }
    let down = scrape_once("127.0.0.1:1", &config)
        .await
        .unwrap_err()
        .to_string();
    assert!(down.starts_with("cannot connect"), "{down}");
    let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    assert!(scrape_once(&s.metrics_url(), &config).await.unwrap() > 50);
}

/// A scrape with no engine additions.
struct Plain;

#[genai_collector_core::async_trait]
impl genai_collector_receivers::scrape::Engine for Plain {
    fn provider(&self) -> Option<&'static str> {
        None
    }
    fn default_interval(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// An engine whose enrichment panics on every other page: the bug of a future engine module.
struct Panicky(std::sync::atomic::AtomicUsize);

#[genai_collector_core::async_trait]
impl genai_collector_receivers::scrape::Engine for Panicky {
    fn provider(&self) -> Option<&'static str> {
        None
    }
    fn default_interval(&self) -> Duration {
        Duration::from_millis(100)
    }
    fn enrich(
        &self,
        _: &genai_collector_receivers::scrape::text::Page<'_>,
        _: &mut Vec<genai_collector_core::model::Metric>,
        _: u64,
    ) {
        if self
            .0
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(2)
        {
            panic!("enrich failed on purpose");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_a_page_is_a_failed_scrape_and_the_target_keeps_its_schedule() {
    use genai_collector_core::model::{metric, number_value};
    use genai_collector_core::{
        CancellationToken, ComponentId, ComponentKind, Output, Receiver, ReceiverContext,
    };
    use genai_collector_receivers::scrape::{ScrapeConfig, ScrapeReceiver};

    let target = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let telemetry = genai_collector_core::telemetry::Telemetry::new();
    let stats = telemetry.register(ComponentKind::Receiver, "prometheus", None);
    let (output, mut rx) = Output::capture(64, stats.clone());
    let receiver = Box::new(ScrapeReceiver {
        engine: std::sync::Arc::new(Panicky(Default::default())),
        config: ScrapeConfig {
            targets: vec![target.metrics_url()],
            interval: Some(Duration::from_millis(100)),
            timeout: Some(Duration::from_millis(90)),
            ..Default::default()
        },
    });
    let stop = CancellationToken::new();
    let run = tokio::spawn(receiver.run(ReceiverContext {
        id: ComponentId::parse("prometheus").unwrap(),
        output,
        shutdown: stop.clone(),
    }));
    let mut ups = Vec::new();
    while ups.len() < 6 {
        let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the target is still scraped")
            .unwrap();
        let up = batch
            .metrics()
            .find(|m| m.name == "up")
            .and_then(|m| match &m.data {
                Some(metric::Data::Gauge(g)) => number_value(&g.data_points[0]),
                _ => None,
            });
        ups.extend(up);
    }
    stop.cancel();
    let _ = run.await;
    assert!(ups.contains(&0.0) && ups.contains(&1.0), "up {ups:?}");
    assert!(
        stats.last_error().unwrap().contains("panicked"),
        "{:?}",
        stats.last_error()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bombs_on_side_endpoints_stop_at_the_limit() {
    const GB: u64 = 1 << 30;
    let tgi = sim::start(EngineKind::Tgi, "127.0.0.1:0").await.unwrap();
    tgi.set_fault(Fault::SideGzipBomb(GB));
    let ollama = sim::start(EngineKind::Ollama, "127.0.0.1:0").await.unwrap();
    ollama.set_fault(Fault::SideGzipBomb(GB));
    let yaml = format!(
        "receivers:\n  tgi:\n    targets: [\"{}\"]\n    interval: 300ms\n    timeout: 250ms\n  ollama:\n    endpoint: \"http://{}\"\n    interval: 300ms\n    timeout: 250ms\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [tgi, ollama], exporters: [capture] }}\n",
        tgi.metrics_url(),
        ollama.addr
    );
    let before = peak_rss_mb();
    let capture = run_for(&yaml, 2.0).await;
    let grown = peak_rss_mb() - before;
    let by_target = scrapes(&capture);
    let tgi_scrapes = &by_target[&tgi.metrics_url()];
    assert!(
        tgi_scrapes.iter().all(|s| s.gauge("up") == Some(1.0)),
        "the page itself is fine"
    );
    assert!(tgi_scrapes.len() >= 3);
    let ollama_up: Vec<_> = capture
        .batches()
        .iter()
        .flat_map(|b| {
            b.metrics()
                .filter(|m| m.name == "up")
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!ollama_up.is_empty());
    assert!(
        grown < 200.0,
        "a 1 GB answer from /info and /api/ps grew RSS by {grown:.0} MB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_over_sample_limit_fails_its_scrape() {
    let big = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    big.set_fault(Fault::ManySeries(5_000));
    let yaml = format!(
        "receivers:\n  prometheus:\n    targets: [\"{}\"]\n    interval: 300ms\n    sample_limit: 1000\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [prometheus], exporters: [capture] }}\n",
        big.metrics_url()
    );
    let url = big.metrics_url();
    let capture = run_until(&yaml, Duration::from_secs(30), "two scrapes", |c| {
        scrape_counts(c).get(&url).is_some_and(|n| *n >= 2)
    })
    .await;
    let by_target = scrapes(&capture);
    let s = &by_target[&big.metrics_url()];
    assert!(!s.is_empty());
    assert!(
        s.iter().all(|s| s.gauge("up") == Some(0.0)),
        "over the limit: up 0"
    );
    assert_eq!(
        capture.point_count(),
        s.len() * 4,
        "only the health series, no samples"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_target_url_are_never_shown() {
    use genai_collector_core::model::AttributesExt;
    use genai_collector_core::{
        CancellationToken, ComponentId, ComponentKind, Output, Receiver, ReceiverContext,
    };
    use genai_collector_receivers::scrape::{ScrapeConfig, ScrapeReceiver};

    let up = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let down = common::free_port();
    let telemetry = genai_collector_core::telemetry::Telemetry::new();
    let stats = telemetry.register(ComponentKind::Receiver, "vllm", None);
    let (output, mut rx) = Output::capture(64, stats.clone());
    let receiver = Box::new(ScrapeReceiver {
        engine: std::sync::Arc::new(Plain),
        config: ScrapeConfig {
            targets: vec![
                format!("http://scraper:s3cr3t@{}/metrics", up.addr),
                format!("http://scraper:s3cr3t@127.0.0.1:{down}/metrics"),
            ],
            interval: Some(Duration::from_millis(200)),
            timeout: Some(Duration::from_millis(150)),
            ..Default::default()
        },
    });
    let stop = CancellationToken::new();
    let run = tokio::spawn(receiver.run(ReceiverContext {
        id: ComponentId::parse("vllm").unwrap(),
        output,
        shutdown: stop.clone(),
    }));
    let mut shown = Vec::new();
    while shown.len() < 4 {
        let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        for rm in &batch.resource_metrics {
            let attrs = &rm.resource.as_ref().unwrap().attributes;
            shown.push(attrs.get_str("url.full").unwrap().to_owned());
        }
    }
    stop.cancel();
    let _ = run.await;
    assert!(
        shown
            .iter()
            .all(|u| !u.contains("s3cr3t") && !u.contains("scraper@")),
        "{shown:?}"
    );
    let error = stats.last_error().unwrap();
    assert!(
        error.contains(&format!("127.0.0.1:{down}")) && !error.contains("s3cr3t"),
        "{error}"
    );
    let health = telemetry.health_json();
    assert!(!health.contains("s3cr3t"), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_targets_back_off_and_leave_the_scrape_slot_to_healthy_ones() {
    let healthy = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let mut hung = Vec::new();
    for _ in 0..8 {
        let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
        s.set_fault(Fault::Hang);
        hung.push(s);
    }
    let mut targets = vec![format!("\"{}\"", healthy.metrics_url())];
    targets.extend(hung.iter().map(|s| format!("\"{}\"", s.metrics_url())));
    // One slot, eight targets that hold it for the whole timeout: without backing off they
    // would need 400 ms of slot per 200 ms interval.
    let yaml = format!(
        "receivers:\n  prometheus:\n    targets: [{}]\n    interval: 200ms\n    timeout: 50ms\n    max_concurrent_scrapes: 1\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [prometheus], exporters: [capture] }}\n",
        targets.join(", ")
    );
    let capture = run_for(&yaml, 4.0).await;
    let by_target = scrapes(&capture);
    let ok = &by_target[&healthy.metrics_url()];
    let asked: Vec<u64> = hung.iter().map(|s| s.requests()).collect();
    eprintln!(
        "healthy scrapes {}, requests to hung targets {asked:?}",
        ok.len()
    );
    assert!(
        ok.len() >= 14 && ok.iter().all(|s| s.gauge("up") == Some(1.0)),
        "the healthy target kept most of its 20 ticks: {}",
        ok.len()
    );
    for s in &hung {
        let reports = &by_target[&s.metrics_url()];
        assert!(
            reports.len() >= 12 && reports.iter().all(|r| r.gauge("up") == Some(0.0)),
            "a hung target still reports up 0 on its schedule: {} reports",
            reports.len()
        );
        assert!(
            s.requests() <= 7,
            "a hung target is asked less and less often: {} requests in 20 ticks",
            s.requests()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_limits_fail_the_scrape_with_a_clear_error() {
    use genai_collector_receivers::scrape::{scrape_once, ScrapeConfig};
    let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let base = ScrapeConfig::default();
    assert!(scrape_once(&s.metrics_url(), &base).await.is_ok());
    // The captured vLLM page has samples with 5+ labels and names over 20 bytes.
    for (config, expected) in [
        (
            ScrapeConfig {
                label_limit: 2,
                ..base.clone()
            },
            "over label_limit 2",
        ),
        (
            ScrapeConfig {
                label_name_length_limit: 5,
                ..base.clone()
            },
            "over label_name_length_limit 5",
        ),
        (
            ScrapeConfig {
                label_value_length_limit: 20,
                ..base.clone()
            },
            "over label_value_length_limit 20",
        ),
    ] {
        let err = scrape_once(&s.metrics_url(), &config)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "`{err}` should say `{expected}`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_targets_past_max_targets_are_not_scraped() {
    let mut servers = Vec::new();
    for _ in 0..5 {
        servers.push(sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap());
    }
    let file = std::env::temp_dir().join(format!("max-targets-{}.yaml", std::process::id()));
    let listed: Vec<String> = servers
        .iter()
        .map(|s| format!("- \"{}\"\n", s.metrics_url()))
        .collect();
    std::fs::write(&file, listed.concat()).unwrap();
    let yaml = format!(
        "receivers:\n  prometheus:\n    file_targets: [\"{}\"]\n    interval: 200ms\n    max_targets: 3\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [prometheus], exporters: [capture] }}\n",
        file.display()
    );
    // Two scrapes of each of three targets: time enough for the others to show up, were
    // they wrongly scraped.
    let capture = run_until(
        &yaml,
        Duration::from_secs(30),
        "three targets scraped twice",
        |c| scrape_counts(c).values().filter(|n| **n >= 2).count() >= 3,
    )
    .await;
    let _ = std::fs::remove_file(&file);
    let by_target = scrapes(&capture);
    assert_eq!(by_target.len(), 3, "{:?}", by_target.keys());
    let asked = servers.iter().filter(|s| s.requests() > 0).count();
    assert_eq!(asked, 3, "the other two are never fetched");
}
