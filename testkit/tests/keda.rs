//! The `keda_scaler` exporter as KEDA sees it: a Python gRPC client built from KEDA's proto
//! (tests/peers/keda_client.py) asks a gateway for the metric spec and the values of a pool's
//! signals while an agent process scrapes two engine simulators whose load the test moves,
//! watches `IsActive` turn false after the idle window, and gets an error, not a 0, once the
//! agent stops reporting.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use genai_collector_core::config::{self, Source};
use genai_collector_core::Service;
use genai_collector_testkit::sim::{self, EngineKind};
use genai_collector_testkit::{components, free_port, peers_python, Capture};
use serde_json::{json, Value};

/// KEDA's side of the gRPC API, one call per line.
struct Keda {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Keda {
    fn start(port: u16, token: Option<&str>) -> Keda {
        Self::start_with(&format!("127.0.0.1:{port}"), token, &[])
    }

    /// With more of keda_client.py's options: `--ca`, `--cert`, `--key`.
    fn start_with(
        address: &str,
        token: Option<&str>,
        options: &[(&str, &std::path::Path)],
    ) -> Keda {
        let mut cmd = Command::new(peers_python());
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/peers/keda_client.py"
        ))
        .arg("--address")
        .arg(address);
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        for (flag, path) in options {
            cmd.arg(flag).arg(path);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        Keda {
            child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, request: Value) -> Value {
        writeln!(self.stdin, "{request}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Calls until `want` holds for the answer, within 20 s.
    fn until(&mut self, request: Value, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = self.call(request.clone());
            if want(&answer) {
                return answer;
            }
            assert!(
                Instant::now() < deadline,
                "{request} never gave what was wanted: {answer}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Keda {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn trigger(signal: &str) -> Value {
    json!({"pool": "chat", "signal": signal, "target": "5"})
}

fn value(answer: &Value) -> Option<f64> {
    answer["values"][0]["value"].as_f64()
}

#[test]
fn keda_scales_a_pool_on_its_signals_and_is_told_when_data_is_stale() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = rt.block_on(async {
        (
            sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap(),
            sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap(),
        )
    });
    a.set_load(Some(1.0));
    b.set_load(Some(1.0));
    let (otlp, scaler) = (free_port(), free_port());
    let gateway = format!(
        r#"
receivers:
  otlp: {{ protocols: {{ grpc: {{ endpoint: "127.0.0.1:{otlp}" }} }} }}
exporters:
  keda_scaler:
    endpoint: "127.0.0.1:{scaler}"
    bearer_token: s3cret
    stale_after: 1s
    scale_to_zero_after: 2s
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [otlp], exporters: [keda_scaler] }}
"#
    );
    let comps = components(&Capture::new());
    let cfg = config::load(&[Source::new("gateway.yaml", gateway)], &comps).unwrap();
    let running =
        rt.block_on(async { Service::build(cfg, &comps).unwrap().start().await.unwrap() });
    let dir = std::env::temp_dir().join(format!("keda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let agent_yaml = dir.join("agent.yaml");
    std::fs::write(
        &agent_yaml,
        format!(
            r#"
receivers:
  vllm: {{ targets: ["{}", "{}"], interval: 200ms, pool: chat }}
processors:
  genai_normalize: {{}}
  # vLLM's page has no max_num_seqs: the capacity signal needs it from here.
  percentages: {{ max_requests: 64 }}
exporters:
  otlp: {{ endpoint: "http://127.0.0.1:{otlp}" }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [vllm], processors: [genai_normalize, percentages], exporters: [otlp] }}
"#,
            a.metrics_url(),
            b.metrics_url()
        ),
    )
    .unwrap();
    let agent = common::Killed(
        Command::new(env!("CARGO_BIN_EXE_testkit-collector"))
            .arg("-c")
            .arg(&agent_yaml)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut keda = Keda::start(scaler, Some("s3cret"));

    // The spec the HPA is made from: a name of letters, digits and dashes, the target as given.
    let spec =
        keda.call(json!({"call": "GetMetricSpec", "metadata": trigger("waiting_per_server")}));
    assert_eq!(
        spec["specs"][0]["name"], "waiting-per-server-pool-chat",
        "{spec}"
    );
    assert_eq!(spec["specs"][0]["target"], 5.0);
    assert_eq!(spec["specs"][0]["target_int"], 5);

    // Full load: 20 waiting on each simulator, so 40 for the pool (KEDA's AverageValue divides
    // by the replicas), every slot running, and the KV cache at 95 % on each.
    let metrics = |signal: &str| {
        json!({"call": "GetMetrics", "metadata": trigger(signal),
               "metric_name": format!("s0-{signal}")})
    };
    let full = keda.until(metrics("waiting_per_server"), |a| value(a) == Some(40.0));
    assert_eq!(
        full["values"][0]["name"], "s0-waiting_per_server",
        "KEDA's name comes back"
    );
    assert_eq!(full["values"][0]["value_int"], 40);
    assert_eq!(value(&keda.call(metrics("capacity"))), Some(200.0));
    assert_eq!(value(&keda.call(metrics("kv_cache"))), Some(190.0));
    let tps = keda.until(metrics("tokens_per_second"), |a| {
        value(a).is_some_and(|v| v > 0.0)
    });
    assert!(value(&tps).unwrap().is_finite());
    let by_model = json!({"call": "GetMetrics", "metadata": {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "signal": "waiting_per_server", "target": "5"}});
    assert_eq!(
        value(&keda.call(by_model)),
        Some(40.0),
        "by model, across the pool"
    );
    let is_active = json!({"call": "IsActive", "metadata": trigger("waiting_per_server")});
    assert_eq!(keda.call(is_active.clone())["active"], true);

    // Half load: nothing waits, and 0 is what the live servers say, not a missing value.
    a.set_load(Some(0.5));
    b.set_load(Some(0.5));
    keda.until(metrics("waiting_per_server"), |a| value(a) == Some(0.0));
    assert_eq!(
        keda.call(is_active.clone())["active"],
        true,
        "requests still run"
    );

    // Idle: the stream says active, then, after `scale_to_zero_after`, inactive.
    a.set_load(Some(0.0));
    b.set_load(Some(0.0));
    let stream = keda.call(
        json!({"call": "StreamIsActive", "metadata": trigger("capacity"),
                                  "count": 2, "timeout": 15}),
    );
    assert_eq!(stream["stream"], json!([true, false]), "{stream}");
    assert_eq!(keda.call(is_active.clone())["active"], false);

    // The agent stops reporting: the values are an error, never a 0; the pool, idle when it
    // went, stays inactive.
    drop(agent);
    let stale = keda.until(metrics("waiting_per_server"), |a| a.get("error").is_some());
    assert_eq!(stale["error"], "UNAVAILABLE", "{stale}");
    assert!(
        stale["details"].as_str().unwrap().contains("pool `chat`"),
        "{stale}"
    );
    assert_eq!(keda.call(is_active)["active"], false);

    // Mistakes are told apart.
    let unknown = keda.call(json!({"call": "GetMetrics", "metadata": {
        "pool": "nope", "signal": "kv_cache", "target": "1"}}));
    assert_eq!(unknown["error"], "NOT_FOUND", "{unknown}");
    let bad = keda.call(json!({"call": "GetMetricSpec", "metadata": {
        "pool": "chat", "signal": "vibes", "target": "1"}}));
    assert_eq!(bad["error"], "INVALID_ARGUMENT", "{bad}");
    let no_target = keda.call(json!({"call": "GetMetricSpec", "metadata": {
        "pool": "chat", "signal": "kv_cache"}}));
    assert_eq!(no_target["error"], "INVALID_ARGUMENT", "{no_target}");
    let optional = keda.call(json!({"call": "StreamMetricSpec", "metadata": trigger("kv_cache")}));
    assert_eq!(
        optional["error"], "UNIMPLEMENTED",
        "KEDA falls back to GetMetricSpec"
    );
    let mut stranger = Keda::start(scaler, None);
    let refused = stranger.call(json!({"call": "IsActive", "metadata": trigger("kv_cache")}));
    assert_eq!(refused["error"], "UNAUTHENTICATED", "{refused}");

    rt.block_on(running.run_until(std::future::ready(())));
    let _ = std::fs::remove_dir_all(&dir);
}

/// KEDA opens one `StreamIsActive` per ScaledObject: a thousand held open at once cost
/// bounded memory, and one past `max_streams` is refused rather than piled on.
#[test]
fn a_thousand_streams_hold_bounded_memory_and_one_more_is_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = rt
        .block_on(sim::start(EngineKind::VllmV1, "127.0.0.1:0"))
        .unwrap();
    let scaler = free_port();
    let yaml = format!(
        r#"
receivers:
  vllm: {{ targets: ["{}"], interval: 200ms, pool: chat }}
processors:
  genai_normalize: {{}}
exporters:
  keda_scaler: {{ endpoint: "127.0.0.1:{scaler}", max_streams: 1000 }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [vllm], processors: [genai_normalize], exporters: [keda_scaler] }}
"#,
        engine.metrics_url()
    );
    let comps = components(&Capture::new());
    let cfg = config::load(&[Source::new("gateway.yaml", yaml)], &comps).unwrap();
    let running =
        rt.block_on(async { Service::build(cfg, &comps).unwrap().start().await.unwrap() });
    let mut keda = Keda::start(scaler, None);
    let is_active = json!({"call": "IsActive", "metadata": trigger("kv_cache")});
    keda.until(is_active, |a| a["active"] == true);
    let rss = || genai_collector_testkit::status_kb(std::process::id(), "VmRSS");
    let before = rss();
    let opened = keda.call(
        json!({"call": "OpenStreams", "metadata": trigger("kv_cache"),
                                  "count": 1001}),
    );
    let during = rss();
    assert_eq!(opened["open"], 1000, "{opened}");
    assert_eq!(opened["errors"]["RESOURCE_EXHAUSTED"], 1, "{opened}");
    let grown_mb = during.saturating_sub(before) as f64 / 1024.0;
    println!("1000 open StreamIsActive streams: +{grown_mb:.1} MB resident");
    assert!(grown_mb < 64.0, "+{grown_mb:.1} MB for 1000 streams");
    // Closed streams give their places back.
    assert_eq!(keda.call(json!({"call": "CloseStreams"}))["closed"], 1000);
    let again = keda.until(
        json!({"call": "OpenStreams", "metadata": trigger("kv_cache"), "count": 10}),
        |a| a["open"] == 10,
    );
    assert_eq!(again["errors"], json!({}));
    rt.block_on(running.run_until(std::future::ready(())));
}

/// KEDA's TriggerAuthentication gives the scaler a CA, a client certificate and its key: the
/// scaler's endpoint with `tls.client_ca_file` answers such a client and refuses one without
/// a certificate.
#[test]
fn keda_reaches_the_scaler_over_mutual_tls() {
    common::install_tls_provider();
    let c = common::certificates("keda-tls");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let scaler = free_port();
    let yaml = format!(
        r#"
receivers:
  generator: {{ batches: 0, points: 1, interval: 1s }}
exporters:
  keda_scaler:
    endpoint: "127.0.0.1:{scaler}"
    tls: {{ cert_file: "{}", key_file: "{}", client_ca_file: "{}" }}
service:
  telemetry: {{ endpoint: null }}
  pipelines:
    metrics: {{ receivers: [generator], exporters: [keda_scaler] }}
"#,
        c.server_cert.display(),
        c.server_key.display(),
        c.ca.display()
    );
    let comps = components(&Capture::new());
    let cfg = config::load(&[Source::new("tls.yaml", yaml)], &comps).unwrap();
    let running =
        rt.block_on(async { Service::build(cfg, &comps).unwrap().start().await.unwrap() });
    let address = format!("localhost:{scaler}");
    let call = json!({"call": "IsActive", "metadata": trigger("kv_cache")});
    let mut keda = Keda::start_with(
        &address,
        None,
        &[
            ("--ca", &c.ca),
            ("--cert", &c.client_cert),
            ("--key", &c.client_key),
        ],
    );
    let answer = keda.call(call.clone());
    assert_eq!(
        answer["error"], "NOT_FOUND",
        "through TLS, an answer: {answer}"
    );
    let mut anonymous = Keda::start_with(&address, None, &[("--ca", &c.ca)]);
    let refused = anonymous.call(call);
    assert_eq!(
        refused["error"], "UNAVAILABLE",
        "no client certificate: {refused}"
    );
    rt.block_on(running.run_until(std::future::ready(())));
    let _ = std::fs::remove_dir_all(&c.dir);
}

/// A server's report as the agent sends it after `genai_normalize`.
fn report(id: &str, pool: &str, model: &str, waiting: f64) -> genai_collector_core::Batch {
    use genai_collector_core::model::{kv, number_point, Metric, MetricExt};
    let model = || vec![kv("gen_ai.request.model", model)];
    genai_collector_core::Batch::with_resource(
        vec![kv("service.instance.id", id), kv("gen_ai.pool.name", pool)],
        vec![
            Metric::gauge(
                "gen_ai.server.requests.waiting",
                "{request}",
                vec![number_point(1, waiting, model())],
            ),
            Metric::gauge(
                "gen_ai.server.requests.running",
                "{request}",
                vec![number_point(1, 1.0, model())],
            ),
            Metric::gauge("up", "", vec![number_point(1, 1.0, vec![])]),
        ],
    )
}

/// Three gateway replicas, each holding some pools (as the agents' `loadbalancing` routes
/// them): KEDA asks any one of them and gets the answer for all, a server whose pool moved
/// counted once by its freshest report, and a replica that is gone left out.
#[test]
fn any_gateway_replica_answers_for_all_of_them() {
    use genai_collector_core::{BuildContext, ComponentConfig, ComponentId, ExporterFactory};
    use genai_collector_exporters::keda_scaler::{KedaScalerConfig, KedaScalerFactory};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let peers: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let scalers: Vec<_> = ports
        .iter()
        .map(|p| {
            let config: KedaScalerConfig = serde_saphyr::from_str(&format!(
                "endpoint: \"127.0.0.1:{p}\"\nbearer_token: s3cret\npeers: {{ static: [{}], timeout: 1s }}\n",
                peers.join(", ")
            ))
            .unwrap();
            config.validate().unwrap();
            let ctx = BuildContext {
                id: ComponentId::parse("keda_scaler").unwrap(),
                pipeline: None,
                telemetry: Default::default(),
            };
            rt.block_on(async { KedaScalerFactory.build(config, &ctx).unwrap() })
        })
        .collect();
    rt.block_on(async {
        // Pool `chat` on replica 0; model `llama` served from pools on replicas 1 and 2; pool
        // `moved` went from replica 0 to 1, and replica 0 still holds its older report.
        for (g, b) in [
            (0, report("s1", "chat", "m", 3.0)),
            (0, report("s2", "chat", "m", 4.0)),
            (1, report("s3", "edge", "llama", 5.0)),
            (2, report("s4", "batch", "llama", 6.0)),
            (0, report("s5", "moved", "m", 100.0)),
        ] {
            scalers[g].export(&b).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        scalers[1]
            .export(&report("s5", "moved", "m", 1.0))
            .await
            .unwrap();
    });
    let waiting = |by: &str, name: &str| {
        json!({"call": "GetMetrics",
               "metadata": {by: name, "signal": "waiting_per_server", "target": "5"},
               "metric_name": "m"})
    };
    for port in ports {
        let mut keda = Keda::start(port, Some("s3cret"));
        assert_eq!(value(&keda.call(waiting("pool", "chat"))), Some(7.0));
        let llama = keda.call(waiting("model", "llama"));
        assert_eq!(value(&llama), Some(11.0), "{llama}");
        assert_eq!(
            value(&keda.call(waiting("pool", "moved"))),
            Some(1.0),
            "the freshest report of s5 only"
        );
        let unknown = keda.call(waiting("pool", "nowhere"));
        assert_eq!(unknown["error"], "NOT_FOUND", "{unknown}");
        let active = keda.call(json!({"call": "IsActive", "metadata": {"pool": "edge", "signal": "waiting_per_server", "target": "5"}}));
        assert_eq!(active["active"], true, "{active}");
    }
    // Replica 2 goes: its servers are left out, the others still answer.
    rt.block_on(async { scalers[2].shutdown().await.unwrap() });
    let mut keda = Keda::start(ports[0], Some("s3cret"));
    let started = Instant::now();
    let without = keda.until(waiting("model", "llama"), |a| value(a) == Some(5.0));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a replica that is gone holds the answer up: {without}"
    );
    for s in &scalers[..2] {
        rt.block_on(s.shutdown()).unwrap();
    }
}
