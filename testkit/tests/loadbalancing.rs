//! The `loadbalancing` exporter over real OTLP/gRPC: three gateways (each an `otlp` receiver
//! feeding its own capture), 60 pools routed by `gen_ai.pool.name`. Every pool lands on
//! exactly one gateway, the pools spread over the three, and with one gateway gone from the
//! list only that gateway's pools move; a gateway that goes down has its pools failed over to
//! the next gateway and back when it returns. End to end: two agents scrape 120 engine
//! simulators (60 pools of two) into three gateways' `pool_aggregate`: each pool's aggregates
//! on exactly one gateway, equal to what the simulators' pages say, through a gateway's death
//! and return, with every point the agents queued received by a gateway.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{kv, number_point, AttributesExt, Metric, MetricExt};
use genai_collector_core::telemetry::Telemetry;
use genai_collector_core::{
    Batch, BuildContext, ComponentConfig, ComponentId, ExporterFactory, RunningService, Service,
};
use genai_collector_exporters::loadbalancing::{LoadBalancingConfig, LoadBalancingFactory};
use genai_collector_testkit::{components, eventually, free_port, Capture};

/// A gateway: an OTLP/gRPC receiver into a capture.
async fn gateway() -> (u16, Capture, RunningService) {
    let port = free_port();
    let (capture, running) = gateway_at("127.0.0.1", port).await;
    (port, capture, running)
}

/// A gateway listening on `host:port` (any loopback address: 127.0.0.2 is a pod of its own).
async fn gateway_at(host: &str, port: u16) -> (Capture, RunningService) {
    let yaml = format!(
        "receivers:\n  otlp: {{ protocols: {{ grpc: {{ endpoint: \"{host}:{port}\" }} }} }}\nexporters:\n  capture:\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [capture] }}\n"
    );
    let capture = Capture::new();
    let comps = components(&capture);
    let cfg = config::load(&[Source::new("gateway.yaml", yaml)], &comps).unwrap();
    let running = Service::build(cfg, &comps).unwrap().start().await.unwrap();
    genai_collector_testkit::eventually(Duration::from_secs(30), "the gateway", || {
        std::net::TcpStream::connect((host, port)).ok()
    })
    .await;
    (capture, running)
}

/// 60 pools' servers, one gauge each, and one resource without a pool.
fn pools() -> Batch {
    let mut b = Batch::new();
    for i in 0..60 {
        b.push_resource(
            vec![
                kv("gen_ai.pool.name", format!("pool-{i}")),
                kv("service.instance.id", format!("s{i}")),
            ],
            vec![Metric::gauge(
                "gen_ai.server.requests.waiting",
                "{request}",
                vec![number_point(1, i as f64, vec![])],
            )],
        );
    }
    b.push_resource(
        vec![kv("service.name", "no-pool")],
        vec![Metric::gauge("up", "", vec![number_point(1, 1.0, vec![])])],
    );
    b
}

/// A balancer over gateways on these ports, whose backends retry every 100-200 ms and recheck
/// an unreachable one after 500 ms.
fn balancer(ports: &[u16]) -> Box<dyn genai_collector_core::Exporter> {
    let hostnames: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let yaml = format!(
        "protocol: {{ otlp: {{ compression: none, retry_on_failure: {{ initial_interval: 100ms, max_interval: 200ms }} }} }}\nresolver: {{ static: {{ hostnames: [{}] }} }}\nfailover: {{ recheck_after: 500ms }}\n",
        hostnames.join(", ")
    );
    balancer_of(&yaml).0
}

/// A balancer from its YAML, and the telemetry its backends' queues report to.
fn balancer_of(yaml: &str) -> (Box<dyn genai_collector_core::Exporter>, Telemetry) {
    let config: LoadBalancingConfig = serde_saphyr::from_str(yaml).unwrap();
    config.validate().unwrap();
    let telemetry = Telemetry::new();
    let ctx = BuildContext {
        id: ComponentId::parse("loadbalancing").unwrap(),
        pipeline: None,
        telemetry: telemetry.clone(),
    };
    (LoadBalancingFactory.build(config, &ctx).unwrap(), telemetry)
}

/// The counters of the balancer's queue for the backend on 127.0.0.1:`port`, while it has one.
fn backend_counts(
    telemetry: &Telemetry,
    port: u16,
) -> Option<genai_collector_core::telemetry::Counts> {
    backend_counts_at(telemetry, "127.0.0.1", port)
}

/// [`backend_counts`] for a backend on `host`.
fn backend_counts_at(
    telemetry: &Telemetry,
    host: &str,
    port: u16,
) -> Option<genai_collector_core::telemetry::Counts> {
    let id = format!("loadbalancing/{host}:{port}");
    let stats = telemetry.find(genai_collector_core::ComponentKind::Exporter, &id)?;
    Some(stats.snapshot())
}

/// Which gateway (by index) got each pool, from the batches each capture took after `since`.
fn owners(captures: &[&Capture], since: &[usize]) -> BTreeMap<String, BTreeSet<usize>> {
    let mut out: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (i, c) in captures.iter().enumerate() {
        for b in c.batches().iter().skip(since[i]) {
            for rm in &b.resource_metrics {
                let attrs = &rm.resource.as_ref().unwrap().attributes;
                let pool = attrs.get_str("gen_ai.pool.name").unwrap_or("").to_owned();
                out.entry(pool).or_default().insert(i);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pool_reaches_one_gateway_and_only_a_leaving_gateways_pools_move() {
    let (a, ca, ra) = gateway().await;
    let (b, cb, rb) = gateway().await;
    let (c, cc, rc) = gateway().await;
    let three = balancer(&[a, b, c]);
    three.export(&pools()).await.unwrap();
    let captures = [&ca, &cb, &cc];
    let first = eventually(
        Duration::from_secs(10),
        "61 resources at the gateways",
        || {
            let o = owners(&captures, &[0, 0, 0]);
            (o.len() == 61).then_some(o)
        },
    )
    .await;
    for (pool, at) in &first {
        assert_eq!(at.len(), 1, "{pool} reached {at:?}");
    }
    let per_gateway: Vec<usize> = (0..3)
        .map(|g| first.values().filter(|at| at.contains(&g)).count())
        .collect();
    assert!(
        per_gateway.iter().all(|n| *n >= 8),
        "the pools spread: {per_gateway:?}"
    );

    // Gateway b leaves the list: its pools go to a or c, every other pool stays.
    let since: Vec<usize> = captures.iter().map(|c| c.batches().len()).collect();
    let two = balancer(&[a, c]);
    two.export(&pools()).await.unwrap();
    let second = eventually(Duration::from_secs(10), "61 resources again", || {
        let o = owners(&captures, &since);
        (o.len() == 61).then_some(o)
    })
    .await;
    for (pool, at) in &second {
        assert!(
            !at.contains(&1),
            "{pool} still went to the gateway that left"
        );
        if !first[pool].contains(&1) {
            assert_eq!(at, &first[pool], "{pool} moved though its gateway stayed");
        }
    }
    // Gateway c goes down: its part goes from its queue to a, its pools' next backend.
    rc.run_until(std::future::ready(())).await;
    let since: Vec<usize> = captures.iter().map(|c| c.batches().len()).collect();
    two.export(&pools()).await.unwrap();
    let third = eventually(Duration::from_secs(10), "61 resources at a", || {
        let o = owners(&captures, &since);
        (o.len() == 61).then_some(o)
    })
    .await;
    assert!(
        third.values().all(|at| at == &BTreeSet::from([0])),
        "{third:?}"
    );
    // Every backend down: the batch is queued all the same, and arrives whole once a gateway
    // is back on a's port.
    ra.run_until(std::future::ready(())).await;
    two.export(&pools()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ca2, ra2) = gateway_at("127.0.0.1", a).await;
    let back = eventually(Duration::from_secs(10), "61 resources at the new a", || {
        let o = owners(&[&ca2], &[0]);
        (o.len() == 61).then_some(o)
    })
    .await;
    assert_eq!(back.len(), 61);
    two.shutdown().await.unwrap();
    three.shutdown().await.unwrap();
    ra2.run_until(std::future::ready(())).await;
    rb.run_until(std::future::ready(())).await;
}

#[test]
fn a_pipeline_with_the_loadbalancing_exporter_loads() {
    let yaml = "receivers:\n  otlp: {}\nexporters:\n  loadbalancing:\n    routing_key: gen_ai.pool.name\n    protocol:\n      otlp: { compression: gzip, headers: { x-tenant: a } }\n    resolver:\n      dns: { hostname: genai-collector-gateway-headless.genai-collector, port: 4317, interval: 30s }\nservice:\n  pipelines:\n    metrics: { receivers: [otlp], exporters: [loadbalancing] }\n";
    let comps = components(&Capture::new());
    config::load(&[Source::new("agent.yaml", yaml)], &comps).unwrap_or_else(|e| panic!("{e}"));
    let bad = yaml.replace("compression: gzip", "compression: lzma");
    let Err(err) = config::load(&[Source::new("agent.yaml", bad)], &comps) else {
        panic!("an unknown compression loaded")
    };
    assert!(err.to_string().contains("loadbalancing"), "{err}");
}

/// A gateway on `port`: OTLP/gRPC into `pool_aggregate` (1 s) into a capture.
async fn pool_gateway(port: u16) -> (Capture, RunningService, Telemetry) {
    let yaml = format!(
        "receivers:\n  otlp: {{ protocols: {{ grpc: {{ endpoint: \"127.0.0.1:{port}\" }} }} }}\nprocessors:\n  pool_aggregate: {{ interval: 1s, stale_after: 30s }}\nexporters:\n  capture:\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], processors: [pool_aggregate], exporters: [capture] }}\n"
    );
    let capture = Capture::new();
    let comps = components(&capture);
    let cfg = config::load(&[Source::new("gateway.yaml", yaml)], &comps).unwrap();
    let svc = Service::build(cfg, &comps).unwrap();
    let telemetry = svc.telemetry().clone();
    let running = svc.start().await.unwrap();
    common::listening(port).await;
    (capture, running, telemetry)
}

/// The pools in a gateway's latest `pool_aggregate` flush: (ready servers, waiting requests).
fn latest_pools(capture: &Capture) -> BTreeMap<String, (f64, f64)> {
    let batches = capture.batches();
    let is_pool = |rm: &genai_collector_core::model::ResourceMetrics| {
        rm.resource
            .as_ref()
            .unwrap()
            .attributes
            .get_str("service.name")
            == Some("genai-collector/pool_aggregate")
    };
    let Some(last) = batches
        .iter()
        .rev()
        .find(|b| b.resource_metrics.iter().any(is_pool))
    else {
        return BTreeMap::new();
    };
    last.resource_metrics
        .iter()
        .filter(|rm| is_pool(rm))
        .map(|rm| {
            let attrs = &rm.resource.as_ref().unwrap().attributes;
            let pool = attrs.get_str("gen_ai.pool.name").unwrap().to_owned();
            let value = |name: &str| {
                rm.scope_metrics
                    .iter()
                    .flat_map(|s| &s.metrics)
                    .find(|m| m.name == name)
                    .and_then(|m| {
                        m.number_points()
                            .first()
                            .and_then(genai_collector_core::model::number_value)
                    })
                    .unwrap_or(f64::NAN)
            };
            (
                pool,
                (
                    value("gen_ai.pool.servers.ready"),
                    value("gen_ai.pool.requests.waiting"),
                ),
            )
        })
        .collect()
}

/// Which gateway shows each pool, when every pool shows on exactly one with both servers
/// ready and the waiting requests the pages say.
fn placement(
    captures: &[&Capture],
    alive: &[bool],
    want: &BTreeMap<String, f64>,
) -> Option<BTreeMap<String, usize>> {
    let mut at = BTreeMap::new();
    for (g, c) in captures.iter().enumerate() {
        if !alive[g] {
            continue;
        }
        for (pool, (ready, waiting)) in latest_pools(c) {
            if ready != 2.0 || Some(&waiting) != want.get(&pool) || at.insert(pool, g).is_some() {
                return None;
            }
        }
    }
    (at.len() == want.len()).then_some(at)
}

/// An agent's `loadbalancing` counters.
fn balancer_counts(telemetry: &Telemetry) -> genai_collector_core::telemetry::Counts {
    telemetry
        .find(
            genai_collector_core::ComponentKind::Exporter,
            "loadbalancing",
        )
        .unwrap()
        .snapshot()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_stay_whole_on_one_gateway_through_a_gateways_death_and_return() {
    use genai_collector_testkit::sim::{self, EngineKind};
    // 60 pools of two vLLM simulators, each holding its own load: 0..19 waiting.
    let mut sims = Vec::new();
    for i in 0..120 {
        let s = sim::start(EngineKind::VllmV1, "127.0.0.1:0").await.unwrap();
        s.set_load(Some(0.8 + (i % 20) as f64 / 100.0));
        sims.push(s);
    }
    // The brute force: each pool's waiting requests, summed from its simulators' own pages.
    common::install_tls_provider();
    let client = reqwest::Client::new();
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for (i, s) in sims.iter().enumerate() {
        let page = common::get_text(&client, &s.metrics_url()).await;
        let waiting: f64 = page
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some("vllm:num_requests_waiting"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        *want.entry(format!("pool-{}", i / 2)).or_default() += waiting;
    }
    let ports = [free_port(), free_port(), free_port()];
    let mut gateways = Vec::new();
    for p in ports {
        gateways.push(Some(pool_gateway(p).await));
    }
    let hostnames: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    // Two agents, 30 pools each.
    let mut agents = Vec::new();
    for a in 0..2 {
        let mut yaml = String::from("receivers:\n");
        let mut names = Vec::new();
        for pool in (a * 30)..(a * 30 + 30) {
            yaml += &format!(
                "  vllm/p{pool}: {{ targets: [\"{}\", \"{}\"], interval: 1s, pool: pool-{pool} }}\n",
                sims[2 * pool].metrics_url(),
                sims[2 * pool + 1].metrics_url()
            );
            names.push(format!("vllm/p{pool}"));
        }
        yaml += &format!(
            "processors:\n  genai_normalize: {{}}\nexporters:\n  loadbalancing:\n    protocol: {{ otlp: {{ compression: none }} }}\n    resolver: {{ static: {{ hostnames: [{}] }} }}\n    failover: {{ recheck_after: 1s }}\n    retry_on_failure: {{ initial_interval: 100ms, max_elapsed_time: 0s }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [{}], processors: [genai_normalize], exporters: [loadbalancing] }}\n",
            hostnames.join(", "),
            names.join(", ")
        );
        let comps = components(&Capture::new());
        let cfg = config::load(&[Source::new("agent.yaml", yaml)], &comps)
            .unwrap_or_else(|e| panic!("{e}"));
        let svc = Service::build(cfg, &comps).unwrap();
        let telemetry = svc.telemetry().clone();
        agents.push((svc.start().await.unwrap(), telemetry));
    }
    let captures: Vec<Capture> = gateways
        .iter()
        .map(|g| g.as_ref().unwrap().0.clone())
        .collect();
    let captures: Vec<&Capture> = captures.iter().collect();

    let first = eventually(
        Duration::from_secs(30),
        "every pool whole on exactly one gateway",
        || placement(&captures, &[true; 3], &want),
    )
    .await;
    let held: Vec<usize> = (0..3)
        .map(|g| first.values().filter(|at| **at == g).count())
        .collect();
    assert!(held.iter().all(|n| *n >= 8), "the pools spread: {held:?}");

    // Gateway 1 dies: its pools fail over to the others, whole and right; no other pool moves.
    let (_, running, dead_telemetry) = gateways[1].take().unwrap();
    running.run_until(std::future::ready(())).await;
    let second = eventually(
        Duration::from_secs(30),
        "gateway 1's pools on the other two",
        || placement(&captures, &[true, false, true], &want),
    )
    .await;
    for (pool, g) in &first {
        if *g != 1 {
            assert_eq!(second[pool], *g, "{pool} moved though its gateway lived");
        }
    }
    // Each agent tells it: three backends, one passed over.
    let backends = |agents: &[(RunningService, Telemetry)]| {
        agents
            .iter()
            .map(|(_, t)| {
                let s = balancer_counts(t);
                (s.backends, s.backends_down)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(backends(&agents), vec![(3, 1), (3, 1)]);

    // It returns on its port: its pools come back to it (a third of them), the rest stay.
    let back = pool_gateway(ports[1]).await;
    let mut captures = captures;
    captures[1] = &back.0;
    let third = eventually(
        Duration::from_secs(30),
        "gateway 1's pools back on it",
        || placement(&captures, &[true; 3], &want).filter(|at| at == &first),
    )
    .await;
    let moved_back = third.values().filter(|g| **g == 1).count();
    assert_eq!(backends(&agents), vec![(3, 0), (3, 0)]);
    println!(
        "pools per gateway {held:?}; {} moved when gateway 1 died, {moved_back} back when it returned",
        held[1]
    );

    // Nothing the agents queued was lost: all of it reached a gateway.
    let mut queued = 0;
    let (mut sent, mut dropped) = (0, 0);
    for (running, telemetry) in agents {
        let summary = running.run_until(std::future::ready(())).await;
        assert!(summary.drained, "{summary:?}");
        let lb = balancer_counts(&telemetry);
        assert_eq!(lb.failed, 0, "points given up on");
        // Scrapes that found the queue full (an overloaded machine) were never queued: counted
        // apart, and no part of the contract.
        assert_eq!(lb.accepted, lb.sent, "queued but not routed to a backend");
        // Each backend's queue sent all it took (its own and, while another was down, that
        // one's), and gave up on nothing.
        for c in telemetry.components() {
            if c.id.starts_with("loadbalancing/") {
                let b = c.snapshot();
                assert_eq!((b.failed, b.queued), (0, 0), "{}", c.id);
                assert_eq!(b.accepted, b.sent, "{}", c.id);
            }
        }
        queued += lb.accepted;
        sent += lb.sent;
        dropped += lb.refused;
    }
    let mut received = 0;
    let mut gateway_telemetry = vec![dead_telemetry, back.2];
    let (_, back_running, _) = back;
    back_running.run_until(std::future::ready(())).await;
    for g in gateways.into_iter().flatten() {
        g.1.run_until(std::future::ready(())).await;
        gateway_telemetry.push(g.2);
    }
    for t in &gateway_telemetry {
        received += t
            .find(genai_collector_core::ComponentKind::Receiver, "otlp")
            .unwrap()
            .snapshot()
            .accepted;
    }
    assert!(queued > 0 && sent == queued);
    println!(
        "the agents queued and sent {sent} points ({dropped} scraped points found the queue full)"
    );
    assert!(
        received >= sent,
        "the agents sent {sent} points, the gateways received {received}"
    );
}

/// An EndpointSlice of the gateway Service with these addresses and readiness.
fn slice(name: &str, endpoints: &[(&str, bool)]) -> serde_json::Value {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(ip, ready)| serde_json::json!({"addresses": [ip], "conditions": {"ready": ready}}))
        .collect();
    serde_json::json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "namespace": "genai", "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": "gateway-headless"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "otlp-grpc", "port": 4317, "protocol": "TCP"}]
    })
}

/// Whether, within 10 s, an export of the pools reaches exactly the gateways `want`.
async fn routes_to(
    lb: &dyn genai_collector_core::Exporter,
    captures: &[&Capture],
    want: &[usize],
) -> bool {
    for _ in 0..100 {
        let since: Vec<usize> = captures.iter().map(|c| c.batches().len()).collect();
        if lb.export(&pools()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let reached: BTreeSet<usize> =
                owners(captures, &since).into_values().flatten().collect();
            if reached.iter().eq(want) {
                return true;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    false
}

/// A balancer whose `resolver.k8s` watches the fake API server, which lists `slice` first;
/// `settings` are its other keys (`protocol`, `failover`). The fake (for events), the
/// balancer, its telemetry, and the directory of its kubeconfig (remove it at the end).
async fn k8s_balancer(
    name: &str,
    port: u16,
    slice: serde_json::Value,
    settings: &str,
) -> (
    common::kube::Fake,
    Box<dyn genai_collector_core::Exporter>,
    Telemetry,
    std::path::PathBuf,
) {
    let path = "/apis/discovery.k8s.io/v1/namespaces/genai/endpointslices";
    let (fake, api) = common::kube::start_fake(path, "EndpointSliceList", false, vec![slice]).await;
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = common::kube::kubeconfig(&dir, api);
    let (lb, telemetry) = balancer_of(&format!(
        "{settings}resolver: {{ k8s: {{ service: gateway-headless.genai, ports: [{port}], kubeconfig: \"{}\" }} }}\n",
        kubeconfig.display()
    ));
    (fake, lb, telemetry, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_follow_the_gateway_services_endpointslices() {
    let port = free_port();
    let mut gateways = Vec::new();
    for host in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        gateways.push(gateway_at(host, port).await);
    }
    let captures: Vec<&Capture> = gateways.iter().map(|g| &g.0).collect();
    let (fake, lb, _, dir) = k8s_balancer(
        "lb-k8s",
        port,
        slice("gw-a", &[("127.0.0.1", true), ("127.0.0.2", true)]),
        "protocol: { otlp: { compression: none } }\n",
    )
    .await;
    // The listed slice: its two ready addresses share the pools.
    assert!(
        routes_to(lb.as_ref(), &captures, &[0, 1]).await,
        "the listed slice's addresses"
    );
    // The slice changes: 127.0.0.2 is no longer ready, 127.0.0.3 joins.
    common::kube::event(
        &fake,
        "MODIFIED",
        slice(
            "gw-a",
            &[
                ("127.0.0.1", true),
                ("127.0.0.2", false),
                ("127.0.0.3", true),
            ],
        ),
    );
    assert!(
        routes_to(lb.as_ref(), &captures, &[0, 2]).await,
        "the unready address left and the new one joined"
    );
    // The slice is deleted: no backend, a retryable error.
    common::kube::event(&fake, "DELETED", slice("gw-a", &[]));
    let mut gone = false;
    for _ in 0..100 {
        if lb.export(&pools()).await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "no backend once the Service has no endpoints");
    lb.shutdown().await.unwrap();
    for (_, running) in gateways {
        running.run_until(std::future::ready(())).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `resolver.dns` through the system's resolver: `localhost` names the one gateway (and, where
/// it also resolves to ::1, a second backend nobody listens on, which fails over to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_resolves_to_the_backends() {
    let (port, capture, running) = gateway().await;
    let (lb, _) = balancer_of(&format!(
        "protocol: {{ otlp: {{ compression: none }} }}\nresolver: {{ dns: {{ hostname: localhost, port: {port}, interval: 1s }} }}\n"
    ));
    assert!(
        routes_to(lb.as_ref(), &[&capture], &[0]).await,
        "the name's address receives the pools"
    );
    lb.shutdown().await.unwrap();
    running.run_until(std::future::ready(())).await;
}

/// A gateway that went away without closing its connections: a listener on `addr` that
/// accepts (up to 16 connections) and never reads, so a request never gets an answer. Its
/// port, and the thread that holds the connections.
fn stuck_gateway(
    addr: (&str, u16),
) -> (
    u16,
    std::thread::JoinHandle<Vec<std::io::Result<std::net::TcpStream>>>,
) {
    let hole = std::net::TcpListener::bind(addr).unwrap();
    let port = hole.local_addr().unwrap().port();
    (
        port,
        std::thread::spawn(move || hole.incoming().take(16).collect()),
    )
}

/// A gateway that went away without closing its connections (a pod's address dropping
/// packets, here a listener that accepts and never answers): after `failover.timeout` its
/// pools go to the next gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_is_failed_over_after_the_timeout() {
    let (a, ca, ra) = gateway().await;
    let (hole_port, held) = stuck_gateway(("127.0.0.1", 0));
    let (lb, telemetry) = balancer_of(&format!(
        "protocol: {{ otlp: {{ compression: none }} }}\nresolver: {{ static: {{ hostnames: [\"127.0.0.1:{a}\", \"127.0.0.1:{hole_port}\"] }} }}\nfailover: {{ timeout: 300ms }}\n"
    ));
    let started = std::time::Instant::now();
    lb.export(&pools()).await.unwrap();
    let at = eventually(Duration::from_secs(10), "every pool at gateway a", || {
        let o = owners(&[&ca], &[0]);
        (o.len() == 61).then_some(o)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "failed over after {:?}",
        started.elapsed()
    );
    assert_eq!(at.len(), 61);
    let to_hole = backend_counts(&telemetry, hole_port).unwrap().accepted;
    assert!(to_hole > 0, "the hole owned some pools");
    // Passed over now: the next export's pools go straight to a's queue.
    let since = ca.batches().len();
    lb.export(&pools()).await.unwrap();
    eventually(Duration::from_secs(10), "every pool at a again", || {
        (owners(&[&ca], &[since]).len() == 61).then_some(())
    })
    .await;
    assert_eq!(
        backend_counts(&telemetry, hole_port).unwrap().accepted,
        to_hole
    );
    lb.shutdown().await.unwrap();
    ra.run_until(std::future::ready(())).await;
    drop(held);
}

/// A gateway that accepts and never answers, with failover off (nothing is passed over): its
/// pools wait in its queue while every other gateway gets each of its pools exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_gateway_holds_up_only_its_own_pools() {
    let (a, ca, ra) = gateway().await;
    let (hole_port, held) = stuck_gateway(("127.0.0.1", 0));
    let (lb, telemetry) = balancer_of(&format!(
        "protocol: {{ otlp: {{ compression: none, timeout: 500ms }} }}\nresolver: {{ static: {{ hostnames: [\"127.0.0.1:{a}\", \"127.0.0.1:{hole_port}\"] }} }}\nfailover: {{ enabled: false }}\n"
    ));
    for _ in 0..5 {
        lb.export(&pools()).await.unwrap();
    }
    let mine = eventually(Duration::from_secs(10), "a's pools, five times", || {
        let per_pool = pool_counts(&ca);
        (!per_pool.is_empty() && per_pool.values().all(|n| *n >= 5)).then_some(per_pool)
    })
    .await;
    // A while longer: the stuck gateway's retries must not send a's pools again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(pool_counts(&ca), mine, "a got pools more than once");
    assert!(mine.values().all(|n| *n == 5), "{mine:?}");
    let stuck = backend_counts(&telemetry, hole_port).unwrap();
    assert_eq!(
        mine.len() as u64 + stuck.accepted / 5,
        61,
        "every pool went to one of them"
    );
    assert!(stuck.queued > 0 && stuck.sent == 0, "{stuck:?}");
    assert!(stuck.attempt_failures > 0, "{stuck:?}");
    ra.run_until(std::future::ready(())).await;
    drop(held);
}

/// How many times each pool reached `capture`.
fn pool_counts(capture: &Capture) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for b in capture.batches() {
        for rm in &b.resource_metrics {
            let attrs = &rm.resource.as_ref().unwrap().attributes;
            let pool = attrs.get_str("gen_ai.pool.name").unwrap_or("").to_owned();
            *n.entry(pool).or_insert(0) += 1;
        }
    }
    n
}

/// A backend's persistent queue outlives it: batches a stuck gateway never took are on disk at
/// shutdown, and the next run, whose resolver no longer lists that gateway, sends them to the
/// one it does list, then removes the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_left_has_its_persisted_batches_sent_to_the_others() {
    let (a, ca, ra) = gateway().await;
    let (hole_port, held) = stuck_gateway(("127.0.0.1", 0));
    let dir = std::env::temp_dir().join(format!("lb-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let yaml = |hostnames: &str| {
        format!(
            "protocol: {{ otlp: {{ compression: none, timeout: 300ms, sending_queue: {{ storage: \"{}\" }} }} }}\nresolver: {{ static: {{ hostnames: [{hostnames}] }} }}\nfailover: {{ enabled: false }}\n",
            dir.display()
        )
    };
    let (lb, telemetry) = balancer_of(&yaml(&format!(
        "\"127.0.0.1:{a}\", \"127.0.0.1:{hole_port}\""
    )));
    lb.export(&pools()).await.unwrap();
    let stuck = eventually(Duration::from_secs(10), "the stuck part on disk", || {
        backend_counts(&telemetry, hole_port).filter(|c| c.disk_bytes > 0)
    })
    .await;
    let hole_dir = dir.join(format!("loadbalancing__127.0.0.1:{hole_port}"));
    assert!(hole_dir.is_dir(), "{}", hole_dir.display());
    lb.shutdown().await.unwrap();
    let kept = backend_counts(&telemetry, hole_port).unwrap();
    assert_eq!(
        kept.persisted, stuck.accepted,
        "kept on disk at shutdown: {kept:?}"
    );
    let first = pool_counts(&ca);
    drop(lb);

    // The next run lists only a: the hole's pools arrive there from the hole's directory.
    let (lb, telemetry) = balancer_of(&yaml(&format!("\"127.0.0.1:{a}\"")));
    let both = eventually(Duration::from_secs(10), "all 61 at a", || {
        let n = pool_counts(&ca);
        (n.len() == 61).then_some(n)
    })
    .await;
    for (pool, n) in &both {
        assert_eq!(
            *n,
            1,
            "{pool} came {n} times (first run: {:?})",
            first.get(pool)
        );
    }
    eventually(
        Duration::from_secs(10),
        "the hole's queue closed and its directory gone",
        || (backend_counts(&telemetry, hole_port).is_none() && !hole_dir.exists()).then_some(()),
    )
    .await;
    lb.shutdown().await.unwrap();
    ra.run_until(std::future::ready(())).await;
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway that leaves the Service while its queue holds batches it never took (it accepts
/// and never answers; failover off, so nothing else moves them): they go to the gateway that
/// stays, each pool once, and the leaver's queue is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_leaving_the_service_has_its_queue_sent_to_the_others() {
    let port = free_port();
    let (ca, ra) = gateway_at("127.0.0.1", port).await;
    let (_, held) = stuck_gateway(("127.0.0.2", port));
    let (fake, lb, telemetry, dir) = k8s_balancer(
        "lb-leave",
        port,
        slice("gw-a", &[("127.0.0.1", true), ("127.0.0.2", true)]),
        "protocol: { otlp: { compression: none, timeout: 500ms, retry_on_failure: { initial_interval: 100ms } } }\nfailover: { enabled: false }\n",
    )
    .await;
    let leaver = || backend_counts_at(&telemetry, "127.0.0.2", port);
    eventually(Duration::from_secs(10), "both backends", || {
        leaver().map(|_| ())
    })
    .await;
    for _ in 0..3 {
        lb.export(&pools()).await.unwrap();
    }
    let stuck = eventually(Duration::from_secs(10), "a's pools at a", || {
        let n = pool_counts(&ca);
        let c = leaver()?;
        (!n.is_empty() && n.values().all(|k| *k == 3) && c.accepted > 0).then_some(c)
    })
    .await;
    assert_eq!(stuck.sent, 0, "the leaver took nothing: {stuck:?}");
    common::kube::event(&fake, "MODIFIED", slice("gw-a", &[("127.0.0.1", true)]));
    let all = eventually(
        Duration::from_secs(15),
        "every pool at a, three times",
        || {
            let n = pool_counts(&ca);
            (n.len() == 61 && n.values().all(|k| *k >= 3)).then_some(n)
        },
    )
    .await;
    eventually(Duration::from_secs(10), "the leaver's queue closed", || {
        leaver().is_none().then_some(())
    })
    .await;
    assert_eq!(pool_counts(&ca), all, "pools sent more than three times");
    assert!(all.values().all(|k| *k == 3), "{all:?}");
    lb.shutdown().await.unwrap();
    ra.run_until(std::future::ready(())).await;
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether, within 15 s, pools pushed into the agent on `push` reach exactly the gateways
/// `want`.
async fn pushes_route_to(
    client: &reqwest::Client,
    push: u16,
    captures: &[&Capture],
    want: &[usize],
) -> bool {
    for _ in 0..60 {
        let since: Vec<usize> = captures.iter().map(|c| c.batches().len()).collect();
        let ok = client
            .post(format!("http://127.0.0.1:{push}/v1/metrics"))
            .header("Content-Type", "application/x-protobuf")
            .body(pools().encode_request())
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        tokio::time::sleep(Duration::from_millis(250)).await;
        let reached = owners(captures, &since);
        let at: BTreeSet<usize> = reached.values().flatten().copied().collect();
        if ok && reached.len() == 61 && at.iter().eq(want) {
            return true;
        }
    }
    false
}

/// `resolver.dns` membership from a hosts file the test controls: the agent binary runs in a
/// user and mount namespace where that file is `/etc/hosts`, and the name's addresses are
/// rewritten under it. Gateways join and leave as the name's addresses do, and only the
/// pools of the gateway that joined or left move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_membership_follows_the_names_addresses() {
    let namespaces = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !namespaces {
        println!("skipped: this machine gives no user namespaces (`unshare --user` failed)");
        return;
    }
    let port = free_port();
    let mut gateways = Vec::new();
    for host in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        gateways.push(gateway_at(host, port).await);
    }
    let captures: Vec<&Capture> = gateways.iter().map(|g| &g.0).collect();
    let dir = std::env::temp_dir().join(format!("lb-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts");
    // Rewritten in place: the bind mount follows the file, not its name.
    let set_hosts = |ips: &[&str]| {
        let text: String = ips
            .iter()
            .map(|ip| format!("{ip} gateways.genai.test\n"))
            .collect();
        std::fs::write(&hosts, text).unwrap();
    };
    set_hosts(&["127.0.0.1", "127.0.0.2"]);
    let push = free_port();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "receivers:\n  otlp: {{ protocols: {{ http: {{ endpoint: \"127.0.0.1:{push}\" }} }} }}\nexporters:\n  loadbalancing:\n    protocol: {{ otlp: {{ compression: none }} }}\n    resolver: {{ dns: {{ hostname: gateways.genai.test, port: {port}, interval: 200ms }} }}\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [loadbalancing] }}\n"
        ),
    )
    .unwrap();
    let script = format!(
        "mount --bind '{}' /etc/hosts && exec '{}' -c '{}'",
        hosts.display(),
        env!("CARGO_BIN_EXE_testkit-collector"),
        config.display()
    );
    let _agent = common::Killed(
        Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::listening(push).await;
    common::install_tls_provider();
    let client = reqwest::Client::new();
    assert!(
        pushes_route_to(&client, push, &captures, &[0, 1]).await,
        "the name's two addresses"
    );
    let before = owners(&captures, &[0, 0, 0]);
    // A third address joins the name: it takes pools, and only from the other two.
    set_hosts(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    assert!(
        pushes_route_to(&client, push, &captures, &[0, 1, 2]).await,
        "the joined address"
    );
    let since: Vec<usize> = captures.iter().map(|c| c.batches().len()).collect();
    assert!(pushes_route_to(&client, push, &captures, &[0, 1, 2]).await);
    let three = owners(&captures, &since);
    let moved = three.values().filter(|at| at.contains(&2)).count();
    assert!(
        (8..=35).contains(&moved),
        "{moved} of 61 pools moved to the third"
    );
    for (pool, at) in &three {
        if !at.contains(&2) {
            assert_eq!(
                at, &before[pool],
                "{pool} moved between the two that stayed"
            );
        }
    }
    // 127.0.0.2 leaves the name: its pools go, the others stay where they were.
    set_hosts(&["127.0.0.1", "127.0.0.3"]);
    assert!(
        pushes_route_to(&client, push, &captures, &[0, 2]).await,
        "the address that left"
    );
    let since: Vec<usize> = captures.iter().map(|c| c.batches().len()).collect();
    assert!(pushes_route_to(&client, push, &captures, &[0, 2]).await);
    let two = owners(&captures, &since);
    for (pool, at) in &two {
        if !three[pool].contains(&1) {
            assert_eq!(at, &three[pool], "{pool} moved though its gateway stayed");
        }
    }
    drop(_agent);
    for (_, running) in gateways {
        running.run_until(std::future::ready(())).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
