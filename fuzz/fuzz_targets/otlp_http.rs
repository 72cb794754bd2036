#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| genai_collector_testkit::fuzz::otlp_http(data));
