//! Reloading the config of a running collector process: SIGHUP and `--watch-config`, while an
//! OTLP client pushes into it and its exporter holds a persistent queue for a slow sink (the
//! independent Python sink). A reload that adds a scrape receiver takes effect; an invalid
//! file is refused with its position, shown on `/healthz`, and the running pipelines carry on;
//! a valid change after it is taken up, and one to the exporter alone keeps both receivers
//! running (their counters and the scraped counters' start times go on); one that cannot
//! start (a port taken) gives way to the last one again; every point the collector
//! acknowledged arrives.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, Sink};
use genai_collector_core::model::{kv, number_point, Metric, MetricExt};
use genai_collector_core::Batch;
use genai_collector_testkit::{eventually_async, sim};

const POINTS: u64 = 10;

/// One push request: `POINTS` gauge points whose values are their sequence numbers.
fn request(first: u64) -> Vec<u8> {
    let points = (first..first + POINTS)
        .map(|v| number_point(1, v as f64, vec![]))
        .collect();
    Batch::with_resource(
        vec![kv("service.name", "pusher")],
        vec![Metric::gauge("seq", "1", points)],
    )
    .encode_request()
}

fn config(http: u16, telemetry: u16, sink: u16, dir: &std::path::Path, scrape: &str) -> String {
    format!(
        r#"receivers:
  otlp: {{ protocols: {{ http: {{ endpoint: "127.0.0.1:{http}" }} }} }}
{scrape}exporters:
  otlp:
    endpoint: "http://127.0.0.1:{sink}"
    sending_queue: {{ storage: "{}" }}
service:
  telemetry: {{ endpoint: "127.0.0.1:{telemetry}" }}
  pipelines:
    metrics: {{ receivers: [{}], exporters: [otlp] }}
"#,
        dir.join("queue").display(),
        if scrape.is_empty() {
            "otlp"
        } else {
            "otlp, vllm"
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_every_acknowledged_point_and_an_invalid_one_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut sink = Sink::start_slow(dir.join("points.jsonl"), 0, 0.02).await;
    let engine = sim::start(sim::EngineKind::VllmV1, "127.0.0.1:0")
        .await
        .unwrap();
    let (http, telemetry) = (free_port(), free_port());
    let path = dir.join("collector.yaml");
    let write = |text: &str| {
        // Written whole, then renamed: a watcher never reads half a file.
        let tmp = dir.join("collector.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(&config(http, telemetry, sink.grpc, &dir, ""));
    let child = common::Killed(
        Command::new(env!("CARGO_BIN_EXE_testkit-collector"))
            .arg("-c")
            .arg(&path)
            .arg("--watch-config")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    common::listening(http).await;
    common::install_tls_provider();
    let client = reqwest::Client::new();

    // The client: pushes in turn, each request retried until acknowledged (through the
    // moments a reload has the port closed).
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let pushes = Arc::new(AtomicU64::new(0));
    let pusher = {
        let (client, stop, acked, pushes) =
            (client.clone(), stop.clone(), acked.clone(), pushes.clone());
        let url = format!("http://127.0.0.1:{http}/v1/metrics");
        tokio::spawn(async move {
            let mut next = 0;
            while !stop.load(Ordering::Relaxed) {
                let ok = client
                    .post(&url)
                    .header("Content-Type", "application/x-protobuf")
                    .body(request(next))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    acked.lock().unwrap().extend(next..next + POINTS);
                    pushes.fetch_add(1, Ordering::Relaxed);
                    next += POINTS;
                }
                tokio::time::sleep(Duration::from_millis(if ok { 10 } else { 50 })).await;
            }
        })
    };
    let health = || {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://127.0.0.1:{telemetry}/healthz"))
                .send()
                .await
                .ok()?;
            r.text().await.ok()
        }
    };
    let pushed = |n: u64| {
        let pushes = pushes.clone();
        async move {
            let start = pushes.load(Ordering::Relaxed);
            eventually_async(Duration::from_secs(20), "pushes acknowledged", || {
                let pushes = pushes.clone();
                async move { (pushes.load(Ordering::Relaxed) >= start + n).then_some(()) }
            })
            .await
        }
    };
    pushed(20).await;

    // SIGHUP with a scrape receiver added: the engine's points reach the sink.
    let scrape = format!(
        "  vllm: {{ targets: [\"{}\"], interval: 500ms }}\n",
        engine.metrics_url()
    );
    write(&config(http, telemetry, sink.grpc, &dir, &scrape));
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let scraped = |sink: &Sink| {
        sink.rows()
            .iter()
            .filter(|r| r["resource"]["service.name"] == "vllm")
            .count()
    };
    eventually_async(
        Duration::from_secs(30),
        "scraped points at the sink",
        || {
            let n = scraped(&sink);
            async move { (n > 0).then_some(()) }
        },
    )
    .await;
    pushed(20).await;

    // An invalid file, picked up by the watch: refused with its position, shown on /healthz;
    // the pipelines carry on (pushes are still acknowledged).
    let bad = config(http, telemetry, sink.grpc, &dir, &scrape).replace("interval:", "intervall:");
    write(&bad);
    let refused = eventually_async(Duration::from_secs(20), "the refusal on /healthz", || {
        let h = health();
        async move { h.await.filter(|b| b.contains("config_error")) }
    })
    .await;
    assert!(
        refused.contains("collector.yaml") && refused.contains("intervall"),
        "{refused}"
    );
    let (line, text) = bad
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("intervall"))
        .unwrap();
    let position = format!(
        "collector.yaml:{}:{}:",
        line + 1,
        text.find("intervall").unwrap() + 1
    );
    assert!(refused.contains(&position), "{position} in {refused}");
    pushed(20).await;

    // A valid change (the scrape interval) after it: taken up, the error gone.
    write(&config(http, telemetry, sink.grpc, &dir, &scrape).replace("500ms", "1s"));
    eventually_async(Duration::from_secs(20), "the new config running", || {
        let h = health();
        async move { h.await.filter(|b| !b.contains("config_error")) }
    })
    .await;
    pushed(20).await;

    // A change elsewhere (the exporter's timeout): both receivers are kept running. The
    // engine's counters keep the start time they had, and the receivers' own counters go on
    // from where they were: a restarted receiver would start both over.
    let interval_changed_at = unix_nanos();
    let metrics = |client: reqwest::Client| async move {
        let url = format!("http://127.0.0.1:{telemetry}/metrics");
        client.get(url).send().await.ok()?.text().await.ok()
    };
    let before = metrics(client.clone()).await.unwrap();
    let uptime_before = sample(&before, "genai_collector_uptime_seconds").unwrap();
    // From scrapes of the receiver the interval change started (the sink is slow: rows of the
    // one before may still be arriving).
    let starts_before = eventually_async(Duration::from_secs(30), "scrapes since", || {
        let starts = counter_starts(&sink.rows(), interval_changed_at);
        async move { (!starts.is_empty()).then_some(starts) }
    })
    .await;
    write(
        &config(http, telemetry, sink.grpc, &dir, &scrape)
            .replace("500ms", "1s")
            .replace("    sending_queue:", "    timeout: 6s\n    sending_queue:"),
    );
    // The new service's registry: its uptime starts over.
    let after = eventually_async(Duration::from_secs(20), "the reloaded config", || {
        let page = metrics(client.clone());
        async move {
            let page = page.await?;
            let uptime = sample(&page, "genai_collector_uptime_seconds")?;
            (uptime < uptime_before).then_some(page)
        }
    })
    .await;
    let reloaded_at = unix_nanos();
    for receiver in ["otlp", "vllm"] {
        let series =
            format!("genai_collector_receiver_accepted_points_total{{receiver=\"{receiver}\"}}");
        let (b, a) = (
            sample(&before, &series).unwrap(),
            sample(&after, &series).unwrap(),
        );
        assert!(
            a >= b,
            "{receiver}: {b} accepted before the reload, {a} after: restarted"
        );
    }
    let starts_after =
        eventually_async(Duration::from_secs(30), "scrapes after the reload", || {
            let starts = counter_starts(&sink.rows(), reloaded_at);
            async move { (!starts.is_empty()).then_some(starts) }
        })
        .await;
    for (series, start) in &starts_after {
        if let Some(before) = starts_before.get(series) {
            assert_eq!(start, before, "{series}: its start time changed");
        }
    }
    assert!(
        starts_after.keys().any(|k| starts_before.contains_key(k)),
        "the same series before and after"
    );
    pushed(20).await;

    // A valid config that cannot start (its port is taken): the last one runs again, and
    // /healthz tells why.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    write(&config(http, telemetry, sink.grpc, &dir, &scrape).replace(
        &format!("endpoint: \"127.0.0.1:{http}\""),
        &format!("endpoint: \"127.0.0.1:{taken_port}\""),
    ));
    let back = eventually_async(Duration::from_secs(20), "the last config back", || {
        let h = health();
        async move { h.await.filter(|b| b.contains("config_error")) }
    })
    .await;
    assert!(back.contains("cannot listen"), "{back}");
    pushed(20).await;
    drop(taken);

    stop.store(true, Ordering::Relaxed);
    pusher.await.unwrap();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut child = child;
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    sink.stop();

    let arrived: BTreeSet<u64> = sink
        .rows()
        .iter()
        .filter(|r| r["resource"]["service.name"] == "pusher")
        .filter_map(|r| r["value"].as_f64())
        .map(|v| v as u64)
        .collect();
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<_> = acked.difference(&arrived).take(10).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged points lost, such as {lost:?}",
        acked.len() - acked.intersection(&arrived).count(),
        acked.len()
    );
    println!(
        "{} points acknowledged through five reloads, all arrived",
        acked.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The value of the series `name` (with its labels, as written) on a Prometheus page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The start time of each of the engine's counter series, from its latest point scraped
/// after `since` (Unix ns).
fn counter_starts(
    rows: &[serde_json::Value],
    since: u64,
) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for r in rows {
        let scraped = r["time_unix_nano"].as_u64().unwrap_or(0);
        if r["resource"]["service.name"] != "vllm" || r["kind"] != "sum" || scraped <= since {
            continue;
        }
        let series = format!("{}{}", r["metric"], r["attributes"]);
        out.insert(series, r["start_time_unix_nano"].as_u64().unwrap_or(0));
    }
    out
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
