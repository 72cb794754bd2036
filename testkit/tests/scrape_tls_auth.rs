//! Scraping with credentials and over TLS signed by a custom CA.

mod common;

use std::sync::Arc;
use std::time::Duration;

use genai_collector_receivers::scrape::{scrape_once, BasicAuth, ScrapeConfig, TlsConfig};
use genai_collector_testkit::sim::{self, fixtures_dir, EngineKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config() -> ScrapeConfig {
    ScrapeConfig {
        timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_basic_auth_and_headers() {
    let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
    s.require_authorization("Bearer s3cret");
    let url = s.metrics_url();
    let no_token = scrape_once(&url, &config()).await.unwrap_err();
    assert_eq!(no_token.to_string(), "answered HTTP 401");
    let token = ScrapeConfig {
        bearer_token: Some("s3cret".into()),
        ..config()
    };
    assert!(scrape_once(&url, &token).await.unwrap() > 50);

    let dir = std::env::temp_dir().join(format!("auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "s3cret\n").unwrap();
    let from_file = ScrapeConfig {
        bearer_token_file: Some(dir.join("token")),
        ..config()
    };
    assert!(
        scrape_once(&url, &from_file).await.is_ok(),
        "the token file is read and trimmed"
    );

    s.require_authorization("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    let basic = ScrapeConfig {
        basic_auth: Some(BasicAuth {
            username: "Aladdin".into(),
            password: Some("open sesame".into()),
            password_file: None,
        }),
        ..config()
    };
    assert!(scrape_once(&url, &basic).await.is_ok());
    // A custom header can carry credentials too.
    let header = ScrapeConfig {
        headers: [(
            "Authorization".to_string(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==".to_string(),
        )]
        .into(),
        ..config()
    };
    assert!(scrape_once(&url, &header).await.is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Serves the vLLM page over HTTPS, one response per connection.
async fn tls_server(cert_pem: String, key_pem: String) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let page = std::fs::read_to_string(fixtures_dir().join("vllm/v1-composed.prom")).unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let page = page.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    page.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(page.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_custom_ca() {
    let certs = common::certificates("scrape-tls");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let addr = tls_server(read(&certs.server_cert), read(&certs.server_key)).await;
    let dir = certs.dir.clone();
    let url = format!("https://localhost:{}/metrics", addr.port());

    let unknown = scrape_once(&url, &config()).await.unwrap_err().to_string();
    assert!(
        unknown.starts_with("cannot connect"),
        "an unknown CA is refused: {unknown}"
    );
    let with_ca = ScrapeConfig {
        tls: TlsConfig {
            ca_file: Some(dir.join("ca.pem")),
            ..Default::default()
        },
        ..config()
    };
    assert!(scrape_once(&url, &with_ca).await.unwrap() > 50);
    let ip_url = format!("https://127.0.0.1:{}/metrics", addr.port());
    assert!(
        scrape_once(&ip_url, &with_ca).await.is_ok(),
        "IP SANs verify too"
    );
    let insecure = ScrapeConfig {
        tls: TlsConfig {
            insecure_skip_verify: true,
            ..Default::default()
        },
        ..config()
    };
    assert!(scrape_once(&url, &insecure).await.is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
