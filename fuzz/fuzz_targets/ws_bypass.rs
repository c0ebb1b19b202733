//! Fuzz target: see `porthole::transport::ws_bypass::fuzz_bypass`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| porthole::transport::ws_bypass::fuzz_bypass(data));
