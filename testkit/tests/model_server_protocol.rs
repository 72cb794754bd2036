//! The Inference Extension bridge: a TGI, a llama.cpp and a vLLM simulator, each behind its own
//! `model_server_protocol` exporter as a sidecar would run it. Each page is parsed by our
//! strict parser and checked against what the endpoint picker reads: the queue and running
//! requests as the engine counts them, the KV cache as a 0..1 ratio equal to the normalised
//! percentage, LoRA info with its three labels where the engine knows its adapters, nothing
//! made up where it does not, and an empty page once the engine stops answering.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::Service;
use genai_collector_exporters::model_server_protocol::NAMES;
use genai_collector_receivers::scrape::text::{parse, Format};
use genai_collector_testkit::sim::{self, EngineKind, Fault};
use genai_collector_testkit::{components, eventually, free_port, Capture};

/// A sample's labels and value.
type Sample = (Vec<(String, String)>, f64);

/// The page's samples by name; `None` when the page does not parse.
fn samples(page: &str) -> Option<BTreeMap<String, Sample>> {
    let parsed = parse(page, Format::Prometheus).ok()?;
    let mut out = BTreeMap::new();
    for f in &parsed.families {
        for s in &f.samples {
            let labels = parsed
                .labels_of(s)
                .iter()
                .map(|l| (l.name.to_owned(), l.value.to_string()))
                .collect();
            out.insert(s.name.to_owned(), (labels, s.value));
        }
    }
    Some(out)
}

async fn page(port: u16) -> String {
    common::fetch(&format!("http://127.0.0.1:{port}/metrics")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_llamacpp_and_vllm_pods_speak_the_endpoint_pickers_protocol() {
    common::install_tls_provider();
    let tgi = sim::start(EngineKind::Tgi, "127.0.0.1:0").await.unwrap();
    let llama = sim::start(EngineKind::LlamaCpp, "127.0.0.1:0")
        .await
        .unwrap();
    let vllm = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    for s in [&tgi, &llama, &vllm] {
        s.set_load(Some(1.0));
    }
    let ports = [free_port(), free_port(), free_port()];
    let yaml = format!(
        r#"
receivers:
  tgi: {{ targets: ["{}"], interval: 200ms }}
  llamacpp: {{ targets: ["{}"], interval: 200ms }}
  vllm: {{ targets: ["{}"], interval: 200ms }}
processors:
  genai_normalize: {{}}
  percentages: {{}}
exporters:
  model_server_protocol/tgi: {{ endpoint: "127.0.0.1:{}", stale_after: 1s }}
  model_server_protocol/llama: {{ endpoint: "127.0.0.1:{}", stale_after: 1s }}
  model_server_protocol/vllm: {{ endpoint: "127.0.0.1:{}", stale_after: 1s }}
  capture:
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics/tgi: {{ receivers: [tgi], processors: [genai_normalize, percentages], exporters: [model_server_protocol/tgi, capture] }}
    metrics/llama: {{ receivers: [llamacpp], processors: [genai_normalize, percentages], exporters: [model_server_protocol/llama] }}
    metrics/vllm: {{ receivers: [vllm], processors: [genai_normalize, percentages], exporters: [model_server_protocol/vllm] }}
"#,
        tgi.metrics_url(),
        llama.metrics_url(),
        vllm.metrics_url(),
        ports[0],
        ports[1],
        ports[2],
    );
    let capture = Capture::new();
    let comps = components(&capture);
    let cfg = config::load(&[Source::new("sidecar.yaml", yaml)], &comps).unwrap();
    let running = Service::build(cfg, &comps).unwrap().start().await.unwrap();
    for p in ports {
        common::listening(p).await;
    }

    // Each page: only the picker's names, parsed strictly; the queue and running requests are
    // the simulators' at full load (20 waiting; every slot busy).
    let mut pages = Vec::new();
    for (port, running_requests) in [(ports[0], 64.0), (ports[1], 4.0), (ports[2], 64.0)] {
        let mut got = BTreeMap::new();
        for _ in 0..100 {
            got = samples(&page(port).await).expect("the page parses");
            if got.contains_key("vllm:num_requests_waiting") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(got.keys().all(|n| NAMES.contains(&n.as_str())), "{got:?}");
        assert_eq!(got["vllm:num_requests_waiting"].1, 20.0, "{got:?}");
        assert_eq!(
            got["vllm:num_requests_running"].1, running_requests,
            "{got:?}"
        );
        pages.push(got);
    }
    let [tgi_page, llama_page, vllm_page] = [&pages[0], &pages[1], &pages[2]];

    // KV: a ratio, the same on both names, and TGI's equal to its normalised percentage / 100.
    let kv = tgi_page["vllm:kv_cache_usage_perc"].1;
    assert!((0.0..=1.0).contains(&kv), "{kv}");
    assert_eq!(tgi_page["vllm:gpu_cache_usage_perc"].1, kv);
    let normalised = eventually(Duration::from_secs(10), "TGI's KV usage", || {
        common::scrapes(&capture)
            .values()
            .flatten()
            .filter_map(|s| s.gauge("gen_ai.server.kv_cache.usage"))
            .next_back()
    })
    .await;
    assert!(
        (kv - normalised / 100.0).abs() < 0.02,
        "{kv} vs {normalised} %"
    );
    let vllm_kv = vllm_page["vllm:kv_cache_usage_perc"].1;
    assert!(
        (vllm_kv - 0.95).abs() < 1e-9,
        "the simulator's 0.95: {vllm_kv}"
    );
    // llama.cpp's API gives no cache size: no KV figure rather than a made-up one.
    assert!(
        !llama_page.contains_key("vllm:kv_cache_usage_perc"),
        "{llama_page:?}"
    );

    // LoRA info where the engine knows its adapters (vLLM's max_lora), with the three labels.
    let (labels, updated) = &vllm_page["vllm:lora_requests_info"];
    let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["max_lora", "running_lora_adapters", "waiting_lora_adapters"]
    );
    assert!(
        labels[0].1.parse::<f64>().is_ok_and(|m| m > 0.0),
        "{labels:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - updated).abs() < 60.0,
        "the value is when it was updated"
    );
    assert!(!tgi_page.contains_key("vllm:lora_requests_info"));

    // The engine stops answering: the page empties rather than freezing.
    tgi.set_fault(Fault::Status500);
    let mut emptied = false;
    for _ in 0..50 {
        if page(ports[0]).await.is_empty() {
            emptied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(emptied, "a stale engine's figures are withdrawn");
    running.run_until(std::future::ready(())).await;
}
