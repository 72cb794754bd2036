//! A fake Kubernetes API server that answers list and watch requests the way the real one
//! does (a list, then a stream of ADDED/MODIFIED/DELETED/ERROR events), for one resource path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast;

#[derive(Clone)]
pub enum Msg {
    /// The event's type and object.
    Event(String, Value),
    Close,
}

#[derive(Clone)]
pub struct Fake {
    /// What a list answers now.
    pub pods: Arc<Mutex<Vec<Value>>>,
    pub events: broadcast::Sender<Msg>,
    /// Every request's query string, in order.
    pub seen: Arc<Mutex<Vec<String>>>,
    forbidden: bool,
    /// The list's `kind` (`PodList`).
    list_kind: &'static str,
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

/// Whether an object matches an equality label selector (`k=v,k2=v2`), as the API server
/// filters; an ERROR event's Status always passes.
fn selected(selector: Option<&String>, pod: &Value) -> bool {
    pod["kind"] == "Status"
        || selector.is_none_or(|s| {
            s.split(',')
                .filter_map(|kv| kv.split_once('='))
                .all(|(k, v)| pod["metadata"]["labels"][k] == v)
        })
}

async fn objects(State(f): State<Fake>, uri: axum::http::Uri) -> Response {
    let q = query(&uri);
    let selector = q.get("labelSelector").cloned();
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
        let stream = futures_util::stream::unfold((rx, selector), |(mut rx, sel)| async move {
            loop {
                match rx.recv().await {
                    Ok(Msg::Event(kind, object)) if selected(sel.as_ref(), &object) => {
                        let line = format!("{}\n", json!({"type": kind, "object": object}));
                        return Some((Ok::<_, std::io::Error>(line), (rx, sel)));
                    }
                    Ok(Msg::Event(..)) => continue,
                    _ => return None,
                }
            }
        });
        return Response::new(Body::from_stream(stream));
    }
    let items: Vec<Value> = f
        .pods
        .lock()
        .unwrap()
        .iter()
        .filter(|p| selected(selector.as_ref(), p))
        .cloned()
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"kind": f.list_kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": "100"}, "items": items}),
    )
}

/// Serves list and watch of the objects at `path` (`/api/v1/pods`), a list being `list_kind`.
pub async fn start_fake(
    path: &str,
    list_kind: &'static str,
    forbidden: bool,
    initial: Vec<Value>,
) -> (Fake, u16) {
    let fake = Fake {
        pods: Arc::new(Mutex::new(initial)),
        events: broadcast::channel(64).0,
        seen: Arc::new(Mutex::new(Vec::new())),
        forbidden,
        list_kind,
    };
    let app = axum::Router::new()
        .route(path, axum::routing::get(objects))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, port)
}

pub fn event(fake: &Fake, kind: &str, object: Value) {
    let _ = fake.events.send(Msg::Event(kind.to_owned(), object));
}

pub fn kubeconfig(dir: &std::path::Path, api_port: u16) -> std::path::PathBuf {
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
