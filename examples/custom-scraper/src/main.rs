//! The collector with the `myserve` scraper and its table: the whole custom build.

use std::process::ExitCode;

use genai_collector::{run_with, Builtin, Components};
use genai_collector_processors::GenaiNormalizeFactory;

fn main() -> ExitCode {
    run_with(
        Components::builtin()
            .with_receiver(custom_scraper::FACTORY)
            .with_processor(GenaiNormalizeFactory::with_tables(custom_scraper::TABLES)),
    )
}
