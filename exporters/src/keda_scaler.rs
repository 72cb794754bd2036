//! `keda_scaler`: KEDA's external scaler (`externalscaler.ExternalScaler`, gRPC) served by the
//! collector, so that a ScaledObject scales an engine Deployment on its pool's or model's
//! normalised signals, for every engine the collector knows, with no Prometheus adapter between.
//!
//! A trigger names `pool` (or `model`), `signal` and `target`:
//! - `waiting_per_server`: requests waiting (`gen_ai.server.requests.waiting`);
//! - `kv_cache`: KV-cache usage in % (`gen_ai.server.kv_cache.usage`; Ollama's VRAM share is
//!   not one);
//! - `capacity`: running / max requests in %;
//! - `tokens_per_second`: output tokens per second, from `gen_ai.server.token.usage`.
//!
//! The value is the sum over the selection's live servers, and `target` is per replica: KEDA's
//! default `metricType: AverageValue` has the HPA divide the sum by the replicas, so the
//! Deployment is sized to `ceil(sum / target)`. A selection with no report for `stale_after` is
//! an error, never a 0. `IsActive` is false once none of its servers has run or queued a request
//! for `scale_to_zero_after`. Behind several gateway replicas, `peers` lets any replica answer
//! for all of them (`peers.rs`).

mod peers;

pub use peers::{PeersConfig, PeersDns};

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use genai_collector_core::config::duration;
use genai_collector_core::model::{
    attr_str, display_value, number_value, resource_attributes, server_identity, AttributesExt,
    Batch, Metric, MetricExt, NumberDataPoint,
};
use genai_collector_core::tls::TlsServerConfig;
use genai_collector_core::{
    async_trait, BuildContext, CancellationToken, ComponentConfig, ComponentError, ExportError,
    Exporter, ExporterFactory, ValidationError,
};
use serde::Deserialize;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KedaScalerConfig {
    /// Where KEDA's `scalerAddress` points.
    pub endpoint: String,
    pub tls: Option<TlsServerConfig>,
    /// Calls without `authorization: Bearer <token>` are refused.
    pub bearer_token: Option<String>,
    /// A selection whose servers have not reported for this long is an error.
    #[serde(with = "duration")]
    pub stale_after: Duration,
    /// No request running or waiting for this long: `IsActive` is false.
    #[serde(with = "duration")]
    pub scale_to_zero_after: Duration,
    /// Servers tracked at most (whoever can push names them).
    pub max_servers: usize,
    /// `StreamIsActive` streams open at most; more are refused with RESOURCE_EXHAUSTED.
    pub max_streams: usize,
    /// The other gateway replicas' scalers, to answer for all of them.
    pub peers: Option<PeersConfig>,
}

impl Default for KedaScalerConfig {
    fn default() -> Self {
        Self {
            endpoint: "localhost:6000".into(),
            tls: None,
            bearer_token: None,
            stale_after: Duration::from_secs(60),
            scale_to_zero_after: Duration::from_secs(300),
            max_servers: 10_000,
            max_streams: 1000,
            peers: None,
        }
    }
}

impl ComponentConfig for KedaScalerConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.stale_after.is_zero() {
            return Err(ValidationError::field(
                "stale_after",
                "must be more than 0s",
            ));
        }
        if self.scale_to_zero_after.is_zero() {
            return Err(ValidationError::field(
                "scale_to_zero_after",
                "must be more than 0s",
            ));
        }
        if let Some(p) = &self.peers {
            p.validate()?;
            if self.tls.is_some() {
                return Err(ValidationError::field(
                    "peers",
                    "peers are asked in plain gRPC: not with `tls` yet",
                ));
            }
        }
        Ok(())
    }
}

pub struct KedaScalerFactory;

impl ExporterFactory for KedaScalerFactory {
    type Config = KedaScalerConfig;

    fn kind(&self) -> &'static str {
        "keda_scaler"
    }

    fn description(&self) -> &'static str {
        "serves KEDA's external scaler gRPC API on pools' and models' signals (waiting, KV cache, capacity, tokens/s)"
    }

    fn build(
        &self,
        config: KedaScalerConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        let listener = crate::endpoint::bind(&config.endpoint)?;
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &config.tls {
            let pems = tls.read().map_err(ComponentError::Config)?;
            let mut t = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(pems.cert, pems.key));
            if let Some(ca) = pems.client_ca {
                t = t.client_ca_root(tonic::transport::Certificate::from_pem(ca));
            }
            server = server
                .tls_config(t)
                .map_err(|e| ComponentError::Config(format!("tls: {e}")))?;
        }
        let token = config.bearer_token.clone().filter(|t| !t.is_empty());
        let scaler = Arc::new(Scaler {
            state: Mutex::new(State::default()),
            streams: AtomicUsize::new(0),
            peers: config
                .peers
                .clone()
                .map(|p| peers::Peers::new(p, token.clone())),
            token,
            config,
        });
        let stop = CancellationToken::new();
        let (service, peer_service) = (ScalerService(scaler.clone()), PeerService(scaler.clone()));
        let cancelled = stop.clone().cancelled_owned();
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let incoming = futures_util::stream::unfold(listener, |l| async move {
                Some((l.accept().await.map(|(s, _)| s), l))
            });
            let served = server
                .add_service(service)
                .add_service(peer_service)
                .serve_with_incoming_shutdown(incoming, cancelled)
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "keda_scaler endpoint stopped");
            }
        });
        tracing::info!(%addr, "keda_scaler listening");
        Ok(Box::new(KedaScaler { scaler, stop }))
    }
}

struct KedaScaler {
    scaler: Arc<Scaler>,
    stop: CancellationToken,
}

#[async_trait]
impl Exporter for KedaScaler {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        self.scaler.observe(batch, Instant::now());
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), ExportError> {
        self.stop.cancel();
        Ok(())
    }
}

/// What a trigger asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    WaitingPerServer,
    KvCache,
    Capacity,
    TokensPerSecond,
}

impl Signal {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting_per_server" => Self::WaitingPerServer,
            "kv_cache" => Self::KvCache,
            "capacity" => Self::Capacity,
            "tokens_per_second" => Self::TokensPerSecond,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::WaitingPerServer => "waiting-per-server",
            Self::KvCache => "kv-cache",
            Self::Capacity => "capacity",
            Self::TokensPerSecond => "tokens-per-second",
        }
    }
}

/// A trigger's `scalerMetadata`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// `pool` or `model`, and its name.
    pub by: (&'static str, String),
    pub signal: Signal,
    pub target: f64,
}

impl Trigger {
    pub fn parse(metadata: &HashMap<String, String>) -> Result<Self, Status> {
        let by = match (metadata.get("pool"), metadata.get("model")) {
            (Some(p), None) => ("pool", p.clone()),
            (None, Some(m)) => ("model", m.clone()),
            _ => {
                return Err(Status::invalid_argument(
                    "the trigger's metadata names one of `pool` and `model`",
                ))
            }
        };
        let signal = metadata
            .get("signal")
            .and_then(|s| Signal::parse(s))
            .ok_or_else(|| {
                Status::invalid_argument(
                    "`signal` is one of waiting_per_server, kv_cache, capacity, tokens_per_second",
                )
            })?;
        let target = metadata
            .get("target")
            .and_then(|t| t.parse::<f64>().ok())
            .filter(|t| t.is_finite() && *t > 0.0)
            .ok_or_else(|| Status::invalid_argument("`target` is a number above 0"))?;
        Ok(Self { by, signal, target })
    }

    /// The metric's name for the HPA: lower-case letters, digits and dashes.
    pub fn metric_name(&self) -> String {
        let name: String = format!("{}-{}-{}", self.signal.name(), self.by.0, self.by.1)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        name.trim_matches('-').to_owned()
    }
}

/// One server's latest figures, for one of its models (`""`: points that name none).
#[derive(Debug, Clone, Default)]
struct Figures {
    waiting: f64,
    running: f64,
    max: Option<f64>,
    kv: Option<f64>,
    output_tokens: Option<f64>,
    /// Output tokens per second between the last two reports.
    token_rate: Option<f64>,
}

#[derive(Debug, Clone)]
struct Server {
    pool: Option<String>,
    models: HashMap<String, Figures>,
    ready: bool,
    seen: Instant,
}

/// When a pool or model was last reported, and last had a request running or waiting.
#[derive(Debug, Clone, Copy)]
struct Activity {
    reported: Instant,
    busy: Instant,
}

#[derive(Default)]
struct State {
    servers: HashMap<String, Server>,
    activity: HashMap<(&'static str, String), Activity>,
    ignored: u64,
}

struct Scaler {
    config: KedaScalerConfig,
    token: Option<String>,
    state: Mutex<State>,
    /// `StreamIsActive` streams open now.
    streams: AtomicUsize,
    peers: Option<peers::Peers>,
}

/// One open stream's place among `max_streams`, given back when the stream is dropped.
struct StreamSlot(Arc<Scaler>);

impl StreamSlot {
    fn take(scaler: Arc<Scaler>) -> Result<Self, Status> {
        let open = scaler.streams.fetch_add(1, Ordering::Relaxed);
        if open >= scaler.config.max_streams {
            scaler.streams.fetch_sub(1, Ordering::Relaxed);
            return Err(Status::resource_exhausted(format!(
                "{open} StreamIsActive streams are open (max_streams)"
            )));
        }
        Ok(Self(scaler))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Replicas of one scheduler (SGLang's tensor-parallel ranks) report the same gauges: the
/// first stands for all.
fn first_replica(p: &NumberDataPoint) -> bool {
    ["tp_rank", "pp_rank", "moe_ep_rank"].iter().all(|k| {
        p.attributes
            .get_attr(k)
            .is_none_or(|v| display_value(v) == "0")
    })
}

impl Scaler {
    fn observe(&self, batch: &Batch, now: Instant) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        for rm in &batch.resource_metrics {
            let attrs = resource_attributes(rm);
            let metrics: Vec<&Metric> = rm.scope_metrics.iter().flat_map(|s| &s.metrics).collect();
            if !metrics.iter().any(|m| m.name.starts_with("gen_ai.server.")) {
                continue;
            }
            let Some(key) = server_identity(attrs) else {
                continue;
            };
            if !state.servers.contains_key(&key) && state.servers.len() >= self.config.max_servers {
                state.ignored += 1;
                continue;
            }
            // Taken out, not copied: the new report goes in its place below.
            let previous = state.servers.remove(&key);
            let mut server = Server {
                pool: attr_str(attrs, "gen_ai.pool.name").map(str::to_owned),
                models: HashMap::new(),
                ready: true,
                seen: now,
            };
            for m in &metrics {
                for p in m.number_points().iter().filter(|p| first_replica(p)) {
                    let Some(v) = number_value(p) else { continue };
                    if m.name == "up" {
                        server.ready &= v != 0.0;
                        continue;
                    }
                    let wanted = match m.name.as_str() {
                        "gen_ai.server.requests.waiting"
                        | "gen_ai.server.requests.running"
                        | "gen_ai.server.requests.max" => true,
                        "gen_ai.server.kv_cache.usage" => p
                            .attributes
                            .get_attr("gen_ai.server.kv_cache.basis")
                            .is_none(),
                        "gen_ai.server.token.usage" => {
                            p.attributes.get_str("gen_ai.token.type") == Some("output")
                        }
                        _ => false,
                    };
                    if !wanted {
                        continue;
                    }
                    let model = p.attributes.get_str("gen_ai.request.model").unwrap_or("");
                    let f = server.models.entry(model.to_owned()).or_default();
                    match m.name.as_str() {
                        "gen_ai.server.requests.waiting" => f.waiting += v,
                        "gen_ai.server.requests.running" => f.running += v,
                        "gen_ai.server.requests.max" => *f.max.get_or_insert(0.0) += v,
                        // Several engines behind one server: the fullest cache.
                        "gen_ai.server.kv_cache.usage" => {
                            let kv = f.kv.get_or_insert(0.0);
                            *kv = kv.max(v);
                        }
                        _ => *f.output_tokens.get_or_insert(0.0) += v,
                    }
                }
            }
            if let Some(before) = &previous {
                let seconds = now.duration_since(before.seen).as_secs_f64();
                for (model, f) in &mut server.models {
                    let old = before.models.get(model).and_then(|o| o.output_tokens);
                    if let (Some(new), Some(old)) = (f.output_tokens, old) {
                        // A counter that went back (restart) gives no rate this time.
                        f.token_rate = (seconds > 0.0 && new >= old).then(|| (new - old) / seconds);
                    }
                }
            }
            let busy = server
                .models
                .values()
                .any(|f| f.running > 0.0 || f.waiting > 0.0);
            let mut selections: Vec<(&'static str, String)> = server
                .models
                .keys()
                .filter(|m| !m.is_empty())
                .map(|m| ("model", m.clone()))
                .collect();
            if let Some(p) = &server.pool {
                selections.push(("pool", p.clone()));
            }
            for sel in selections {
                // Bounded like the servers: names pushed by anyone cannot grow it without end.
                if !state.activity.contains_key(&sel)
                    && state.activity.len() >= 4 * self.config.max_servers
                {
                    continue;
                }
                let a = state.activity.entry(sel).or_insert(Activity {
                    reported: now,
                    busy: now,
                });
                a.reported = now;
                if busy {
                    a.busy = now;
                }
            }
            state.servers.insert(key, server);
        }
        // Servers long gone are forgotten; a selection's activity is kept for a day, so that a
        // pool scaled to zero stays inactive rather than unknown.
        let forget = self.config.stale_after.max(self.config.scale_to_zero_after) * 2;
        state
            .servers
            .retain(|_, s| now.duration_since(s.seen) < forget);
        state
            .activity
            .retain(|_, a| now.duration_since(a.reported) < Duration::from_secs(86_400));
    }

    /// This replica's live servers for `by` (their models' figures for a model, all for a
    /// pool) and the selection's activity, as of `now`.
    fn local_view(&self, by: &(&'static str, String), now: Instant) -> View {
        let Ok(state) = self.state.lock() else {
            return View::default();
        };
        let ms = |d: Duration| d.as_millis() as i64;
        let mut servers = Vec::new();
        for (key, s) in &state.servers {
            let age = now.saturating_duration_since(s.seen);
            if !s.ready || age >= self.config.stale_after {
                continue;
            }
            let figures: Vec<(&String, &Figures)> = match by.0 {
                "pool" if s.pool.as_deref() == Some(by.1.as_str()) => s.models.iter().collect(),
                "model" => s.models.get_key_value(&by.1).into_iter().collect(),
                _ => continue,
            };
            for (model, f) in figures {
                servers.push(ViewServer {
                    id: format!("{key} {model}"),
                    age_ms: ms(age),
                    waiting: f.waiting,
                    running: f.running,
                    max: f.max,
                    kv: f.kv,
                    token_rate: f.token_rate,
                });
            }
        }
        let activity = state.activity.get(by);
        View {
            servers,
            reported_age_ms: activity.map(|a| ms(now.saturating_duration_since(a.reported))),
            busy_age_ms: activity.map(|a| ms(now.saturating_duration_since(a.busy))),
        }
    }

    /// What every replica knows of `by`: this one's view, merged with its peers' if it has any.
    async fn view(&self, by: &(&'static str, String)) -> View {
        let local = self.local_view(by, Instant::now());
        match &self.peers {
            Some(p) => peers::merge(std::iter::once(local).chain(p.views(by).await)),
            None => local,
        }
    }

    fn unknown_or_stale(&self, by: &(&'static str, String), view: &View) -> Status {
        match view.reported_age_ms {
            None => Status::not_found(format!("{} `{}`: no server has reported it", by.0, by.1)),
            Some(age) => Status::unavailable(format!(
                "{} `{}`: no live server has reported for {}s (stale_after {}s)",
                by.0,
                by.1,
                age / 1000,
                self.config.stale_after.as_secs()
            )),
        }
    }

    /// The trigger's value: the sum over the live servers; an error when there is none.
    fn value_of(&self, t: &Trigger, view: &View) -> Result<f64, Status> {
        let live = &view.servers;
        if live.is_empty() {
            return Err(self.unknown_or_stale(&t.by, view));
        }
        let figures: Vec<f64> = match t.signal {
            Signal::WaitingPerServer => live.iter().map(|f| f.waiting).collect(),
            Signal::KvCache => live.iter().filter_map(|f| f.kv).collect(),
            Signal::Capacity => live
                .iter()
                .filter_map(|f| Some(f.running / f.max.filter(|m| *m > 0.0)? * 100.0))
                .collect(),
            Signal::TokensPerSecond => live.iter().filter_map(|f| f.token_rate).collect(),
        };
        if figures.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{} `{}`: its servers report no {} figure yet",
                t.by.0,
                t.by.1,
                t.signal.name()
            )));
        }
        Ok(figures.iter().sum())
    }

    /// Whether the selection had a request running or waiting within `scale_to_zero_after`.
    /// A selection whose servers all went away while idle is inactive (scaled to zero); one
    /// that went away while busy is an error, not a reason to scale down.
    fn is_active_of(&self, by: &(&'static str, String), view: &View) -> Result<bool, Status> {
        let Some(busy) = view.busy_age_ms else {
            return Err(self.unknown_or_stale(by, view));
        };
        let idle = busy >= self.config.scale_to_zero_after.as_millis() as i64;
        if view.servers.is_empty() && !idle {
            return Err(self.unknown_or_stale(by, view));
        }
        Ok(!idle)
    }

    #[cfg(test)]
    fn value(&self, t: &Trigger, now: Instant) -> Result<f64, Status> {
        self.value_of(t, &self.local_view(&t.by, now))
    }

    #[cfg(test)]
    fn is_active(&self, by: &(&'static str, String), now: Instant) -> Result<bool, Status> {
        self.is_active_of(by, &self.local_view(by, now))
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if genai_collector_core::auth::bearer_matches(self.token.as_deref(), given) {
            Ok(())
        } else {
            Err(Status::unauthenticated("a valid bearer token is required"))
        }
    }
}

/// KEDA's messages (tests/fixtures/keda/externalscaler.proto), field for field.
pub mod proto {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScaledObjectRef {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(map = "string, string", tag = "3")]
        pub scaler_metadata: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IsActiveResponse {
        #[prost(bool, tag = "1")]
        pub result: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetMetricSpecResponse {
        #[prost(message, repeated, tag = "1")]
        pub metric_specs: Vec<MetricSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricSpec {
        #[prost(string, tag = "1")]
        pub metric_name: String,
        #[prost(int64, tag = "2")]
        pub target_size: i64,
        #[prost(double, tag = "3")]
        pub target_size_float: f64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetMetricsRequest {
        #[prost(message, optional, tag = "1")]
        pub scaled_object_ref: Option<ScaledObjectRef>,
        #[prost(string, tag = "2")]
        pub metric_name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetMetricsResponse {
        #[prost(message, repeated, tag = "1")]
        pub metric_values: Vec<MetricValue>,
    }

    /// A replica's question to its peers (`peers.rs`): a `pool` or a `model`, and its name.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PeerRequest {
        #[prost(string, tag = "1")]
        pub kind: String,
        #[prost(string, tag = "2")]
        pub name: String,
    }

    /// What a replica knows of a selection: its live servers and the selection's activity.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct View {
        #[prost(message, repeated, tag = "1")]
        pub servers: Vec<ViewServer>,
        /// Since the selection was last reported; none: never.
        #[prost(int64, optional, tag = "2")]
        pub reported_age_ms: Option<i64>,
        /// Since one of its servers last had a request running or waiting.
        #[prost(int64, optional, tag = "3")]
        pub busy_age_ms: Option<i64>,
    }

    /// One server's figures for the selection (one model of it, for a pool).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ViewServer {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(int64, tag = "2")]
        pub age_ms: i64,
        #[prost(double, tag = "3")]
        pub waiting: f64,
        #[prost(double, tag = "4")]
        pub running: f64,
        #[prost(double, optional, tag = "5")]
        pub max: Option<f64>,
        #[prost(double, optional, tag = "6")]
        pub kv: Option<f64>,
        #[prost(double, optional, tag = "7")]
        pub token_rate: Option<f64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricValue {
        #[prost(string, tag = "1")]
        pub metric_name: String,
        #[prost(int64, tag = "2")]
        pub metric_value: i64,
        #[prost(double, tag = "3")]
        pub metric_value_float: f64,
    }
}

use proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, PeerRequest, ScaledObjectRef, View, ViewServer,
};

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = Result<Response<T>, Status>> + Send>>;
type ActiveStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

impl Scaler {
    fn is_active_call(self: Arc<Self>, r: Request<ScaledObjectRef>) -> BoxFuture<IsActiveResponse> {
        Box::pin(async move {
            self.authorize(&r)?;
            let t = Trigger::parse(&r.get_ref().scaler_metadata)?;
            let result = self.is_active_of(&t.by, &self.view(&t.by).await)?;
            Ok(Response::new(IsActiveResponse { result }))
        })
    }

    /// The current answer at once, then each change (checked every second) until the client
    /// goes or the answer becomes an error.
    fn stream_is_active_call(
        self: Arc<Self>,
        r: Request<ScaledObjectRef>,
    ) -> BoxFuture<ActiveStream> {
        Box::pin(async move {
            self.authorize(&r)?;
            let t = Trigger::parse(&r.get_ref().scaler_metadata)?;
            let slot = StreamSlot::take(self)?;
            let stream = futures_util::stream::unfold(
                (slot, t.by, None::<bool>, false),
                |(slot, by, last, done)| async move {
                    if done {
                        return None;
                    }
                    // Asking the peers costs a call to each: less often then.
                    let every = Duration::from_secs(if slot.0.peers.is_some() { 5 } else { 1 });
                    loop {
                        let view = slot.0.view(&by).await;
                        match slot.0.is_active_of(&by, &view) {
                            Ok(now) if Some(now) != last => {
                                let item = Ok(IsActiveResponse { result: now });
                                return Some((item, (slot, by, Some(now), false)));
                            }
                            Ok(_) => tokio::time::sleep(every).await,
                            Err(e) => return Some((Err(e), (slot, by, last, true))),
                        }
                    }
                },
            );
            Ok(Response::new(Box::pin(stream) as ActiveStream))
        })
    }

    /// A peer's question: this replica's own view, never its peers'.
    fn peer_call(self: Arc<Self>, r: Request<PeerRequest>) -> BoxFuture<View> {
        Box::pin(async move {
            self.authorize(&r)?;
            let PeerRequest { kind, name } = r.into_inner();
            let by = match kind.as_str() {
                "pool" => ("pool", name),
                "model" => ("model", name),
                _ => return Err(Status::invalid_argument("`kind` is pool or model")),
            };
            Ok(Response::new(self.local_view(&by, Instant::now())))
        })
    }

    fn metric_spec_call(
        self: Arc<Self>,
        r: Request<ScaledObjectRef>,
    ) -> BoxFuture<GetMetricSpecResponse> {
        Box::pin(async move {
            self.authorize(&r)?;
            let t = Trigger::parse(&r.get_ref().scaler_metadata)?;
            Ok(Response::new(GetMetricSpecResponse {
                metric_specs: vec![MetricSpec {
                    metric_name: t.metric_name(),
                    target_size: t.target.round() as i64,
                    target_size_float: t.target,
                }],
            }))
        })
    }

    fn metrics_call(
        self: Arc<Self>,
        r: Request<GetMetricsRequest>,
    ) -> BoxFuture<GetMetricsResponse> {
        Box::pin(async move {
            self.authorize(&r)?;
            let req = r.into_inner();
            let metadata = req
                .scaled_object_ref
                .map(|o| o.scaler_metadata)
                .unwrap_or_default();
            let t = Trigger::parse(&metadata)?;
            let value = self.value_of(&t, &self.view(&t.by).await)?;
            let metric_name = if req.metric_name.is_empty() {
                t.metric_name()
            } else {
                req.metric_name
            };
            Ok(Response::new(GetMetricsResponse {
                metric_values: vec![MetricValue {
                    metric_name,
                    metric_value: value.round() as i64,
                    metric_value_float: value,
                }],
            }))
        })
    }
}

/// One unary method: the scaler and what it answers with.
struct Unary<Req, Resp>(
    Arc<Scaler>,
    fn(Arc<Scaler>, Request<Req>) -> BoxFuture<Resp>,
);

impl<Req, Resp> tonic::server::UnaryService<Req> for Unary<Req, Resp> {
    type Response = Resp;
    type Future = BoxFuture<Resp>;
    fn call(&mut self, request: Request<Req>) -> Self::Future {
        (self.1)(self.0.clone(), request)
    }
}

struct StreamActive(Arc<Scaler>);

impl tonic::server::ServerStreamingService<ScaledObjectRef> for StreamActive {
    type Response = IsActiveResponse;
    type ResponseStream = ActiveStream;
    type Future = BoxFuture<ActiveStream>;
    fn call(&mut self, request: Request<ScaledObjectRef>) -> Self::Future {
        self.0.clone().stream_is_active_call(request)
    }
}

/// The peers' method (`peers.rs`), a service of its own name.
#[derive(Clone)]
struct PeerService(Arc<Scaler>);

impl tonic::server::NamedService for PeerService {
    const NAME: &'static str = peers::PEER_SERVICE;
}

impl tonic::codegen::Service<HttpRequest> for PeerService {
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<HttpResponse, std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let scaler = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != peers::PEER_PATH {
                return Ok(Status::unimplemented("").into_http());
            }
            Ok(tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .unary(Unary(scaler, Scaler::peer_call), req)
                .await)
        })
    }
}

/// The gRPC service, routed by method path as tonic's generated servers do.
#[derive(Clone)]
struct ScalerService(Arc<Scaler>);

impl tonic::server::NamedService for ScalerService {
    const NAME: &'static str = "externalscaler.ExternalScaler";
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl tonic::codegen::Service<HttpRequest> for ScalerService {
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<HttpResponse, std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        use tonic::server::Grpc;
        use tonic_prost::ProstCodec;
        let scaler = self.0.clone();
        let path = req.uri().path().to_owned();
        Box::pin(async move {
            let response = match path.as_str() {
                "/externalscaler.ExternalScaler/IsActive" => {
                    Grpc::new(ProstCodec::default())
                        .unary(Unary(scaler, Scaler::is_active_call), req)
                        .await
                }
                "/externalscaler.ExternalScaler/StreamIsActive" => {
                    Grpc::new(ProstCodec::default())
                        .server_streaming(StreamActive(scaler), req)
                        .await
                }
                "/externalscaler.ExternalScaler/GetMetricSpec" => {
                    Grpc::new(ProstCodec::default())
                        .unary(Unary(scaler, Scaler::metric_spec_call), req)
                        .await
                }
                "/externalscaler.ExternalScaler/GetMetrics" => {
                    Grpc::new(ProstCodec::default())
                        .unary(Unary(scaler, Scaler::metrics_call), req)
                        .await
                }
                // StreamMetricSpec among them: KEDA then asks GetMetricSpec.
                _ => Status::unimplemented("").into_http(),
            };
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{kv, number_point, MetricExt};

    fn scaler() -> Scaler {
        Scaler {
            config: KedaScalerConfig {
                stale_after: Duration::from_secs(10),
                scale_to_zero_after: Duration::from_secs(60),
                ..Default::default()
            },
            token: None,
            state: Mutex::new(State::default()),
            streams: AtomicUsize::new(0),
            peers: None,
        }
    }

    /// One server's report: waiting and running of one model, its output tokens, `up`.
    fn report(id: &str, waiting: f64, running: f64, tokens: f64, up: f64) -> Batch {
        let model = || vec![kv("gen_ai.request.model", "llama")];
        let g = |name: &str, v: f64| Metric::gauge(name, "", vec![number_point(1, v, model())]);
        let mut out = model();
        out.push(kv("gen_ai.token.type", "output"));
        Batch::with_resource(
            vec![
                kv("service.instance.id", id),
                kv("gen_ai.pool.name", "chat"),
            ],
            vec![
                g("gen_ai.server.requests.waiting", waiting),
                g("gen_ai.server.requests.running", running),
                g("gen_ai.server.requests.max", 8.0),
                Metric::sum(
                    "gen_ai.server.token.usage",
                    "{token}",
                    true,
                    vec![number_point(1, tokens, out)],
                ),
                Metric::gauge("up", "", vec![number_point(1, up, vec![])]),
            ],
        )
    }

    fn trigger(by: &str, name: &str, signal: &str) -> Trigger {
        let meta: HashMap<String, String> = [(by, name), ("signal", signal), ("target", "2.5")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Trigger::parse(&meta).unwrap()
    }

    #[test]
    fn sums_over_live_servers_and_rates_from_two_reports() {
        let s = scaler();
        let t0 = Instant::now();
        s.observe(&report("a", 3.0, 8.0, 100.0, 1.0), t0);
        s.observe(&report("b", 4.0, 4.0, 0.0, 1.0), t0);
        s.observe(&report("down", 50.0, 8.0, 0.0, 0.0), t0);
        let waiting = trigger("pool", "chat", "waiting_per_server");
        assert_eq!(
            s.value(&waiting, t0).ok(),
            Some(7.0),
            "the server that is down is left out"
        );
        assert_eq!(
            s.value(&trigger("pool", "chat", "capacity"), t0).ok(),
            Some(150.0)
        );
        let rate = trigger("model", "llama", "tokens_per_second");
        assert!(s.value(&rate, t0).is_err(), "one report gives no rate");
        let t1 = t0 + Duration::from_secs(2);
        s.observe(&report("a", 3.0, 8.0, 300.0, 1.0), t1);
        s.observe(&report("b", 4.0, 4.0, 40.0, 1.0), t1);
        assert_eq!(s.value(&rate, t1).ok(), Some(120.0));
        // Silent past stale_after: an error, never 0.
        let late = t1 + Duration::from_secs(11);
        let e = s.value(&waiting, late).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("11s"), "{}", e.message());
        let e = s
            .value(&trigger("pool", "other", "kv_cache"), t1)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    }

    #[test]
    fn inactive_after_the_idle_window_and_an_error_when_gone_while_busy() {
        let s = scaler();
        let pool = ("pool", "chat".to_owned());
        let t0 = Instant::now();
        s.observe(&report("a", 1.0, 0.0, 0.0, 1.0), t0);
        assert_eq!(s.is_active(&pool, t0).ok(), Some(true));
        let t1 = t0 + Duration::from_secs(5);
        s.observe(&report("a", 0.0, 0.0, 0.0, 1.0), t1);
        // Gone with a request waiting 5 s ago: no reason to scale down.
        let gone = t1 + Duration::from_secs(20);
        assert!(s.is_active(&pool, gone).is_err());
        // Still reporting, idle for a minute: inactive.
        let t2 = t0 + Duration::from_secs(61);
        s.observe(&report("a", 0.0, 0.0, 0.0, 1.0), t2);
        assert_eq!(s.is_active(&pool, t2).ok(), Some(false));
        // Gone while idle: scaled to zero, inactive rather than an error.
        assert_eq!(
            s.is_active(&pool, t2 + Duration::from_secs(30)).ok(),
            Some(false)
        );
    }

    #[test]
    fn triggers_are_checked_and_named_for_the_hpa() {
        let t = trigger("model", "meta-llama/Llama-3.1-8B", "kv_cache");
        assert_eq!(t.metric_name(), "kv-cache-model-meta-llama-llama-3-1-8b");
        assert_eq!(t.target, 2.5);
        for bad in [
            vec![("signal", "kv_cache"), ("target", "1")],
            vec![
                ("pool", "a"),
                ("model", "b"),
                ("signal", "kv_cache"),
                ("target", "1"),
            ],
            vec![("pool", "a"), ("signal", "vibes"), ("target", "1")],
            vec![("pool", "a"), ("signal", "kv_cache"), ("target", "0")],
            vec![("pool", "a"), ("signal", "kv_cache"), ("target", "NaN")],
        ] {
            let meta = bad
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let e = Trigger::parse(&meta).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}
