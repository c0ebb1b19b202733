//! The PROXY protocol on every kind of listener, in-process: a real gateway
//! on free loopback ports whose trusted proxy is 127.0.0.1 (the test), so
//! the test speaks for clients such as 192.0.2.7. The client address a
//! header names is what the gate, the session caps and the session list
//! see; a header from an untrusted peer is just a bad client; a missing,
//! malformed, oversized or slow header from a trusted one is refused under
//! the connection's deadline. HAProxy itself is in tests/e2e/test_proxy_protocol.py.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Gateway, LOOPBACK_BACKEND, echo_console, spawn_gateway, tokens_toml, within};
use futures_util::{SinkExt, StreamExt};
use porthole::token::claims::ConsoleType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const BEARER: &str = "proxy-test-bearer-key-0123456789abcdef";
const ORIGIN: &str = "https://consoles.test";
/// The deadline of every handshake here (the header's included), seconds.
const DEADLINE_SECS: u64 = 1;

/// A gateway whose listeners expect PROXY headers from `trusted`.
async fn start(trusted: &str, listen_extra: &str) -> Gateway {
    start_on("127.0.0.1:0", trusted, listen_extra).await
}

/// [`start`] with its public listener on `public`.
async fn start_on(public: &str, trusted: &str, listen_extra: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bearer"), BEARER).unwrap();
    let toml = format!(
        r#"
[node]
name = "node-a"
[listen]
public = "{public}"
admin = "127.0.0.1:0"
public_base_url = "{ORIGIN}"
trusted_proxies = ["{trusted}"]
proxy_protocol = true
{listen_extra}
[sessions]
max_sessions_per_client = 1
[websocket]
upgrade_timeout_secs = {DEADLINE_SECS}
{tokens}
[issuance]
bearer_key_files = ["bearer"]
signing_key = "k.key"
[spice]
listen_tls = "127.0.0.1:0"
tls_cert = "server.pem"
tls_key = "server.key"
handshake_timeout_secs = {DEADLINE_SECS}
proxy_protocol = true
[vnc]
listen = "127.0.0.1:0"
handshake_timeout_secs = {DEADLINE_SECS}
proxy_protocol = true
{LOOPBACK_BACKEND}"#,
        tokens = tokens_toml("")
    );
    spawn_gateway(dir, toml).await
}

/// A v2 PROXY header for a TCP client at `client` (to `to`).
fn v2(client: &str, to: SocketAddr) -> Vec<u8> {
    let addrs: ppp::v2::Addresses = (client.parse::<SocketAddr>().unwrap(), to).into();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        addrs,
    )
    .build()
    .unwrap()
}

/// A v1 PROXY line for an IPv4 client `ip`.
fn v1(ip: &str, to: SocketAddr) -> Vec<u8> {
    format!("PROXY TCP4 {ip} {} 40000 {}\r\n", to.ip(), to.port()).into_bytes()
}

/// Whether the peer closes `s` without a byte, and how soon.
async fn closed_silently(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = within("the close", s.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "got {:?}", String::from_utf8_lossy(&buf[..n]));
    start.elapsed()
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

impl Gateway {
    /// A serial console WebSocket through the public listener, the
    /// connection starting with `header`; the HTTP status when refused.
    async fn serial(&self, header: &[u8], port: u16) -> Result<Ws, u16> {
        let mut tcp = TcpStream::connect(self.public).await.unwrap();
        tcp.write_all(header).await.unwrap();
        // A VM of its own each: a serial console takes one client at a time.
        static VM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let vm = VM.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = self.token(ConsoleType::Serial, port, &format!("vm-{vm}"));
        let url = format!("ws://{}/serial?token={token}", self.public);
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert("Origin", ORIGIN.parse().unwrap());
        match within("upgrade", tokio_tungstenite::client_async(req, tcp)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn the_client_a_header_names_is_the_one_sessions_and_caps_see() {
    let g = start("127.0.0.1/32", "").await;
    let port = echo_console().await;
    let mut a = g
        .serial(&v2("192.0.2.7:40000", g.public), port)
        .await
        .unwrap();
    a.send(Message::Binary(b"ping".to_vec().into()))
        .await
        .unwrap();
    let echoed = within("echo", a.next()).await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), b"ping");
    let _b = g
        .serial(&v1("192.0.2.8", g.public), echo_console().await)
        .await
        .unwrap();
    let mut clients: Vec<(String, String)> = g
        .sessions(BEARER)
        .await
        .iter()
        .map(|s| {
            (
                s["client"].as_str().unwrap().to_owned(),
                s["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    clients.sort();
    assert_eq!(
        clients,
        [
            ("192.0.2.7".to_owned(), "node-a".to_owned()),
            ("192.0.2.8".to_owned(), "node-a".to_owned())
        ]
    );
    // max_sessions_per_client = 1 counts the named client, not the proxy:
    // 192.0.2.7 has its session, 192.0.2.9 (through the same proxy) none.
    assert_eq!(
        g.serial(&v2("192.0.2.7:40001", g.public), echo_console().await)
            .await
            .err(),
        Some(429)
    );
    let _c = g
        .serial(&v2("192.0.2.9:40000", g.public), echo_console().await)
        .await
        .unwrap();
    g.stop().await;
}

#[tokio::test]
async fn the_session_cap_counts_an_ipv6_client_by_its_64_and_a_mapped_one_as_ipv4() {
    let g = start("127.0.0.1/32", "").await;
    let to: SocketAddr = "[2001:db8:ffff::1]:443".parse().unwrap();
    // max_sessions_per_client = 1: one session for the /64 ...
    let _a = g
        .serial(&v2("[2001:db8:1:2::7]:40000", to), echo_console().await)
        .await
        .unwrap();
    // ... which another address of it cannot add to ...
    assert_eq!(
        g.serial(
            &v2("[2001:db8:1:2:ffff::8]:40000", to),
            echo_console().await
        )
        .await
        .err(),
        Some(429)
    );
    // ... while the next /64 has its own.
    let _b = g
        .serial(&v2("[2001:db8:1:3::7]:40000", to), echo_console().await)
        .await
        .unwrap();
    // An IPv4 client seen through a dual-stack socket counts as itself,
    // not as ::/64 with every other IPv4 client.
    let _c = g
        .serial(&v1("192.0.2.30", g.public), echo_console().await)
        .await
        .unwrap();
    assert_eq!(
        g.serial(&v2("[::ffff:192.0.2.30]:40000", to), echo_console().await)
            .await
            .err(),
        Some(429)
    );
    let _d = g
        .serial(&v2("[::ffff:192.0.2.31]:40000", to), echo_console().await)
        .await
        .unwrap();
    g.stop().await;
}

#[tokio::test]
async fn an_ipv4_proxy_is_trusted_on_a_dual_stack_listener() {
    // A v6 socket that takes IPv4 connections (to 127.0.0.1 only): its
    // peers are ::ffff:127.0.0.1, which must match 127.0.0.1/32.
    let mut g = start_on("[::ffff:127.0.0.1]:0", "127.0.0.1/32", "").await;
    assert!(g.public.is_ipv6(), "{}", g.public);
    g.public = SocketAddr::from(([127, 0, 0, 1], g.public.port()));
    let _a = g
        .serial(&v2("192.0.2.40:40000", g.public), echo_console().await)
        .await
        .expect("the header was read and the client admitted");
    let clients: Vec<String> = g
        .sessions(BEARER)
        .await
        .iter()
        .map(|s| s["client"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(clients, ["192.0.2.40"]);
    g.stop().await;
}

#[tokio::test]
async fn the_gate_counts_the_named_client() {
    let g = start("127.0.0.1/32", "max_pending_per_address = 1").await;
    // A connection waiting for its request holds its client's one place.
    let mut held = TcpStream::connect(g.public).await.unwrap();
    held.write_all(&v2("192.0.2.20:1", g.public)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = TcpStream::connect(g.public).await.unwrap();
    second
        .write_all(&v2("192.0.2.20:2", g.public))
        .await
        .unwrap();
    let took = closed_silently(&mut second).await;
    assert!(
        took < Duration::from_millis(500),
        "closed at once, not at the deadline: {took:?}"
    );
    // Another client behind the same proxy gets its own place.
    let (status, _) = {
        let mut other = TcpStream::connect(g.public).await.unwrap();
        other.write_all(&v1("192.0.2.21", g.public)).await.unwrap();
        other
            .write_all(b"GET /console HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        within("answer", other.read_to_end(&mut out)).await.unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        (text[9..12].to_string(), text)
    };
    assert_eq!(status, "401", "a page without a token");
    drop(held);
    g.stop().await;
}

#[tokio::test]
async fn a_trusted_proxy_must_send_a_whole_header_in_time() {
    let g = start("127.0.0.1/32", "").await;
    let (vnc, spice) = (g.vnc(), g.spice());
    // No header: the request itself is not believed, and not answered.
    let mut s = TcpStream::connect(g.public).await.unwrap();
    s.write_all(b"GET /console HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed_silently(&mut s).await;
    // Malformed.
    let mut s = TcpStream::connect(g.public).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.999 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    closed_silently(&mut s).await;
    // Oversized: a v2 header announcing 60,000 bytes is refused unread.
    let mut big = v2("192.0.2.7:1", g.public);
    big[14..16].copy_from_slice(&60_000u16.to_be_bytes());
    let mut s = TcpStream::connect(g.public).await.unwrap();
    s.write_all(&big).await.unwrap();
    let took = closed_silently(&mut s).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    // A v1 line with no end in sight.
    let mut s = TcpStream::connect(g.public).await.unwrap();
    s.write_all(format!("PROXY TCP4 {}", "1".repeat(120)).as_bytes())
        .await
        .unwrap();
    closed_silently(&mut s).await;
    // Slow: half a header, then nothing; closed at the deadline, on every listener.
    for addr in [g.public, vnc, spice] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&v2("192.0.2.7:1", addr)[..20]).await.unwrap();
        let took = closed_silently(&mut s).await;
        assert!(
            took >= Duration::from_millis(DEADLINE_SECS * 1000 - 100)
                && took < Duration::from_secs(DEADLINE_SECS + 2),
            "{addr}: {took:?}"
        );
    }
    assert!(g.sessions(BEARER).await.is_empty());
    g.stop().await;
}

#[tokio::test]
async fn native_listeners_read_the_header_and_nothing_after_it() {
    let g = start("127.0.0.1/32", "").await;
    let (vnc, spice) = (g.vnc(), g.spice());
    // VNC: the server speaks first, once the header is in.
    let mut s = TcpStream::connect(vnc).await.unwrap();
    s.write_all(&v1("192.0.2.7", vnc)).await.unwrap();
    common::expect(&mut s, b"RFB 003.008\n").await;
    // Without a header, a trusted peer hears nothing and is closed.
    let mut s = TcpStream::connect(vnc).await.unwrap();
    closed_silently(&mut s).await;
    // SPICE: the TLS handshake right behind a v2 header goes through.
    let mut s = TcpStream::connect(spice).await.unwrap();
    s.write_all(&v2("192.0.2.7:40000", spice)).await.unwrap();
    let _tls = g.pki.connect(s).await;
    g.stop().await;
}

#[tokio::test]
async fn a_header_from_an_untrusted_peer_is_a_bad_client() {
    // 127.0.0.1 is not trusted here: nothing is read for it.
    let g = start("10.0.0.0/8", "").await;
    let vnc = g.vnc();
    let mut s = TcpStream::connect(g.public).await.unwrap();
    s.write_all(&v1("192.0.2.7", g.public)).await.unwrap();
    s.write_all(b"GET /console HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    within("answer", s.read_to_end(&mut out)).await.unwrap();
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A direct VNC client is greeted at once, as without the PROXY protocol.
    let mut s = TcpStream::connect(vnc).await.unwrap();
    common::expect(&mut s, b"RFB 003.008\n").await;
    // And its PROXY line is junk to the RFB handshake.
    s.write_all(&v1("192.0.2.7", vnc)).await.unwrap();
    let mut rest = Vec::new();
    let _ = within("refusal", s.read_to_end(&mut rest)).await;
    let port = echo_console().await;
    assert_eq!(
        g.serial(&v1("192.0.2.7", g.public), port).await.err(),
        Some(400)
    );
    assert!(g.sessions(BEARER).await.is_empty());
    g.stop().await;
}
