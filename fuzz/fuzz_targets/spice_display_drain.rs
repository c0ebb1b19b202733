//! Fuzz target: see `porthole::protocol::spice::display_drain::fuzz_display_drain`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    porthole::protocol::spice::display_drain::fuzz_display_drain(data)
});
