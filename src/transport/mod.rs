//! Async adapters that know nothing about consoles: listeners (one accept
//! loop for every listener, plain or TLS, behind a gate for connections not
//! yet admitted, and the PROXY protocol header that names the client behind
//! a balancer), connections as byte streams, a
//! WebSocket seen as bytes, the client's WebSocket with binary payloads
//! kept out of tungstenite's buffers, a read buffer sized to the traffic,
//! the watch on whether a client drains its socket, TCP keepalive for
//! peers that may vanish without a word, and a deadline on HTTP responses
//! a peer does not read.

pub mod conn;
pub mod drain_watch;
pub mod elastic;
pub mod gate;
pub mod keepalive;
pub mod listener;
pub mod pem;
pub mod proxy_header;
pub mod write_stall;
pub mod ws_bypass;
pub mod ws_stream;
