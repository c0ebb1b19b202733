//! The session proxies in-process against fake hypervisors: the VNC
//! security proxy (browser and native legs) and the SPICE link proxy, driven
//! through Porthole's public API (config, listeners, HTTP exchanges) in
//! seconds, without QEMU. The QEMU end-to-end suite (tests/e2e) proves the
//! same paths against real peers; these pin the bytes.

use crate::common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{
    Gateway, LOOPBACK_BACKEND, echo, expect, hex, read_n, say, spawn_gateway, tokens_toml, within,
};
use futures_util::{SinkExt, StreamExt};
use porthole::protocol::spice::crypto::{decrypt_ticket, encrypt_ticket};
use porthole::protocol::spice::messages::{Caps, LinkMess, LinkReply, channel};
use porthole::session::link_keys::LinkKey;
use porthole::token::claims::ConsoleType;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const ORIGIN: &str = "https://consoles.test";
/// What the fake hypervisors expect; the backend's files hold these, or not.
const VNC_PASSWORD: &str = "Vnc-Pa55";
const SPICE_PASSWORD: &str = "Sp1ce-hv-ticket";
const SESSION_ID: u32 = 0x5eed_5eed;
/// The admin API's bearer key.
const BEARER: &str = "admin-bearer-key-for-tests";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ------------------------------------------------------------------ Porthole

/// Porthole with every listener on a free loopback port; its backend holds
/// `vnc_password` and `spice_password` for the fakes.
async fn start(vnc_password: &str, spice_password: &str, handshake_secs: u64) -> Gateway {
    start_with(vnc_password, spice_password, handshake_secs, "").await
}

/// [`start`], with `tokens_extra` added to its `[tokens]` section.
async fn start_with(
    vnc_password: &str,
    spice_password: &str,
    handshake_secs: u64,
    tokens_extra: &str,
) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("vnc-password", &format!("{vnc_password}\n"));
    write("spice-password", &format!("{spice_password}\n"));
    write("bearer", BEARER);
    let toml = format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
public_base_url = "{ORIGIN}"
{tokens}
[issuance]
bearer_key_files = ["bearer"]
signing_key = "k.key"
[spice]
listen_tls = "127.0.0.1:0"
tls_cert = "server.pem"
tls_key = "server.key"
ca = "ca.pem"
handshake_timeout_secs = {handshake_secs}
[vnc]
listen = "127.0.0.1:0"
handshake_timeout_secs = {handshake_secs}
{LOOPBACK_BACKEND}
[backends.vnc]
password_file = "vnc-password"
[backends.spice]
password_file = "spice-password"
"#,
        tokens = tokens_toml(tokens_extra)
    );
    spawn_gateway(dir, toml).await
}

impl Gateway {
    /// `GET path` on the public listener: 200 and its JSON body.
    async fn details(&self, path: &str) -> Value {
        let (status, body) = common::http(self.public, "GET", path, None, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The console types of the live sessions, as the admin API lists them.
    async fn consoles(&self) -> Vec<String> {
        let list = self.sessions(BEARER).await;
        list.iter()
            .map(|s| s["console"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until the admin API lists no session.
    async fn until_no_session(&self, what: &str) {
        within(what, async {
            while !self.consoles().await.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

// ------------------------------------------------------------- fake VNC

/// The fake's ServerInit.
const SERVER_INIT: &str = "
    04 00  03 00                  # framebuffer 1024 x 768
    20 18 00 01                   # 32 bpp, depth 24, little-endian, true colour
    00 ff  00 ff  00 ff           # red, green, blue max 255
    10 08 00  00 00 00            # shifts 16 8 0, padding
    00 00 00 07                   # name: 7 bytes
    66 61 6b 65 2d 76 6d          # fake-vm
";

#[derive(Debug, Default)]
struct RfbSeen {
    version: Vec<u8>,
    choice: u8,
    /// VNC authentication: whether the DES response was right.
    response_ok: Option<bool>,
    /// The ClientInit shared flag.
    shared: Option<u8>,
}

/// VNC authentication as servers check it: DES over the challenge, keyed
/// with the password's first 8 bytes, each bit-reversed.
fn vnc_response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    use des::cipher::{BlockEncrypt, KeyInit};
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = des::Des::new_from_slice(&key).unwrap();
    let mut out = *challenge;
    for half in out.chunks_exact_mut(8) {
        cipher.encrypt_block(half.into());
    }
    out
}

/// An RFB 3.8 server offering one security type (1 None, 2 VNC
/// authentication with [`VNC_PASSWORD`]), then ServerInit, then echo.
async fn fake_vnc(security: u8) -> (u16, UnboundedReceiver<RfbSeen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(rfb_server(s, security, tx.clone()));
        }
    });
    (port, rx)
}

async fn rfb_server(mut s: TcpStream, security: u8, tx: UnboundedSender<RfbSeen>) {
    let mut seen = RfbSeen::default();
    say(&mut s, b"RFB 003.008\n").await;
    seen.version = read_n(&mut s, 12).await;
    say(&mut s, &[1, security]).await;
    seen.choice = read_n(&mut s, 1).await[0];
    if security == 2 {
        let challenge: [u8; 16] = rand::random();
        say(&mut s, &challenge).await;
        let ok = read_n(&mut s, 16).await == vnc_response(VNC_PASSWORD.as_bytes(), &challenge);
        seen.response_ok = Some(ok);
        if !ok {
            let mut failed = hex("00 00 00 01  00 00 00 15  # failed; 21 bytes:");
            failed.extend(b"Authentication failed");
            say(&mut s, &failed).await;
            return tx.send(seen).unwrap();
        }
    }
    say(&mut s, &hex("00 00 00 00  # SecurityResult OK")).await;
    seen.shared = Some(read_n(&mut s, 1).await[0]);
    tx.send(seen).unwrap();
    say(&mut s, &hex(SERVER_INIT)).await;
    echo(s).await;
}

// ------------------------------------------------------------ fake SPICE

/// INIT on the main channel, mini header.
const MAIN_INIT: &str = "
    67 00  20 00 00 00            # SPICE_MSG_MAIN_INIT (103), 32 bytes
    ed 5e ed 5e                   # session id 0x5eed5eed
    01 00 00 00                   # display channels hint
    03 00 00 00  02 00 00 00      # mouse modes: supported server|client, current client
    00 00 00 00  0a 00 00 00      # no agent, 10 agent tokens
    00 00 00 00  00 00 00 04      # multimedia time, RAM hint
";

#[derive(Debug)]
struct LinkSeen {
    mess: LinkMess,
    mechanism: u32,
    /// The ticket as the fake decrypted it.
    password: Vec<u8>,
}

/// A SPICE server expecting [`SPICE_PASSWORD`]: its own link key, the
/// ticket checked, INIT on the main channel, then echo. Returns its port
/// and its public key.
async fn fake_spice() -> (u16, [u8; 162], UnboundedReceiver<LinkSeen>) {
    let key = Arc::new(LinkKey::generate());
    let der = key.der;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(spice_server(s, key.clone(), tx.clone()));
        }
    });
    (port, der, rx)
}

/// A link message or reply: its 16-byte header, then the body it announces.
async fn read_link<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let header = read_n(s, 16).await;
    let size = u32::from_le_bytes(header[12..16].try_into().unwrap()) as usize;
    [header, read_n(s, size).await].concat()
}

/// The fake's link reply: OK, its key, the capabilities spice-server offers.
fn link_reply(key: &LinkKey) -> Vec<u8> {
    LinkReply {
        error: 0,
        public_key: key.der,
        caps: Caps {
            common: vec![0b1011], // AUTH_SELECTION | AUTH_SPICE | MINI_HEADER
            channel: vec![],
        },
    }
    .encode()
}

async fn spice_server(mut s: TcpStream, key: Arc<LinkKey>, tx: UnboundedSender<LinkSeen>) {
    let (mess, _) = LinkMess::decode(&read_link(&mut s).await).expect("a link message");
    say(&mut s, &link_reply(&key)).await;
    let auth = read_n(&mut s, 4 + 128).await;
    let password = decrypt_ticket(&key.private, auth[4..].try_into().unwrap()).unwrap();
    let ok = password == SPICE_PASSWORD.as_bytes();
    let main = mess.channel_type == channel::MAIN;
    let mechanism = u32::from_le_bytes(auth[..4].try_into().unwrap());
    tx.send(LinkSeen {
        mess,
        mechanism,
        password,
    })
    .unwrap();
    if !ok {
        // spice-server's answer to a wrong ticket.
        return say(&mut s, &hex("07 00 00 00  # PERMISSION_DENIED")).await;
    }
    say(&mut s, &hex("00 00 00 00  # link result OK")).await;
    if main {
        say(&mut s, &hex(MAIN_INIT)).await;
    }
    echo(s).await;
}

// ---------------------------------------------------------------- clients

type Tls = tokio_rustls::client::TlsStream<TcpStream>;
type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A noVNC-like client: the WebSocket seen as a byte stream.
struct Browser {
    ws: Ws,
    pending: Vec<u8>,
    /// Everything received.
    all: Vec<u8>,
}

impl Browser {
    async fn open(g: &Gateway, token: &str) -> Browser {
        let mut req = format!("ws://{}/vnc?token={token}", g.public)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("Origin", ORIGIN.parse().unwrap());
        let (ws, _) = within("upgrade", tokio_tungstenite::connect_async(req))
            .await
            .unwrap();
        Browser {
            ws,
            pending: Vec::new(),
            all: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .unwrap();
    }

    /// One message: binary ones are kept (`None`), others returned.
    async fn next(&mut self) -> Option<Message> {
        match within("a message", self.ws.next()).await {
            Some(Ok(Message::Binary(b))) => {
                self.pending.extend_from_slice(&b);
                self.all.extend_from_slice(&b);
                None
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
            Some(Ok(other)) => Some(other),
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    }

    async fn read(&mut self, n: usize) -> Vec<u8> {
        while self.pending.len() < n {
            if let Some(m) = self.next().await {
                panic!("{m:?} after {:?}", self.pending);
            }
        }
        self.pending.drain(..n).collect()
    }

    /// Everything up to the close frame, and the frame.
    async fn until_close(&mut self) -> (Vec<u8>, CloseFrame) {
        loop {
            match self.next().await {
                None => {}
                Some(Message::Close(Some(frame))) => {
                    return (std::mem::take(&mut self.pending), frame);
                }
                Some(other) => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

/// A native VNC client's part of VeNCrypt X509Plain in clear, then TLS.
async fn vencrypt(g: &Gateway, mut s: TcpStream) -> Tls {
    expect(&mut s, b"RFB 003.008\n").await;
    say(&mut s, b"RFB 003.008\n").await;
    expect(&mut s, &hex("01 13  # one security type: VeNCrypt (19)")).await;
    say(&mut s, &hex("13")).await;
    expect(&mut s, &hex("00 02  # VeNCrypt 0.2")).await;
    say(&mut s, &hex("00 02")).await;
    expect(&mut s, &hex("00  01  00 00 01 06  # OK; X509Plain only")).await;
    say(&mut s, &hex("00 00 01 06")).await;
    expect(&mut s, &hex("01  # accepted: TLS starts")).await;
    g.pki.connect(s).await
}

/// A SPICE link message with the caps every test client sends
/// (AUTH_SELECTION | AUTH_SPICE | MINI_HEADER).
fn link_mess(channel_type: u8, connection_id: u32) -> Vec<u8> {
    LinkMess {
        connection_id,
        channel_type,
        channel_id: 0,
        caps: Caps {
            common: vec![0b1011],
            channel: vec![],
        },
    }
    .encode()
}

/// A fresh ticket for a spice-direct token of the console at `port`.
async fn spice_ticket(g: &Gateway, port: u16) -> String {
    spice_ticket_of(g, port, false).await
}

/// [`spice_ticket`], view-only when `view_only`.
async fn spice_ticket_of(g: &Gateway, port: u16, view_only: bool) -> String {
    let token = g.token_of(ConsoleType::SpiceDirect, port, "vm-1", view_only);
    let path = format!("/spice-direct?token={token}&format=json");
    g.details(&path).await["ticket"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Opens a channel connection to Porthole's SPICE TLS listener and links
/// with `link` and `ticket`; returns Porthole's reply and the link result.
async fn spice_link(g: &Gateway, link: &[u8], ticket: &str) -> (Tls, LinkReply, u32) {
    let tcp = TcpStream::connect(g.spice()).await.unwrap();
    let mut s = g.pki.connect(tcp).await;
    say(&mut s, link).await;
    let (reply, _) = LinkReply::decode(&read_link(&mut s).await).unwrap();
    // Porthole answers every link with its key before it sees the ticket.
    assert_eq!(reply.error, 0);
    let mut auth = hex("01 00 00 00  # mechanism: SPICE ticket");
    let ticket = encrypt_ticket(&mut rand::rngs::OsRng, &reply.public_key, ticket.as_bytes());
    auth.extend(ticket.unwrap());
    say(&mut s, &auth).await;
    let result = u32::from_le_bytes(read_n(&mut s, 4).await.try_into().unwrap());
    (s, reply, result)
}

// ------------------------------------------------------------------ tests

/// A browser over `/vnc` in front of a fake offering `security`.
async fn browser_session(security: u8) {
    let g = start(VNC_PASSWORD, SPICE_PASSWORD, 10).await;
    let (port, mut fake) = fake_vnc(security).await;
    let mut b = Browser::open(&g, &g.token(ConsoleType::Novnc, port, "vm-1")).await;
    // Porthole offers the browser None whatever the hypervisor asked for.
    assert_eq!(b.read(12).await, b"RFB 003.008\n");
    b.send(b"RFB 003.008\n").await;
    assert_eq!(b.read(2).await, hex("01 01  # one security type: None"));
    b.send(&hex("01  # None")).await;
    assert_eq!(b.read(4).await, hex("00 00 00 00  # SecurityResult OK"));
    b.send(&hex("00  # ClientInit: exclusive")).await;
    assert_eq!(b.read(hex(SERVER_INIT).len()).await, hex(SERVER_INIT));

    let seen = within("the fake's handshake", fake.recv()).await.unwrap();
    assert_eq!(seen.version, b"RFB 003.008\n");
    assert_eq!(seen.choice, security);
    let expected_response = (security == 2).then_some(true);
    assert_eq!(seen.response_ok, expected_response, "the DES response");
    assert_eq!(seen.shared, Some(1), "force_shared overrides exclusive");

    let payload: Vec<u8> = (0..=255u8).cycle().take(40_000).collect();
    b.send(&payload).await;
    assert_eq!(b.read(payload.len()).await, payload, "echoed both ways");
    assert!(!contains(&b.all, VNC_PASSWORD.as_bytes()));
    assert_eq!(g.consoles().await, ["novnc"]);
    b.ws.close(None).await.unwrap();
    g.until_no_session("the session ends").await;
    g.stop().await;
}

#[tokio::test]
async fn a_browser_reaches_a_vnc_console_offering_none() {
    browser_session(1).await;
}

#[tokio::test]
async fn a_browser_reaches_a_vnc_console_behind_its_password() {
    // The fake's DES is right: FIPS 81's key 0123456789abcdef, bit-reversed.
    let fips = vnc_response(&hex("80 c4 a2 e6 91 d5 b3 f7"), b"Now is the time ");
    assert_eq!(fips[..8], hex("3f a4 0e 8a 98 4d 48 15"));
    browser_session(2).await;
}

#[tokio::test]
async fn a_wrong_backend_vnc_password_gives_the_browser_a_generic_failure_and_1011() {
    let g = start("wrong-pw", SPICE_PASSWORD, 10).await;
    let (port, mut fake) = fake_vnc(2).await;
    let mut b = Browser::open(&g, &g.token(ConsoleType::Novnc, port, "vm-1")).await;
    let (bytes, frame) = b.until_close().await;
    let mut expected = b"RFB 003.008\n".to_vec();
    expected.extend(hex("00  00 00 00 13  # no security types; 19 bytes:"));
    expected.extend(b"console unavailable");
    assert_eq!(bytes, expected, "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(u16::from(frame.code), 1011);
    assert_eq!(frame.reason.as_str(), "console connection failed");
    let seen = within("the fake's handshake", fake.recv()).await.unwrap();
    assert_eq!((seen.response_ok, seen.shared), (Some(false), None));
    assert!(!contains(&b.all, b"Authentication failed"), "nor why");
    g.until_no_session("the registry empties").await;
    g.stop().await;
}

#[tokio::test]
async fn a_native_vnc_client_with_a_ticket_reaches_the_console_over_vencrypt() {
    let g = start(VNC_PASSWORD, SPICE_PASSWORD, 10).await;
    let (port, mut fake) = fake_vnc(2).await;
    let token = g.token(ConsoleType::VncDirect, port, "vm-1");
    let d = g.details(&format!("/vnc-direct?token={token}")).await;
    assert_eq!(d["port"], g.vnc().port());
    assert_eq!(d["security"], "VeNCrypt X509Plain");
    assert_eq!(d["ca"], g.pki.ca_pem.as_str());
    let ticket = d["ticket"].as_str().unwrap();

    let mut s = vencrypt(&g, TcpStream::connect(g.vnc()).await.unwrap()).await;
    let mut plain = hex("00 00 00 08  00 00 00 20  # username 8 bytes, password 32");
    plain.extend(b"porthole");
    plain.extend(ticket.as_bytes());
    say(&mut s, &plain).await;
    expect(&mut s, &hex("00 00 00 00  # SecurityResult OK")).await;
    say(&mut s, &hex("00  # ClientInit: exclusive")).await;
    expect(&mut s, &hex(SERVER_INIT)).await;
    let seen = within("the fake's handshake", fake.recv()).await.unwrap();
    assert_eq!((seen.response_ok, seen.shared), (Some(true), Some(1)));
    say(&mut s, b"echo me").await;
    expect(&mut s, b"echo me").await;
    assert_eq!(g.consoles().await, ["vnc-direct"]);
    drop(s);
    g.until_no_session("the session ends").await;
    g.stop().await;
}

#[tokio::test]
async fn one_token_holds_one_unused_ticket_and_runs_one_session() {
    // A store of 4 tickets: one token exchanged over and over must not fill it.
    let g = start_with(VNC_PASSWORD, SPICE_PASSWORD, 10, "store_capacity = 4").await;
    let (port, _fake) = fake_vnc(2).await;
    let token = g.token(ConsoleType::VncDirect, port, "vm-1");
    let path = format!("/vnc-direct?token={token}");
    let first = g.details(&path).await["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut last = String::new();
    for _ in 0..50 {
        last = g.details(&path).await["ticket"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    // Another user is not locked out.
    let other = g.token(ConsoleType::VncDirect, port, "vm-1");
    g.details(&format!("/vnc-direct?token={other}")).await;

    // The replaced ticket opens nothing.
    let tls = |g: &Gateway| {
        let addr = g.vnc();
        async move { TcpStream::connect(addr).await.unwrap() }
    };
    let plain = |ticket: &str| {
        let mut p = hex("00 00 00 08  00 00 00 20  # username 8 bytes, password 32");
        p.extend(b"porthole");
        p.extend(ticket.as_bytes());
        p
    };
    let mut s = vencrypt(&g, tls(&g).await).await;
    say(&mut s, &plain(&first)).await;
    expect(&mut s, &hex("00 00 00 01  # SecurityResult failed")).await;

    // The last one does; while its session runs the token gets no ticket.
    let mut s = vencrypt(&g, tls(&g).await).await;
    say(&mut s, &plain(&last)).await;
    expect(&mut s, &hex("00 00 00 00  # SecurityResult OK")).await;
    say(&mut s, &hex("01  # ClientInit: shared")).await;
    expect(&mut s, &hex(SERVER_INIT)).await;
    let (status, body) = common::http(g.public, "GET", &path, None, None).await;
    assert_eq!((status, body.as_str()), (403, r#"{"error":"refused"}"#));
    assert_eq!(g.consoles().await, ["vnc-direct"]);

    // Once it ends, the token may start another (the `reconnect` policy).
    drop(s);
    g.until_no_session("the session ends").await;
    g.details(&path).await;
    g.stop().await;
}

#[tokio::test]
async fn an_address_guessing_tickets_must_wait_and_others_are_not_held_up() {
    let g = start(VNC_PASSWORD, SPICE_PASSWORD, 10).await;
    let (port, _fake) = fake_vnc(2).await;
    // Ten free failures from 127.0.0.1, then it must wait: even a good
    // ticket is not looked at.
    for _ in 0..11 {
        assert!(!vnc_ticket_opens(&g, "127.0.0.1", &"g".repeat(32)).await);
    }
    let token = g.token(ConsoleType::VncDirect, port, "vm-1");
    let d = g.details(&format!("/vnc-direct?token={token}")).await;
    let ticket = d["ticket"].as_str().unwrap();
    assert!(
        !vnc_ticket_opens(&g, "127.0.0.1", ticket).await,
        "a guessing address waits"
    );
    // Another address is not held up, and the ticket was not used up.
    assert!(
        vnc_ticket_opens(&g, "127.0.0.2", ticket).await,
        "127.0.0.2 is not the guesser"
    );
    g.stop().await;
}

/// Whether `ticket`, presented from `ip` on the native VNC listener, opens
/// a session (SecurityResult OK).
async fn vnc_ticket_opens(g: &Gateway, ip: &str, ticket: &str) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let mut s = vencrypt(g, socket.connect(g.vnc()).await.unwrap()).await;
    let mut plain = hex("00 00 00 08  00 00 00 20  # username 8 bytes, password 32");
    plain.extend(b"porthole");
    plain.extend(ticket.as_bytes());
    say(&mut s, &plain).await;
    read_n(&mut s, 4).await == hex("00 00 00 00")
}

#[tokio::test]
async fn spice_channels_link_through_porthole_and_join_only_their_session() {
    let g = start(VNC_PASSWORD, SPICE_PASSWORD, 10).await;
    let (port, fake_key, mut fake) = fake_spice().await;
    let token = g.token(ConsoleType::SpiceDirect, port, "vm-1");
    let path = format!("/spice-direct?token={token}&format=json");
    let d = g.details(&path).await;
    assert_eq!(d["tls_port"], g.spice().port());
    assert_eq!(d["ca"], g.pki.ca_pem.as_str());
    let ticket = d["ticket"].as_str().unwrap();
    assert_eq!(ticket.len(), 32);

    let main_link = hex("
        52 45 44 51  02 00 00 00  02 00 00 00   # REDQ, version 2.2
        1a 00 00 00                             # body: 26 bytes
        00 00 00 00  01  00                     # connection id 0 (new session), main, id 0
        01 00 00 00  01 00 00 00  12 00 00 00   # 1 common word, 1 channel word, at 18
        0f 00 00 00   # AUTH_SELECTION | AUTH_SPICE | AUTH_SASL | MINI_HEADER
        0b 00 00 00   # SEMI_SEAMLESS_MIGRATE | NAME_AND_UUID | SEAMLESS_MIGRATE
    ");
    let (mut main, reply, result) = spice_link(&g, &main_link, ticket).await;
    assert_eq!(result, 0, "main channel linked");
    assert_ne!(reply.public_key, fake_key, "Porthole's own link key");
    assert_eq!(reply.caps.common, [0b1011], "no SASL offered");
    assert_eq!(reply.caps.channel, [0b110], "no migration offered");
    // Upstream: the backend's ticket, the client's caps minus SASL and migration.
    let up = within("the fake's link", fake.recv()).await.unwrap();
    assert_eq!(up.mechanism, 1);
    assert_eq!(up.password, SPICE_PASSWORD.as_bytes());
    let (m, caps) = (&up.mess, &up.mess.caps);
    assert_eq!((m.connection_id, m.channel_type), (0, channel::MAIN));
    assert_eq!(caps.common, [0b1011], "minus AUTH_SASL");
    assert_eq!(caps.channel, [0b0010], "minus both migrations");
    expect(&mut main, &hex(MAIN_INIT)).await;
    // A whole main-channel message (ATTACH_CHANNELS): each channel passes
    // only the messages its clients send.
    let attach = [0x68, 0x00, 0x00, 0x00, 0x00, 0x00];
    say(&mut main, &attach).await;
    expect(&mut main, &attach).await;
    assert_eq!(g.consoles().await, ["spice-direct"]);

    // A second channel of the session the fake named joins it.
    let (mut inputs, _, result) =
        spice_link(&g, &link_mess(channel::INPUTS, SESSION_ID), ticket).await;
    assert_eq!(result, 0, "inputs channel linked");
    let up = within("the fake's link", fake.recv()).await.unwrap();
    assert_eq!(
        (up.mess.channel_type, up.mess.connection_id),
        (channel::INPUTS, SESSION_ID)
    );
    // A whole SPICE message (KEY_DOWN, scancode 0x1e): Porthole passes
    // messages on once their header is whole and checked.
    let key_down = [0x65, 0x00, 0x04, 0x00, 0x00, 0x00, 0x1e, 0x00, 0x00, 0x00];
    say(&mut inputs, &key_down).await;
    expect(&mut inputs, &key_down).await;
    assert_eq!(g.consoles().await, ["spice-direct"], "no new session");

    // Naming another session (spice-server would take it): BAD_CONNECTION_ID.
    let (_, _, result) =
        spice_link(&g, &link_mess(channel::DISPLAY, SESSION_ID ^ 0xff), ticket).await;
    assert_eq!(result, 8, "BAD_CONNECTION_ID");
    assert!(fake.try_recv().is_err(), "never reached the hypervisor");

    // The main channel ends the session; its ticket is dead.
    drop((main, inputs));
    g.until_no_session("the session ends").await;
    let (_, _, result) = spice_link(&g, &link_mess(channel::MAIN, 0), ticket).await;
    assert_eq!(result, 7, "PERMISSION_DENIED");
    g.stop().await;
}

#[tokio::test]
async fn a_spice_ticket_the_hypervisor_refuses_gives_the_client_a_generic_error() {
    let g = start(VNC_PASSWORD, "not-the-ticket", 10).await;
    let (port, _, mut fake) = fake_spice().await;
    let ticket = spice_ticket(&g, port).await;
    let (mut s, _, result) = spice_link(&g, &link_mess(channel::MAIN, 0), &ticket).await;
    let up = within("the fake's link", fake.recv()).await.unwrap();
    assert_eq!(up.password, b"not-the-ticket", "the backend's");
    // README: hypervisor_refused_ticket (blame backend) gets the client ERROR,
    // not the hypervisor's PERMISSION_DENIED (which would blame its ticket).
    assert_eq!(result, 1, "ERROR");
    let mut rest = Vec::new();
    let _ = within("the close", s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "nothing after the link error: {rest:?}");
    g.until_no_session("the registry empties").await;
    g.stop().await;
}

/// spice-server serves one client: a view-only client's main channel would
/// disconnect the console's user, so while a session is on the console it
/// is refused with ERROR before it reaches the hypervisor (whichever node
/// runs that session: the check asks the registry by console); once the
/// user has left, a view-only client links.
#[tokio::test]
async fn a_view_only_spice_client_is_refused_while_the_consoles_user_is_on_it() {
    let g = start(VNC_PASSWORD, SPICE_PASSWORD, 10).await;
    let (port, _, mut fake) = fake_spice().await;
    let ticket = spice_ticket(&g, port).await;
    let (main, _, result) = spice_link(&g, &link_mess(channel::MAIN, 0), &ticket).await;
    assert_eq!(result, 0, "the user's main channel linked");
    within("the fake's link", fake.recv()).await.unwrap();

    let watcher = spice_ticket_of(&g, port, true).await;
    let (_, _, result) = spice_link(&g, &link_mess(channel::MAIN, 0), &watcher).await;
    assert_eq!(result, 1, "ERROR");
    assert!(fake.try_recv().is_err(), "never reached the hypervisor");
    assert_eq!(
        g.consoles().await,
        ["spice-direct"],
        "the user's session only"
    );

    drop(main);
    g.until_no_session("the user's session ends").await;
    // The refused ticket was ended with its refusal: a new one.
    let watcher = spice_ticket_of(&g, port, true).await;
    let (watching, _, result) = spice_link(&g, &link_mess(channel::MAIN, 0), &watcher).await;
    assert_eq!(result, 0, "a free console: the view-only client linked");
    within("the fake's link", fake.recv()).await.unwrap();
    drop(watching);
    g.until_no_session("the view-only session ends").await;
    g.stop().await;
}

/// A display channel whose session stops while the hypervisor checks its
/// ticket: spice-server links the channel, and closing it unsettled crashes
/// QEMU 7.2 (tests/e2e/test_spice_drain.py), so Porthole drains it (its
/// first word to the hypervisor is the client's DISPLAY_INIT) rather than
/// drop it with the cancelled link; the client hears ERROR, never OK. The
/// fake holds the link result until the session is gone, which real QEMU
/// answers too fast to time (the e2e test covers a client gone then).
#[tokio::test]
async fn a_display_channel_linked_as_its_session_stops_is_drained_not_dropped() {
    display_link_held(HeldUntil::SessionEnded).await;
}

/// The same, when the client spent its handshake deadline before its
/// ticket: the hypervisor's result comes after that deadline, and the
/// channel it linked is drained all the same (before, the link's read of
/// the result timed out and dropped it).
#[tokio::test]
async fn a_display_channel_linked_after_the_handshake_deadline_is_drained_not_dropped() {
    display_link_held(HeldUntil::DeadlinePassed).await;
}

/// What the fake hypervisor waits for before it answers the display's ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeldUntil {
    /// The client ended its session (its main channel).
    SessionEnded,
    /// The display's handshake deadline (2 s) has passed.
    DeadlinePassed,
}

async fn display_link_held(until: HeldUntil) {
    let handshake_secs = match until {
        HeldUntil::SessionEnded => 10,
        HeldUntil::DeadlinePassed => 2,
    };
    let g = start(VNC_PASSWORD, SPICE_PASSWORD, handshake_secs).await;
    let key = Arc::new(LinkKey::generate());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (ticket_seen, mut ticket_rx) = unbounded_channel::<()>();
    let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (first_words, first_rx) = tokio::sync::oneshot::channel();
    let (main_seen, _main_rx) = unbounded_channel();
    tokio::spawn(async move {
        let (main, _) = l.accept().await.unwrap();
        tokio::spawn(spice_server(main, key.clone(), main_seen));
        let (mut s, _) = l.accept().await.unwrap();
        LinkMess::decode(&read_link(&mut s).await).expect("a link message");
        say(&mut s, &link_reply(&key)).await;
        read_n(&mut s, 4 + 128).await;
        ticket_seen.send(()).unwrap();
        let _ = go_rx.await;
        say(&mut s, &hex("00 00 00 00  # link result OK")).await;
        let mut first = [0u8; 6];
        let got = within("Porthole's first word", s.read_exact(&mut first)).await;
        let _ = first_words.send(got.map(|_| first));
    });
    let ticket = spice_ticket(&g, port).await;
    let (mut main, _, result) = spice_link(&g, &link_mess(channel::MAIN, 0), &ticket).await;
    assert_eq!(result, 0, "main channel linked");
    expect(&mut main, &hex(MAIN_INIT)).await;

    let connected = Instant::now();
    let tcp = TcpStream::connect(g.spice()).await.unwrap();
    let mut display = g.pki.connect(tcp).await;
    say(&mut display, &link_mess(channel::DISPLAY, SESSION_ID)).await;
    let (reply, _) = LinkReply::decode(&read_link(&mut display).await).unwrap();
    let mut auth = hex("01 00 00 00  # mechanism: SPICE ticket");
    auth.extend(
        encrypt_ticket(&mut rand::rngs::OsRng, &reply.public_key, ticket.as_bytes()).unwrap(),
    );
    say(&mut display, &auth).await;
    within("the display's ticket upstream", ticket_rx.recv())
        .await
        .unwrap();
    if until == HeldUntil::SessionEnded {
        // The client ends its session (its main channel) while the ticket is checked.
        drop(main);
        g.until_no_session("the session ends").await;
    } else {
        tokio::time::sleep_until(connected + Duration::from_millis(2500)).await;
    }
    go.send(()).unwrap();
    // Told OK or not (the deadline has passed), that client leaves.
    let stayed = (until == HeldUntil::SessionEnded).then_some(display);
    let first = within("the fake's report", first_rx).await.unwrap();
    assert_eq!(
        first.expect("the hypervisor's side was closed, not drained"),
        hex("65 00  0e 00 00 00  # DISPLAY_INIT (101), 14 bytes")[..],
    );
    if let Some(mut display) = stayed {
        let result = read_n(&mut display, 4).await;
        assert_eq!(result, hex("01 00 00 00  # ERROR"), "never OK");
    }
    g.stop().await;
}

/// Connects, waits 3 s, runs `handshake` (TLS included), then sends
/// nothing; returns when Porthole closed, counted from connect.
async fn closed_after<F>(addr: SocketAddr, handshake: impl FnOnce(TcpStream) -> F) -> Duration
where
    F: Future<Output = Tls>,
{
    let connected = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut s = handshake(tcp).await;
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    let got = got.expect("not closed 13 s after connect");
    assert!(matches!(got, Ok(0) | Err(_)), "sent {got:?}");
    connected.elapsed()
}

#[tokio::test]
async fn a_handshake_deadline_counts_from_connect_not_from_tls() {
    let g = start(VNC_PASSWORD, SPICE_PASSWORD, 4).await;
    let (spice, vnc) = tokio::join!(
        closed_after(g.spice(), |tcp| g.pki.connect(tcp)),
        closed_after(g.vnc(), |tcp| vencrypt(&g, tcp)),
    );
    for (what, took) in [("spice", spice), ("vnc", vnc)] {
        assert!(
            took >= Duration::from_millis(3500) && took < Duration::from_millis(6500),
            "{what}: closed {took:?} after connect; the deadline is 4 s from connect"
        );
    }
    g.stop().await;
}
