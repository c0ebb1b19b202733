//! Async adapters that know nothing about consoles: listeners (one accept
//! loop for every listener, plain or TLS), connections as byte streams, a
//! WebSocket seen as bytes, and the lazily buffered socket reader.

pub mod conn;
pub mod lazy_read;
pub mod listener;
pub mod pem;
pub mod ws_stream;
