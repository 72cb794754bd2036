//! The genai-collector binary as a library: the CLI, signal handling, and [`run_with`] for
//! custom builds that register their own components.
//!
//! ```no_run
//! use genai_collector::{run_with, Builtin, Components};
//!
//! fn main() -> std::process::ExitCode {
//!     run_with(Components::builtin())
//! }
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use genai_collector_core::config::{self, Source};
pub use genai_collector_core::{Components, Service};

/// The config the binary runs when no `-c` is given.
pub const DEFAULT_CONFIG: &str = include_str!("default.yaml");

/// Exit status for a config that does not load.
pub const EXIT_CONFIG: u8 = 2;

/// Adds the built-in kinds to [`Components`].
pub trait Builtin {
    /// Every receiver, processor and exporter this binary ships.
    fn builtin() -> Self;
}

impl Builtin for Components {
    fn builtin() -> Self {
        use genai_collector_receivers as r;
        Components::new()
            .with_receiver(r::InternalReceiverFactory)
            .with_receiver(r::prometheus::FACTORY)
            .with_receiver(r::vllm::FACTORY)
            .with_receiver(r::tgi::FACTORY)
            .with_receiver(r::llamacpp::FACTORY)
            .with_receiver(r::OllamaReceiverFactory)
            .with_receiver(r::NvmlReceiverFactory)
            .with_receiver(r::OtlpReceiverFactory)
            .with_processor(genai_collector_processors::GenaiNormalizeFactory::default())
            .with_processor(genai_collector_processors::PercentagesFactory)
            .with_processor(genai_collector_processors::PoolAggregateFactory)
            .with_processor(genai_collector_processors::BatchFactory)
            .with_processor(genai_collector_processors::FilterFactory)
            .with_processor(genai_collector_processors::AttributesFactory)
            .with_processor(genai_collector_processors::EfficiencyFactory)
            .with_exporter(genai_collector_exporters::DebugExporterFactory)
            .with_exporter(genai_collector_exporters::KedaScalerFactory)
            .with_exporter(genai_collector_exporters::LoadBalancingFactory)
            .with_exporter(genai_collector_exporters::ModelServerProtocolFactory)
            .with_exporter(genai_collector_exporters::PrometheusExporterFactory)
            .with_exporter(genai_collector_exporters::OtlpExporterFactory)
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "genai-collector",
    version,
    about = "Collects LLM-serving and GPU telemetry and normalises it to the OpenTelemetry gen_ai conventions"
)]
struct Cli {
    /// Pipeline config file; repeat to overlay several (later files win). Default: the embedded config.
    #[arg(short, long = "config", global = true, value_name = "FILE")]
    config: Vec<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `genai_collector_core=debug`); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the collector (the default).
    Run,
    /// Check a config without starting anything; exit status 2 when it is invalid.
    Validate,
    /// List every registered component kind.
    Components,
    /// Print the embedded default config.
    DefaultConfig,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// Parses the command line and runs the collector with `components`.
pub fn run_with(components: Components) -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match cli.command.unwrap_or(Command::Run) {
        Command::Components => {
            print!("{}", components_table(&components));
            ExitCode::SUCCESS
        }
        Command::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Validate => match load(&cli.config, &components) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "config is valid: {} receivers, {} processors, {} exporters, {} pipelines",
                    cfg.receivers.len(),
                    cfg.processors.len(),
                    cfg.exporters.len(),
                    cfg.service.pipelines.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run => {
            let cfg = match load(&cli.config, &components) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(cfg, components))
        }
    }
}

async fn run(cfg: config::Config, components: Components) -> ExitCode {
    let service = match Service::build(cfg, &components) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot build the pipelines: {e}");
            return ExitCode::FAILURE;
        }
    };
    match service.run(shutdown_signal()).await {
        Ok(summary) if summary.drained => ExitCode::SUCCESS,
        Ok(summary) => {
            eprintln!(
                "error: shutdown timed out; {} queued points were lost",
                summary.lost_points
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(paths: &[PathBuf], components: &Components) -> Result<config::Config, ExitCode> {
    let sources: Result<Vec<Source>, _> = if paths.is_empty() {
        Ok(vec![Source::new(
            "<embedded default config>",
            DEFAULT_CONFIG,
        )])
    } else {
        paths.iter().map(|p| Source::read(p)).collect()
    };
    sources
        .and_then(|s| config::load(&s, components))
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("second signal: exiting without draining");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

fn components_table(components: &Components) -> String {
    let list = components.list();
    let width = list.iter().map(|k| k.name.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{:<9}  {:<width$}  DESCRIPTION\n", "KIND", "NAME");
    for k in list {
        out.push_str(&format!(
            "{:<9}  {:<width$}  {}\n",
            k.kind.as_str(),
            k.name,
            k.description
        ));
    }
    out
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr so stdout carries only data (the debug exporter, `components`).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
