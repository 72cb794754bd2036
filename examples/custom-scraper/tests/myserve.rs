//! The `myserve` scraper against the team's server as prometheus_client serves it
//! (`myserve.py`, a real HTTP server in a child process), through the real runtime: its names
//! come out as the gen_ai and hardware names, with units converted and the KV-cache percentage
//! derived from its blocks.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{metric, number_value, AttributesExt, Batch};
use genai_collector_core::Service;
use genai_collector_processors::GenaiNormalizeFactory;
use genai_collector_testkit::{components, free_port, peers_python, Capture};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every number point of the batch by metric name and its attributes' display.
fn values(batch: &Batch) -> BTreeMap<String, (f64, String)> {
    let mut out = BTreeMap::new();
    for m in batch.metrics() {
        let points = match &m.data {
            Some(metric::Data::Gauge(g)) => &g.data_points,
            Some(metric::Data::Sum(s)) => &s.data_points,
            _ => continue,
        };
        for p in points {
            let key = match p.attributes.get_str("gen_ai.token.type") {
                Some(t) => format!("{} {t}", m.name),
                None => m.name.clone(),
            };
            let model = p.attributes.get_str("gen_ai.request.model").unwrap_or("");
            let gpu = p.attributes.get_str("hw.id").unwrap_or("");
            out.insert(key, (number_value(p).unwrap(), format!("{model}{gpu}")));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_teams_names_come_out_as_gen_ai_names() {
    let port = free_port();
    let mut child = Command::new(peers_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("myserve.py"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python with prometheus_client: pip install -r tests/peers/requirements.txt");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening"), "{line}");
    let _server = Server(child);

    let capture = Capture::new();
    let comps = components(&capture)
        .with_receiver(custom_scraper::FACTORY)
        .with_processor(GenaiNormalizeFactory::with_tables(custom_scraper::TABLES));
    let yaml = format!(
        "receivers:\n  myserve: {{ targets: [\"127.0.0.1:{port}\"], interval: 200ms }}\nprocessors:\n  genai_normalize: {{}}\n  percentages: {{}}\nexporters:\n  capture: {{}}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [myserve], processors: [genai_normalize, percentages], exporters: [capture] }}\n"
    );
    let cfg = config::load(&[Source::new("myserve.yaml", yaml)], &comps).unwrap();
    Service::build(cfg, &comps)
        .unwrap()
        .run(tokio::time::sleep(Duration::from_millis(700)))
        .await
        .unwrap();

    let batches = capture.batches();
    let last = batches.last().expect("a scrape");
    let got = values(last);
    let model = "acme/support-bot-7b".to_owned();
    let expect = [
        ("up", 1.0, String::new()),
        ("gen_ai.server.requests.running", 12.0, model.clone()),
        ("gen_ai.server.requests.waiting", 5.0, model.clone()),
        ("gen_ai.server.requests.max", 32.0, model.clone()),
        // 300 of 1,200 blocks, by `percentages`.
        ("gen_ai.server.kv_cache.usage", 25.0, model.clone()),
        // 12 running of 32.
        ("gen_ai.server.capacity.usage", 37.5, model.clone()),
        ("gen_ai.server.token.usage input", 5000.0, model.clone()),
        ("gen_ai.server.token.usage output", 1500.0, model.clone()),
        // 61,440 MB and 87 %.
        ("hw.gpu.memory.usage", 61440.0 * 1048576.0, "0".into()),
        ("hw.gpu.utilization", 0.87, "0".into()),
    ];
    for (name, value, attrs) in expect {
        assert_eq!(got.get(name), Some(&(value, attrs)), "{name}: {got:?}");
    }
    assert!(
        last.metrics().all(|m| !m.name.starts_with("myserve_")),
        "every name of the team's page is mapped"
    );
    let provider = last.resource_metrics[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .get_str("gen_ai.provider.name");
    assert_eq!(provider, Some("myserve"));
}
