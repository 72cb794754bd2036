//! The collector with the test kinds registered, for end-to-end tests of the binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    genai_collector::run_with(genai_collector_testkit::components(&Default::default()))
}
