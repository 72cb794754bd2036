//! `otlp`: accepts OTLP metrics pushed over gRPC (`MetricsService/Export`) and HTTP
//! (`POST /v1/metrics`, protobuf or JSON, gzip or not).
//!
//! "OK" means every exporter of every pipeline this receiver feeds has queued the points (see
//! `Output::push`). Otherwise the client is told to retry: gRPC `RESOURCE_EXHAUSTED` with
//! RetryInfo, HTTP 429 with `Retry-After`, and the points are counted as refused. A request is
//! sized from its wire bytes first and refused before it is decoded when the pipelines are full
//! or its decoded size does not fit under the memory limit; one that could never fit is refused
//! for good (gRPC `RESOURCE_EXHAUSTED` without RetryInfo, HTTP 413). Metrics that carry no data (an OTLP/JSON enum sent by name decodes that way) are
//! rejected and reported as a partial success. With `bearer_token`, exports without it are
//! refused (`UNAUTHENTICATED` / 401). Traces and logs are not served here: gRPC
//! answers `UNIMPLEMENTED`, HTTP 404.

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use genai_collector_core::model::{
    approx_bytes, decoded_size, worst_case_size, Batch, GRPC_EXPORT_PATH,
};
use genai_collector_core::retry_info;
use genai_collector_core::tls::{self, TlsServerConfig};
use genai_collector_core::{
    async_trait, BuildContext, ComponentConfig, ComponentError, Output, Receiver, ReceiverContext,
    ReceiverFactory, SendError, ValidationError,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use serde::Deserialize;
use tracing::info;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    pub endpoint: String,
    /// Largest request, in MiB.
    pub max_recv_msg_size_mib: usize,
    pub tls: Option<TlsServerConfig>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            endpoint: "localhost:4317".into(),
            max_recv_msg_size_mib: 4,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub endpoint: String,
    /// Largest request body, in MiB, after decompression.
    pub max_request_body_size_mib: usize,
    pub tls: Option<TlsServerConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            endpoint: "localhost:4318".into(),
            max_request_body_size_mib: 4,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protocols {
    pub grpc: Option<GrpcConfig>,
    pub http: Option<HttpConfig>,
}

impl Default for Protocols {
    fn default() -> Self {
        Self {
            grpc: Some(GrpcConfig::default()),
            http: Some(HttpConfig::default()),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    pub protocols: Protocols,
    /// Require `authorization: Bearer <token>` on every export (empty: none).
    pub bearer_token: Option<String>,
}

impl ComponentConfig for OtlpConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.protocols.grpc.is_none() && self.protocols.http.is_none() {
            return Err(ValidationError::field(
                "protocols",
                "enable `grpc`, `http` or both",
            ));
        }
        let grpc_tls = self.protocols.grpc.as_ref().and_then(|g| g.tls.as_ref());
        if let Some(tls) = grpc_tls {
            tls.read()
                .map_err(|e| ValidationError::field("protocols.grpc.tls", e))?;
        }
        let http_tls = self.protocols.http.as_ref().and_then(|h| h.tls.as_ref());
        if let Some(tls) = http_tls {
            tls.server_config()
                .map_err(|e| ValidationError::field("protocols.http.tls", e))?;
        }
        Ok(())
    }
}

pub struct OtlpReceiverFactory;

impl ReceiverFactory for OtlpReceiverFactory {
    type Config = OtlpConfig;

    fn kind(&self) -> &'static str {
        "otlp"
    }

    fn description(&self) -> &'static str {
        "accepts OTLP metrics over gRPC and HTTP (protobuf, JSON, gzip), refusing with a retry hint when full"
    }

    fn build(
        &self,
        config: OtlpConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        // Bind now: a taken port fails the start, not the first push.
        let bind = |endpoint: &str| {
            let l = std::net::TcpListener::bind(endpoint).map_err(|e| {
                ComponentError::Config(format!("cannot listen on `{endpoint}`: {e}"))
            })?;
            l.set_nonblocking(true)?;
            Ok::<_, ComponentError>(l)
        };
        let grpc = config
            .protocols
            .grpc
            .as_ref()
            .map(|g| bind(&g.endpoint))
            .transpose()?;
        let http = config
            .protocols
            .http
            .as_ref()
            .map(|h| bind(&h.endpoint))
            .transpose()?;
        Ok(Box::new(OtlpReceiver { config, grpc, http }))
    }
}

pub struct OtlpReceiver {
    config: OtlpConfig,
    grpc: Option<std::net::TcpListener>,
    http: Option<std::net::TcpListener>,
}

impl OtlpReceiver {
    /// The addresses bound, gRPC then HTTP (port 0 in config picks a free one).
    pub fn addresses(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (
            self.grpc.as_ref().and_then(|l| l.local_addr().ok()),
            self.http.as_ref().and_then(|l| l.local_addr().ok()),
        )
    }
}

/// Splits off metrics that carry no data; returns how many metrics were rejected.
fn accept(mut batch: Batch) -> (Batch, i64) {
    let mut rejected_metrics = 0;
    batch.retain_metrics(|m| {
        let ok = m.data.is_some() && !m.name.is_empty();
        rejected_metrics += usize::from(!ok);
        ok
    });
    (batch, rejected_metrics as i64)
}

fn partial(rejected: i64) -> Option<ExportMetricsPartialSuccess> {
    (rejected > 0).then(|| ExportMetricsPartialSuccess {
        rejected_data_points: rejected,
        error_message: format!("{rejected} metrics had no data (an unknown kind, or a JSON enum sent by name) and were dropped"),
    })
}

use genai_collector_core::auth::bearer_matches as authorized;

/// An export request as it arrived.
enum Body<'a> {
    Protobuf(&'a [u8]),
    Json(&'a [u8]),
}

/// Why an export was not taken, and what the client is told.
#[derive(Debug)]
enum Refusal {
    Send(SendError),
    Malformed(String),
}

/// Takes one export request into the pipelines, under the delivery contract: `Ok` only once
/// every exporter has queued it. A request is refused before it is decoded when the pipelines
/// are full or its decoded size does not fit under the memory limit.
async fn take(output: &Output, body: Body<'_>) -> Result<ExportMetricsServiceResponse, Refusal> {
    let (batch, _reserved) = match body {
        Body::Protobuf(bytes) => {
            let forecast = || decoded_size(bytes).map_err(|e| Refusal::Malformed(e.to_string()));
            let refuse = |e: SendError, points: u64| {
                output.refused(points as usize, e);
                Refusal::Send(e)
            };
            // Where the worst a request of this size can decode to fits, the exact forecast
            // (a walk over every field) is spared; near the limit it decides. A request that
            // could never fit is told so before it is told to retry.
            let mut reserved = match output.reserve_memory(worst_case_size(bytes.len())) {
                Ok(reserved) => reserved,
                Err(_) => {
                    let size = forecast()?;
                    output
                        .reserve_memory(size.bytes)
                        .map_err(|e| refuse(e, size.points))?
                }
            };
            if let Err(e) = output.ready() {
                return Err(refuse(e, forecast().map_or(0, |s| s.points)));
            }
            let request = ExportMetricsServiceRequest::decode(bytes)
                .map_err(|e| Refusal::Malformed(e.to_string()))?;
            let batch = Batch::from_request(request);
            if let Some(r) = &mut reserved {
                r.resize(approx_bytes(&batch));
            }
            (batch, reserved)
        }
        Body::Json(bytes) => {
            output.ready().map_err(Refusal::Send)?;
            let request = serde_json::from_slice::<ExportMetricsServiceRequest>(bytes)
                .map_err(|e| Refusal::Malformed(e.to_string()))?;
            let batch = Batch::from_request(request);
            let reserved = output.reserve_memory(approx_bytes(&batch)).map_err(|e| {
                output.refused(batch.point_count(), e);
                Refusal::Send(e)
            })?;
            (batch, reserved)
        }
    };
    let (batch, rejected) = accept(batch);
    output.push(batch).await.map_err(Refusal::Send)?;
    Ok(ExportMetricsServiceResponse {
        partial_success: partial(rejected),
    })
}

impl Refusal {
    fn into_status(self) -> tonic::Status {
        let retry = |message: &str, after: Duration| {
            let details = retry_info::encode(tonic::Code::ResourceExhausted as i32, message, after);
            tonic::Status::with_details(tonic::Code::ResourceExhausted, message, details.into())
        };
        match self {
            Self::Malformed(e) => {
                tonic::Status::invalid_argument(format!("not an OTLP metrics request: {e}"))
            }
            Self::Send(e @ SendError::Full) => retry(&format!("{e}; retry later"), FULL_RETRY),
            Self::Send(e @ SendError::MemoryLimit) => {
                retry(&format!("{e}; retry later"), MEMORY_RETRY)
            }
            // RESOURCE_EXHAUSTED without RetryInfo: OTLP clients do not retry it.
            Self::Send(e @ SendError::TooLarge) => {
                tonic::Status::resource_exhausted(format!("{e}; send smaller requests"))
            }
            Self::Send(e @ SendError::Closed) => tonic::Status::unavailable(e.to_string()),
            Self::Send(e @ SendError::Dropped) => tonic::Status::internal(e.to_string()),
        }
    }

    fn into_http(self) -> Response {
        let retry = |e: SendError, after: Duration| {
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, after.as_secs().to_string())],
                format!("{e}; retry later"),
            )
                .into_response()
        };
        match self {
            Self::Malformed(e) => (
                StatusCode::BAD_REQUEST,
                format!("not an OTLP metrics request: {e}"),
            )
                .into_response(),
            Self::Send(e @ SendError::Full) => retry(e, FULL_RETRY),
            Self::Send(e @ SendError::MemoryLimit) => retry(e, MEMORY_RETRY),
            Self::Send(e @ SendError::TooLarge) => {
                (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()).into_response()
            }
            Self::Send(e @ SendError::Closed) => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                e.to_string(),
            )
                .into_response(),
            Self::Send(e @ SendError::Dropped) => {
                (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
            }
        }
    }
}

/// How long requests in flight at shutdown get to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a refused client is asked to wait: queues drain fast, memory more slowly.
const FULL_RETRY: Duration = Duration::from_secs(1);
const MEMORY_RETRY: Duration = Duration::from_secs(2);

/// The receiver's handler of `MetricsService/Export`: the request's bytes are sized, checked
/// against the pipelines' room and the memory limit, and only then decoded.
#[derive(Clone)]
struct GrpcService {
    output: Output,
    expected: Option<Arc<str>>,
}

impl GrpcService {
    async fn export(
        self,
        request: tonic::Request<Bytes>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if !authorized(self.expected.as_deref(), given) {
            return Err(tonic::Status::unauthenticated(
                "a valid bearer token is required",
            ));
        }
        let bytes = request.into_inner();
        take(&self.output, Body::Protobuf(&bytes))
            .await
            .map(tonic::Response::new)
            .map_err(Refusal::into_status)
    }
}

/// What answers an export from its undecoded bytes.
pub type ExportFuture =
    tonic::codegen::BoxFuture<tonic::Response<ExportMetricsServiceResponse>, tonic::Status>;

/// A gRPC `MetricsService` whose handler gets each export request's bytes undecoded (gzip
/// already inflated, up to `max_message` bytes), so it can size, refuse or count a request
/// before decoding it. Traces, logs and other paths answer `UNIMPLEMENTED`.
#[derive(Clone)]
pub struct RawExportService<H> {
    handler: H,
    max_message: usize,
}

impl<H> RawExportService<H>
where
    H: Fn(tonic::Request<Bytes>) -> ExportFuture + Clone + Send + Sync + 'static,
{
    pub fn new(handler: H, max_message: usize) -> Self {
        Self {
            handler,
            max_message,
        }
    }
}

impl<H> tonic::server::NamedService for RawExportService<H> {
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
}

struct ExportCall<H>(H);

impl<H> tonic::server::UnaryService<Bytes> for ExportCall<H>
where
    H: Fn(tonic::Request<Bytes>) -> ExportFuture,
{
    type Response = ExportMetricsServiceResponse;
    type Future = ExportFuture;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        (self.0)(request)
    }
}

impl<H> tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>>
    for RawExportService<H>
where
    H: Fn(tonic::Request<Bytes>) -> ExportFuture + Clone + Send + Sync + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != GRPC_EXPORT_PATH {
            return Box::pin(async { Ok(tonic::Status::unimplemented("").into_http()) });
        }
        let (handler, max) = (self.handler.clone(), self.max_message);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(max);
            Ok(grpc.unary(ExportCall(handler), req).await)
        })
    }
}

/// A codec that hands the handler the request's bytes undecoded and encodes the response.
pub struct RawCodec;

pub struct RawDecoder;

pub struct ResponseEncoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = ExportMetricsServiceResponse;
    type Decode = Bytes;
    type Encoder = ResponseEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> ResponseEncoder {
        ResponseEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        use prost::bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl tonic::codec::Encoder for ResponseEncoder {
    type Item = ExportMetricsServiceResponse;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: ExportMetricsServiceResponse,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

#[derive(Clone)]
struct Http {
    output: Output,
    limit: usize,
    expected: Option<Arc<str>>,
}

fn too_large(limit: usize) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body over {limit} bytes"),
    )
        .into_response()
}

/// OTLP/HTTP's `POST /v1/metrics` into `output`: bodies up to `limit` bytes, compressed and
/// inflated alike; a bearer token when `expected` names one.
pub fn http_router(output: Output, limit: usize, expected: Option<Arc<str>>) -> Router {
    Router::new()
        .route("/v1/metrics", post(http_export))
        // The body extractor's own limit covers the compressed body.
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(Http {
            output,
            limit,
            expected,
        })
}

async fn http_export(State(h): State<Http>, headers: HeaderMap, body: Bytes) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !authorized(h.expected.as_deref(), given) {
        return (StatusCode::UNAUTHORIZED, "a valid bearer token is required").into_response();
    }
    let text = |k: header::HeaderName| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let json = text(header::CONTENT_TYPE).starts_with("application/json");
    let inflated;
    let body: &[u8] = match text(header::CONTENT_ENCODING).as_str() {
        "gzip" => {
            // Refused before inflating when nothing could be taken anyway.
            if let Err(e) = h.output.ready() {
                return Refusal::Send(e).into_http();
            }
            let mut out = Vec::new();
            let decoder = flate2::read::GzDecoder::new(&body[..]);
            // One byte past the limit tells a body over it from one at it.
            match decoder.take(h.limit as u64 + 1).read_to_end(&mut out) {
                Ok(n) if n > h.limit => return too_large(h.limit),
                Ok(_) => {
                    inflated = out;
                    &inflated
                }
                Err(e) => {
                    return (StatusCode::BAD_REQUEST, format!("bad gzip body: {e}")).into_response()
                }
            }
        }
        "" | "identity" => &body,
        other => {
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Encoding `{other}`"),
            )
                .into_response()
        }
    };
    if body.len() > h.limit {
        return too_large(h.limit);
    }
    let request = if json {
        Body::Json(body)
    } else {
        Body::Protobuf(body)
    };
    match take(&h.output, request).await {
        Ok(response) if json => {
            let body = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Ok(response) => (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            response.encode_to_vec(),
        )
            .into_response(),
        Err(refusal) => refusal.into_http(),
    }
}

#[async_trait]
impl Receiver for OtlpReceiver {
    async fn run(self: Box<Self>, ctx: ReceiverContext) -> Result<(), ComponentError> {
        let mut tasks = tokio::task::JoinSet::new();
        let expected = self
            .config
            .bearer_token
            .as_ref()
            .filter(|t| !t.is_empty())
            .map(|t| Arc::<str>::from(t.as_str()));
        if let (Some(listener), Some(cfg)) = (self.grpc, &self.config.protocols.grpc) {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            info!(receiver = %ctx.id, addr = ?listener.local_addr().ok(), "OTLP/gRPC listening");
            let grpc = GrpcService {
                output: ctx.output.clone(),
                expected: expected.clone(),
            };
            let service = RawExportService::new(
                move |request| -> ExportFuture { Box::pin(grpc.clone().export(request)) },
                cfg.max_recv_msg_size_mib << 20,
            );
            let stop = ctx.shutdown.clone();
            let incoming = tokio_stream_listener(listener);
            // Requests of a few hundred kB arrive without waiting for window updates; a client
            // gets bounded streams and time.
            let mut server = tonic::transport::Server::builder()
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .max_concurrent_streams(256)
                .timeout(Duration::from_secs(30))
                .http2_keepalive_interval(Some(Duration::from_secs(60)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)));
            if let Some(tls) = &cfg.tls {
                let pems = tls.read().map_err(ComponentError::Config)?;
                let mut tls = tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(pems.cert, pems.key));
                if let Some(ca) = pems.client_ca {
                    tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
                }
                server = server
                    .tls_config(tls)
                    .map_err(|e| ComponentError::Config(format!("protocols.grpc.tls: {e}")))?;
            }
            tasks.spawn(async move {
                let r = server
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await;
                r.map_err(|e| e.to_string())
            });
        }
        if let (Some(listener), Some(cfg)) = (self.http, &self.config.protocols.http) {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            info!(receiver = %ctx.id, addr = ?listener.local_addr().ok(), "OTLP/HTTP listening");
            let limit = cfg.max_request_body_size_mib << 20;
            let app = http_router(ctx.output.clone(), limit, expected.clone());
            let stop = ctx.shutdown.clone();
            let tls = cfg
                .tls
                .as_ref()
                .map(TlsServerConfig::server_config)
                .transpose()
                .map_err(ComponentError::Config)?;
            tasks.spawn(async move {
                tls::serve(listener, app, tls, stop)
                    .await
                    .map_err(|e| e.to_string())
            });
        }
        // Requests in flight at shutdown get a grace period; a stalled client past it is cut
        // off, so that it cannot keep the pipelines (and their queued data) from draining.
        let cut_off = async {
            ctx.shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::pin!(cut_off);
        loop {
            tokio::select! {
                done = tasks.join_next() => match done {
                    Some(Ok(Err(e))) => {
                        return Err(ComponentError::Config(format!("OTLP server stopped: {e}")))
                    }
                    Some(_) => {}
                    None => return Ok(()),
                },
                () = &mut cut_off => {
                    tasks.abort_all();
                    return Ok(());
                }
            }
        }
    }
}

/// The listener's connections as the stream tonic serves.
fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| {
            // Without it an answer's frames wait for the client's delayed ACK (~40 ms each).
            let _ = s.set_nodelay(true);
            s
        });
        Some((next, l))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use genai_collector_core::model::{kv, number_point, Metric, MetricExt};

    #[test]
    fn metrics_without_data_are_rejected_as_partial_success() {
        let mut batch = Batch::with_resource(
            vec![kv("service.name", "app")],
            vec![Metric::gauge("ok", "", vec![number_point(1, 1.0, vec![])])],
        );
        batch.resource_metrics[0].scope_metrics[0]
            .metrics
            .push(Metric {
                name: "empty".into(),
                ..Default::default()
            });
        let (accepted, rejected) = accept(batch.clone());
        assert_eq!((rejected, accepted.point_count()), (1, 1));
        assert_eq!(
            accepted
                .metrics()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["ok"]
        );
        assert!(partial(rejected).unwrap().error_message.contains("no data"));
        assert_eq!(partial(0), None);
    }
}
