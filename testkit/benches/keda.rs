//! `keda_scaler`'s answer time as KEDA sees it: a gateway's scaler holding 1,000 pools of 4
//! servers, asked `GetMetrics` over gRPC (one connection, one call at a time, a pool picked
//! in turn) 10,000 times. Prints the median and p99 per signal.
//!
//! `cargo bench -p genai-collector-testkit --bench keda`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use genai_collector_core::model::{kv, number_point, Metric, MetricExt};
use genai_collector_core::{Batch, BuildContext, ComponentId, ExporterFactory};
use genai_collector_exporters::keda_scaler::proto::{
    GetMetricsRequest, GetMetricsResponse, ScaledObjectRef,
};
use genai_collector_exporters::keda_scaler::{KedaScalerConfig, KedaScalerFactory};

const POOLS: usize = 1000;
const SERVERS: usize = 4;
const CALLS: usize = 10_000;

/// One server's report, as an agent would send it after genai_normalize.
fn server(pool: usize, n: usize, tokens: f64) -> Batch {
    let model = || vec![kv("gen_ai.request.model", format!("model-{pool}"))];
    let g = |name: &str, v: f64| Metric::gauge(name, "", vec![number_point(1, v, model())]);
    let mut out = model();
    out.push(kv("gen_ai.token.type", "output"));
    Batch::with_resource(
        vec![
            kv("service.instance.id", format!("10.{pool}.0.{n}:8000")),
            kv("gen_ai.pool.name", format!("pool-{pool}")),
        ],
        vec![
            g("gen_ai.server.requests.waiting", n as f64),
            g("gen_ai.server.requests.running", 8.0),
            g("gen_ai.server.requests.max", 16.0),
            g("gen_ai.server.kv_cache.usage", 50.0),
            Metric::sum(
                "gen_ai.server.token.usage",
                "{token}",
                true,
                vec![number_point(1, tokens, out)],
            ),
            Metric::gauge("up", "", vec![number_point(1, 1.0, vec![])]),
        ],
    )
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let port = genai_collector_testkit::free_port();
        let config = KedaScalerConfig {
            endpoint: format!("127.0.0.1:{port}"),
            ..Default::default()
        };
        let ctx = BuildContext {
            id: ComponentId::parse("keda_scaler").unwrap(),
            pipeline: None,
            telemetry: Default::default(),
        };
        let exporter = KedaScalerFactory.build(config, &ctx).unwrap();
        for round in 0..2 {
            for p in 0..POOLS {
                for n in 0..SERVERS {
                    exporter
                        .export(&server(p, n, 1000.0 * (round + 1) as f64))
                        .await
                        .unwrap();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        println!("GetMetrics over gRPC, {POOLS} pools of {SERVERS} servers, {CALLS} calls each:");
        for signal in ["waiting_per_server", "kv_cache", "tokens_per_second"] {
            let mut times = Vec::with_capacity(CALLS);
            for i in 0..CALLS {
                let metadata: HashMap<String, String> = [
                    ("pool", format!("pool-{}", i % POOLS)),
                    ("signal", signal.to_owned()),
                    ("target", "5".to_owned()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                let request = GetMetricsRequest {
                    scaled_object_ref: Some(ScaledObjectRef {
                        name: "bench".into(),
                        namespace: "default".into(),
                        scaler_metadata: metadata,
                    }),
                    metric_name: String::new(),
                };
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await.unwrap();
                let started = Instant::now();
                let answer: tonic::Response<GetMetricsResponse> = grpc
                    .unary(
                        tonic::Request::new(request),
                        "/externalscaler.ExternalScaler/GetMetrics".parse().unwrap(),
                        tonic_prost::ProstCodec::default(),
                    )
                    .await
                    .unwrap();
                times.push(started.elapsed().as_secs_f64() * 1e6);
                assert!(answer.into_inner().metric_values[0].metric_value_float >= 0.0);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "  {signal:>20}: median {:.0} µs, p99 {:.0} µs",
                times[CALLS / 2],
                times[CALLS * 99 / 100]
            );
        }
    });
}
