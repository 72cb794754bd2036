//! Starts N engine simulators on loopback ports and prints their URLs, one per line.
//!
//! `cargo run -p genai-collector-testkit --bin engine-sim -- --engine vllm-v1 --count 3 --base-port 18000`

use clap::Parser;
use genai_collector_testkit::sim::{self, EngineKind};

#[derive(Parser)]
#[command(about = "Serve simulated inference-engine metrics pages on 127.0.0.1")]
struct Args {
    #[arg(long, value_enum, default_value = "vllm-v1")]
    engine: EngineKind,
    #[arg(long, default_value_t = 1)]
    count: u16,
    /// First port; the others follow. 0 picks free ports.
    #[arg(long, default_value_t = 18000)]
    base_port: u16,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut sims = Vec::new();
    for i in 0..args.count {
        let port = if args.base_port == 0 {
            0
        } else {
            args.base_port + i
        };
        let s = sim::start(args.engine, &format!("127.0.0.1:{port}")).await?;
        println!("{}", s.metrics_url());
        sims.push(s);
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
