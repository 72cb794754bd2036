//! The `ollama` receiver against a simulated Ollama serving `tests/fixtures/ollama`: models,
//! VRAM share and KV-cache usage; an outage, garbage, and recovery.

mod common;

use common::scrapes_by_resource;
use genai_collector_testkit::sim::{self, EngineKind, Fault};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_outage_and_recovery() {
    let ollama = sim::start(EngineKind::Ollama, "127.0.0.1:0").await.unwrap();
    let yaml = format!(
        "receivers:\n  ollama:\n    endpoint: http://{}\n    interval: 200ms\n    timeout: 150ms\n    max_vram_gb: 24\n    pool: local\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [ollama], exporters: [capture] }}\n",
        ollama.addr
    );
    let run = common::Background::start(&yaml);
    // Each fault stays until polls have seen it; then the next one.
    let ups = |c: &genai_collector_testkit::Capture| -> Vec<f64> {
        scrapes_by_resource(c, "service.name")
            .remove("ollama")
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.gauge("up"))
            .collect()
    };
    let downs = |c: &genai_collector_testkit::Capture| ups(c).iter().filter(|u| **u == 0.0).count();
    run.wait("two polls up", |c| ups(c).len() >= 2).await;
    ollama.set_fault(Fault::Status500);
    run.wait("a poll of the HTTP 500", |c| downs(c) >= 1).await;
    ollama.set_fault(Fault::Garbage);
    let before = downs(&run.capture);
    run.wait("two polls of garbage", |c| downs(c) >= before + 2)
        .await;
    ollama.set_fault(Fault::Hang);
    let before = downs(&run.capture);
    run.wait("a poll of the hang", |c| downs(c) > before).await;
    ollama.set_fault(Fault::None);
    run.wait("up again", |c| ups(c).last() == Some(&1.0)).await;
    let polls = scrapes_by_resource(&run.stop().await, "service.name")
        .remove("ollama")
        .unwrap();

    let ups: Vec<f64> = polls.iter().map(|p| p.gauge("up").unwrap()).collect();
    let first_down = ups
        .iter()
        .position(|u| *u == 0.0)
        .expect("the outage shows as up = 0");
    assert!(ups[..first_down].iter().all(|u| *u == 1.0));
    assert_eq!(
        ups.last(),
        Some(&1.0),
        "recovered after the outage: {ups:?}"
    );
    assert!(
        ups.len() >= 7,
        "kept polling through errors and hangs: {ups:?}"
    );

    let ok = &polls[0];
    assert_eq!(ok.attrs["gen_ai.provider.name"], "ollama");
    assert_eq!(ok.attrs["gen_ai.pool.name"], "local");
    assert_eq!(ok.attrs["service.version"], "0.6.2", "from /api/version");
    assert_eq!(
        ok.attrs["service.instance.id"],
        ollama.addr.to_string(),
        "`instance` like a scraped server's"
    );
    assert_eq!(ok.gauge("ollama.models.loaded"), Some(2.0));
    let usage = ok.metrics["gen_ai.server.kv_cache.usage"].clone();
    let expected = 6654289920.0 / (24.0 * 1024.0 * 1024.0 * 1024.0) * 100.0;
    assert!(
        (ok.gauge("gen_ai.server.kv_cache.usage").unwrap() - expected).abs() < 1e-9,
        "{usage:?}"
    );

    let down = &polls[first_down];
    assert!(
        !down.metrics.contains_key("gen_ai.server.kv_cache.usage"),
        "no stale per-model series while down"
    );
    assert!(!down.attrs.contains_key("service.version"));
}
