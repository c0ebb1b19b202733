//! Async adapters that know nothing about consoles: listeners (plain and
//! TLS) and the WebSocket-to-TCP bridge.

pub mod lazy_read;
pub mod listener;
pub mod ws_bridge;
pub mod ws_stream;
