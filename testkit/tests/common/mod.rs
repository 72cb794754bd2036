//! Helpers for tests that run the collector in process against simulators.

#![allow(dead_code)]

pub mod kube;

use std::collections::BTreeMap;
use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{
    display_value, metric, number_value, AttributesExt, Batch, KeyValue, Metric,
};
use genai_collector_core::Service;
use genai_collector_testkit::{components, Capture};

/// The collector built from `yaml`, and what its `capture` exporters will hold.
fn service(yaml: &str) -> (Service, Capture) {
    let capture = Capture::new();
    let comps = components(&capture);
    let cfg =
        config::load(&[Source::new("test.yaml", yaml)], &comps).unwrap_or_else(|e| panic!("{e}"));
    let service = Service::build(cfg, &comps).unwrap_or_else(|e| panic!("{e}"));
    (service, capture)
}

/// Runs the collector on `yaml` for `secs` seconds and returns what the capture exporter got.
pub async fn run_for(yaml: &str, secs: f64) -> Capture {
    let (service, capture) = service(yaml);
    service
        .run(tokio::time::sleep(Duration::from_secs_f64(secs)))
        .await
        .unwrap();
    capture
}

/// Runs the pipeline in `yaml` until `done` holds for what reached the `capture` exporter
/// (checked every 20 ms), then shuts it down; panics naming `what` if that takes past `within`.
pub async fn run_until(
    yaml: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&Capture) -> bool,
) -> Capture {
    let run = Background::start(yaml);
    run.wait_within(within, what, done).await;
    run.stop().await
}

/// A pipeline running in the background, for tests that change things while it runs and
/// wait for what reaches the `capture` exporter with [`Background::wait`].
pub struct Background {
    pub capture: Capture,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Background {
    pub fn start(yaml: &str) -> Background {
        let (service, capture) = service(yaml);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            service
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Background {
            capture,
            stop,
            task,
        }
    }

    /// Waits (at most 30 s) until `done` holds for what the capture holds.
    pub async fn wait(&self, what: &str, done: impl Fn(&Capture) -> bool) {
        self.wait_within(Duration::from_secs(30), what, done).await
    }

    /// Waits at most `within` until `done` holds for what the capture holds.
    pub async fn wait_within(&self, within: Duration, what: &str, done: impl Fn(&Capture) -> bool) {
        genai_collector_testkit::eventually(within, what, || done(&self.capture).then_some(()))
            .await
    }
    /// Shuts the pipeline down and gives what reached the capture.
    pub async fn stop(self) -> Capture {
        let _ = self.stop.send(());
        self.task.await.unwrap();
        self.capture
    }
}

/// The body of a GET of `url`, which must answer.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// [`get_text`] with a client of its own.
pub async fn fetch(url: &str) -> String {
    install_tls_provider();
    get_text(&reqwest::Client::new(), url).await
}

/// Waits until something listens on the loopback `port` (a receiver's listener is up).
pub async fn listening(port: u16) {
    genai_collector_testkit::eventually(Duration::from_secs(30), "the listener", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;
}

/// How many scrapes of each target reached `capture`.
pub fn scrape_counts(capture: &Capture) -> BTreeMap<String, usize> {
    scrapes(capture)
        .into_iter()
        .map(|(t, s)| (t, s.len()))
        .collect()
}

pub fn resource_attrs(batch: &Batch) -> &Vec<KeyValue> {
    &batch.resource_metrics[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
}

/// One scrape of one target: its resource attributes and metrics by name.
pub struct Scrape {
    pub attrs: BTreeMap<String, String>,
    pub metrics: BTreeMap<String, Metric>,
}

impl Scrape {
    pub fn gauge(&self, name: &str) -> Option<f64> {
        match &self.metrics.get(name)?.data {
            Some(metric::Data::Gauge(g)) => g.data_points.first().and_then(number_value),
            _ => None,
        }
    }
}

/// Every scrape captured, grouped by the target's URL, in order.
pub fn scrapes(capture: &Capture) -> BTreeMap<String, Vec<Scrape>> {
    scrapes_by_resource(capture, "url.full")
}

/// Every batch captured, grouped by the resource attribute `key`, in order.
pub fn scrapes_by_resource(capture: &Capture, key: &str) -> BTreeMap<String, Vec<Scrape>> {
    let mut out: BTreeMap<String, Vec<Scrape>> = BTreeMap::new();
    for b in capture.batches() {
        let attrs = resource_attrs(&b);
        let Some(url) = attrs.get_str(key).map(str::to_owned) else {
            continue;
        };
        let attrs = attrs
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().map(display_value).unwrap_or_default(),
                )
            })
            .collect();
        let metrics = b.metrics().map(|m| (m.name.clone(), m.clone())).collect();
        out.entry(url).or_default().push(Scrape { attrs, metrics });
    }
    out
}

/// PEM files for TLS tests: a CA, a server certificate it signs for localhost and 127.0.0.1,
/// and a client certificate it signs.
pub struct Certs {
    pub dir: std::path::PathBuf,
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

pub fn certificates(name: &str) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: OpenSSL-based clients (grpcio) take a leaf whose issuer equals its
    // subject (rcgen's default name on both) for a self-signed certificate.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "genai-collector test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["agent".into()]);
    let write = |file: &str, pem: &str| {
        let path = dir.join(file);
        std::fs::write(&path, pem).unwrap();
        path
    };
    Certs {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
        dir,
    }
}

/// The OpenTelemetry Python SDK pushing OTLP (tests/peers/otlp_push.py) with `args`.
pub fn otlp_push(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(genai_collector_testkit::peers_python());
    cmd.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/otlp_push.py"))
        .args(args);
    cmd
}

/// Runs [`otlp_push`] to the end and returns the JSON summary it prints (what it sent).
pub async fn otlp_push_summary(args: &[&str]) -> serde_json::Value {
    let mut cmd = otlp_push(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "otlp_push.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap()
}

/// The independent OTLP backend, tests/peers/otlp_sink.py, writing one JSON line per point.
pub struct Sink {
    pub grpc: u16,
    pub http: u16,
    pub out: std::path::PathBuf,
    /// Seconds each export takes (a slow backend).
    pub delay: f64,
    child: Option<std::process::Child>,
}

impl Sink {
    /// Starts the sink on two free ports, refusing its first `fail_first` exports.
    pub async fn start(out: std::path::PathBuf, fail_first: u32) -> Sink {
        Self::start_slow(out, fail_first, 0.0).await
    }

    /// Like [`Sink::start`], taking `delay` seconds over each export.
    pub async fn start_slow(out: std::path::PathBuf, fail_first: u32, delay: f64) -> Sink {
        let mut sink = Sink {
            grpc: free_port(),
            http: free_port(),
            out,
            delay,
            child: None,
        };
        sink.restart(fail_first).await;
        sink
    }

    /// Starts the sink again on the same ports, appending to the same file.
    pub async fn restart(&mut self, fail_first: u32) {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/otlp_sink.py");
        let child = std::process::Command::new(genai_collector_testkit::peers_python())
            .arg(script)
            .args(["--grpc-port", &self.grpc.to_string()])
            .args(["--http-port", &self.http.to_string()])
            .args(["--fail-first", &fail_first.to_string()])
            .args(["--delay", &self.delay.to_string()])
            .arg("--out")
            .arg(&self.out)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Ready once both ports answer.
        for _ in 0..100 {
            let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
            if up(self.grpc) && up(self.http) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the OTLP sink did not start");
    }

    /// Kills the sink at once, as a crashed backend.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the sink with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Every point received so far, as the sink wrote it.
    pub fn rows(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The `value` of every point received so far.
    pub fn values(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["value"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.kill();
    }
}

pub use genai_collector_testkit::free_port;

/// The TLS provider reqwest needs (built without one) before a test builds a client.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A real Prometheus on a free port with `scrape_configs` (YAML, indented under the key),
/// scraping every second, until dropped; `None` when it is not installed.
pub struct Prometheus {
    child: std::process::Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl Prometheus {
    /// Scrapes `target` (a local port) as job `collector`, with `honor_labels`.
    pub fn start(name: &str, target: u16, extra: &[&str]) -> Option<Prometheus> {
        Self::with_jobs(
            name,
            free_port(),
            &format!("  - job_name: collector\n    honor_labels: true\n    static_configs: [{{ targets: [\"127.0.0.1:{target}\"] }}]\n"),
            extra,
        )
    }

    /// Listens on `port`, so that a job can name Prometheus itself.
    pub fn with_jobs(
        name: &str,
        port: u16,
        scrape_configs: &str,
        extra: &[&str],
    ) -> Option<Prometheus> {
        use std::process::{Command, Stdio};
        Command::new("prometheus").arg("--version").output().ok()?;
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!("global: {{ scrape_interval: 1s, scrape_timeout: 900ms }}\nscrape_configs:\n{scrape_configs}"),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Some(Prometheus { child, port, dir })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The attributes of each of a metric's points, whatever its kind.
pub fn point_attributes(m: &Metric) -> Vec<&Vec<KeyValue>> {
    match &m.data {
        Some(metric::Data::Gauge(g)) => g.data_points.iter().map(|p| &p.attributes).collect(),
        Some(metric::Data::Sum(s)) => s.data_points.iter().map(|p| &p.attributes).collect(),
        Some(metric::Data::Histogram(h)) => h.data_points.iter().map(|p| &p.attributes).collect(),
        Some(metric::Data::Summary(s)) => s.data_points.iter().map(|p| &p.attributes).collect(),
        _ => Vec::new(),
    }
}

/// Panics, naming `what` and the metric, when one series (an attribute set, in any order) is
/// in a metric twice.
pub fn assert_each_series_once(batch: &Batch, what: &str) {
    for m in batch.metrics() {
        let mut seen = std::collections::HashSet::new();
        for attrs in point_attributes(m) {
            let mut key: Vec<String> = attrs.iter().map(|a| format!("{a:?}")).collect();
            key.sort();
            assert!(seen.insert(key), "{what}: {} has a series twice", m.name);
        }
    }
}

/// Runs `genai_normalize` with its built-in tables over `batch`.
pub fn normalize(batch: &mut Batch) {
    use genai_collector_core::{BuildContext, ComponentId, ProcessorFactory};
    let ctx = BuildContext {
        id: ComponentId::parse("genai_normalize").unwrap(),
        pipeline: Some("metrics".into()),
        telemetry: Default::default(),
    };
    genai_collector_processors::GenaiNormalizeFactory::default()
        .build(&Default::default(), &ctx)
        .unwrap()
        .process(batch);
}

/// The fake kubelet (tests/peers/fake_kubelet.py): the pod-resources API on a unix socket,
/// answering the allocations in a JSON file it rereads on every call.
pub struct Kubelet(std::process::Child);

impl Kubelet {
    pub fn start(socket: &std::path::Path, allocations: &std::path::Path) -> Kubelet {
        let _ = std::fs::remove_file(socket);
        let mut child = std::process::Command::new(genai_collector_testkit::peers_python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/peers/fake_kubelet.py"
            ))
            .arg("--socket")
            .arg(socket)
            .arg("--allocations")
            .arg(allocations)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        Kubelet(child)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child process killed (and reaped) when the test is done with it, passing or not.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
