//! Fuzz target: see `porthole::protocol::rfb::view_only::fuzz_view_only`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| porthole::protocol::rfb::view_only::fuzz_view_only(data));
