//! Fuzz target: see `porthole::protocol::rfb::upstream::fuzz_upstream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| porthole::protocol::rfb::upstream::fuzz_upstream(data));
