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
use genai_collector_core::telemetry::Telemetry;
use genai_collector_core::Kept;
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
    /// Reload the config when a config file changes (checked every second), as on SIGHUP.
    #[arg(long, global = true)]
    watch_config: bool,
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
            let sources = match read_sources(&cli.config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let cfg = match config::load(&sources, &components) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            let reload = Reload {
                paths: cli.config.clone(),
                watch: cli.watch_config,
                running: sources,
            };
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = cfg.service.worker_threads {
                builder.worker_threads(n);
            }
            let runtime = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(cfg, components, reload))
        }
    }
}

/// What a reload reads, and the text of the config running now.
struct Reload {
    paths: Vec<PathBuf>,
    watch: bool,
    running: Vec<Source>,
}

impl Reload {
    /// Waits for SIGHUP or, with `--watch-config`, a changed file, until the files hold a
    /// valid config that differs from the running one. A config that does not load is
    /// refused: logged, shown on `/healthz` as `config_error`, and the running one carries on.
    async fn next(
        &mut self,
        hangup: &mut Hangup,
        components: &Components,
        telemetry: &Telemetry,
    ) -> (config::Config, Vec<Source>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        // What the files held when last read, so that the watch acts on a change only.
        let mut last_seen: Option<Vec<Source>> = None;
        loop {
            let asked = tokio::select! {
                () = hangup.recv() => true,
                _ = tick.tick(), if self.watch => false,
            };
            if self.paths.is_empty() {
                if asked {
                    tracing::warn!("SIGHUP: the embedded config has no file to reload");
                }
                continue;
            }
            let sources = match read_sources(&self.paths) {
                Ok(s) => s,
                Err(e) => {
                    if asked {
                        refuse(telemetry, &e.to_string());
                    }
                    continue;
                }
            };
            let seen = last_seen.as_deref().unwrap_or(&self.running);
            if same_text(&sources, seen) && !asked {
                continue;
            }
            if same_text(&sources, &self.running) {
                tracing::info!("config reload: unchanged");
            } else {
                match config::load(&sources, components) {
                    Ok(cfg) => {
                        for w in &cfg.warnings {
                            tracing::warn!("{w}");
                        }
                        return (cfg, std::mem::replace(&mut self.running, sources));
                    }
                    Err(e) => refuse(telemetry, &e.to_string()),
                }
            }
            last_seen = Some(sources);
        }
    }
}

fn same_text(a: &[Source], b: &[Source]) -> bool {
    a.iter().map(|s| &s.text).eq(b.iter().map(|s| &s.text))
}

fn refuse(telemetry: &Telemetry, error: &str) {
    tracing::error!("config reload refused, the running config carries on: {error}");
    telemetry.set_config_error(error);
}

/// Runs `cfg`, and on a reload, drains it and runs the new one: queued data is delivered in
/// the drain or, with a persistent queue, taken up from its directory by the new pipelines.
async fn run(cfg: config::Config, components: Components, mut reload: Reload) -> ExitCode {
    let mut shutdown = std::pin::pin!(shutdown_signal());
    // Registered once, before anything runs: an unhandled SIGHUP would end the process.
    let mut hangup = hangup_signal();
    let mut cfg = cfg;
    let worker_threads = cfg.service.worker_threads;
    // The config that ran before a reload, to go back to if the new one cannot start (a port
    // taken), and why it could not.
    let mut previous: Option<Vec<Source>> = None;
    let mut failed_reload: Option<String> = None;
    // What the last reload kept running, for the next service to adopt.
    let mut kept = Kept::default();
    loop {
        let started = match Service::build_keeping(cfg, &components, &kept) {
            Ok(service) => service
                .start_with(&mut kept)
                .await
                .map_err(|e| format!("cannot start: {e}")),
            Err(e) => Err(format!("cannot build the pipelines: {e}")),
        };
        let mut running = match (started, previous.take()) {
            (Ok(r), _) => r,
            (Err(e), Some(sources)) => {
                tracing::error!("config reload: the new config {e}; going back to the last one");
                match config::load(&sources, &components) {
                    Ok(c) => {
                        cfg = c;
                        reload.running = sources;
                        failed_reload = Some(e);
                        continue;
                    }
                    Err(e) => {
                        eprintln!("error: the last config no longer loads: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            (Err(e), None) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let telemetry = running.telemetry().clone();
        // Kept by the reload but not adopted (the last config came back instead): they stop.
        std::mem::take(&mut kept).stop().await;
        // The registry outlives a reload: a refusal shown before is cleared by this start.
        match failed_reload.take() {
            Some(e) => telemetry.set_config_error(e),
            None => telemetry.clear_config_error(),
        }
        let mut next = None;
        let asked = running
            .wait(async {
                tokio::select! {
                    () = &mut shutdown => {}
                    c = reload.next(&mut hangup, &components, &telemetry) => next = Some(c),
                }
            })
            .await;
        let summary = match &next {
            Some((c, _)) => {
                tracing::info!("config reload: stopping what changed, draining its pipelines");
                let (summary, k) = running.stop_for(c).await;
                kept = k;
                summary
            }
            None => {
                if asked {
                    tracing::info!("shutdown requested: stopping receivers, draining pipelines");
                }
                running.stop().await
            }
        };
        if !summary.drained {
            eprintln!(
                "error: shutdown timed out; {} queued points were lost",
                summary.lost_points
            );
        }
        match next {
            Some((c, before)) => {
                tracing::info!(
                    kept_components = kept.len(),
                    "config reloaded: pipelines drained, starting the new ones"
                );
                if c.service.worker_threads != worker_threads {
                    tracing::warn!(
                        "config reload: service.worker_threads takes effect at the next restart"
                    );
                }
                cfg = c;
                previous = Some(before);
            }
            None if summary.drained => return ExitCode::SUCCESS,
            None => return ExitCode::FAILURE,
        }
    }
}

fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>, config::ConfigError> {
    if paths.is_empty() {
        return Ok(vec![Source::new(
            "<embedded default config>",
            DEFAULT_CONFIG,
        )]);
    }
    paths.iter().map(|p| Source::read(p)).collect()
}

fn load(paths: &[PathBuf], components: &Components) -> Result<config::Config, ExitCode> {
    read_sources(paths)
        .and_then(|s| config::load(&s, components))
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
}

/// SIGHUP, as a stream; never, where there is none.
struct Hangup(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangup {
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.0 {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    }
}

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        Hangup(signal(SignalKind::hangup()).ok())
    }
    #[cfg(not(unix))]
    Hangup()
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
