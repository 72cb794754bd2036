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

use genai_collector_core::config::header_map;
use genai_collector_core::{
    async_trait, Batch, BuildContext, ComponentConfig, ComponentError, ExportError, Exporter,
    ExporterFactory, ValidationError,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
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
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sender = match config.protocol {
            Protocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
                    .map_err(|e| ComponentError::Config(format!("endpoint: {e}")))?
                    .connect_timeout(Duration::from_secs(5))
                    .connect_lazy();
                let mut client =
                    MetricsServiceClient::new(channel).max_encoding_message_size(64 << 20);
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
                let client = reqwest::Client::builder()
                    .default_headers(headers)
                    .build()
                    .map_err(|e| ComponentError::Config(e.to_string()))?;
                Sender::Http { client, url }
            }
        };
        Ok(Box::new(OtlpExporter {
            sender,
            gzip: config.compression == Compression::Gzip,
        }))
    }
}

enum Sender {
    Grpc {
        client: MetricsServiceClient<tonic::transport::Channel>,
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

/// The request's protobuf encoding, written from the borrowed batch (no copy of its data).
fn encode(batch: &Batch) -> Vec<u8> {
    let mut buf = Vec::with_capacity(
        batch
            .resource_metrics
            .iter()
            .map(prost::Message::encoded_len)
            .sum::<usize>()
            + 16,
    );
    for rm in &batch.resource_metrics {
        prost::encoding::message::encode(1, rm, &mut buf);
    }
    buf
}

fn grpc_error(status: tonic::Status) -> ExportError {
    use tonic::Code;
    let message = format!("gRPC {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => ExportError::retryable(message),
        _ => ExportError::Permanent(message),
    }
}

#[async_trait]
impl Exporter for OtlpExporter {
    async fn export(&mut self, batch: &Batch) -> Result<(), ExportError> {
        match &mut self.sender {
            Sender::Grpc { client, metadata } => {
                let mut request = tonic::Request::new(ExportMetricsServiceRequest {
                    resource_metrics: batch.resource_metrics.clone(),
                });
                *request.metadata_mut() = metadata.clone();
                client.export(request).await.map(|_| ()).map_err(grpc_error)
            }
            Sender::Http { client, url } => {
                let mut body = encode(batch);
                let mut request = client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf");
                if self.gzip {
                    let mut enc = flate2::write::GzEncoder::new(
                        Vec::with_capacity(body.len() / 4),
                        flate2::Compression::fast(),
                    );
                    enc.write_all(&body)
                        .map_err(|e| ExportError::Permanent(e.to_string()))?;
                    body = enc
                        .finish()
                        .map_err(|e| ExportError::Permanent(e.to_string()))?;
                    request = request.header(reqwest::header::CONTENT_ENCODING, "gzip");
                }
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
    use genai_collector_core::model::{kv, number_point, Metric, MetricExt};
    use prost::Message as _;

    #[test]
    fn borrowed_encoding_equals_the_message_encoding() {
        let batch = Batch::with_resource(
            vec![kv("service.name", "x")],
            vec![Metric::gauge(
                "g",
                "1",
                vec![number_point(5, 1.5, vec![kv("a", "b")])],
            )],
        );
        let expected = batch.clone().into_request().encode_to_vec();
        assert_eq!(encode(&batch), expected);
        let decoded = ExportMetricsServiceRequest::decode(&encode(&batch)[..]).unwrap();
        assert_eq!(Batch::from_request(decoded), batch);
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
    }
}
