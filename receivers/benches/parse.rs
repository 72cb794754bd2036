//! Parse throughput (MB/s) of our text parser against `prometheus-parse`, in the same run:
//! a vLLM V1 page, and a 5 MB page of 50,000 series without `:` in names (so that
//! `prometheus-parse`, which returns nothing for vLLM's `vllm:` names, has work to do).
//!
//! `cargo bench -p genai-collector-receivers --bench parse`

use std::fmt::Write as _;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use genai_collector_receivers::scrape::text::{parse, Format};

fn big_page() -> String {
    let mut s = String::with_capacity(5_200_000);
    let mut series = 0;
    let mut family = 0;
    while series < 50_000 {
        let _ = writeln!(
            s,
            "# HELP engine_metric_{family} Synthetic engine metric number {family}."
        );
        let _ = writeln!(s, "# TYPE engine_metric_{family} gauge");
        for i in 0..100 {
            let _ = writeln!(
                s,
                "engine_metric_{family}{{engine=\"{}\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\",pod=\"vllm-{i}-7d9f8c6b5-x2k4p\"}} {}.{}",
                i % 8,
                series * 7,
                series % 1000
            );
            series += 1;
        }
        family += 1;
    }
    s
}

fn bench(c: &mut Criterion) {
    let vllm = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/vllm/v1-composed.prom"
    ))
    .unwrap();
    let big = big_page();
    let mut group = c.benchmark_group("parse");
    for (name, page) in [("vllm-v1-composed", &vllm), ("50k-series-5MB", &big)] {
        group.throughput(Throughput::Bytes(page.len() as u64));
        group.bench_with_input(BenchmarkId::new("genai-collector", name), page, |b, p| {
            b.iter(|| parse(p, Format::Prometheus).unwrap().sample_count())
        });
        group.bench_with_input(BenchmarkId::new("prometheus-parse", name), page, |b, p| {
            b.iter(|| {
                let lines = p.lines().map(|l| Ok(l.to_owned()));
                prometheus_parse::Scrape::parse(lines)
                    .unwrap()
                    .samples
                    .len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
