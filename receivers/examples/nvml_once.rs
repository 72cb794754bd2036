//! One NVML poll, printed one reading per line, to compare with `nvidia-smi` on a GPU machine:
//!
//! ```sh
//! cargo run -p genai-collector-receivers --example nvml_once
//! nvidia-smi --query-gpu=uuid,memory.total,memory.used,utilization.gpu,utilization.memory,temperature.gpu,power.draw,power.limit,clocks.sm,clocks.mem --format=csv
//! ```

use std::time::Instant;

use genai_collector_core::model::{display_attrs, metric, number_value, resource_attributes};
use genai_collector_receivers::nvml::{to_batch, GpuBackend, NvmlBackend};

fn main() {
    let backend = match NvmlBackend::init() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("no NVIDIA driver: {e}");
            std::process::exit(1);
        }
    };
    let started = Instant::now();
    let gpus = backend.read_all().unwrap_or_else(|e| {
        eprintln!("cannot read the GPUs: {e}");
        std::process::exit(1);
    });
    let poll = started.elapsed();
    let batch = to_batch(
        &gpus,
        backend.driver_version().as_deref(),
        &Default::default(),
        &Default::default(),
        0,
    );
    for rm in &batch.resource_metrics {
        let resource = resource_attributes(rm);
        println!("# {}", display_attrs(resource, " "));
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            let points = match &m.data {
                Some(metric::Data::Gauge(g)) => &g.data_points,
                Some(metric::Data::Sum(s)) => &s.data_points,
                _ => continue,
            };
            for p in points {
                let value = number_value(p).unwrap_or(f64::NAN);
                println!(
                    "{} {{{}}} {value} {}",
                    m.name,
                    display_attrs(&p.attributes, ","),
                    m.unit
                );
            }
        }
    }
    println!(
        "# one poll of {} devices took {:?} ({:?} per device)",
        gpus.len(),
        poll,
        poll / gpus.len().max(1) as u32
    );
}
