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

    let metrics = |client: reqwest::Client| async move {
        let url = format!("http://127.0.0.1:{telemetry}/metrics");
        client.get(url).send().await.ok()?.text().await.ok()
    };
    const EXPORTER_SENT: &str = "genai_collector_exporter_sent_points_total{exporter=\"otlp\"}";
    const OTLP_ACCEPTED: &str = "genai_collector_receiver_accepted_points_total{receiver=\"otlp\"}";

    // A valid change (the scrape interval) after it: taken up, the error gone. The pipeline
    // and its exporter are unchanged, so they run on: their counters go on.
    let before = metrics(client.clone()).await.unwrap();
    write(&config(http, telemetry, sink.grpc, &dir, &scrape).replace("500ms", "1s"));
    eventually_async(Duration::from_secs(20), "the new config running", || {
        let h = health();
        async move { h.await.filter(|b| !b.contains("config_error")) }
    })
    .await;
    pushed(20).await;
    let after = metrics(client.clone()).await.unwrap();
    for series in [EXPORTER_SENT, OTLP_ACCEPTED] {
        let (b, a) = (
            sample(&before, series).unwrap(),
            sample(&after, series).unwrap(),
        );
        assert!(
            a > b,
            "{series}: {b} before the reload, {a} after: restarted"
        );
    }

    // A change to the exporter alone (its timeout): the exporter and its pipeline start over,
    // both receivers are kept running. The engine's counters keep the start time they had,
    // and the receivers' own counters go on: a restarted receiver would start both over.
    let interval_changed_at = unix_nanos();
    let before = metrics(client.clone()).await.unwrap();
    let sent_before = sample(&before, EXPORTER_SENT).unwrap();
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
    // The new exporter's counters start over.
    let after = eventually_async(Duration::from_secs(20), "the reloaded config", || {
        let page = metrics(client.clone());
        async move {
            let page = page.await?;
            (sample(&page, EXPORTER_SENT)? < sent_before).then_some(page)
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

/// The runtime's side of a reload, in process: a receiver added to a pipeline keeps that
/// pipeline (its `batch` processor) and its exporter running, the same
/// instances; a processor's config changed starts the pipeline over but keeps the exporter;
/// a removed receiver stops and frees its port. Every point pushed arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_pipelines_and_exporters_run_on_through_a_reload() {
    use genai_collector_core::config::{self, Source};
    use genai_collector_core::telemetry::Telemetry;
    use genai_collector_core::{ComponentKind, Service};
    use genai_collector_testkit::{components, Capture};

    let (a, b) = (free_port(), free_port());
    let yaml = |receivers: &str, timeout: &str| {
        format!(
            "receivers:\n  otlp/a: {{ protocols: {{ http: {{ endpoint: \"127.0.0.1:{a}\" }} }} }}\n  otlp/b: {{ protocols: {{ http: {{ endpoint: \"127.0.0.1:{b}\" }} }} }}\nprocessors:\n  batch: {{ timeout: {timeout} }}\nexporters:\n  capture:\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [{receivers}], processors: [batch], exporters: [capture] }}\n"
        )
    };
    let capture = Capture::new();
    let comps = components(&capture);
    let load = |text: String| config::load(&[Source::new("c.yaml", text)], &comps).unwrap();
    common::install_tls_provider();
    let client = reqwest::Client::new();
    let push = |port: u16, first: u64| {
        let client = client.clone();
        async move {
            client
                .post(format!("http://127.0.0.1:{port}/v1/metrics"))
                .header("Content-Type", "application/x-protobuf")
                .body(request(first))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    };
    let find = |t: &Telemetry, kind, id: &str| match kind {
        ComponentKind::Processor => t.find_processor(id, "metrics").unwrap(),
        _ => t.find(kind, id).unwrap(),
    };
    let arrived = |capture: &Capture| -> BTreeSet<u64> {
        capture
            .batches()
            .iter()
            .flat_map(|b| b.resource_metrics.iter())
            .flat_map(|rm| rm.scope_metrics.iter())
            .flat_map(|sm| sm.metrics.iter())
            .flat_map(|m| m.number_points())
            .filter_map(genai_collector_core::model::number_value)
            .map(|v| v as u64)
            .collect()
    };

    let service = Service::build(load(yaml("otlp/a", "1s")), &comps).unwrap();
    let telemetry = service.telemetry().clone();
    let running = service.start().await.unwrap();
    common::listening(a).await;
    assert!(push(a, 0).await);
    let batch = find(&telemetry, ComponentKind::Processor, "batch");
    let exporter = find(&telemetry, ComponentKind::Exporter, "capture");

    // otlp/b joins the pipeline: nothing else changed, so the pipeline runs on, its `batch`
    // processor the same instance, and so does the exporter.
    let next = load(yaml("otlp/a, otlp/b", "1s"));
    let (summary, mut kept) = running.stop_for(&next).await;
    assert!(summary.drained);
    assert_eq!(kept.len(), 3, "otlp/a, the pipeline and the exporter");
    let service = Service::build_keeping(next, &comps, &kept).unwrap();
    let running = service.start_with(&mut kept).await.unwrap();
    assert!(kept.is_empty());
    common::listening(b).await;
    assert!(push(a, 100).await && push(b, 200).await);
    assert!(Arc::ptr_eq(
        &batch,
        &find(&telemetry, ComponentKind::Processor, "batch")
    ));
    assert!(Arc::ptr_eq(
        &exporter,
        &find(&telemetry, ComponentKind::Exporter, "capture")
    ));

    // The batch processor's timeout changes and otlp/a leaves: the pipeline starts over (its
    // held batch flushed on the way), the exporter runs on, otlp/a's port is free.
    let next = load(yaml("otlp/b", "2s"));
    let (summary, mut kept) = running.stop_for(&next).await;
    assert!(summary.drained);
    assert_eq!(kept.len(), 2, "otlp/b and the exporter");
    let service = Service::build_keeping(next, &comps, &kept).unwrap();
    let running = service.start_with(&mut kept).await.unwrap();
    assert!(!Arc::ptr_eq(
        &batch,
        &find(&telemetry, ComponentKind::Processor, "batch")
    ));
    assert!(Arc::ptr_eq(
        &exporter,
        &find(&telemetry, ComponentKind::Exporter, "capture")
    ));
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", a)).is_ok(),
        "otlp/a's port is free"
    );
    assert!(push(b, 300).await);
    let summary = running.run_until(std::future::ready(())).await;
    assert!(summary.drained);
    let want: BTreeSet<u64> = [0, 100, 200, 300]
        .iter()
        .flat_map(|f| *f..*f + POINTS)
        .collect();
    assert_eq!(arrived(&capture), want);
}
