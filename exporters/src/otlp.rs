//! `otlp`: sends batches to an OTLP backend over gRPC or HTTP (protobuf), gzip-compressed.
//!
//! The runtime queues, retries and times out (see "Settings every exporter takes"); this
//! exporter says which failures are worth a retry: unavailable, overloaded and timed-out
//! backends (gRPC `UNAVAILABLE`, `RESOURCE_EXHAUSTED`, `DEADLINE_EXCEEDED`, `ABORTED`; HTTP 429,
//! 502, 503, 504, honouring `Retry-After`) are retried; a rejected request (bad data, auth) is
//! dropped and counted.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use genai_collector_core::component::error_chain;
use genai_collector_core::config::header_map;
use genai_collector_core::model::GRPC_EXPORT_PATH;
use genai_collector_core::retry_info;
use genai_collector_core::tls::TlsClientConfig;
use genai_collector_core::{
    async_trait, Batch, BuildContext, Bytes, ComponentConfig, ComponentError, ExportError,
    Exporter, ExporterFactory, ValidationError,
};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Grpc,
    Http,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    Gzip,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpExporterConfig {
    /// `http://gateway:4317` for gRPC; `http://gateway:4318` for HTTP (`/v1/metrics` is added
    /// when the URL has no path).
    pub endpoint: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub compression: Compression,
    /// Request headers (`authorization: Bearer ...`, tenant ids).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// For `https://` endpoints: extra CAs and a client certificate.
    #[serde(default)]
    pub tls: TlsClientConfig,
}

impl ComponentConfig for OtlpExporterConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        let url = reqwest::Url::parse(&self.endpoint).map_err(|e| {
            ValidationError::field("endpoint", format!("`{}` is not a URL: {e}", self.endpoint))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ValidationError::field(
                "endpoint",
                "must be an http:// or https:// URL",
            ));
        }
        header_map(&self.headers).map_err(|e| ValidationError::field("headers", e))?;
        self.tls
            .read()
            .map_err(|e| ValidationError::field("tls", e))?;
        if self.tls.insecure_skip_verify && self.protocol == Protocol::Grpc {
            return Err(ValidationError::field(
                "tls.insecure_skip_verify",
                "is not offered for gRPC: give the server's CA in `tls.ca_file`",
            ));
        }
        Ok(())
    }
}

pub struct OtlpExporterFactory;

impl ExporterFactory for OtlpExporterFactory {
    type Config = OtlpExporterConfig;

    fn kind(&self) -> &'static str {
        "otlp"
    }

    fn description(&self) -> &'static str {
        "sends to an OTLP backend over gRPC or HTTP (protobuf, gzip), retryable and permanent failures told apart"
    }

    fn build(
        &self,
        config: OtlpExporterConfig,
        _: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        Ok(Box::new(OtlpExporter::new(config)?))
    }
}

impl OtlpExporter {
    /// The exporter itself, for a component that sends through it (`loadbalancing`).
    pub fn new(config: OtlpExporterConfig) -> Result<Self, ComponentError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pems = config.tls.read().map_err(ComponentError::Config)?;
        let sender = match config.protocol {
            Protocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
                    .map_err(|e| ComponentError::Config(format!("endpoint: {e}")))?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .initial_stream_window_size(1 << 20)
                    .initial_connection_window_size(4 << 20);
                if config.endpoint.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(ca) = pems.ca {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
                    }
                    if let Some((cert, key)) = pems.identity {
                        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
                    }
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| ComponentError::Config(format!("tls: {e}")))?;
                }
                let channel = endpoint.connect_lazy();
                let mut client =
                    tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
                if config.compression == Compression::Gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                let headers = header_map(&config.headers).map_err(ComponentError::Config)?;
                let metadata = tonic::metadata::MetadataMap::from_headers(headers);
                Sender::Grpc { client, metadata }
            }
            Protocol::Http => {
                let mut url = reqwest::Url::parse(&config.endpoint)
                    .map_err(|e| ComponentError::Config(e.to_string()))?;
                if url.path() == "/" || url.path().is_empty() {
                    url.set_path("/v1/metrics");
                }
                let headers = header_map(&config.headers).map_err(ComponentError::Config)?;
                let mut builder = reqwest::Client::builder()
                    .default_headers(headers)
                    .danger_accept_invalid_certs(config.tls.insecure_skip_verify);
                if let Some(ca) = &pems.ca {
                    for cert in reqwest::Certificate::from_pem_bundle(ca)
                        .map_err(|e| ComponentError::Config(format!("tls.ca_file: {e}")))?
                    {
                        builder = builder.add_root_certificate(cert);
                    }
                }
                if let Some(pem) = pems.identity_pem() {
                    builder = builder.identity(reqwest::Identity::from_pem(&pem).map_err(|e| {
                        ComponentError::Config(format!("tls client certificate: {e}"))
                    })?);
                }
                let client = builder
                    .build()
                    .map_err(|e| ComponentError::Config(e.to_string()))?;
                Sender::Http { client, url }
            }
        };
        Ok(OtlpExporter {
            sender,
            gzip: config.compression == Compression::Gzip,
        })
    }
}

enum Sender {
    Grpc {
        client: tonic::client::Grpc<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: reqwest::Client,
        url: reqwest::Url,
    },
}

pub struct OtlpExporter {
    sender: Sender,
    gzip: bool,
}

/// A gRPC codec that sends a request already encoded (from the borrowed batch, so the batch
/// is never cloned into an owned message) and decodes the export response. Any OTLP client
/// that holds encoded requests can use it.
pub struct EncodedCodec;

pub struct EncodedEncoder;

pub struct ResponseDecoder;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = prost::bytes::Bytes;
    type Decode = ExportMetricsServiceResponse;
    type Encoder = EncodedEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> EncodedEncoder {
        EncodedEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl tonic::codec::Encoder for EncodedEncoder {
    type Item = prost::bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: prost::bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = ExportMetricsServiceResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ExportMetricsServiceResponse>, tonic::Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("bad export response: {e}")))
    }
}

/// A backend's own words, cut to what a log line and `/healthz` need: a hostile or broken
/// backend must not fill them.
fn excerpt(text: &str) -> String {
    const MAX: usize = 256;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
        None => text.to_owned(),
    }
}

fn grpc_error(status: tonic::Status) -> ExportError {
    use tonic::Code;
    let message = format!("gRPC {:?}: {}", status.code(), excerpt(status.message()));
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => ExportError::Retryable {
            message,
            retry_after: retry_info::decode(status.details()),
        },
        _ => ExportError::Permanent(message),
    }
}

/// An HTTP body gzip-compressed. Done as each attempt is sent, by the exporter's consumers in
/// parallel, as gRPC compresses in its own framing: the request is encoded (and queued) by the
/// pipeline, which should stay cheap.
fn gzip(body: &[u8]) -> Result<Bytes, ExportError> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body)
        .and_then(|()| enc.finish())
        .map(Bytes::from)
        .map_err(|e| ExportError::Permanent(e.to_string()))
}

#[async_trait]
impl Exporter for OtlpExporter {
    async fn export(&self, batch: &Batch) -> Result<(), ExportError> {
        self.export_encoded(batch.encode_request().into()).await
    }

    fn encode(&self, batch: &Batch) -> Option<Bytes> {
        Some(batch.encode_request().into())
    }

    async fn export_encoded(&self, body: Bytes) -> Result<(), ExportError> {
        match &self.sender {
            Sender::Grpc { client, metadata } => {
                // A clone shares the channel; each request in flight needs its own handle.
                let mut client = client.clone();
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                client.ready().await.map_err(|e| {
                    ExportError::retryable(format!("cannot connect: {}", error_chain(&e)))
                })?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_EXPORT_PATH);
                client
                    .unary(request, path, EncodedCodec)
                    .await
                    .map(|_| ())
                    .map_err(grpc_error)
            }
            Sender::Http { client, url } => {
                let mut request = client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf");
                let body = if self.gzip {
                    request = request.header(reqwest::header::CONTENT_ENCODING, "gzip");
                    gzip(&body)?
                } else {
                    body
                };
                let response = request
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| ExportError::retryable(format!("cannot send: {e}")))?;
                let status = response.status();
                if status.is_success() {
                    return Ok(());
                }
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let message = format!("HTTP {}", status.as_u16());
                match status.as_u16() {
                    429 | 502 | 503 | 504 => Err(ExportError::Retryable {
                        message,
                        retry_after,
                    }),
                    _ => Err(ExportError::Permanent(message)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backends_message_is_quoted_in_part() {
        let long = "é".repeat(10_000);
        let e = grpc_error(tonic::Status::unavailable(long));
        let text = e.to_string();
        assert!(text.chars().count() < 320, "{} chars", text.chars().count());
        assert!(text.contains("(20000 bytes)"), "{text}");
        let short = grpc_error(tonic::Status::unavailable("busy")).to_string();
        assert!(short.ends_with("gRPC Unavailable: busy"), "{short}");
    }

    #[test]
    fn grpc_codes_sort_into_retryable_and_permanent() {
        assert!(matches!(
            grpc_error(tonic::Status::unavailable("down")),
            ExportError::Retryable { .. }
        ));
        assert!(matches!(
            grpc_error(tonic::Status::resource_exhausted("busy")),
            ExportError::Retryable { .. }
        ));
        assert!(matches!(
            grpc_error(tonic::Status::invalid_argument("bad")),
            ExportError::Permanent(_)
        ));
        assert!(matches!(
            grpc_error(tonic::Status::unauthenticated("who")),
            ExportError::Permanent(_)
        ));
        let busy = tonic::Status::with_details(
            tonic::Code::ResourceExhausted,
            "busy",
            retry_info::encode(8, "busy", Duration::from_millis(2500)).into(),
        );
        assert!(matches!(
            grpc_error(busy),
            ExportError::Retryable { retry_after: Some(d), .. } if d == Duration::from_millis(2500)
        ));
    }
}
