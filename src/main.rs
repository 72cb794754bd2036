use std::process::ExitCode;

use genai_collector::{run_with, Builtin, Components};

fn main() -> ExitCode {
    run_with(Components::builtin())
}
