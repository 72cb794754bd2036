//! Prometheus parity on pages no one here wrote: a real node_exporter (Debian's
//! `prometheus-node-exporter`) and a real Prometheus's own `/metrics`, each scraped by that
//! Prometheus directly and through the collector (`prometheus` receiver → `prometheus`
//! exporter, which the same Prometheus scrapes with `honor_labels`). Series by series, what
//! the collector re-exposes must have the identity a direct scrape gives it: same names, same
//! labels, same label values (an empty label value is no label; `quantile="0"` stays `0`).

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::free_port;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn installed(program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found || std::env::var_os("CI").is_none(),
        "{program} is not installed (.ci/run installs it)"
    );
    found
}

/// The series Prometheus holds now for `selector`, each as its sorted label pairs.
async fn series(prom: u16, selector: &str) -> Vec<Vec<(String, String)>> {
    let encoded: String = selector
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let url = format!("http://127.0.0.1:{prom}/api/v1/query?query={encoded}");
    let body = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|r| {
            let mut labels: Vec<(String, String)> = r["metric"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            labels.sort();
            labels
        })
        .collect()
}

/// Identities without the scrape's own labels, and without the series each scraper makes
/// about the scrape itself.
fn identities(series: &[Vec<(String, String)>]) -> BTreeSet<String> {
    series
        .iter()
        .filter(|labels| {
            let name = labels
                .iter()
                .find(|(k, _)| k == "__name__")
                .map_or("", |(_, v)| v.as_str());
            !(name == "up"
                || name == "target_info"
                || name.starts_with("scrape_")
                || name.starts_with("genai_collector_"))
        })
        .map(|labels| {
            labels
                .iter()
                .filter(|(k, _)| k != "job" && k != "instance")
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_through_the_collector_keep_the_identity_a_direct_scrape_gives_them() {
    if !installed("prometheus") || !installed("prometheus-node-exporter") {
        eprintln!("prometheus or prometheus-node-exporter not installed: skipped");
        return;
    }
    let (node, exporter) = (free_port(), free_port());
    let _node = Child(
        Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address=127.0.0.1:{node}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Prometheus scrapes node_exporter and itself directly, and the collector's endpoint.
    let own = free_port();
    let jobs = format!(
        "  - job_name: direct\n    static_configs: [{{ targets: [\"127.0.0.1:{node}\", \"127.0.0.1:{own}\"] }}]\n  - job_name: collector\n    honor_labels: true\n    static_configs: [{{ targets: [\"127.0.0.1:{exporter}\"] }}]\n"
    );
    let prom_handle = common::Prometheus::with_jobs("parity", own, &jobs, &[]).unwrap();
    let prom = prom_handle.port;
    // The collector scrapes both pages with the same `job` label Prometheus gives them, so
    // its re-exposed series differ from the direct ones by nothing but where they came from.
    let yaml = format!(
        "receivers:\n  prometheus:\n    targets: [\"http://127.0.0.1:{node}/metrics\", \"http://127.0.0.1:{prom}/metrics\"]\n    interval: 1s\n    job: via\nexporters:\n  prometheus: {{ endpoint: \"127.0.0.1:{exporter}\" }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [prometheus], exporters: [prometheus] }}\n"
    );
    let run = common::Background::start(&yaml);
    // The comparison below queries Prometheus, and its first query adds `/api/v1/query`
    // series to its own page: one now, so that both sides have scraped them by then.
    common::install_tls_provider();
    let client = reqwest::Client::new();
    let warm = format!("http://127.0.0.1:{prom}/api/v1/query?query=up");
    for _ in 0..150 {
        let answered = client.get(&warm).send().await;
        if answered.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Prometheus scrapes both sides every second: ten seconds give each series several.
    tokio::time::sleep(Duration::from_secs(10)).await;

    for (what, port) in [("node_exporter", node), ("Prometheus's own page", prom)] {
        let instance = format!("127.0.0.1:{port}");
        let direct = series(prom, &format!("{{job=\"direct\",instance=\"{instance}\"}}")).await;
        let via = series(prom, &format!("{{job=\"via\",instance=\"{instance}\"}}")).await;
        let (direct, via) = (identities(&direct), identities(&via));
        assert!(direct.len() > 50, "{what}: {} series direct", direct.len());
        // Series a page has only now and then (a GC that just ran) may miss one side's last
        // scrape; every other series must be the same on both sides.
        let only_direct: Vec<_> = direct.difference(&via).collect();
        let only_via: Vec<_> = via.difference(&direct).collect();
        eprintln!(
            "{what}: {} series direct, {} through the collector, {} only direct, {} only through the collector",
            direct.len(),
            via.len(),
            only_direct.len(),
            only_via.len()
        );
        assert!(
            only_direct.is_empty() && only_via.is_empty(),
            "{what}: only direct {only_direct:#?}\nonly through the collector {only_via:#?}"
        );
    }
    run.stop().await;
    drop(prom_handle);
}
