#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| genai_collector_testkit::fuzz::disk_queue(data));
