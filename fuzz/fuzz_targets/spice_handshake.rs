//! Fuzz target: see `porthole::protocol::spice::link::fuzz_handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| porthole::protocol::spice::link::fuzz_handshake(data));
