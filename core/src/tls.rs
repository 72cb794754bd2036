//! TLS settings shared by every component: `tls:` on a server (the OTLP receiver, the
//! Prometheus endpoint) and on a client (scrapers, the OTLP exporter), and one HTTP server loop
//! that serves a router over TLS or plain TCP with bounded time and connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// `tls:` on a server: its certificate, and optionally the CAs its clients' certificates must
/// chain to (mutual TLS).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate they sign.
    pub client_ca_file: Option<PathBuf>,
}

/// `tls:` on a client: the CAs to trust beyond the system's and a client certificate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsClientConfig {
    /// PEM file with the CA certificates that sign the servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM files with a client certificate and its key, for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    /// The key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Accept any certificate: for tests only.
    pub insecure_skip_verify: bool,
}

/// A client's TLS files, read and checked.
#[derive(Debug, Clone, Default)]
pub struct ClientPems {
    /// The CA bundle's PEM.
    pub ca: Option<Vec<u8>>,
    /// Certificate chain then key, as `reqwest::Identity::from_pem` wants them.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls.{field} {}: {e}", path.display()))
}

fn certificates(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.{field} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.{field} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read("key_file", path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("tls.key_file {}: no PEM private key: {e}", path.display()))
}

impl ClientPems {
    /// The certificate chain followed by the key, as one PEM.
    pub fn identity_pem(&self) -> Option<Vec<u8>> {
        self.identity
            .as_ref()
            .map(|(cert, key)| [&cert[..], b"\n", key].concat())
    }
}

impl TlsClientConfig {
    /// Reads the files, checking that they hold what they should.
    pub fn read(&self) -> Result<ClientPems, String> {
        let ca = match &self.ca_file {
            Some(path) => {
                certificates("ca_file", path)?;
                Some(read("ca_file", path)?)
            }
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                certificates("cert_file", cert)?;
                private_key(key)?;
                Some((read("cert_file", cert)?, read("key_file", key)?))
            }
            (None, None) => None,
            _ => return Err("tls.cert_file and tls.key_file come together".into()),
        };
        Ok(ClientPems { ca, identity })
    }
}

/// A server's TLS files, read and checked.
#[derive(Debug, Clone)]
pub struct ServerPems {
    /// The certificate chain's PEM.
    pub cert: Vec<u8>,
    /// The key's PEM.
    pub key: Vec<u8>,
    /// CAs a client certificate must chain to (mutual TLS); none: no client certificate asked.
    pub client_ca: Option<Vec<u8>>,
}

impl TlsServerConfig {
    /// Reads the files, checking that they make a working configuration.
    pub fn read(&self) -> Result<ServerPems, String> {
        self.server_config()?;
        Ok(ServerPems {
            cert: read("cert_file", &self.cert_file)?,
            key: read("key_file", &self.key_file)?,
            client_ca: match &self.client_ca_file {
                Some(path) => Some(read("client_ca_file", path)?),
                None => None,
            },
        })
    }

    /// The rustls configuration, offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates("client_ca_file", path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("tls.client_ca_file {}: {e}", path.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .map_err(|e| format!("tls.client_ca_file {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(
                certificates("cert_file", &self.cert_file)?,
                private_key(&self.key_file)?,
            )
            .map_err(|e| format!("tls: the certificate and key do not go together: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// How long a client has to finish the TLS handshake, and to send a request's head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take, body upload included: a client dripping a body byte by
/// byte is cut off here rather than holding the connection (and the data behind it) for ever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; past it new ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;
/// How long requests in flight get to finish once the server is told to stop; then their
/// connections are closed, so that a stalled client never holds the shutdown hostage.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn limit_time(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            axum::http::StatusCode::REQUEST_TIMEOUT,
            format!("the request took longer than {REQUEST_TIMEOUT:?}"),
        )
            .into_response(),
    }
}

/// Serves `router` on `listener` until `stop`, over TLS when `tls` is set. Every connection
/// has bounded time to handshake, send its request head and finish each request; at most
/// `MAX_CONNECTIONS` are served at once. Requests in flight when `stop` comes get
/// `SHUTDOWN_GRACE` to finish before their connections are closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let router = router.layer(axum::middleware::from_fn(limit_time));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(60))
        .max_concurrent_streams(256);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        // Finished connections leave the set as new ones come.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            let _slot = slot;
            let result = match acceptor {
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => return debug!(%peer, "TLS handshake timed out"),
                        };
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
    // What is left is stalled: closing it drops the state its requests hold (a receiver's
    // output), so the pipelines behind can drain.
    connections.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_wrong_files_say_which() {
        let dir = std::env::temp_dir().join(format!("tlscfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk.pem"), "not a certificate").unwrap();
        let server = TlsServerConfig {
            cert_file: dir.join("absent.pem"),
            key_file: dir.join("junk.pem"),
            client_ca_file: None,
        };
        let e = server.server_config().unwrap_err();
        assert!(
            e.starts_with("tls.cert_file ") && e.contains("absent.pem"),
            "{e}"
        );
        let server = TlsServerConfig {
            cert_file: dir.join("junk.pem"),
            ..server
        };
        let e = server.server_config().unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let client = TlsClientConfig {
            cert_file: Some(dir.join("junk.pem")),
            ..Default::default()
        };
        assert_eq!(
            client.read().unwrap_err(),
            "tls.cert_file and tls.key_file come together"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
