//! One HTTP GET of a metrics page, with a time limit, a size limit that also holds for
//! decompressed bodies (a gzip bomb stops at the limit), and errors that say what went wrong.

use std::time::Duration;

use futures_util::StreamExt;
use genai_collector_core::component::error_chain;

pub use genai_collector_core::tls::TlsClientConfig as TlsConfig;

/// Why a scrape failed; the words go into logs and health checks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScrapeError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("the page is larger than the {0}-byte limit")]
    TooLarge(u64),
    #[error("answered `{0}`, not a metrics page")]
    NotMetrics(String),
    #[error("cannot read the answer: {0}")]
    Body(String),
    #[error("the page is not valid UTF-8")]
    NotUtf8,
    #[error("malformed page: {0}")]
    Parse(String),
    #[error("{0}")]
    Limit(String),
    #[error("not scraped: {0} scrapes in a row timed out; backing off")]
    BackingOff(u32),
}

/// A page as received: the body (decompressed) and its `Content-Type`.
pub(crate) struct Fetched {
    pub body: String,
    pub content_type: String,
}

pub(crate) fn build_client(tls: &TlsConfig) -> Result<reqwest::Client, String> {
    // The ring provider; installing twice is harmless (the second call reports the first).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("genai-collector/", env!("CARGO_PKG_VERSION")));
    builder = tls_client(builder, tls)?;
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Applies `tls:` to an HTTP client.
fn tls_client(
    mut builder: reqwest::ClientBuilder,
    tls: &TlsConfig,
) -> Result<reqwest::ClientBuilder, String> {
    let pems = tls.read()?;
    if let Some(ca) = &pems.ca {
        let certs =
            reqwest::Certificate::from_pem_bundle(ca).map_err(|e| format!("tls.ca_file: {e}"))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(pem) = pems.identity_pem() {
        let id = reqwest::Identity::from_pem(&pem)
            .map_err(|e| format!("tls client certificate: {e}"))?;
        builder = builder.identity(id);
    }
    Ok(builder.danger_accept_invalid_certs(tls.insecure_skip_verify))
}

/// GETs `request` and reads at most `limit` bytes of (decompressed) body.
pub(crate) async fn fetch(
    request: reqwest::RequestBuilder,
    limit: u64,
) -> Result<Fetched, ScrapeError> {
    let response = request.send().await.map_err(|e| {
        if e.is_timeout() {
            ScrapeError::Timeout(Duration::ZERO)
        } else {
            // The URL may carry credentials; the caller names the target.
            ScrapeError::Connect(error_chain(&e.without_url()))
        }
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(ScrapeError::Status(status.as_u16()));
    }
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_owned();
    if content_type.starts_with("text/html") || content_type.starts_with("application/json") {
        return Err(ScrapeError::NotMetrics(content_type));
    }
    let body = read_limited(response, limit).await?;
    let body = String::from_utf8(body).map_err(|_| ScrapeError::NotUtf8)?;
    Ok(Fetched { body, content_type })
}

/// Reads at most `limit` bytes of a response body, decompressed: a gzip bomb stops at the
/// limit as it inflates, never after. Every body a receiver reads goes through here.
pub(crate) async fn read_limited(
    response: reqwest::Response,
    limit: u64,
) -> Result<Vec<u8>, ScrapeError> {
    // Content-Length is of the encoded body; a gzip answer is checked as it decompresses.
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(ScrapeError::TooLarge(limit));
    }
    let mut body =
        Vec::with_capacity(response.content_length().unwrap_or(64 * 1024).min(limit) as usize);
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ScrapeError::Body(error_chain(&e.without_url())))?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(ScrapeError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The most a JSON side endpoint (`/info`, `/props`, `/api/ps`) may answer, decompressed.
pub(crate) const SIDE_LIMIT: u64 = 4 << 20;

/// What a target's JSON side endpoint (TGI's `/info`, llama.cpp's `/props`) answered.
pub(crate) enum SideAnswer<T> {
    Json(T),
    /// 404: this server has no such endpoint and will not grow one; stop asking.
    NotFound,
    /// No answer, an error or a body that does not parse: ask again next scrape.
    Failed,
}

/// GETs `path` on the target's host within `timeout` and parses the JSON body. The target's
/// query stays: a llama.cpp router answers `/props?model=...` for that model.
pub(crate) async fn side_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    target: &str,
    path: &str,
    timeout: Duration,
) -> SideAnswer<T> {
    let Ok(mut url) = reqwest::Url::parse(target) else {
        return SideAnswer::Failed;
    };
    url.set_path(path);
    let response = match client.get(url.clone()).timeout(timeout).send().await {
        Ok(r) => r,
        Err(e) => {
            let e = e.without_url();
            let _ = url.set_password(None);
            tracing::debug!(target = %url, error = %e, "no answer; asking again next scrape");
            return SideAnswer::Failed;
        }
    };
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return SideAnswer::NotFound;
    }
    let Ok(response) = response.error_for_status() else {
        return SideAnswer::Failed;
    };
    match read_limited(response, SIDE_LIMIT).await {
        Ok(body) => match serde_json::from_slice(&body) {
            Ok(v) => SideAnswer::Json(v),
            Err(_) => SideAnswer::Failed,
        },
        Err(e) => {
            let _ = url.set_password(None);
            tracing::debug!(target = %url, error = %e, "unusable answer; asking again next scrape");
            SideAnswer::Failed
        }
    }
}
