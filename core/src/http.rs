//! The collector's own endpoint: `/metrics` (self-telemetry), `/healthz` and `/readyz`.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Telemetry;

/// Binds `endpoint` and serves until `stop` is cancelled; returns the bound address and the
/// server task, which ends once the listener is closed.
pub async fn serve_telemetry(
    endpoint: &str,
    telemetry: Telemetry,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(endpoint).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(telemetry);
    let task = tokio::spawn(async move {
        if let Err(e) = crate::tls::serve(listener, app, None, stop).await {
            tracing::warn!(error = %e, "self-telemetry endpoint stopped");
        }
    });
    Ok((addr, task))
}

async fn metrics(State(t): State<Telemetry>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        t.render_prometheus(),
    )
}

fn health(ok: bool, t: &Telemetry) -> impl IntoResponse {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        t.health_json(),
    )
}

/// 200 while no component has failed.
async fn healthz(State(t): State<Telemetry>) -> impl IntoResponse {
    health(t.is_healthy(), &t)
}

/// 200 once every component started, until shutdown begins.
async fn readyz(State(t): State<Telemetry>) -> impl IntoResponse {
    health(t.is_ready(), &t)
}
