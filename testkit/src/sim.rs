//! Engine simulators: HTTP servers that serve the engine pages kept in `tests/fixtures` with
//! values that move like a loaded server (requests arrive, queue, run and finish; the KV cache
//! fills and drains; counters only grow), and faults on demand.
//!
//! The page's structure (names, labels, HELP and TYPE lines, buckets) is the fixture's; only
//! sample values change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

/// Which engine a simulator plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// vLLM V1 engine (`tests/fixtures/vllm/v0.33.0-loggers.prom`, from vLLM's own metrics code).
    VllmV1,
    /// vLLM V0 engine (`tests/fixtures/vllm/v0-composed.prom`).
    VllmV0,
    /// TGI router (`tests/fixtures/tgi/composed.prom`), with `/info`.
    Tgi,
    /// Ollama (`/api/ps` from `tests/fixtures/ollama/ps-two-models.json`, `/api/version`).
    Ollama,
    /// llama.cpp's llama-server (a real page and `/props` from `tests/fixtures/llamacpp`).
    LlamaCpp,
}

impl EngineKind {
    fn fixture(self) -> &'static str {
        match self {
            Self::VllmV1 => "vllm/v0.33.0-loggers.prom",
            Self::VllmV0 => "vllm/v0-composed.prom",
            Self::Tgi => "tgi/composed.prom",
            Self::Ollama => "ollama/ps-two-models.json",
            Self::LlamaCpp => "llamacpp/real-server-0c1e570-tiny-random.prom",
        }
    }
}

/// llama-server's `/props`, captured from the same server as its page.
const LLAMACPP_PROPS: &str = "llamacpp/props-0c1e570-tiny-random.json";
/// llama.cpp's `/slots` after two requests, from the server `LLAMACPP_PROPS` comes from.
const LLAMACPP_SLOTS: &str = "llamacpp/slots-0c1e570-tiny-random.json";
/// TGI's `/info`, served by the TGI simulator.
const TGI_INFO: &str = "tgi/info-composed.json";

/// What a simulator does wrong, switchable while it runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Fault {
    #[default]
    None,
    /// Answers after this delay.
    Slow(Duration),
    /// Never answers.
    Hang,
    /// Answers 500.
    Status500,
    /// Answers text that is not a metrics page.
    Garbage,
    /// Answers an HTML error page with `Content-Type: text/html`.
    Html,
    /// Answers the first half of the page, cut mid-line.
    Truncated,
    /// Streams a page of this many bytes.
    Huge(u64),
    /// A small gzip body that inflates to this many bytes.
    GzipBomb(u64),
    /// `/metrics` is fine; the JSON side endpoints (`/info`, `/props`, `/api/ps`) answer a
    /// gzip bomb of this many bytes.
    SideGzipBomb(u64),
    /// Every series twice.
    Duplicates,
    /// A valid page of this many series.
    ManySeries(usize),
}

/// The directory with the fixture pages: `tests/fixtures` of this repository.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

struct Sim {
    kind: EngineKind,
    template: String,
    /// Requests the engine runs at once: llama.cpp's slots, else vLLM's default `max_num_seqs`.
    max_seqs: f64,
    started: Instant,
    fault: Mutex<Fault>,
    /// The `Authorization` header `/metrics` insists on, if any.
    auth: Mutex<Option<String>>,
    /// The gzip bomb's body, made once when the fault is set.
    bomb: Mutex<bytes::Bytes>,
    requests: std::sync::atomic::AtomicU64,
    /// A load held fixed by the test, in place of the wave.
    held_load: Mutex<Option<f64>>,
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    sim: Arc<Sim>,
    stop: CancellationToken,
}

impl SimHandle {
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// Switches the fault; a gzip bomb is compressed here, before it is served.
    pub fn set_fault(&self, fault: Fault) {
        if let (Fault::GzipBomb(size) | Fault::SideGzipBomb(size), Ok(mut bomb)) =
            (&fault, self.sim.bomb.lock())
        {
            *bomb = gzip_zeros(*size).into();
        }
        if let Ok(mut f) = self.sim.fault.lock() {
            *f = fault;
        }
    }

    /// Makes `/metrics` answer 401 unless the request's `Authorization` header is `value`.
    pub fn require_authorization(&self, value: &str) {
        if let Ok(mut a) = self.sim.auth.lock() {
            *a = Some(value.to_owned());
        }
    }

    /// Holds the load at `load` (0 idle, 0.8 full with nothing waiting, 1 with 20 waiting), or
    /// back to the wave with `None`.
    pub fn set_load(&self, load: Option<f64>) {
        if let Ok(mut l) = self.sim.held_load.lock() {
            *l = load;
        }
    }

    /// Pages served so far.
    pub fn requests(&self) -> u64 {
        self.sim.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a simulator on `addr` (use port 0 for any free port).
pub async fn start(kind: EngineKind, addr: &str) -> std::io::Result<SimHandle> {
    let template = std::fs::read_to_string(fixtures_dir().join(kind.fixture()))?;
    let max_seqs = match kind {
        EngineKind::LlamaCpp => {
            let props = std::fs::read_to_string(fixtures_dir().join(LLAMACPP_PROPS))?;
            let props: serde_json::Value = serde_json::from_str(&props)?;
            props["total_slots"].as_f64().unwrap_or(1.0)
        }
        _ => 64.0,
    };
    let sim = Arc::new(Sim {
        kind,
        template,
        max_seqs,
        started: Instant::now(),
        fault: Mutex::new(Fault::None),
        bomb: Mutex::default(),
        auth: Mutex::default(),
        requests: Default::default(),
        held_load: Mutex::new(None),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/info", get(info))
        .route("/props", get(props))
        .route("/slots", get(slots))
        .route("/api/ps", get(ollama_ps))
        .route(
            "/api/version",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    "{\"version\":\"0.6.2\"}",
                )
            }),
        )
        .with_state(sim.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(token.cancelled_owned())
            .await;
    });
    Ok(SimHandle { addr, sim, stop })
}

/// The simulated load at `t` seconds: a slow wave with a faster ripple, 0 to about 1.
fn load(t: f64) -> f64 {
    (0.55 + 0.35 * (t / 20.0).sin() + 0.1 * (t / 3.0).sin()).clamp(0.0, 1.0)
}

impl Sim {
    /// The fixture with its values moved to time `t`.
    fn render(&self, t: f64) -> String {
        let held = self.held_load.lock().ok().and_then(|l| *l);
        let l = held.unwrap_or_else(|| load(t));
        // Counters and histogram counts grow with the work done so far.
        let growth = 1.0 + t / 60.0;
        let running = (l * self.max_seqs).round();
        let waiting = ((l - 0.8).max(0.0) * 100.0).round();
        let kv = (l * 0.95).min(1.0);
        let mut out = String::with_capacity(self.template.len() + 256);
        let mut kind = "";
        for line in self.template.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                kind = rest.rsplit(' ').next().unwrap_or("");
            }
            if line.starts_with('#') || line.trim().is_empty() {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            let (series, value) = split_value(line);
            let name = series.split('{').next().unwrap_or(series);
            let new = match name {
                "vllm:num_requests_running"
                | "tgi_batch_current_size"
                | "llamacpp:requests_processing" => Some(running),
                "vllm:num_requests_waiting" | "tgi_queue_size" | "llamacpp:requests_deferred" => {
                    Some(waiting)
                }
                "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                    Some((kv * 1e4).round() / 1e4)
                }
                _ => match (kind, value.parse::<f64>()) {
                    ("counter" | "histogram" | "summary", Ok(v))
                        if !name.ends_with("_created") && !series.contains("quantile=") =>
                    {
                        Some(if name.ends_with("_sum") {
                            v * growth
                        } else {
                            (v * growth).round()
                        })
                    }
                    _ => None,
                },
            };
            match new {
                Some(v) => {
                    out.push_str(series);
                    out.push(' ');
                    out.push_str(&format!("{v:?}"));
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }
}

/// `series value [timestamp]` → (`series`, `value`).
fn split_value(line: &str) -> (&str, &str) {
    let end = line.rfind('}').map_or(0, |i| i + 1);
    let rest = &line[end..];
    let offset = end + rest.find(' ').unwrap_or(rest.len());
    let series = &line[..offset];
    let value = line[offset..].split_whitespace().next().unwrap_or("");
    (series, value)
}

async fn metrics(State(sim): State<Arc<Sim>>, headers: axum::http::HeaderMap) -> Response {
    sim.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let required = sim.auth.lock().ok().and_then(|a| a.clone());
    if let Some(required) = required {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(required.as_str()) {
            return (StatusCode::UNAUTHORIZED, "missing or wrong credentials").into_response();
        }
    }
    let fault = sim.fault.lock().map(|f| f.clone()).unwrap_or_default();
    let t = sim.started.elapsed().as_secs_f64();
    let text_plain = [(
        header::CONTENT_TYPE,
        "text/plain; version=0.0.4; charset=utf-8",
    )];
    match fault {
        Fault::None | Fault::SideGzipBomb(_) => (text_plain, sim.render(t)).into_response(),
        Fault::Slow(d) => {
            tokio::time::sleep(d).await;
            (text_plain, sim.render(t)).into_response()
        }
        Fault::Hang => {
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Fault::Status500 => (StatusCode::INTERNAL_SERVER_ERROR, "engine exploded").into_response(),
        Fault::Garbage => (text_plain, "\u{1}\u{2}}}{{ this is not a page\n%%%\n").into_response(),
        Fault::Html => (
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        )
            .into_response(),
        Fault::Truncated => {
            // Cut just inside a label set, so the last line cannot read as a whole sample.
            let page = sim.render(t);
            let cut = page[page.len() / 2..]
                .find('{')
                .map_or(page.len() / 2, |i| page.len() / 2 + i + 3);
            (text_plain, page[..cut].to_owned()).into_response()
        }
        Fault::Huge(bytes) => {
            let line = "vllm:num_requests_running{model_name=\"padding\"} 1.0\n".repeat(1000);
            let chunks = bytes / line.len() as u64 + 1;
            let stream = futures_util::stream::iter(
                (0..chunks).map(move |_| Ok::<_, std::io::Error>(bytes::Bytes::from(line.clone()))),
            );
            (text_plain, Body::from_stream(stream)).into_response()
        }
        Fault::GzipBomb(_) => {
            let body = sim.bomb.lock().map(|b| b.clone()).unwrap_or_default();
            (
                [
                    (header::CONTENT_TYPE, "text/plain; version=0.0.4"),
                    (header::CONTENT_ENCODING, "gzip"),
                ],
                body,
            )
                .into_response()
        }
        Fault::Duplicates => {
            let page = sim.render(t);
            let doubled: String = page
                .lines()
                .flat_map(|l| {
                    if l.starts_with('#') || l.is_empty() {
                        vec![l]
                    } else {
                        vec![l, l]
                    }
                })
                .map(|l| format!("{l}\n"))
                .collect();
            (text_plain, doubled).into_response()
        }
        Fault::ManySeries(n) => {
            let mut page = String::with_capacity(n * 100);
            page.push_str("# TYPE vllm:num_requests_running gauge\n");
            for i in 0..n {
                page.push_str(&format!(
                    "vllm:num_requests_running{{engine=\"{}\",model_name=\"model-{i}\"}} {}\n",
                    i % 8,
                    i % 64
                ));
            }
            (text_plain, page).into_response()
        }
    }
}

/// `size` zero bytes, gzip-compressed (about a thousandth of the size).
fn gzip_zeros(size: u64) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        let _ = enc.write_all(&chunk[..n]);
        left -= n as u64;
    }
    enc.finish().unwrap_or_default()
}

/// A side endpoint's answer under a bomb fault.
fn side_bomb(sim: &Sim) -> Option<Response> {
    let fault = sim.fault.lock().map(|f| f.clone()).unwrap_or_default();
    if !matches!(fault, Fault::GzipBomb(_) | Fault::SideGzipBomb(_)) {
        return None;
    }
    let body = sim.bomb.lock().map(|b| b.clone()).unwrap_or_default();
    let headers = [
        (header::CONTENT_TYPE, "application/json"),
        (header::CONTENT_ENCODING, "gzip"),
    ];
    Some((headers, body).into_response())
}

async fn info(State(sim): State<Arc<Sim>>) -> Response {
    if sim.kind != EngineKind::Tgi {
        return StatusCode::NOT_FOUND.into_response();
    }
    if let Some(bomb) = side_bomb(&sim) {
        return bomb;
    }
    json_fixture(TGI_INFO)
}

async fn slots(State(sim): State<Arc<Sim>>) -> Response {
    if sim.kind != EngineKind::LlamaCpp {
        return StatusCode::NOT_FOUND.into_response();
    }
    json_fixture(LLAMACPP_SLOTS)
}

/// A JSON fixture as the engine answers it.
fn json_fixture(path: &str) -> Response {
    match std::fs::read_to_string(fixtures_dir().join(path)) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn props(State(sim): State<Arc<Sim>>) -> Response {
    if sim.kind != EngineKind::LlamaCpp {
        return StatusCode::NOT_FOUND.into_response();
    }
    if let Some(bomb) = side_bomb(&sim) {
        return bomb;
    }
    json_fixture(LLAMACPP_PROPS)
}

async fn ollama_ps(State(sim): State<Arc<Sim>>) -> Response {
    if sim.kind != EngineKind::Ollama {
        return StatusCode::NOT_FOUND.into_response();
    }
    sim.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(bomb) = side_bomb(&sim) {
        return bomb;
    }
    let fault = sim.fault.lock().map(|f| f.clone()).unwrap_or_default();
    let json = [(header::CONTENT_TYPE, "application/json")];
    match fault {
        Fault::Hang => return std::future::pending::<Response>().await,
        Fault::Slow(d) => tokio::time::sleep(d).await,
        Fault::Status500 => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "ollama exploded").into_response()
        }
        Fault::Garbage => return (json, "{\"models\": [{\"name\": 7").into_response(),
        Fault::Html => {
            return ([(header::CONTENT_TYPE, "text/html")], "<html>502</html>").into_response()
        }
        _ => {}
    }
    (json, sim.template.clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_value_finds_the_value() {
        assert_eq!(split_value("a{b=\"c d\"} 1.5"), ("a{b=\"c d\"}", "1.5"));
        assert_eq!(split_value("a 2 123"), ("a", "2"));
    }

    #[test]
    fn values_move_and_counters_grow() {
        let sim = Sim {
            kind: EngineKind::VllmV1,
            template: std::fs::read_to_string(fixtures_dir().join(EngineKind::VllmV1.fixture()))
                .unwrap(),
            max_seqs: 64.0,
            started: Instant::now(),
            fault: Mutex::new(Fault::None),
            bomb: Mutex::default(),
            auth: Mutex::default(),
            requests: Default::default(),
            held_load: Mutex::new(None),
        };
        let value = |page: &str, name: &str| -> f64 {
            page.lines()
                .find(|l| l.starts_with(name))
                .map(|l| split_value(l).1.parse().unwrap())
                .unwrap()
        };
        let (a, b) = (sim.render(0.0), sim.render(30.0));
        assert!(value(&b, "vllm:prompt_tokens_total") > value(&a, "vllm:prompt_tokens_total"));
        assert_ne!(
            value(&a, "vllm:num_requests_running"),
            value(&b, "vllm:num_requests_running")
        );
        let kv = value(&b, "vllm:kv_cache_usage_perc");
        assert!((0.0..=1.0).contains(&kv));
        assert_eq!(
            a.lines().count(),
            sim.template.lines().count(),
            "the fixture's structure is kept"
        );
    }
}
