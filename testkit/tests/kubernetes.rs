//! Pod discovery against a fake Kubernetes API server that answers list and watch requests the
//! way the real one does (PodList, then a stream of ADDED/MODIFIED/DELETED/ERROR events), built
//! from tests/fixtures/kubernetes/pod-vllm.json. Targets follow pods as they are added,
//! relabelled and deleted, and after the watch fails and the pods are listed again; a forbidden
//! or unreachable API server leaves the static targets scraping and says why.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use genai_collector_core::config::{self, Source};
use genai_collector_core::{ComponentKind, Service};
use genai_collector_testkit::sim::{self, fixtures_dir, EngineKind};
use genai_collector_testkit::{components, Capture};
use serde_json::{json, Value};
use tokio::sync::broadcast;

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

#[derive(Clone)]
enum Msg {
    Event(String),
    Close,
}

#[derive(Clone)]
struct Fake {
    /// What a list answers now.
    pods: Arc<Mutex<Vec<Value>>>,
    events: broadcast::Sender<Msg>,
    /// Every request's query string, in order.
    seen: Arc<Mutex<Vec<String>>>,
    forbidden: bool,
}

/// The query's pairs, percent-decoded.
fn query(uri: &axum::http::Uri) -> HashMap<String, String> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 3 <= bytes.len() {
                if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn pods(State(f): State<Fake>, uri: axum::http::Uri) -> Response {
    let q = query(&uri);
    let mut keys: Vec<_> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
    keys.sort();
    f.seen.lock().unwrap().push(keys.join("&"));
    if f.forbidden {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "pods is forbidden: User \"system:serviceaccount:monitoring:genai-collector\" cannot list resource \"pods\" in API group \"\" at the cluster scope",
            "reason": "Forbidden", "details": {"kind": "pods"}, "code": 403});
        return json_response(StatusCode::FORBIDDEN, &status);
    }
    if q.get("watch").map(String::as_str) == Some("true") {
        let rx = f.events.subscribe();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(Msg::Event(line)) => Some((Ok::<_, std::io::Error>(line), rx)),
                _ => None,
            }
        });
        return Response::new(Body::from_stream(stream));
    }
    let items = f.pods.lock().unwrap().clone();
    json_response(
        StatusCode::OK,
        &json!({"kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": "100"}, "items": items}),
    )
}

async fn start_fake(forbidden: bool, initial: Vec<Value>) -> (Fake, u16) {
    let fake = Fake {
        pods: Arc::new(Mutex::new(initial)),
        events: broadcast::channel(64).0,
        seen: Arc::new(Mutex::new(Vec::new())),
        forbidden,
    };
    let app = axum::Router::new()
        .route("/api/v1/pods", axum::routing::get(pods))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, port)
}

fn event(fake: &Fake, kind: &str, object: Value) {
    let line = format!("{}\n", json!({"type": kind, "object": object}));
    let _ = fake.events.send(Msg::Event(line));
}

fn kubeconfig(dir: &std::path::Path, api_port: u16) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{ server: \"http://127.0.0.1:{api_port}\" }}\nusers:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{ cluster: fake, user: agent }}\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    path
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
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_follow_pods_through_watch_and_relist() {
    let a = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let b = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    let (pa, pb) = (a.addr.port(), b.addr.port());
    let (fake, api) = start_fake(
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
    let running = Service::build(cfg, &comps).unwrap().start().await.unwrap();

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
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mark = capture.batches().len();
    until("the relabelled pod carries its new pool", || {
        recent(&capture, mark).get("vllm-a").map(String::as_str) == Some("batch")
    })
    .await;

    // Deleted.
    event(&fake, "DELETED", pod("vllm-b", Some(pb), "chat", "Running"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mark = capture.batches().len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = recent(&capture, mark);
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
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mark = capture.batches().len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = recent(&capture, mark);
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
    let (_fake, api) = start_fake(true, Vec::new()).await;
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
        tokio::time::sleep(Duration::from_millis(500)).await;
        let up: Vec<f64> = common::scrapes(&capture)
            .values()
            .flatten()
            .filter_map(|s| s.gauge("up"))
            .collect();
        assert!(
            up.len() >= 2 && up.iter().all(|v| *v == 1.0),
            "{name}: the static target keeps being scraped: {up:?}"
        );
        running.run_until(std::future::ready(())).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
