//! Fuzz target: see `porthole::protocol::rfb::client::fuzz_client`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| porthole::protocol::rfb::client::fuzz_client(data));
