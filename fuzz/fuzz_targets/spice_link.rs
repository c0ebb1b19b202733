//! Fuzz target: see `porthole::protocol::spice::messages::fuzz_link`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| porthole::protocol::spice::messages::fuzz_link(data));
