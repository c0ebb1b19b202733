//! Fuzz target: see `porthole::protocol::spice::main_watch::fuzz_main_watch`.
#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| porthole::protocol::spice::main_watch::fuzz_main_watch(data)
);
