//! Fuzz target: see `porthole::protocol::spice::client_check::fuzz_client_check`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    porthole::protocol::spice::client_check::fuzz_client_check(data)
});
