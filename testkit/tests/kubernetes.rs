//! Pod discovery against a fake Kubernetes API server that answers list and watch requests the
//! way the real one does (PodList, then a stream of ADDED/MODIFIED/DELETED/ERROR events), built
//! from tests/fixtures/kubernetes/pod-vllm.json. Targets follow pods as they are added,
//! relabelled and deleted, and after the watch fails and the pods are listed again; a forbidden
//! or unreachable API server leaves the static targets scraping and says why. With the fake
//! kubelet, `efficiency` gives each pod the joules of the GPU the kubelet allocated to it, and
//! reports the idle one.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kube::{event, kubeconfig, Msg};
use genai_collector_core::config::{self, Source};
use genai_collector_core::{ComponentKind, Service};
use genai_collector_testkit::sim::{self, fixtures_dir, EngineKind};
use genai_collector_testkit::{components, Capture};
use serde_json::{json, Value};

async fn start_pods(forbidden: bool, initial: Vec<Value>) -> (common::kube::Fake, u16) {
    common::kube::start_fake("/api/v1/pods", "PodList", forbidden, initial).await
}

/// A pod from the fixture with the name, uid, IP, scrape port and labels a case needs.
fn pod(name: &str, port: Option<u16>, pool: &str, phase: &str) -> Value {
    let text = std::fs::read_to_string(fixtures_dir().join("kubernetes/pod-vllm.json")).unwrap();
    let mut p: Value = serde_json::from_str(&text).unwrap();
    p["metadata"]["name"] = json!(name);
    p["metadata"]["uid"] = json!(format!("uid-{name}"));
    p["metadata"]["labels"]["inference.networking.k8s.io/pool"] = json!(pool);
    match port {
        Some(port) => p["metadata"]["annotations"]["prometheus.io/port"] = json!(port.to_string()),
        None => {
            p["metadata"]["annotations"]
                .as_object_mut()
                .unwrap()
                .remove("prometheus.io/port");
        }
    }
    p["status"]["phase"] = json!(phase);
    p["status"]["podIP"] = json!("127.0.0.1");
    p
}

/// The pods scraped in the last `window`, with the pool each scrape carried.
fn recent(capture: &Capture, since: usize) -> HashMap<String, String> {
    let batches = capture.batches();
    let mut out = HashMap::new();
    for b in &batches[since.min(batches.len())..] {
        let attrs = common::resource_attrs(b);
        use genai_collector_core::model::AttributesExt;
        if let Some(pod) = attrs.get_str("k8s.pod.name") {
            let pool = attrs.get_str("gen_ai.pool.name").unwrap_or("").to_owned();
            out.insert(pod.to_owned(), pool);
        }
    }
    out
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    genai_collector_testkit::eventually(Duration::from_secs(15), what, || check().then_some(()))
        .await
}

/// Pods seen in a whole scrape round that began after the receiver went down to `n` targets
/// (a scrape already in flight when a target left may still deliver; the round after may not).
async fn after_targets_settle(
    capture: &Capture,
    stats: &genai_collector_core::telemetry::ComponentStats,
    n: u64,
) -> HashMap<String, String> {
    until("the receiver's targets settle", || {
        stats.snapshot().targets == n
    })
    .await;
    let settled = capture.batches().len();
    until("one more scrape round", || {
        capture.batches().len() > settled + n as usize
    })
    .await;
    let mark = capture.batches().len();
    until("a whole round after it", || {
        capture.batches().len() >= mark + 2 * n as usize
    })
    .await;
    recent(capture, mark)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_follow_pods_through_watch_and_relist() {
    let a = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let b = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let (pa, pb) = (a.addr.port(), b.addr.port());
    let (fake, api) = start_pods(
        false,
        vec![
            pod("vllm-a", Some(pa), "chat", "Running"),
            pod("vllm-pending", Some(pb), "chat", "Pending"),
            pod("vllm-no-port", None, "chat", "Running"),
        ],
    )
    .await;
    let dir = std::env::temp_dir().join(format!("k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        r#"
receivers:
  vllm:
    interval: 200ms
    kubernetes:
      label_selector: app=vllm
      node: gpu-node-1
      kubeconfig: "{}"
exporters:
  capture:
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [vllm], exporters: [capture] }}
"#,
        kubeconfig(&dir, api).display()
    );
    let capture = Capture::new();
    let comps = components(&capture);
    let cfg = config::load(&[Source::new("k8s.yaml", yaml)], &comps).unwrap();
    let service = Service::build(cfg, &comps).unwrap();
    let stats = service
        .telemetry()
        .find(ComponentKind::Receiver, "vllm")
        .unwrap();
    let running = service.start().await.unwrap();

    until("the listed running pod is scraped", || {
        recent(&capture, 0).get("vllm-a").map(String::as_str) == Some("chat")
    })
    .await;
    let seen = recent(&capture, 0);
    assert!(
        !seen.contains_key("vllm-pending"),
        "a pending pod is not a target"
    );
    assert!(
        !seen.contains_key("vllm-no-port"),
        "a pod without a port is skipped"
    );
    let queries = fake.seen.lock().unwrap().clone();
    assert!(
        queries[0].contains("fieldSelector=spec.nodeName=gpu-node-1")
            && queries[0].contains("labelSelector=app=vllm"),
        "the agent asks for its node's pods only: {queries:?}"
    );

    // Added while watching.
    until("the watch is open", || fake.events.receiver_count() > 0).await;
    event(&fake, "ADDED", pod("vllm-b", Some(pb), "chat", "Running"));
    let mark = capture.batches().len();
    until("the added pod is scraped", || {
        recent(&capture, mark).contains_key("vllm-b")
    })
    .await;

    // Relabelled into another pool.
    event(
        &fake,
        "MODIFIED",
        pod("vllm-a", Some(pa), "batch", "Running"),
    );
    let mark = capture.batches().len();
    until("the relabelled pod carries its new pool", || {
        recent(&capture, mark).get("vllm-a").map(String::as_str) == Some("batch")
    })
    .await;

    // Deleted.
    event(&fake, "DELETED", pod("vllm-b", Some(pb), "chat", "Running"));
    let after = after_targets_settle(&capture, &stats, 1).await;
    assert!(
        !after.contains_key("vllm-b"),
        "a deleted pod is no longer scraped"
    );
    assert!(after.contains_key("vllm-a"));

    // The watch fails (410 Gone, then the stream ends): the pods are listed again, and the
    // list now says vllm-a is gone and vllm-b is back.
    let lists_before = fake
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|q| !q.contains("watch=true"))
        .count();
    *fake.pods.lock().unwrap() = vec![pod("vllm-b", Some(pb), "chat", "Running")];
    let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "too old resource version: 100 (200)", "reason": "Expired", "code": 410});
    event(&fake, "ERROR", gone);
    let _ = fake.events.send(Msg::Close);
    until("the pods are listed again", || {
        fake.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|q| !q.contains("watch=true"))
            .count()
            > lists_before
    })
    .await;
    let after = after_targets_settle(&capture, &stats, 1).await;
    assert!(
        after.contains_key("vllm-b") && !after.contains_key("vllm-a"),
        "{after:?}"
    );

    running.run_until(std::future::ready(())).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_or_unreachable_api_keeps_static_targets_and_says_why() {
    let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let (_fake, api) = start_pods(true, Vec::new()).await;
    let closed = common::free_port();
    let dir = std::env::temp_dir().join(format!("k8s-rbac-{}", std::process::id()));
    for (name, port) in [("forbidden", api), ("unreachable", closed)] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let yaml = format!(
            "receivers:\n  vllm:\n    interval: 200ms\n    targets: [\"{}\"]\n    kubernetes: {{ kubeconfig: \"{}\" }}\nexporters:\n  capture:\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [vllm], exporters: [capture] }}\n",
            s.metrics_url(),
            kubeconfig(&d, port).display()
        );
        let capture = Capture::new();
        let comps = components(&capture);
        let cfg = config::load(&[Source::new("k8s.yaml", yaml)], &comps).unwrap();
        let service = Service::build(cfg, &comps).unwrap();
        let telemetry = service.telemetry().clone();
        let running = service.start().await.unwrap();
        let stats = telemetry.find(ComponentKind::Receiver, "vllm").unwrap();
        until("the API error is reported", || {
            stats
                .last_error()
                .is_some_and(|e| e.starts_with("kubernetes:"))
        })
        .await;
        let error = stats.last_error().unwrap();
        if name == "forbidden" {
            assert!(
                error.contains("RBAC forbids `list` on pods")
                    && error.contains("get, list and watch"),
                "{error}"
            );
        }
        let ups = || -> Vec<f64> {
            common::scrapes(&capture)
                .values()
                .flatten()
                .filter_map(|s| s.gauge("up"))
                .collect()
        };
        let before = ups().len();
        until("two scrapes after the error", || ups().len() >= before + 2).await;
        let up = ups();
        assert!(
            up.len() >= 2 && up.iter().all(|v| *v == 1.0),
            "{name}: the static target keeps being scraped: {up:?}"
        );
        running.run_until(std::future::ready(())).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pipeline in a shipped manifest's ConfigMap (deploy/kubernetes/), to adapt for a test.
fn shipped_pipeline(manifest: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let text = std::fs::read_to_string(path.join(manifest)).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let map = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    serde_saphyr::from_str(map["data"]["config.yaml"].as_str().unwrap()).unwrap()
}

/// A collector process started as the manifests start it (`-c <file>`), killed on drop.
struct Collector(std::process::Child);

impl Collector {
    fn start(dir: &std::path::Path, name: &str, pipeline: &Value) -> Collector {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, pipeline.to_string()).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_testkit-collector"))
            .arg("-c")
            .arg(&file)
            .env("NODE_NAME", "gpu-node-1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Collector(child)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sample lines of a page whose name is `name` and whose labels include every `labels` pair.
fn samples<'a>(page: &'a str, name: &str, labels: &[&str]) -> Vec<&'a str> {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|kv| l.contains(kv)))
        .collect()
}

/// The agent and gateway pipelines exactly as deploy/kubernetes/ ships them (only addresses,
/// paths and intervals changed), as two processes: the agent finds its node's vLLM, TGI and
/// llama.cpp pods through the API server, scrapes and normalises them and sends OTLP to the
/// gateway, which serves per-pool aggregates on its Prometheus endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_agent_and_gateway_pipelines_end_to_end() {
    common::install_tls_provider();
    let a = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let b = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let t = sim::start(EngineKind::Tgi, "127.0.0.1:0").await.unwrap();
    let l = sim::start(EngineKind::LlamaCpp, "127.0.0.1:0")
        .await
        .unwrap();
    let engine_pod = |name: &str, port: u16, pool: &str, engine: &str| {
        let mut p = pod(name, Some(port), pool, "Running");
        p["metadata"]["labels"]["genai-collector.io/engine"] = json!(engine);
        p
    };
    let (_fake, api) = start_pods(
        false,
        vec![
            engine_pod("vllm-a", a.addr.port(), "chat", "vllm"),
            engine_pod("vllm-b", b.addr.port(), "chat", "vllm"),
            engine_pod("tgi-a", t.addr.port(), "support", "tgi"),
            engine_pod("llama-a", l.addr.port(), "edge", "llamacpp"),
        ],
    )
    .await;
    let dir = std::env::temp_dir().join(format!("k8s-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = kubeconfig(&dir, api);
    let local = |port: u16| format!("127.0.0.1:{port}");

    let mut gateway = shipped_pipeline("gateway.yaml");
    let (grpc, metrics) = (common::free_port(), common::free_port());
    let otlp = &mut gateway["receivers"]["otlp"]["protocols"];
    otlp["grpc"]["endpoint"] = json!(local(grpc));
    otlp["http"]["endpoint"] = json!(local(common::free_port()));
    gateway["processors"]["pool_aggregate"]["interval"] = json!("1s");
    gateway["exporters"]["prometheus"]["endpoint"] = json!(local(metrics));
    gateway["exporters"]["keda_scaler"]["endpoint"] = json!(local(common::free_port()));
    gateway["service"]["telemetry"]["endpoint"] = json!(local(common::free_port()));

    let mut agent = shipped_pipeline("agent.yaml");
    for engine in ["vllm", "tgi", "llamacpp"] {
        let r = &mut agent["receivers"][engine];
        r["interval"] = json!("300ms");
        r["kubernetes"]["kubeconfig"] = json!(kubeconfig.display().to_string());
    }
    // The headless Service's addresses stand for one gateway here.
    agent["exporters"]["loadbalancing"]["resolver"] =
        json!({"static": {"hostnames": [local(grpc)]}});
    agent["exporters"]["loadbalancing"]["sending_queue"]["storage"] =
        json!(dir.join("queue").display().to_string());
    let agent_telemetry = common::free_port();
    agent["service"]["telemetry"]["endpoint"] = json!(local(agent_telemetry));

    let _gateway = Collector::start(&dir, "gateway", &gateway);
    let _agent = Collector::start(&dir, "agent", &agent);

    let url = format!("http://{}/metrics", local(metrics));
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let page = match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let ready = |pool: &str| {
            samples(
                &page,
                "inference_pool_ready_pods",
                &[&format!("name=\"{pool}\"")],
            )
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .next_back()
        };
        if ready("chat") == Some(2.0) && ready("support") == Some(1.0) && ready("edge") == Some(1.0)
        {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never counted 2 ready pods in `chat`, 1 in `support`, 1 in `edge`:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };

    // Every engine pod's normalised series reached the gateway, labelled with its pod, and
    // the agent's node (from NODE_NAME through the `attributes` processor).
    for pod in ["vllm-a", "vllm-b", "tgi-a", "llama-a"] {
        let info = samples(&page, "target_info", &[&format!("k8s_pod_name=\"{pod}\"")]);
        assert!(
            info.iter()
                .any(|l| l.contains("k8s_node_name=\"gpu-node-1\"")
                    && l.contains("k8s_namespace_name=\"inference\"")),
            "{pod}: {info:?}"
        );
    }
    for pod in ["vllm-a", "vllm-b", "llama-a"] {
        assert!(
            !samples(
                &page,
                "gen_ai_server_requests_running",
                &[&format!("k8s_pod_name=\"{pod}\""), "k8s_node_name=\"gpu-node-1\""]
            )
            .is_empty(),
            "{pod}: normalised engine series labelled with the pod and node (the gateway promotes them)"
        );
    }
    let chat_queue = samples(&page, "gen_ai_pool_queue_size_average", &[]);
    assert!(!chat_queue.is_empty(), "pool aggregates in our names too");

    // The Inference Extension's per-model series, derived from the engines' own, under its
    // names and labels; the request counter counts what the engines added since the gateway
    // first saw them.
    let model = r#"model_name="meta-llama/Llama-3.1-8B-Instruct""#;
    for name in [
        "inference_objective_request_total",
        "inference_objective_request_duration_seconds_bucket",
        "inference_objective_input_tokens_bucket",
        "inference_objective_output_tokens_bucket",
        "inference_objective_running_requests",
    ] {
        assert!(
            !samples(&page, name, &[model]).is_empty(),
            "{name}:\n{page}"
        );
    }
    let requests = |page: &str| {
        samples(page, "inference_objective_request_total", &[model])
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = common::fetch(&url).await;
        if requests(&now) > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the objective counter never moved:\n{now}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The agent says how many pods each receiver found; receivers without targets say nothing.
    let own = common::fetch(&format!("http://{}/metrics", local(agent_telemetry))).await;
    for (receiver, n) in [("vllm", "2"), ("tgi", "1"), ("llamacpp", "1")] {
        let line = format!("genai_collector_receiver_targets{{receiver=\"{receiver}\"}} {n}");
        assert!(own.lines().any(|l| l == line), "{line}:\n{own}");
    }
    assert!(!own.contains("genai_collector_receiver_targets{receiver=\"nvml\"}"));

    drop((_agent, _gateway));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two GPUs whose energy counters move at 400 W and 100 W from the test's start; GPU-aaaa
/// busy, GPU-bbbb idle.
struct TwoGpus(Instant);

impl genai_collector_receivers::nvml::GpuBackend for TwoGpus {
    fn driver_version(&self) -> Option<String> {
        None
    }
    fn read_all(&self) -> Result<Vec<genai_collector_receivers::nvml::GpuReading>, String> {
        let ms = self.0.elapsed().as_millis() as u64;
        let gpu =
            |index, uuid: &str, watts: u64, util| genai_collector_receivers::nvml::GpuReading {
                index,
                uuid: uuid.into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                utilization: Some((util, 10)),
                energy_mj: Some(watts * ms),
                ..Default::default()
            };
        Ok(vec![
            gpu(0, "GPU-aaaa", 400, 80),
            gpu(1, "GPU-bbbb", 100, 0),
        ])
    }
}

struct TwoGpusFactory(Instant);

impl genai_collector_core::ReceiverFactory for TwoGpusFactory {
    type Config = genai_collector_receivers::nvml::NvmlConfig;
    fn kind(&self) -> &'static str {
        "nvml"
    }
    fn description(&self) -> &'static str {
        "nvml over two fake GPUs"
    }
    fn build(
        &self,
        config: Self::Config,
        _: &genai_collector_core::BuildContext,
    ) -> Result<Box<dyn genai_collector_core::Receiver>, genai_collector_core::ComponentError> {
        Ok(Box::new(
            genai_collector_receivers::nvml::NvmlReceiver::with_backend(
                config,
                Box::new(TwoGpus(self.0)),
            ),
        ))
    }
}

/// The value of `name`'s first point in a resource's metrics.
fn first_value(rm: &genai_collector_core::model::ResourceMetrics, name: &str) -> Option<f64> {
    use genai_collector_core::model::{metric, number_value};
    rm.scope_metrics
        .iter()
        .flat_map(|s| &s.metrics)
        .filter(|m| m.name == name)
        .find_map(|m| match &m.data {
            Some(metric::Data::Gauge(g)) => g.data_points.first().and_then(number_value),
            Some(metric::Data::Sum(s)) => s.data_points.first().and_then(number_value),
            _ => None,
        })
}

/// Tokens an engine's resource counted: input plus output.
fn all_tokens(rm: &genai_collector_core::model::ResourceMetrics) -> f64 {
    use genai_collector_core::model::{metric, number_value};
    rm.scope_metrics
        .iter()
        .flat_map(|s| &s.metrics)
        .filter(|m| m.name == "gen_ai.server.token.usage")
        .filter_map(|m| match &m.data {
            Some(metric::Data::Sum(s)) => Some(&s.data_points),
            _ => None,
        })
        .flatten()
        .filter_map(number_value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_the_joules_of_the_gpus_the_kubelet_gave_them_and_the_idle_one_is_reported() {
    let a = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let b = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let (_fake, api) = start_pods(
        false,
        vec![
            pod("vllm-a", Some(a.addr.port()), "chat", "Running"),
            pod("vllm-b", Some(b.addr.port()), "chat", "Running"),
        ],
    )
    .await;
    let dir = std::env::temp_dir().join(format!("k8s-efficiency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("kubelet.sock");
    let allocations = dir.join("allocations.json");
    let holds = |pod: &str, gpu: &str| {
        json!({"namespace": "inference", "pod": pod, "containers": [
            {"name": "vllm", "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": [gpu]}]}]})
    };
    std::fs::write(
        &allocations,
        json!([holds("vllm-a", "GPU-aaaa"), holds("vllm-b", "GPU-bbbb")]).to_string(),
    )
    .unwrap();
    let _kubelet = common::Kubelet::start(&socket, &allocations);
    let yaml = format!(
        r#"
receivers:
  nvml: {{ interval: 200ms, pod_resources_socket: "{}" }}
  vllm:
    interval: 300ms
    kubernetes: {{ label_selector: app=vllm, node: gpu-node-1, kubeconfig: "{}" }}
processors:
  genai_normalize: {{}}
  efficiency: {{ interval: 1s, idle: {{ utilization_below: 0.05, for: 1s }}, prices: [{{ price_per_gpu_hour: 3.6 }}] }}
  pool_aggregate: {{ interval: 500ms }}
exporters:
  capture: {{ sending_queue: {{ num_consumers: 1 }} }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [nvml, vllm], processors: [genai_normalize, efficiency, pool_aggregate], exporters: [capture] }}
"#,
        socket.display(),
        kubeconfig(&dir, api).display()
    );
    let capture = Capture::new();
    let comps = components(&capture).with_receiver(TwoGpusFactory(Instant::now()));
    let cfg = config::load(&[Source::new("k8s.yaml", yaml)], &comps).unwrap();
    let running = Service::build(cfg, &comps).unwrap().start().await.unwrap();

    // In the order the processor saw them: each GPU's latest energy, and per pod the windows
    // its energy counter closed, checked against the GPU's joules and the pod's tokens.
    let check = |batches: &[Arc<genai_collector_core::Batch>]| {
        use genai_collector_core::model::AttributesExt;
        let mut gpu_energy: HashMap<String, f64> = HashMap::new();
        let mut base: HashMap<String, (f64, f64, f64)> = HashMap::new();
        let mut windows: HashMap<String, Vec<f64>> = HashMap::new();
        let mut idle: HashMap<String, f64> = HashMap::new();
        let mut pool = None;
        for rm in batches.iter().flat_map(|b| &b.resource_metrics) {
            let attrs = &rm.resource.as_ref().unwrap().attributes;
            if let Some(gpu) = attrs.get_str("hw.id") {
                gpu_energy.insert(gpu.to_owned(), first_value(rm, "hw.energy").unwrap());
                if let Some(v) = first_value(rm, "hw.gpu.idle_allocated") {
                    idle.insert(gpu.to_owned(), v);
                }
                continue;
            }
            if let Some(v) = first_value(rm, "gen_ai.pool.energy.per_token") {
                pool = Some(v);
            }
            let (Some(pod), Some(counter)) = (
                attrs.get_str("k8s.pod.name"),
                first_value(rm, "gen_ai.server.energy"),
            ) else {
                continue;
            };
            let gpu = if pod == "vllm-a" {
                "GPU-aaaa"
            } else {
                "GPU-bbbb"
            };
            let now = (counter, gpu_energy[gpu], all_tokens(rm));
            let Some(before) = base.get(pod).copied() else {
                base.insert(pod.to_owned(), now);
                continue;
            };
            if counter == before.0 {
                continue;
            }
            let joules = now.1 - before.1;
            assert!(
                (counter - before.0 - joules).abs() < 1e-6,
                "{pod}: the window's joules are {gpu}'s: {} vs {joules}",
                counter - before.0
            );
            let per_token = first_value(rm, "gen_ai.server.energy.per_token").unwrap();
            assert!(
                (per_token - joules / (now.2 - before.2)).abs() < 1e-9 * per_token,
                "{pod}: {per_token} J/token"
            );
            windows.entry(pod.to_owned()).or_default().push(per_token);
            base.insert(pod.to_owned(), now);
        }
        (windows, idle, pool)
    };
    let (windows, idle, pool) = genai_collector_testkit::eventually(
        Duration::from_secs(30),
        "two windows per pod, the idle GPU reported, the pool's J/token",
        || {
            let (w, idle, pool) = check(&capture.batches());
            let enough = ["vllm-a", "vllm-b"]
                .iter()
                .all(|p| w.get(*p).is_some_and(|v| v.len() >= 2));
            (enough && idle.get("GPU-bbbb") == Some(&1.0) && pool.is_some())
                .then_some((w, idle, pool))
        },
    )
    .await;
    assert_eq!(idle.get("GPU-aaaa"), Some(&0.0), "the busy GPU is not idle");
    // The same simulated load on 400 W and on 100 W: a quarter of the joules per token.
    let last = |p: &str| *windows[p].last().unwrap();
    let (ja, jb) = (last("vllm-a"), last("vllm-b"));
    assert!(ja > jb, "{ja} J/token on 400 W, {jb} on 100 W");
    let pool = pool.unwrap();
    assert!(
        pool > jb.min(ja) * 0.5 && pool < ja.max(jb) * 2.0,
        "the pool's J/token, {pool}, is a mean of its pods' ({ja}, {jb})"
    );
    running.run_until(std::future::ready(())).await;
    let _ = std::fs::remove_dir_all(&dir);
}
