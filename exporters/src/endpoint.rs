//! What the exporters that listen (`prometheus`, `keda_scaler`, `model_server_protocol`) share:
//! binding at build time and serving HTTP until shutdown.

use genai_collector_core::tls::{self, TlsServerConfig};
use genai_collector_core::{CancellationToken, ComponentError};

/// Binds `endpoint` now, so a taken port fails the collector's start rather than the first
/// request.
pub(crate) fn bind(endpoint: &str) -> Result<std::net::TcpListener, ComponentError> {
    let listener = std::net::TcpListener::bind(endpoint)
        .map_err(|e| ComponentError::Config(format!("cannot listen on `{endpoint}`: {e}")))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `app` on `listener` (over TLS when `tls` is set) until `stop`; `what` names the
/// exporter in its log lines.
pub(crate) fn spawn_http(
    listener: std::net::TcpListener,
    app: axum::Router,
    tls: Option<&TlsServerConfig>,
    stop: CancellationToken,
    what: &'static str,
) -> Result<(), ComponentError> {
    let tls = tls
        .map(TlsServerConfig::server_config)
        .transpose()
        .map_err(ComponentError::Config)?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        if let Err(e) = tls::serve(listener, app, tls, stop).await {
            tracing::error!(error = %e, exporter = what, "endpoint stopped");
        }
    });
    tracing::info!(%addr, exporter = what, "listening");
    Ok(())
}
