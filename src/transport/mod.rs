//! Async adapters that know nothing about consoles: listeners (one accept
//! loop for every listener, plain or TLS, behind a gate for connections not
//! yet admitted, and the PROXY protocol header that names the client behind
//! a balancer), connections as byte streams, a
//! WebSocket seen as bytes, the lazily buffered socket reader, and the watch
//! on whether a client drains its socket.

pub mod conn;
pub mod drain_watch;
pub mod gate;
pub mod lazy_read;
pub mod listener;
pub mod pem;
pub mod proxy_header;
pub mod ws_stream;
