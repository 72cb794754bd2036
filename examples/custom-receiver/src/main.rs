//! The collector with the `textfile` receiver added: the whole custom build.

use std::process::ExitCode;

use custom_receiver::TextfileReceiverFactory;
use genai_collector::{run_with, Builtin, Components};

fn main() -> ExitCode {
    run_with(Components::builtin().with_receiver(TextfileReceiverFactory))
}
