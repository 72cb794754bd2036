//! The scraping receivers against engine simulators serving the fixture pages.

mod common;

use std::time::Duration;

use common::{run_for, run_until, scrape_counts, scrapes};
use genai_collector_core::model::{metric, MetricExt};
use genai_collector_testkit::sim::{self, EngineKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_and_tgi_pages_flow_with_engine_identity() {
    let v1 = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let v0 = sim::start(EngineKind::VllmV0, "127.0.0.1:0").await.unwrap();
    let tgi = sim::start(EngineKind::Tgi, "127.0.0.1:0").await.unwrap();
    let yaml = format!(
        r#"
receivers:
  vllm/chat:
    targets: [{v1}, "{v0}"]
    interval: 200ms
    pool: chat
  tgi:
    targets: ["{tgi}"]
    interval: 200ms
exporters:
  capture: {{}}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [vllm/chat, tgi], exporters: [capture] }}
"#,
        v1 = v1.addr,
        v0 = v0.metrics_url(),
        tgi = tgi.metrics_url()
    );
    let (v1_url, v0_url, tgi_url) = (v1.metrics_url(), v0.metrics_url(), tgi.metrics_url());
    let capture = run_until(
        &yaml,
        Duration::from_secs(30),
        "4 scrapes of V1, one of V0 and TGI",
        |c| {
            let n = scrape_counts(c);
            let count = |u: &String| n.get(u).copied().unwrap_or(0);
            count(&v1_url) >= 4 && count(&v0_url) >= 1 && count(&tgi_url) >= 1
        },
    )
    .await;
    let by_target = scrapes(&capture);
    assert_eq!(
        by_target.len(),
        3,
        "{:?}",
        by_target.keys().collect::<Vec<_>>()
    );

    let v1_scrapes = &by_target[&v1.metrics_url()];
    let first = &v1_scrapes[0];
    assert_eq!(first.gauge("up"), Some(1.0));
    assert_eq!(first.attrs["gen_ai.provider.name"], "vllm");
    assert_eq!(first.attrs["gen_ai.pool.name"], "chat");
    assert_eq!(first.attrs["service.name"], "vllm/chat");
    assert_eq!(first.attrs["server.port"], v1.addr.port().to_string());
    let kv = first.gauge("vllm:kv_cache_usage_perc").unwrap();
    assert!((0.0..=1.0).contains(&kv));
    assert!(
        first.gauge("vllm:num_gpu_blocks").unwrap() > 0.0,
        "engine facts from cache_config_info"
    );
    assert!(first.gauge("scrape_samples_scraped").unwrap() > 50.0);

    // Counters grow and keep their start time across scrapes.
    let sums: Vec<(u64, f64)> = v1_scrapes
        .iter()
        .map(|s| {
            let Some(metric::Data::Sum(sum)) = &s.metrics["vllm:prompt_tokens_total"].data else {
                panic!("sum")
            };
            let p = &sum.data_points[0];
            (
                p.start_time_unix_nano,
                genai_collector_core::model::number_value(p).unwrap(),
            )
        })
        .collect();
    assert!(
        sums.windows(2)
            .all(|w| w[0].0 == w[1].0 && w[1].1 >= w[0].1),
        "{sums:?}"
    );
    let last = &v1_scrapes[v1_scrapes.len() - 1];
    let Some(metric::Data::Histogram(h)) = &last.metrics["vllm:e2e_request_latency_seconds"].data
    else {
        panic!("histogram")
    };
    assert_eq!(
        h.data_points[0].bucket_counts.iter().sum::<u64>(),
        h.data_points[0].count
    );

    let v0_first = &by_target[&v0.metrics_url()][0];
    assert!(
        v0_first.gauge("vllm:gpu_cache_usage_perc").is_some(),
        "V0 names are read too"
    );

    let tgi_first = &by_target[&tgi.metrics_url()][0];
    assert_eq!(tgi_first.attrs["gen_ai.provider.name"], "tgi");
    assert_eq!(
        tgi_first.attrs["gen_ai.request.model"], "meta-llama/Llama-3.1-8B-Instruct",
        "model from TGI's /info"
    );
    assert!(tgi_first.gauge("tgi_queue_size").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_targets_follow_the_file() {
    let a = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let b = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let dir = std::env::temp_dir().join(format!("file-sd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("targets.yaml");
    std::fs::write(
        &file,
        format!(
            "- targets: [\"{}\"]\n  labels: {{ k8s.pod.name: vllm-a }}\n",
            a.addr
        ),
    )
    .unwrap();
    let yaml = format!(
        "receivers:\n  prometheus:\n    file_targets: [\"{}\"]\n    interval: 150ms\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [prometheus], exporters: [capture] }}\n",
        file.display()
    );
    let run = tokio::spawn(async move { run_for(&yaml, 2.0).await });
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert!(a.requests() > 0, "the listed target is scraped");
    std::fs::write(&file, format!("- \"{}\"\n", b.metrics_url())).unwrap();
    // Give the change (checked every interval) time to land, then watch `a` stop.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let a_after = a.requests();
    let capture = run.await.unwrap();
    assert_eq!(
        a.requests(),
        a_after,
        "a removed target is no longer scraped"
    );
    assert!(
        b.requests() > 0,
        "an added target is scraped without a restart"
    );
    let by_target = scrapes(&capture);
    assert_eq!(
        by_target[&a.metrics_url()][0].attrs["k8s.pod.name"],
        "vllm-a",
        "file_sd labels become resource attributes"
    );
    assert!(by_target[&b.metrics_url()]
        .iter()
        .all(|s| s.gauge("up") == Some(1.0)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_a_hundred_thousand_series() {
    let dup = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    dup.set_fault(sim::Fault::Duplicates);
    let many = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    many.set_fault(sim::Fault::ManySeries(100_000));
    let yaml = format!(
        "receivers:\n  vllm:\n    targets: [\"{}\", \"{}\"]\n    interval: 1s\n    timeout: 900ms\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [vllm], exporters: [capture] }}\n",
        dup.metrics_url(),
        many.metrics_url()
    );
    // A debug build parsing 100,000 series on a loaded 2-core machine needs the time.
    let urls = [dup.metrics_url(), many.metrics_url()];
    let capture = run_until(&yaml, Duration::from_secs(60), "a scrape of each", |c| {
        let n = scrape_counts(c);
        urls.iter().all(|u| n.contains_key(u))
    })
    .await;
    let by_target = scrapes(&capture);
    let d = &by_target[&dup.metrics_url()][0];
    assert_eq!(
        d.gauge("up"),
        Some(1.0),
        "duplicate series are kept once, not an error"
    );
    assert_eq!(d.metrics["vllm:num_requests_running"].point_count(), 1);
    let m = &by_target[&many.metrics_url()][0];
    assert_eq!(m.gauge("up"), Some(1.0));
    assert_eq!(m.gauge("scrape_samples_scraped"), Some(100_000.0));
    assert_eq!(
        m.metrics["vllm:num_requests_running"].point_count(),
        100_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_pages_come_out_normalised() {
    let v1 = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let tgi = sim::start(EngineKind::Tgi, "127.0.0.1:0").await.unwrap();
    let yaml = format!(
        "receivers:\n  vllm: {{ targets: [\"{}\"], interval: 200ms }}\n  tgi: {{ targets: [\"{}\"], interval: 200ms }}\nprocessors:\n  genai_normalize: {{}}\n  percentages: {{}}\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [vllm, tgi], processors: [genai_normalize, percentages], exporters: [capture] }}\n",
        v1.metrics_url(),
        tgi.metrics_url()
    );
    let urls = [v1.metrics_url(), tgi.metrics_url()];
    let capture = run_until(&yaml, Duration::from_secs(30), "a scrape of each", |c| {
        let n = scrape_counts(c);
        urls.iter().all(|u| n.contains_key(u))
    })
    .await;
    let by_target = scrapes(&capture);
    let v = &by_target[&v1.metrics_url()][0];
    let usage = v.gauge("gen_ai.server.kv_cache.usage").unwrap();
    assert!(
        (0.0..=100.0).contains(&usage) && usage > 1.0,
        "percent, not ratio: {usage}"
    );
    assert_eq!(v.metrics["gen_ai.server.kv_cache.usage"].unit, "%");
    let Some(metric::Data::Sum(tokens)) = &v.metrics["gen_ai.server.token.usage"].data else {
        panic!("sum")
    };
    assert_eq!(tokens.data_points.len(), 2, "input and output");
    for name in [
        "gen_ai.server.requests.running",
        "gen_ai.server.requests.waiting",
        "gen_ai.server.request.duration",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
        "gen_ai.server.inter_token_latency",
        "gen_ai.server.prefix_cache.hits",
        "gen_ai.server.requests.finished",
    ] {
        assert!(v.metrics.contains_key(name), "vLLM V1 gives {name}");
    }
    let t = &by_target[&tgi.metrics_url()][0];
    let Some(metric::Data::Gauge(queue)) = &t.metrics["gen_ai.server.requests.waiting"].data else {
        panic!("gauge")
    };
    use genai_collector_core::model::AttributesExt;
    assert_eq!(
        queue.data_points[0]
            .attributes
            .get_str("gen_ai.request.model"),
        Some("meta-llama/Llama-3.1-8B-Instruct"),
        "TGI's model from /info on every point"
    );
    // TGI's KV stand-in: the running batch's token ceiling over /info's max_batch_total_tokens.
    let limit = t.gauge("gen_ai.server.kv_cache.tokens.limit").unwrap();
    assert_eq!(
        limit, 196608.0,
        "from tests/fixtures/tgi/info-composed.json"
    );
    let used = t.gauge("gen_ai.server.kv_cache.tokens.usage").unwrap();
    assert_eq!(
        t.gauge("gen_ai.server.kv_cache.usage"),
        Some(used / limit * 100.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_from_scraped_servers() {
    let a = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let b = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let yaml = format!(
        "receivers:\n  vllm/chat: {{ targets: [\"{}\", \"{}\", \"127.0.0.1:1\"], interval: 200ms, pool: chat }}\nprocessors:\n  genai_normalize: {{}}\n  percentages: {{ max_requests: 64 }}\n  pool_aggregate: {{ interval: 300ms, compat: gateway_api_inference_extension }}\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [vllm/chat], processors: [genai_normalize, percentages, pool_aggregate], exporters: [capture] }}\n",
        a.addr, b.addr
    );
    let capture = run_for(&yaml, 1.4).await;
    let pools = common::scrapes_by_resource(&capture, "service.name")
        .remove("genai-collector/pool_aggregate")
        .expect("pool series");
    let last = pools.last().unwrap();
    assert_eq!(last.attrs["gen_ai.pool.name"], "chat");
    assert_eq!(
        last.gauge("gen_ai.pool.servers.ready"),
        Some(2.0),
        "the target that never answers is not ready"
    );
    assert_eq!(last.gauge("inference_pool_ready_pods"), Some(2.0));
    let kv = last.gauge("gen_ai.pool.kv_cache.usage.average").unwrap();
    assert!((0.0..=100.0).contains(&kv));
    assert!(
        (last
            .gauge("inference_pool_average_kv_cache_utilization")
            .unwrap()
            - kv / 100.0)
            .abs()
            < 1e-9
    );
    let running = last.gauge("gen_ai.pool.requests.running").unwrap();
    let capacity = last.gauge("gen_ai.pool.capacity.usage").unwrap();
    assert!(
        (capacity - running / 128.0 * 100.0).abs() < 1e-9,
        "capacity over two servers of 64: {capacity} for {running}"
    );
    let per_server = scrapes(&capture);
    let server = &per_server[&a.metrics_url()].last().unwrap();
    assert!(
        server.gauge("gen_ai.server.capacity.usage").is_some(),
        "percentages per server"
    );
}

/// llama.cpp's real page carries no labels: the `llamacpp` receiver adds the model and build
/// from `/props` (both captured from the same llama-server) and its slots as the maximum, so
/// the page normalises like any engine's and gets a capacity percentage; `/slots` (captured
/// from that server too) gives the tokens held in the KV cache on every scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_gets_its_model_and_slots_from_props() {
    let server = sim::start(EngineKind::LlamaCpp, "127.0.0.1:0")
        .await
        .unwrap();
    let props: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            sim::fixtures_dir().join("llamacpp/props-0c1e570-tiny-random.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let yaml = format!(
        "receivers:\n  llamacpp: {{ targets: [\"{}\"], interval: 200ms }}\nprocessors:\n  genai_normalize: {{}}\n  percentages: {{}}\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [llamacpp], processors: [genai_normalize, percentages], exporters: [capture] }}\n",
        server.addr
    );
    let url = server.metrics_url();
    let capture = run_until(&yaml, Duration::from_secs(30), "a scrape", |c| {
        scrape_counts(c).contains_key(&url)
    })
    .await;
    let polls = &scrapes(&capture)[&server.metrics_url()];
    let s = polls.last().unwrap();
    assert_eq!(s.gauge("up"), Some(1.0));
    assert_eq!(s.attrs["gen_ai.provider.name"], "llama.cpp");
    assert_eq!(
        s.attrs["service.version"],
        props["build_info"].as_str().unwrap()
    );
    let model = props["model_alias"].as_str().unwrap();
    let slots = props["total_slots"].as_f64().unwrap();
    assert_eq!(s.gauge("gen_ai.server.requests.max"), Some(slots));
    let running = s.gauge("gen_ai.server.requests.running").unwrap();
    assert!((0.0..=slots).contains(&running), "{running} of {slots}");
    let capacity = s.gauge("gen_ai.server.capacity.usage").unwrap();
    assert!((capacity - running / slots * 100.0).abs() < 1e-9);
    // /slots on every scrape: the tokens the slots hold in the KV cache (61 + 49).
    assert_eq!(s.gauge("gen_ai.server.kv_cache.tokens.usage"), Some(110.0));
    use genai_collector_core::model::AttributesExt;
    let Some(metric::Data::Sum(tokens)) = &s.metrics["gen_ai.server.token.usage"].data else {
        panic!("sum")
    };
    assert_eq!(tokens.data_points.len(), 2, "prompt and predicted tokens");
    for p in &tokens.data_points {
        assert_eq!(p.attributes.get_str("gen_ai.request.model"), Some(model));
    }
}

/// Datadog's vLLM fixture has old and new names side by side (both KV gauges; the per-step
/// latency as `time_per_output_token` and `inter_token_latency`) and the per-request time per
/// output token: after `genai_normalize` each series is there once, OTel's time per output
/// token comes from the per-request histogram and the per-step one is its own metric.
#[test]
fn old_and_new_vllm_names_on_one_page_count_once() {
    use genai_collector_core::model::{kv, AttributesExt};
    use genai_collector_receivers::scrape::convert::Converter;
    use genai_collector_receivers::scrape::text::{parse, Format};

    let text = std::fs::read_to_string(
        sim::fixtures_dir().join("vllm/datadog-integrations-core-vllm_metrics.txt"),
    )
    .unwrap();
    let page = parse(&text, Format::Prometheus).unwrap();
    let (mut batch, _) =
        Converter::new().convert(&page, 1, vec![kv("gen_ai.provider.name", "vllm")]);
    common::normalize(&mut batch);
    let metric = |name: &str| {
        batch
            .metrics()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .clone()
    };
    common::assert_each_series_once(&batch, "Datadog's vLLM page");
    let histogram_count = |name: &str| match &metric(name).data {
        Some(metric::Data::Histogram(h)) => h.data_points.iter().map(|p| p.count).sum::<u64>(),
        _ => panic!("{name} is a histogram"),
    };
    assert_eq!(
        histogram_count("gen_ai.server.time_per_output_token"),
        6,
        "one observation per request"
    );
    assert_eq!(
        histogram_count("gen_ai.server.inter_token_latency"),
        144,
        "per step, from inter_token_latency alone"
    );
    let Some(metric::Data::Gauge(kv_usage)) = &metric("gen_ai.server.kv_cache.usage").data else {
        panic!("gauge")
    };
    assert_eq!(kv_usage.data_points.len(), 1);
    assert_eq!(
        kv_usage.data_points[0]
            .attributes
            .get_str("gen_ai.request.model"),
        Some("facebook/opt-125m")
    );
}
