//! GPU series stay apart per GPU on the Prometheus endpoint, and the `nvml` receiver names the
//! pod each GPU is allocated to, asking a kubelet's pod-resources API (grpcio serving the
//! Kubernetes proto on a unix socket, tests/peers/fake_kubelet.py): the kubelet absent at
//! start, then up, a GPU moving to another pod, and the kubelet gone again. The GPUs' readings
//! keep flowing throughout.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use genai_collector_core::model::{AttributesExt, Batch};
use genai_collector_core::telemetry::Telemetry;
use genai_collector_core::{
    CancellationToken, Captured, ComponentId, ComponentKind, Output, Receiver, ReceiverContext,
};
use genai_collector_receivers::nvml::{GpuBackend, GpuReading, NvmlConfig, NvmlReceiver};

/// An exclusive GPU, a GPU time-sliced between two pods, and a MIG instance of a third.
struct ThreeDevices;

impl GpuBackend for ThreeDevices {
    fn driver_version(&self) -> Option<String> {
        None
    }
    fn read_all(&self) -> Result<Vec<GpuReading>, String> {
        let gpu = |index, uuid: &str, parent: Option<&str>| GpuReading {
            index,
            uuid: uuid.into(),
            parent_uuid: parent.map(str::to_owned),
            memory: Some((80 << 30, 60 << 30, 20 << 30)),
            utilization: Some((50, 20)),
            ..Default::default()
        };
        Ok(vec![
            gpu(0, "GPU-aaaa", None),
            gpu(1, "GPU-bbbb", None),
            gpu(0, "MIG-cccc", Some("GPU-pppp")),
        ])
    }
}

fn allocations(exclusive_pod: &str) -> String {
    serde_json::json!([
        {"namespace": "inference", "pod": exclusive_pod, "containers": [
            {"name": "vllm", "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": ["GPU-aaaa"]}]},
            {"name": "proxy", "devices": []}]},
        {"namespace": "dev", "pod": "notebook-0", "containers": [
            {"name": "lab", "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": ["GPU-bbbb::0"]}]}]},
        {"namespace": "dev", "pod": "notebook-1", "containers": [
            {"name": "lab", "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": ["GPU-bbbb::1"]}]},
            {"name": "small", "devices": [{"resource_name": "nvidia.com/mig-1g.10gb", "device_ids": ["MIG-cccc"]}]}]}
    ])
    .to_string()
}

/// Device UUID → its `k8s.*` resource attributes, for one poll.
fn pods_by_device(batch: &Batch) -> BTreeMap<String, BTreeMap<String, String>> {
    batch
        .resource_metrics
        .iter()
        .map(|rm| {
            let attrs = &rm.resource.as_ref().unwrap().attributes;
            let k8s = ["k8s.namespace.name", "k8s.pod.name", "k8s.container.name"]
                .iter()
                .filter_map(|k| Some(((*k).to_owned(), attrs.get_str(k)?.to_owned())))
                .collect();
            (attrs.get_str("hw.id").unwrap().to_owned(), k8s)
        })
        .collect()
}

/// The next poll whose attribution satisfies `want`, within 10 s.
async fn poll_where(
    rx: &mut Captured,
    want: impl Fn(&BTreeMap<String, BTreeMap<String, String>>) -> bool,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let batch = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .expect("no such poll within 10 s")
            .expect("the receiver stopped");
        assert_eq!(batch.resource_metrics.len(), 3, "every device, every poll");
        let pods = pods_by_device(&batch);
        if want(&pods) {
            return pods;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_carry_the_pod_the_kubelet_allocated_them_to() {
    let dir = std::env::temp_dir().join(format!("gpu-pods-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("kubelet.sock");
    let alloc = dir.join("pods.json");
    std::fs::write(&alloc, allocations("vllm-0")).unwrap();

    let telemetry = Telemetry::new();
    let stats = telemetry.register(ComponentKind::Receiver, "nvml", None);
    let (output, mut rx) = Output::capture(64, stats.clone());
    let shutdown = CancellationToken::new();
    let config = NvmlConfig {
        interval: Duration::from_millis(100),
        pod_resources_socket: Some(socket.clone()),
        ..Default::default()
    };
    let receiver = Box::new(NvmlReceiver::with_backend(config, Box::new(ThreeDevices)));
    let run = tokio::spawn(receiver.run(ReceiverContext {
        id: ComponentId::parse("nvml").unwrap(),
        output,
        shutdown: shutdown.clone(),
    }));

    // No kubelet yet: the readings go out unattributed, and /healthz says why.
    let pods = poll_where(&mut rx, |_| true).await;
    assert!(pods.values().all(BTreeMap::is_empty), "{pods:?}");
    let error = stats.last_error().unwrap();
    assert!(
        error.contains("cannot reach the kubelet's pod-resources socket")
            && error.contains("kubelet.sock"),
        "{error}"
    );

    let kubelet = common::Kubelet::start(&socket, &alloc);
    let pods = poll_where(&mut rx, |p| !p["GPU-aaaa"].is_empty()).await;
    let attrs = |ns: &str, pod: &str, c: &str| {
        BTreeMap::from([
            ("k8s.namespace.name".to_owned(), ns.to_owned()),
            ("k8s.pod.name".to_owned(), pod.to_owned()),
            ("k8s.container.name".to_owned(), c.to_owned()),
        ])
    };
    assert_eq!(pods["GPU-aaaa"], attrs("inference", "vllm-0", "vllm"));
    assert!(
        pods["GPU-bbbb"].is_empty(),
        "time-sliced between two pods: neither owns its readings"
    );
    assert_eq!(pods["MIG-cccc"], attrs("dev", "notebook-1", "small"));

    // The pod is replaced: its successor holds the GPU from the next List on.
    std::fs::write(&alloc, allocations("vllm-1")).unwrap();
    let pods = poll_where(&mut rx, |p| {
        p["GPU-aaaa"].get("k8s.pod.name").unwrap() != "vllm-0"
    })
    .await;
    assert_eq!(pods["GPU-aaaa"], attrs("inference", "vllm-1", "vllm"));

    // The kubelet goes away: no stale pod on the readings, which keep coming.
    drop(kubelet);
    let pods = poll_where(&mut rx, |p| p["GPU-aaaa"].is_empty()).await;
    assert!(pods.values().all(BTreeMap::is_empty), "{pods:?}");
    poll_where(&mut rx, |_| true).await;

    shutdown.cancel();
    run.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `nvml` reading [`ThreeDevices`], in a pipeline built from YAML.
struct ThreeDevicesFactory;

impl genai_collector_core::ReceiverFactory for ThreeDevicesFactory {
    type Config = NvmlConfig;
    fn kind(&self) -> &'static str {
        "nvml"
    }
    fn description(&self) -> &'static str {
        "nvml over three fake devices"
    }
    fn build(
        &self,
        config: NvmlConfig,
        _: &genai_collector_core::BuildContext,
    ) -> Result<Box<dyn Receiver>, genai_collector_core::ComponentError> {
        Ok(Box::new(NvmlReceiver::with_backend(
            config,
            Box::new(ThreeDevices),
        )))
    }
}

/// The values of `name` on a Prometheus page, by their `hw_id` label.
fn by_gpu(page: &str, name: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| {
            let id = l.split("hw_id=\"").nth(1).and_then(|r| r.split('"').next());
            let value = l.rsplit(' ').next().unwrap_or("");
            (id.unwrap_or("none").to_owned(), value.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gpu_is_its_own_series_on_the_prometheus_endpoint() {
    common::install_tls_provider();
    let port = common::free_port();
    let yaml = format!(
        "receivers:\n  nvml: {{ interval: 100ms }}\nprocessors:\n  percentages: {{}}\nexporters:\n  prometheus: {{ endpoint: \"127.0.0.1:{port}\" }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [nvml], processors: [percentages], exporters: [prometheus] }}\n"
    );
    let capture = genai_collector_testkit::Capture::new();
    let comps = genai_collector_testkit::components(&capture).with_receiver(ThreeDevicesFactory);
    let cfg = genai_collector_core::config::load(
        &[genai_collector_core::config::Source::new("gpus.yaml", yaml)],
        &comps,
    )
    .unwrap();
    let running = genai_collector_core::Service::build(cfg, &comps)
        .unwrap()
        .start()
        .await
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if page.contains("hw_gpu_memory_utilization_ratio{") || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    running.run_until(std::future::ready(())).await;

    let devices = ["GPU-aaaa", "GPU-bbbb", "MIG-cccc"];
    for name in [
        "hw_gpu_utilization_ratio",
        "hw_gpu_memory_usage_bytes",
        "hw_gpu_memory_utilization_ratio",
    ] {
        let series = by_gpu(&page, name);
        assert_eq!(
            series.keys().map(String::as_str).collect::<Vec<_>>(),
            devices,
            "{name}: one series per device, labelled as the dashboard expects:\n{page}"
        );
    }
    assert_eq!(by_gpu(&page, "hw_gpu_utilization_ratio")["GPU-bbbb"], "0.5");
    assert_eq!(
        by_gpu(&page, "hw_gpu_memory_utilization_ratio")["GPU-bbbb"],
        "0.75"
    );
    assert!(
        page.lines()
            .all(|l| !l.starts_with("hw_gpu_memory_usage_percent")),
        "no percentage beside the hardware conventions' ratio"
    );
    assert!(
        page.lines()
            .any(|l| l.starts_with("hw_gpu_utilization_ratio{") && l.contains("job=\"nvml\"")),
        "job from the receiver's id"
    );
}
