//! The gen_ai processor chain against the scrape it follows: 1,000 servers' vLLM V1 pages,
//! each parsed and converted (the scrape's CPU cost), then run through genai_normalize →
//! percentages → pool_aggregate. Prints medians of 5 runs, the chain's share of the scrape
//! cost, and allocations per point.
//!
//! `cargo bench -p genai-collector-testkit --bench chain`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use genai_collector_core::model::kv;
use genai_collector_core::{Batch, BuildContext, ComponentId, ProcessorFactory};
use genai_collector_processors::{GenaiNormalizeFactory, PercentagesFactory, PoolAggregateFactory};
use genai_collector_receivers::scrape::convert::Converter;
use genai_collector_receivers::scrape::text::{parse, Format};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SERVERS: usize = 1000;
const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/vllm/v1-composed.prom"
    ))
    .unwrap();
    let ctx = |kind: &str| BuildContext {
        id: ComponentId::parse(kind).unwrap(),
        pipeline: Some("metrics".into()),
        telemetry: Default::default(),
    };
    let mut converters: Vec<Converter> = (0..SERVERS).map(|_| Converter::new()).collect();
    let (mut scrape_ms, mut chain_ms, mut allocs_per_point) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let mut normalize = GenaiNormalizeFactory::default()
            .build(&Default::default(), &ctx("genai_normalize"))
            .unwrap();
        let mut percentages = PercentagesFactory
            .build(&Default::default(), &ctx("percentages"))
            .unwrap();
        let mut pools = PoolAggregateFactory
            .build(&Default::default(), &ctx("pool_aggregate"))
            .unwrap();
        let t = Instant::now();
        let mut batches: Vec<Batch> = converters
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                let parsed = parse(&page, Format::Prometheus).unwrap();
                let resource = vec![
                    kv("gen_ai.provider.name", "vllm"),
                    kv("gen_ai.pool.name", format!("pool{}", i % 10)),
                    kv(
                        "service.instance.id",
                        format!("10.0.{}.{}:8000", i / 250, i % 250),
                    ),
                ];
                c.convert(&parsed, 1, resource).0
            })
            .collect();
        scrape_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let points: usize = batches.iter().map(Batch::point_count).sum();
        let before = ALLOCS.load(Ordering::Relaxed);
        let t = Instant::now();
        for b in &mut batches {
            normalize.process(b);
            percentages.process(b);
            pools.process(b);
        }
        let pool_batch = pools.flush();
        chain_ms.push(t.elapsed().as_secs_f64() * 1e3);
        allocs_per_point.push((ALLOCS.load(Ordering::Relaxed) - before) as f64 / points as f64);
        assert_eq!(
            pool_batch.map(|b| b.resource_metrics.len()),
            Some(10),
            "ten pools"
        );
        std::hint::black_box(&batches);
    }
    let (s, c) = (median(scrape_ms), median(chain_ms));
    println!("gen_ai chain benchmark: {SERVERS} vLLM V1 pages, median of {RUNS} runs");
    println!(
        "  scrape (parse + convert)                        {s:8.2} ms  ({:.1} us per page)",
        s * 1e3 / SERVERS as f64
    );
    println!(
        "  genai_normalize + percentages + pool_aggregate  {c:8.2} ms  ({:.1} us per page)",
        c * 1e3 / SERVERS as f64
    );
    println!(
        "  chain / scrape                                  {:8.1} %",
        c / s * 100.0
    );
    println!(
        "  allocations per point in the chain              {:8.2}",
        median(allocs_per_point)
    );
}
