//! The `loadbalancing` exporter over real OTLP/gRPC: three gateways (each an `otlp` receiver
//! feeding its own capture), 60 pools routed by `gen_ai.pool.name`. Every pool lands on
//! exactly one gateway, the pools spread over the three, and with one gateway gone from the
//! list only that gateway's pools move.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use genai_collector_core::config::{self, Source};
use genai_collector_core::model::{kv, number_point, AttributesExt, Metric, MetricExt};
use genai_collector_core::{
    Batch, BuildContext, ComponentConfig, ComponentId, ExporterFactory, RunningService, Service,
};
use genai_collector_exporters::loadbalancing::{LoadBalancingConfig, LoadBalancingFactory};
use genai_collector_testkit::{components, eventually, free_port, Capture};

/// A gateway: an OTLP/gRPC receiver into a capture.
async fn gateway() -> (u16, Capture, RunningService) {
    let port = free_port();
    let yaml = format!(
        "receivers:\n  otlp: {{ protocols: {{ grpc: {{ endpoint: \"127.0.0.1:{port}\" }} }} }}\nexporters:\n  capture:\nservice:\n  telemetry: {{ endpoint: null }}\n  pipelines:\n    metrics: {{ receivers: [otlp], exporters: [capture] }}\n"
    );
    let capture = Capture::new();
    let comps = components(&capture);
    let cfg = config::load(&[Source::new("gateway.yaml", yaml)], &comps).unwrap();
    let running = Service::build(cfg, &comps).unwrap().start().await.unwrap();
    common::listening(port).await;
    (port, capture, running)
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

fn balancer(ports: &[u16]) -> Box<dyn genai_collector_core::Exporter> {
    let hostnames: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let yaml = format!(
        "protocol: {{ otlp: {{ compression: none }} }}\nresolver: {{ static: {{ hostnames: [{}] }} }}\n",
        hostnames.join(", ")
    );
    let config: LoadBalancingConfig = serde_saphyr::from_str(&yaml).unwrap();
    config.validate().unwrap();
    let ctx = BuildContext {
        id: ComponentId::parse("loadbalancing").unwrap(),
        pipeline: None,
        telemetry: Default::default(),
    };
    LoadBalancingFactory.build(config, &ctx).unwrap()
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
    // A backend that is down: the batch is refused as retryable, for the runtime to retry.
    drop(rc);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = two.export(&pools()).await.unwrap_err();
    assert!(
        matches!(err, genai_collector_core::ExportError::Retryable { .. }),
        "{err}"
    );
    for r in [ra, rb] {
        r.run_until(std::future::ready(())).await;
    }
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
