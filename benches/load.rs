//! The load tool: Porthole side by side with direct TCP, a plain relay and websockify.
//!
//! `cargo bench --bench load` runs the full comparison (see `benches/README.md`
//! for the method and the latest figures); under `cargo test` (no `--bench`
//! argument) it runs a few-second smoke pass that only proves every part works.
//!
//! Every target sits in front of the same far side: a minimal RFB server with
//! no authentication (what a VNC console is), which after the handshake
//! floods, sinks, echoes or idles on the client's request. The client speaks
//! the RFB handshake first, so the numbers stay valid when Porthole's VNC path
//! terminates RFB itself.
//!
//! Targets:
//! - `direct`: the client talks TCP to the far side; no proxy at all.
//! - `porthole`: WebSocket to Porthole's `/vnc`, with a fresh Ed25519 token per session.
//! - `relay`: the "obvious" proxy: tokio-tungstenite with its default config,
//!   two copy loops, a 64 KiB read buffer. This binary re-executed with `--relay`.
//! - `relay+opts`: the same relay with Porthole's socket options (TCP_NODELAY
//!   on both legs, TCP_NOTSENT_LOWAT of 64 KiB on the client leg), `--relay
//!   ... --opts`: the like-for-like reference for CPU per GB.
//! - `relay+jwt`: relay+opts that also verifies the Ed25519 console token in
//!   `?token=` as Porthole does (jsonwebtoken, EdDSA pinned, `exp` `nbf`
//!   `iss` `aud` `sub`) and opens the far side the token names, `--relay ...
//!   --jwt PEM`: the like-for-like reference for sessions per second (session
//!   rate only).
//! - `relay+jwt+rfb`: relay+jwt that also does the far side's RFB handshake
//!   (versions, security None, its result: two round trips) and sends the
//!   client a version of its own before relaying, as Porthole does (`--relay
//!   ... --jwt PEM --rfb`; session rate only).
//! - `floor`: a relay that does only the work a WebSocket upload cannot
//!   skip (the kernel's copy in, the unmask, the kernel's copy out) with one
//!   warm buffer and no framing library (`load/floor.rs`, `--relay ...
//!   --floor`; `cargo bench --bench load -- floor`: the upload rows only).
//! - `websockify`: Debian's websockify (the proxy Nova's noVNC proxy is built on).
//! - `porthole view-only`: the same Porthole with a view-only token: every
//!   client message goes through the RFB view-only filter (throughput only;
//!   `cargo bench --bench load -- view-only` runs only that comparison).
//! - `porthole recording`: a second Porthole, configured like the first but
//!   with `[recording]` on its backend network, so every session is written
//!   to an FBS file (`load/recording.rs`; `cargo bench --bench load --
//!   recording` runs only that comparison, with what the recordings hold).
//!
//! Then the shared store (`load/store.rs`): the same Porthole against one node
//! with `[store]` on redis-server and two nodes behind HAProxy.
//! `cargo bench --bench load -- store` runs only that part.
//!
//! Then Nova's console tokens beside JWTs (`load/nova.rs`): opens per second
//! cold and warm, the positive cache, the latency a lookup adds, against an
//! in-process fake Nova and a real Keystone + Nova (`target/nova-venv`).
//! `cargo bench --bench load -- nova` runs only that part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "load/floor.rs"]
mod floor;
#[path = "load/nova.rs"]
mod nova;
#[path = "load/recording.rs"]
mod recording;
#[path = "load/store.rs"]
mod store;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------- far side

/// What the far side does after the RFB handshake, chosen by the client in
/// a FramebufferUpdateRequest (type 3: what a view-only client may send)
/// whose second byte is the mode and whose x and y are the chunk size.
const FLOOD: u8 = b'D';
const SINK: u8 = b'U';
const ECHO: u8 = b'E';
const IDLE: u8 = b'I';
/// A first screen: `total` bytes (the request's width and height) in pieces
/// of [`SCREEN_PIECES`], then idle.
const SCREEN: u8 = b'S';

/// The sizes a first screen is written in, in turn: a framebuffer update
/// reaches a proxy as reads of every size up to its read chunk.
const SCREEN_PIECES: [usize; 4] = [64 * 1024, 16 * 1024, 4 * 1024, 1024];

/// A minimal RFB 3.8 server, security type None, then the requested mode.
async fn far_side(listener: TcpListener, sunk: Arc<AtomicU64>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let sunk = sunk.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut version = [0u8; 12];
            s.write_all(b"RFB 003.008\n").await?;
            s.read_exact(&mut version).await?;
            s.write_all(&[1, 1]).await?; // one security type: None
            let mut choice = [0u8; 1];
            s.read_exact(&mut choice).await?;
            s.write_all(&0u32.to_be_bytes()).await?; // SecurityResult OK
            let mut shared = [0u8; 1];
            s.read_exact(&mut shared).await?;
            let mut init = Vec::new();
            init.extend_from_slice(&720u16.to_be_bytes());
            init.extend_from_slice(&400u16.to_be_bytes());
            init.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
            init.extend_from_slice(&4u32.to_be_bytes());
            init.extend_from_slice(b"load");
            s.write_all(&init).await?;
            let mut mode = [0u8; 10];
            s.read_exact(&mut mode).await?;
            let chunk = u32::from_be_bytes([mode[2], mode[3], mode[4], mode[5]]) as usize;
            let total = u32::from_be_bytes([mode[6], mode[7], mode[8], mode[9]]) as usize;
            let mut buf = vec![0u8; chunk.clamp(1, 1 << 20)];
            match mode[1] {
                SCREEN => {
                    let mut sent = 0;
                    for piece in SCREEN_PIECES.into_iter().cycle() {
                        if sent >= total {
                            break;
                        }
                        let n = piece.min(total - sent);
                        s.write_all(&vec![0x5a; n]).await?;
                        sent += n;
                    }
                    let _ = s.read(&mut buf).await?;
                }
                FLOOD => loop {
                    s.write_all(&buf).await?;
                },
                SINK => loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    sunk.fetch_add(n as u64, Relaxed);
                },
                ECHO => loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    s.write_all(&buf[..n]).await?;
                },
                _ => {
                    let _ = s.read(&mut buf).await?;
                }
            }
            Ok::<_, std::io::Error>(())
        });
    }
}

// ---------------------------------------------------------------- the plain relay

/// Porthole's TCP_NOTSENT_LOWAT on its client leg (`src/transport/listener.rs`).
const PORTHOLE_NOTSENT_LOWAT: u32 = 64 * 1024;

/// How a relay process is configured (its command line after `--relay
/// LISTEN FAR`): `--opts` gives it Porthole's socket options, `--jwt PEM`
/// makes it verify a console token the way Porthole does (and implies
/// `--opts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RelayKind {
    /// tokio-tungstenite's defaults, sockets untuned.
    Plain,
    /// TCP_NODELAY on both legs, TCP_NOTSENT_LOWAT on the client leg.
    Opts,
    /// [`RelayKind::Opts`], and the Ed25519 JWT in `?token=` verified
    /// (signature, `exp`, `iss`, `aud`, `sub`) before the upgrade; the far
    /// side is the token's `console.host:port`.
    Jwt,
    /// [`RelayKind::Jwt`], and the far side's RFB handshake done by the
    /// relay (versions, security None, its result: two round trips) before
    /// it sends the client a version of its own, as Porthole does.
    JwtRfb,
    /// Only the work a WebSocket upload cannot skip (`load/floor.rs`).
    Floor,
    /// [`RelayKind::Floor`] with a new read buffer for every read.
    FloorFresh,
}

impl RelayKind {
    fn args(self, dir: &std::path::Path) -> Vec<String> {
        match self {
            RelayKind::Plain => vec![],
            RelayKind::Opts => vec!["--opts".into()],
            RelayKind::Floor => vec!["--floor".into()],
            RelayKind::FloorFresh => vec!["--floor-fresh".into()],
            RelayKind::Jwt => vec![
                "--jwt".into(),
                dir.join("load.pub.pem").display().to_string(),
            ],
            RelayKind::JwtRfb => {
                let mut args = RelayKind::Jwt.args(dir);
                args.push("--rfb".into());
                args
            }
        }
    }

    fn from_args(args: &[String]) -> (RelayKind, Option<jsonwebtoken::DecodingKey>) {
        if let Some(i) = args.iter().position(|a| a == "--jwt") {
            let pem = std::fs::read(&args[i + 1]).expect("the relay's public key");
            let key = jsonwebtoken::DecodingKey::from_ed_pem(&pem).expect("an Ed25519 public key");
            let kind = if args.iter().any(|a| a == "--rfb") {
                RelayKind::JwtRfb
            } else {
                RelayKind::Jwt
            };
            (kind, Some(key))
        } else if args.iter().any(|a| a == "--floor-fresh") {
            (RelayKind::FloorFresh, None)
        } else if args.iter().any(|a| a == "--floor") {
            (RelayKind::Floor, None)
        } else if args.iter().any(|a| a == "--opts") {
            (RelayKind::Opts, None)
        } else {
            (RelayKind::Plain, None)
        }
    }
}

/// The token check of a `--jwt` relay: what Porthole's validator does with
/// jsonwebtoken (pinned EdDSA, `exp` `nbf` `iss` `aud` `sub` required and
/// checked); the claims name the far side.
fn relay_verify(
    key: &jsonwebtoken::DecodingKey,
    validation: &jsonwebtoken::Validation,
    query: Option<&str>,
) -> Option<SocketAddr> {
    let token = query?.split('&').find_map(|kv| kv.strip_prefix("token="))?;
    let claims =
        jsonwebtoken::decode::<porthole::token::ConsoleClaims>(token, key, validation).ok()?;
    format!(
        "{}:{}",
        claims.claims.console.host, claims.claims.console.port
    )
    .parse()
    .ok()
}

/// The reference relay: default tokio-tungstenite, two copy loops, 64 KiB
/// buffer; its socket options and token check as `kind` says.
// The upgrade callback's error type is tungstenite's (an HTTP response).
#[allow(clippy::result_large_err)]
async fn relay(
    listen: SocketAddr,
    backend: SocketAddr,
    kind: RelayKind,
    key: Option<jsonwebtoken::DecodingKey>,
) {
    let listener = TcpListener::bind(listen).await.expect("relay bind");
    let check = key.map(|key| {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        v.leeway = 0;
        v.validate_nbf = true;
        v.set_audience(&["porthole"]);
        v.set_issuer(&["porthole"]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Arc::new((key, v))
    });
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        if matches!(kind, RelayKind::Floor | RelayKind::FloorFresh) {
            tokio::spawn(floor::serve(tcp, backend, kind == RelayKind::FloorFresh));
            continue;
        }
        let check = check.clone();
        tokio::spawn(async move {
            if kind != RelayKind::Plain {
                let _ = tcp.set_nodelay(true);
                let _ = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(PORTHOLE_NOTSENT_LOWAT);
            }
            let (ws, backend) = match check {
                None => (tokio_tungstenite::accept_async(tcp).await.ok()?, backend),
                Some(check) => {
                    let mut far = None;
                    let ws = tokio_tungstenite::accept_hdr_async(
                        tcp,
                        |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                         resp| {
                            far = relay_verify(&check.0, &check.1, req.uri().query());
                            if far.is_some() {
                                Ok(resp)
                            } else {
                                let mut refused = tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(None);
                                *refused.status_mut() =
                                    tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                                Err(refused)
                            }
                        },
                    )
                    .await
                    .ok()?;
                    (ws, far?)
                }
            };
            let mut upstream = TcpStream::connect(backend).await.ok()?;
            if kind != RelayKind::Plain {
                let _ = upstream.set_nodelay(true);
            }
            let mut ws = ws;
            if kind == RelayKind::JwtRfb {
                rfb_none(&mut upstream).await.ok()?;
                ws.send(Message::Binary(Bytes::from_static(b"RFB 003.008\n")))
                    .await
                    .ok()?;
            }
            let (mut rd, mut wr) = upstream.into_split();
            let (mut sink, mut stream) = ws.split();
            let up = async {
                while let Some(Ok(msg)) = stream.next().await {
                    if let Message::Binary(b) = msg
                        && wr.write_all(&b).await.is_err()
                    {
                        break;
                    }
                }
            };
            let down = async {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if sink
                                .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                    }
                }
            };
            tokio::select! { _ = up => {}, _ = down => {} }
            Some(())
        });
    }
}

/// A `--rfb` relay's handshake with the far side: RFB 3.8, security
/// None, its result.
async fn rfb_none(far: &mut TcpStream) -> std::io::Result<()> {
    let mut version = [0u8; 12];
    far.read_exact(&mut version).await?;
    far.write_all(b"RFB 003.008\n").await?;
    let mut count = [0u8; 1];
    far.read_exact(&mut count).await?;
    let mut types = vec![0u8; usize::from(count[0])];
    far.read_exact(&mut types).await?;
    if !types.contains(&1) {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    far.write_all(&[1]).await?;
    let mut result = [0u8; 4];
    far.read_exact(&mut result).await?;
    if result != [0; 4] {
        return Err(std::io::ErrorKind::PermissionDenied.into());
    }
    Ok(())
}

// ---------------------------------------------------------------- clients

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    Direct,
    Porthole,
    /// The Porthole binary `PORTHOLE_BEFORE_BIN` names (a build of the
    /// previous main), beside this one when it is set: before and after in
    /// one run, samples interleaved (`-- floor`, `-- bulk`, `-- opens`).
    PortholeBefore,
    /// Porthole with a view-only token (the same process).
    PortholeViewOnly,
    /// A Porthole of its own whose sessions are recorded.
    PortholeRecording,
    /// A native VNC client of Porthole (`/vnc-direct` ticket, VeNCrypt
    /// over TLS, the byte splice): idle memory only.
    PortholeNative,
    Relay,
    /// The relay with Porthole's socket options.
    RelayOpts,
    /// The relay with Porthole's socket options and token check.
    RelayJwt,
    /// [`Target::RelayJwt`] that also does the far side's RFB handshake
    /// before the client's first byte, as Porthole does.
    RelayJwtRfb,
    /// The floor of a WebSocket upload relay (`load/floor.rs`).
    Floor,
    /// The floor with a new read buffer for every read.
    FloorFresh,
    Websockify,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Porthole => "porthole",
            Target::PortholeBefore => "porthole before",
            Target::PortholeViewOnly => "porthole view-only",
            Target::PortholeRecording => "porthole recording",
            Target::PortholeNative => "porthole vnc-direct",
            Target::Relay => "relay",
            Target::RelayOpts => "relay+opts",
            Target::RelayJwt => "relay+jwt",
            Target::RelayJwtRfb => "relay+jwt+rfb",
            Target::Floor => "floor",
            Target::FloorFresh => "floor+fresh",
            Target::Websockify => "websockify",
        }
    }

    /// Which relay it is, if it is one.
    fn relay(self) -> Option<RelayKind> {
        match self {
            Target::Relay => Some(RelayKind::Plain),
            Target::RelayOpts => Some(RelayKind::Opts),
            Target::RelayJwt => Some(RelayKind::Jwt),
            Target::RelayJwtRfb => Some(RelayKind::JwtRfb),
            Target::Floor => Some(RelayKind::Floor),
            Target::FloorFresh => Some(RelayKind::FloorFresh),
            _ => None,
        }
    }

    /// The process that serves it.
    fn process(self) -> Target {
        match self {
            Target::PortholeViewOnly | Target::PortholeNative => Target::Porthole,
            t => t,
        }
    }
}

/// One client connection: raw TCP or WebSocket, with a read buffer so the
/// RFB handshake can read exact lengths whatever the message boundaries.
enum Conn {
    Tcp(TcpStream, BytesMut),
    Ws(Box<Ws>, BytesMut),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>, BytesMut),
}

impl Conn {
    async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s, _) => s.write_all(data).await,
            Conn::Tls(s, _) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Ws(ws, _) => ws
                .send(Message::Binary(Bytes::copy_from_slice(data)))
                .await
                .map_err(std::io::Error::other),
        }
    }

    /// Reads whatever arrives next; returns its length (0 at end).
    async fn fill(&mut self) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s, buf) => {
                buf.reserve(64 * 1024);
                s.read_buf(buf).await
            }
            Conn::Tls(s, buf) => {
                buf.reserve(64 * 1024);
                s.read_buf(buf).await
            }
            Conn::Ws(ws, buf) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(0),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(std::io::Error::other(e)),
                }
            },
        }
    }

    fn buffered(&mut self) -> &mut BytesMut {
        match self {
            Conn::Tcp(_, b) | Conn::Ws(_, b) | Conn::Tls(_, b) => b,
        }
    }

    async fn read_exact(&mut self, n: usize) -> std::io::Result<Bytes> {
        while self.buffered().len() < n {
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buffered().split_to(n).freeze())
    }

    /// Counts incoming bytes, discarding them.
    async fn drain(&mut self) -> std::io::Result<usize> {
        let n = self.fill().await?;
        self.buffered().clear();
        Ok(n)
    }
}

async fn ws_connect(
    url: String,
    read_buffer: Option<usize>,
    binary: bool,
) -> std::io::Result<Conn> {
    let mut config = WebSocketConfig::default();
    if let Some(n) = read_buffer {
        config = config.read_buffer_size(n).write_buffer_size(0);
    }
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .map_err(std::io::Error::other)?;
    if binary {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .map_err(std::io::Error::other)?;
    Ok(Conn::Ws(Box::new(ws), BytesMut::new()))
}

/// Where each target listens, and tokens for Porthole.
struct Setup {
    far: SocketAddr,
    porthole: SocketAddr,
    /// [`Target::PortholeBefore`]'s, when it runs.
    before: Option<SocketAddr>,
    dir: PathBuf,
    /// Every relay variant's address.
    relays: std::collections::HashMap<Target, SocketAddr>,
    websockify: Option<SocketAddr>,
    tokens: std::sync::Mutex<Vec<String>>,
    signer: porthole::token::signing::Signer,
    processes: Processes,
    sunk: Arc<AtomicU64>,
    /// The recorded Porthole's folder and audit trail.
    recorded: recording::Recorded,
    /// A native client's TLS, trusting Porthole's certificate.
    tls: Arc<rustls::ClientConfig>,
}

/// The proxies this tool started; killed on drop, even after a panic.
struct Processes(Vec<(Target, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Setup {
    /// `targets`, with [`Target::PortholeBefore`] after Porthole when it runs.
    fn with_before(&self, targets: &[Target]) -> Vec<Target> {
        let mut all = targets.to_vec();
        if self.before.is_some()
            && let Some(i) = all.iter().position(|t| *t == Target::Porthole)
        {
            all.insert(i + 1, Target::PortholeBefore);
        }
        all
    }

    fn pid(&self, target: Target) -> Option<u32> {
        self.processes
            .0
            .iter()
            .find(|(t, _)| *t == target.process())
            .map(|(_, c)| c.id())
    }

    fn token(&self) -> String {
        if let Some(t) = self.tokens.lock().unwrap().pop() {
            return t;
        }
        // Minting inside a timed sample slows the target that waits for it.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            eprintln!("load tool: the token pool ran dry: later samples mint their own")
        });
        mint(&self.signer, self.far.port())
    }

    async fn connect(&self, target: Target, read_buffer: Option<usize>) -> std::io::Result<Conn> {
        self.connect_at(target, None, read_buffer).await
    }

    /// Connects to `target`, at `at` when given (a process started for one
    /// measurement) rather than the tool's own.
    async fn connect_at(
        &self,
        target: Target,
        at: Option<SocketAddr>,
        read_buffer: Option<usize>,
    ) -> std::io::Result<Conn> {
        let url = match target {
            Target::Direct => {
                let s = TcpStream::connect(self.far).await?;
                s.set_nodelay(true)?;
                return Ok(Conn::Tcp(s, BytesMut::new()));
            }
            // Opened by `native_session` (idle memory only).
            Target::PortholeNative => return Err(std::io::ErrorKind::Unsupported.into()),
            Target::Porthole => format!(
                "ws://{}/vnc?token={}",
                at.unwrap_or(self.porthole),
                self.token()
            ),
            Target::PortholeViewOnly => format!(
                "ws://{}/vnc?token={}",
                self.porthole,
                mint_view_only(&self.signer, self.far.port())
            ),
            Target::PortholeRecording => {
                format!("ws://{}/vnc?token={}", self.recorded.public, self.token())
            }
            Target::PortholeBefore => format!(
                "ws://{}/vnc?token={}",
                at.or(self.before).ok_or(std::io::ErrorKind::NotFound)?,
                self.token()
            ),
            Target::Relay | Target::RelayOpts | Target::Floor | Target::FloorFresh => {
                format!("ws://{}/", at.unwrap_or(self.relays[&target]))
            }
            Target::RelayJwt | Target::RelayJwtRfb => format!(
                "ws://{}/vnc?token={}",
                at.unwrap_or(self.relays[&target]),
                self.token()
            ),
            Target::Websockify => format!(
                "ws://{}/",
                at.or(self.websockify).ok_or(std::io::ErrorKind::NotFound)?
            ),
        };
        // As noVNC's and spice-html5's browsers do; the relays answer no subprotocol.
        ws_connect(url, read_buffer, target.relay().is_none()).await
    }

    /// Connects and runs the RFB client handshake; then asks for `mode`.
    async fn session(
        &self,
        target: Target,
        mode: u8,
        chunk: usize,
        read_buffer: Option<usize>,
    ) -> std::io::Result<Conn> {
        self.session_at(target, None, mode, chunk, 0, read_buffer)
            .await
    }

    /// [`Setup::session`] at `at` (see [`Setup::connect_at`]), with a
    /// second argument for the mode (a first screen's size).
    async fn session_at(
        &self,
        target: Target,
        at: Option<SocketAddr>,
        mode: u8,
        chunk: usize,
        total: usize,
        read_buffer: Option<usize>,
    ) -> std::io::Result<Conn> {
        let mut c = self.connect_at(target, at, read_buffer).await?;
        c.read_exact(12).await?;
        c.send(b"RFB 003.008\n").await?;
        let n = c.read_exact(1).await?[0] as usize;
        c.read_exact(n).await?;
        c.send(&[1]).await?;
        c.read_exact(4).await?;
        c.send(&[1]).await?;
        let mut init = c.read_exact(24).await?;
        init.advance(20);
        let name_len = init.get_u32() as usize;
        c.read_exact(name_len).await?;
        let mut m = vec![3, mode];
        m.extend_from_slice(&(chunk as u32).to_be_bytes());
        m.extend_from_slice(&(total as u32).to_be_bytes());
        c.send(&m).await?;
        Ok(c)
    }

    /// A native VNC client's session: a `/vnc-direct` ticket from `public`,
    /// then VeNCrypt X509Plain on `vnc` (TLS, the ticket as the password),
    /// ClientInit and the far side's ServerInit; then asks for `mode`.
    async fn native_session(
        &self,
        public: SocketAddr,
        vnc: SocketAddr,
        mode: u8,
        chunk: usize,
        total: usize,
    ) -> std::io::Result<Conn> {
        let token = mint_kind(
            &self.signer,
            self.far.port(),
            porthole::token::claims::ConsoleType::VncDirect,
        );
        let details: serde_json::Value =
            reqwest::get(format!("http://{public}/vnc-direct?token={token}"))
                .await
                .map_err(std::io::Error::other)?
                .json()
                .await
                .map_err(std::io::Error::other)?;
        let ticket = details["ticket"]
            .as_str()
            .ok_or_else(|| std::io::Error::other(format!("no ticket: {details}")))?
            .to_string();
        let mut tcp = Conn::Tcp(TcpStream::connect(vnc).await?, BytesMut::new());
        tcp.read_exact(12).await?;
        tcp.send(b"RFB 003.008\n").await?;
        tcp.read_exact(2).await?; // one security type: VeNCrypt
        tcp.send(&[19]).await?;
        tcp.read_exact(2).await?; // VeNCrypt 0.2
        tcp.send(&[0, 2]).await?;
        tcp.read_exact(6).await?; // OK, X509Plain
        tcp.send(&262u32.to_be_bytes()).await?; // X509Plain
        tcp.read_exact(1).await?; // accepted: TLS starts
        let Conn::Tcp(tcp, _) = tcp else {
            unreachable!()
        };
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect("localhost".try_into().unwrap(), tcp)
            .await?;
        let mut c = Conn::Tls(Box::new(tls), BytesMut::new());
        let mut plain = Vec::new();
        plain.extend_from_slice(&8u32.to_be_bytes());
        plain.extend_from_slice(&(ticket.len() as u32).to_be_bytes());
        plain.extend_from_slice(b"porthole");
        plain.extend_from_slice(ticket.as_bytes());
        c.send(&plain).await?;
        if c.read_exact(4).await?[..] != [0, 0, 0, 0] {
            return Err(std::io::Error::other("ticket refused"));
        }
        c.send(&[1]).await?;
        let mut init = c.read_exact(24).await?;
        init.advance(20);
        let name_len = init.get_u32() as usize;
        c.read_exact(name_len).await?;
        let mut m = vec![3, mode];
        m.extend_from_slice(&(chunk as u32).to_be_bytes());
        m.extend_from_slice(&(total as u32).to_be_bytes());
        c.send(&m).await?;
        Ok(c)
    }
}

/// The pool is minted before the first measurement and a full run takes
/// longer than Porthole's default ceiling (10 minutes): the tokens, and the
/// ceiling of every Porthole the tool starts, last a whole run.
const TOKEN_TTL_SECS: u64 = 3 * 3600;

fn mint(signer: &porthole::token::signing::Signer, port: u16) -> String {
    mint_kind(signer, port, porthole::token::claims::ConsoleType::Novnc)
}

fn mint_view_only(signer: &porthole::token::signing::Signer, port: u16) -> String {
    mint_as(
        signer,
        port,
        porthole::token::claims::ConsoleType::Novnc,
        true,
    )
}

fn mint_kind(
    signer: &porthole::token::signing::Signer,
    port: u16,
    kind: porthole::token::claims::ConsoleType,
) -> String {
    mint_as(signer, port, kind, false)
}

fn mint_as(
    signer: &porthole::token::signing::Signer,
    port: u16,
    kind: porthole::token::claims::ConsoleType,
    view_only: bool,
) -> String {
    use porthole::token::claims::ConsoleClaim;
    let req = porthole::token::signing::MintRequest {
        issuer: "porthole".into(),
        audience: "porthole".into(),
        instance: "load".into(),
        user: None,
        console: ConsoleClaim {
            kind,
            host: "127.0.0.1".into(),
            port,
            tls_port: None,
            view_only,
            record: false,
        },
        ttl_secs: TOKEN_TTL_SECS,
    };
    signer
        .sign(&req.claims(porthole::token::unix_now()))
        .unwrap()
        .expose()
        .clone()
}

// ---------------------------------------------------------------- measurements

/// `/proc/PID/stat` fields after the command name (field 3 onwards).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// A process and its children (websockify forks one per connection).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && stat_fields(child).and_then(|f| f.get(1).copied()) == Some(u64::from(pid))
            {
                pids.push(child);
            }
        }
    }
    pids
}

/// CPU seconds (user + system) used so far by a process, its live children,
/// and its children that have exited.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let pid = pid?;
    let ticks: u64 = process_tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0))
        .sum::<u64>()
        + stat_fields(pid).map_or(0, |f| f.get(13).unwrap_or(&0) + f.get(14).unwrap_or(&0));
    Some(ticks as f64 / 100.0)
}

/// CPU seconds (user + system) used so far by everything on this machine
/// that takes part in a measurement but the proxy: this process (the
/// clients and the far side are its threads; its children, the proxies,
/// are not counted) and the kernel's `ksoftirqd` threads, which take over
/// part of the loopback receive path when a core is saturated. With the
/// proxy's own, the machine's cost of the bytes moved.
fn outside_proxy_cpu_seconds() -> f64 {
    static SOFTIRQ: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    let softirq = SOFTIRQ.get_or_init(|| {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.starts_with("ksoftirqd/"))
            })
            .collect()
    });
    let own = std::process::id();
    let ticks: u64 = std::iter::once(own)
        .chain(softirq.iter().copied())
        .filter_map(stat_fields)
        .map(|f| f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0))
        .sum();
    ticks as f64 / 100.0
}

/// Resident memory of a process and its children.
fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let total = process_tree(pid?)
        .into_iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum();
    Some(total)
}

struct Throughput {
    mb_per_s: f64,
    /// The proxy's own CPU per GB (none for direct).
    cpu_s_per_gb: Option<f64>,
    /// The machine's: the proxy's, the client's and the far side's
    /// ([`outside_proxy_cpu_seconds`]).
    total_s_per_gb: f64,
}

async fn throughput(
    s: &Arc<Setup>,
    target: Target,
    down: bool,
    clients: usize,
    chunk: usize,
    secs: f64,
) -> std::io::Result<Throughput> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(
            s.session(target, if down { FLOOD } else { SINK }, chunk, None)
                .await?,
        );
    }
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let sunk_before = s.sunk.load(Relaxed);
    let cpu_before = cpu_seconds(s.pid(target));
    let outside_before = outside_proxy_cpu_seconds();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut c in conns {
        let (received, sent) = (received.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            // KeyEvents (Escape down), whole in every frame size here: what
            // a view-only session's filter frames and drops; to the others,
            // bytes like any.
            let payload: Vec<u8> = [4u8, 1, 0, 0, 0, 0, 0xff, 0x1b]
                .into_iter()
                .cycle()
                .take(chunk)
                .collect();
            while Instant::now() < deadline {
                if down {
                    match tokio::time::timeout_at(deadline.into(), c.drain()).await {
                        Ok(Ok(n)) if n > 0 => {
                            received.fetch_add(n as u64, Relaxed);
                        }
                        Ok(_) => break,
                        Err(_) => break,
                    }
                } else {
                    match tokio::time::timeout_at(deadline.into(), c.send(&payload)).await {
                        Ok(Ok(())) => {
                            sent.fetch_add(payload.len() as u64, Relaxed);
                        }
                        _ => break,
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let bytes = if down {
        received.load(Relaxed)
    } else if target == Target::PortholeViewOnly {
        // Dropped by design: what the proxy took from its clients.
        sent.load(Relaxed)
    } else {
        s.sunk.load(Relaxed) - sunk_before
    };
    let cpu = cpu_seconds(s.pid(target))
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let total = cpu.unwrap_or(0.0) + outside_proxy_cpu_seconds() - outside_before;
    if target == Target::PortholeRecording {
        // After the measurement: its sessions' ends, their recordings
        // finished (flushed and synced), tallied and removed.
        s.recorded.settle(clients).await;
    }
    Ok(Throughput {
        mb_per_s: bytes as f64 / elapsed / 1e6,
        cpu_s_per_gb: cpu.map(|c| c / (bytes as f64 / 1e9)),
        total_s_per_gb: total / (bytes as f64 / 1e9),
    })
}

async fn latency(s: &Arc<Setup>, target: Target, rounds: usize) -> std::io::Result<(f64, f64)> {
    let mut c = s.session(target, ECHO, 64, None).await?;
    let mut samples = Vec::with_capacity(rounds);
    let msg = [7u8; 32];
    for _ in 0..rounds {
        let t = Instant::now();
        c.send(&msg).await?;
        c.read_exact(32).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    Ok((p(0.5), p(0.99)))
}

/// One session-rate sample.
struct Rate {
    per_s: f64,
    /// The proxy's CPU per session opened, µs (none for direct).
    proxy_us: Option<f64>,
    /// The machine's (proxy, clients, far side; [`outside_proxy_cpu_seconds`]).
    total_us: f64,
}

/// Sessions opened per second by `concurrency` openers for `secs`, and the
/// CPU they cost: everything used from the start until 100 ms after the
/// last opener stopped (the last sessions' closes included), over the
/// sessions opened.
async fn session_rate(s: &Arc<Setup>, target: Target, concurrency: usize, secs: f64) -> Rate {
    let done = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds(s.pid(target));
    let outside_before = outside_proxy_cpu_seconds();
    // Every attempt must open: a refused or broken session would otherwise
    // only lower the rate, silently.
    let failed = Arc::new(std::sync::Mutex::new((0u64, None::<std::io::Error>)));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (s, done, failed) = (s.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                // Token check + connect + first byte: the server's RFB version.
                let opened = match s.connect(target, Some(4096)).await {
                    Ok(mut c) => c.read_exact(12).await.map(drop),
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(()) => {
                        done.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        let mut f = failed.lock().unwrap();
                        f.0 += 1;
                        f.1.get_or_insert(e);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("session-rate opener");
    }
    let (n_failed, first) = std::mem::take(&mut *failed.lock().unwrap());
    if n_failed > 0 {
        panic!(
            "{} session rate: {n_failed} of {} sessions failed to open (first error: {})",
            target.name(),
            n_failed + done.load(Relaxed),
            first.map_or_else(String::new, |e| e.to_string())
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cpu = cpu_seconds(s.pid(target))
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let total = cpu.unwrap_or(0.0) + outside_proxy_cpu_seconds() - outside_before;
    let opened = done.load(Relaxed) as f64;
    Rate {
        per_s: opened / secs,
        proxy_us: cpu.map(|c| c * 1e6 / opened),
        total_us: total * 1e6 / opened,
    }
}

/// What each session carried before it went idle, in a memory measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carried {
    /// Nothing: the RFB handshake only.
    Nothing,
    /// A first screen: [`FIRST_SCREEN`] bytes down, written by the far side
    /// in pieces of [`SCREEN_PIECES`] (a noVNC console's first screen is
    /// over 1 MB).
    FirstScreen,
    /// [`BOTH_WAYS`] bytes up in one message, echoed back down.
    BothWays,
    /// The same, every session at once once all are open: what the
    /// allocator keeps of the peak (glibc does not hand freed heap back to
    /// the system), not what the sessions hold.
    AllAtOnce,
}

const FIRST_SCREEN: usize = 1 << 20;
const BOTH_WAYS: usize = 64 * 1024;

impl Carried {
    const ALL: [Carried; 4] = [
        Carried::Nothing,
        Carried::FirstScreen,
        Carried::BothWays,
        Carried::AllAtOnce,
    ];

    fn name(self) -> &'static str {
        match self {
            Carried::Nothing => "fresh",
            Carried::FirstScreen => "after 1 MiB down",
            Carried::BothWays => "after 64 KiB each way",
            Carried::AllAtOnce => "after 64 KiB each way, all at once",
        }
    }
}

/// A proxy started for one memory measurement, stopped on drop: a fresh
/// process, so that heap freed by earlier sessions (which glibc keeps and
/// hands to the next ones) cannot hide what these cost.
struct Fresh {
    addr: SocketAddr,
    /// Porthole's native VNC listener.
    vnc: Option<SocketAddr>,
    child: Child,
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a fresh `target` (Porthole with the tool's config, the relay,
/// websockify) on a new address.
fn fresh(s: &Setup, target: Target) -> Option<Fresh> {
    match target {
        Target::Porthole | Target::PortholeNative | Target::PortholeBefore => {
            // A native connection keeps its place among those not yet
            // admitted until its handshake deadline (10 s): thousands are
            // opened within that.
            let places = "max_pending_connections = 100000\nmax_pending_per_address = 100000\n";
            let (public, _, vnc) = write_porthole_config_vnc(&s.dir, "fresh", places, "");
            let bin = match target {
                Target::PortholeBefore => before_bin()?,
                _ => porthole_bin(),
            };
            let child = start_porthole_bin(&bin, &s.dir, "fresh", public);
            Some(Fresh {
                addr: public,
                vnc: Some(vnc),
                child,
            })
        }
        Target::Relay
        | Target::RelayOpts
        | Target::RelayJwt
        | Target::RelayJwtRfb
        | Target::Floor
        | Target::FloorFresh => {
            let addr = free_addr();
            let child = start_relay(&s.dir, target.relay()?, addr, s.far);
            Some(Fresh {
                addr,
                vnc: None,
                child,
            })
        }
        Target::Websockify => {
            s.websockify?;
            let addr = free_addr();
            let child = Command::new("websockify")
                .args([addr.to_string(), s.far.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let fresh = Fresh {
                addr,
                vnc: None,
                child,
            };
            wait_for_port(addr);
            Some(fresh)
        }
        _ => None,
    }
}

/// How long an idle-memory sample lets its process settle: after it
/// started (and after the last one stopped) and once its sessions are idle.
/// A smoke pass only proves the table works: its figures are not read.
#[derive(Clone, Copy)]
struct Settle {
    started: Duration,
    idle: Duration,
}

impl Settle {
    const MEASURE: Settle = Settle {
        started: Duration::from_millis(300),
        idle: Duration::from_millis(500),
    };
    const SMOKE: Settle = Settle {
        started: Duration::from_millis(20),
        idle: Duration::from_millis(20),
    };
}

/// On a fresh `target`, opens exactly `sessions` sessions one after
/// another, each carrying `carried` before the next opens (panics if any
/// fails: a cap or a limit must not silently shrink the sample), and
/// returns the resident memory they added per session once all are idle.
async fn idle_memory(
    s: &Arc<Setup>,
    target: Target,
    sessions: usize,
    carried: Carried,
    settle: Settle,
) -> Option<f64> {
    let proxy = fresh(s, target)?;
    let pid = proxy.child.id();
    tokio::time::sleep(settle.started).await;
    let before = rss_kib(Some(pid))?;
    let mut held = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let opened = async {
            let (mode, chunk, total) = match carried {
                Carried::Nothing => (IDLE, 1, 0),
                Carried::FirstScreen => (SCREEN, 1, FIRST_SCREEN),
                Carried::BothWays | Carried::AllAtOnce => (ECHO, BOTH_WAYS, 0),
            };
            let mut c = if target == Target::PortholeNative {
                let vnc = proxy.vnc.expect("Porthole listens for VNC");
                s.native_session(proxy.addr, vnc, mode, chunk, total)
                    .await?
            } else {
                s.session_at(target, Some(proxy.addr), mode, chunk, total, Some(4096))
                    .await?
            };
            match carried {
                Carried::Nothing | Carried::AllAtOnce => {}
                Carried::FirstScreen => receive(&mut c, FIRST_SCREEN).await?,
                Carried::BothWays => both_ways(&mut c).await?,
            }
            Ok::<_, std::io::Error>(c)
        };
        match opened.await {
            Ok(c) => held.push(c),
            Err(e) => panic!(
                "{} at {sessions} ({}): only {} of {sessions} sessions opened: {e}",
                target.name(),
                carried.name(),
                held.len()
            ),
        }
    }
    if carried == Carried::AllAtOnce {
        let all = futures_util::future::join_all(held.iter_mut().map(both_ways)).await;
        if let Some(Err(e)) = all.into_iter().find(Result::is_err) {
            panic!("{} at {sessions}, all at once: {e}", target.name());
        }
    }
    tokio::time::sleep(settle.idle).await;
    let after = rss_kib(Some(pid))?;
    assert_eq!(held.len(), sessions, "{} sessions opened", target.name());
    drop(held);
    Some(after.saturating_sub(before) as f64 / sessions as f64)
}

/// Reads `n` bytes, discarding them.
async fn receive(c: &mut Conn, n: usize) -> std::io::Result<()> {
    let mut got = 0;
    while got < n {
        match c.drain().await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            read => got += read,
        }
    }
    Ok(())
}

/// [`BOTH_WAYS`] bytes up in one message, and their echo back.
async fn both_ways(c: &mut Conn) -> std::io::Result<()> {
    c.send(&vec![0xa5; BOTH_WAYS]).await?;
    receive(c, BOTH_WAYS).await
}

/// Most idle sessions asked of a target. websockify 0.10 cannot hold more
/// than about 508: its listener keeps two pipe ends per child, and once they
/// pass descriptor 1023 a new child's `select()` fails ("filedescriptor out of
/// range in select()"), so it is measured at 500 instead of failing the run.
fn idle_sessions_for(target: Target, n: usize) -> usize {
    match target {
        Target::Websockify => n.min(WEBSOCKIFY_MAX_SESSIONS),
        _ => n,
    }
}

const WEBSOCKIFY_MAX_SESSIONS: usize = 500;

/// Porthole's session caps in the bench's config, far above any session count
/// the tool asks for. `max_sessions_per_token` is capped at 1000 by Porthole's
/// config check; each session here uses its own token.
const PORTHOLE_MAX_SESSIONS: usize = 100_000;
const PORTHOLE_MAX_SESSIONS_PER_TOKEN: usize = 1000;

// ---------------------------------------------------------------- setup and report

fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn porthole_bin() -> PathBuf {
    // Cargo builds the binary in the same profile as this bench (release under
    // `cargo bench`, debug under `cargo test`).
    std::env::var_os("PORTHOLE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_porthole")),
        PathBuf::from,
    )
}

/// Porthole's config for the bench: its key, caps far above any count asked,
/// a native VNC listener (so `/vnc-direct` exchanges), and `extra` sections;
/// its one backend network is named `load`.
fn write_porthole_config(
    dir: &std::path::Path,
    name: &str,
    extra: &str,
) -> (SocketAddr, SocketAddr) {
    let (public, admin, _vnc) = write_porthole_config_vnc(dir, name, "", extra);
    (public, admin)
}

/// [`write_porthole_config`], with `listen` added to `[listen]`, and the
/// native VNC listener's address.
fn write_porthole_config_vnc(
    dir: &std::path::Path,
    name: &str,
    listen: &str,
    extra: &str,
) -> (SocketAddr, SocketAddr, SocketAddr) {
    let (public, admin, vnc) = (free_addr(), free_addr(), free_addr());
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!(
            "[listen]\npublic = \"{public}\"\nadmin = \"{admin}\"\n{listen}\n[tokens]\nstore_capacity = 1000000\nmax_ttl_secs = {TOKEN_TTL_SECS}\n\n\
             [[tokens.keys]]\nkid = \"load\"\nalgorithm = \"EdDSA\"\npublic_key = \"{}\"\n\n\
             [websocket]\nmax_sessions = {PORTHOLE_MAX_SESSIONS}\n\
             max_sessions_per_client = {PORTHOLE_MAX_SESSIONS}\n\
             max_sessions_per_token = {PORTHOLE_MAX_SESSIONS_PER_TOKEN}\n\n\
             [vnc]\nlisten = \"{vnc}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n{extra}\n\
             [[backends]]\nname = \"load\"\nnetworks = [\"127.0.0.0/8\"]\nports = [\"1024-65535\"]\n",
            dir.join("load.pub.pem").display(),
            dir.join("tls.crt").display(),
            dir.join("tls.key").display(),
        ),
    )
    .unwrap();
    (public, admin, vnc)
}

/// Starts Porthole with `dir/name.toml` and waits for its public listener.
fn start_porthole(dir: &std::path::Path, name: &str, public: SocketAddr) -> Child {
    start_porthole_bin(&porthole_bin(), dir, name, public)
}

/// The binary of [`Target::PortholeBefore`], if one is named.
fn before_bin() -> Option<PathBuf> {
    std::env::var_os("PORTHOLE_BEFORE_BIN").map(PathBuf::from)
}

/// [`start_porthole`] of the binary `bin`.
fn start_porthole_bin(
    bin: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    public: SocketAddr,
) -> Child {
    let log = dir.join(format!("{name}.stderr"));
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(dir.join(format!("{name}.toml")))
        .env("PORTHOLE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start porthole");
    // A binary that rejects the config (say, a cap it does not know) exits at
    // once: say so with its own words rather than wait for the port.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(public).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "porthole {name} ({}) exited before listening ({status}):\n{}",
                bin.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "porthole {name} never listened on {public}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

async fn setup(dir: &std::path::Path, tokens: usize) -> Setup {
    let sunk = Arc::new(AtomicU64::new(0));
    let far_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far = far_listener.local_addr().unwrap();
    tokio::spawn(far_side(far_listener, sunk.clone()));

    let key =
        porthole::token::signing::generate(porthole::token::signing::KeyKind::Ed25519, "load")
            .unwrap();
    std::fs::write(dir.join("load.pub.pem"), key.public_pem.as_ref().unwrap()).unwrap();
    let signer = porthole::token::signing::Signer::from_private_pem(
        key.private.expose().as_bytes(),
        Some("load".into()),
    )
    .unwrap();
    let tls = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("tls.crt"), tls.cert.pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls.cert.der().clone()).unwrap();
    let client_tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    std::fs::write(dir.join("tls.key"), tls.signing_key.serialize_pem()).unwrap();
    let (porthole_addr, _admin) = write_porthole_config(dir, "porthole", "");
    let mut processes = Processes(Vec::new());
    processes.0.push((
        Target::Porthole,
        start_porthole(dir, "porthole", porthole_addr),
    ));
    let before = before_bin().map(|bin| {
        let (addr, _admin) = write_porthole_config(dir, "before", "");
        processes.0.push((
            Target::PortholeBefore,
            start_porthole_bin(&bin, dir, "before", addr),
        ));
        addr
    });
    let recorded = recording::Recorded::configure(dir);
    processes.0.push((
        Target::PortholeRecording,
        start_porthole(dir, "recording", recorded.public),
    ));

    let mut relays = std::collections::HashMap::new();
    for target in [
        Target::Relay,
        Target::RelayOpts,
        Target::RelayJwt,
        Target::RelayJwtRfb,
        Target::Floor,
        Target::FloorFresh,
    ] {
        let addr = free_addr();
        let child = start_relay(dir, target.relay().unwrap(), addr, far);
        processes.0.push((target, child));
        relays.insert(target, addr);
    }

    let websockify_addr = free_addr();
    let websockify = match Command::new("websockify")
        .args([websockify_addr.to_string(), far.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => {
            let addr = websockify_addr;
            processes.0.push((Target::Websockify, child));
            wait_for_port(addr);
            Some(addr)
        }
        Err(_) => {
            eprintln!("websockify not installed (Debian: apt-get install websockify); skipping it");
            None
        }
    };
    let pool = (0..tokens).map(|_| mint(&signer, far.port())).collect();
    Setup {
        far,
        porthole: porthole_addr,
        before,
        dir: dir.to_path_buf(),
        relays,
        websockify,
        tokens: std::sync::Mutex::new(pool),
        signer,
        processes,
        sunk,
        recorded,
        tls: client_tls,
    }
}

/// This binary re-executed as a relay of `kind` on `addr` in front of
/// `far`; returns once it listens.
fn start_relay(dir: &std::path::Path, kind: RelayKind, addr: SocketAddr, far: SocketAddr) -> Child {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--relay", &addr.to_string(), &far.to_string()])
        .args(kind.args(dir))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the relay");
    wait_for_port(addr);
    child
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--relay") {
        let (kind, key) = RelayKind::from_args(&args[4..]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(relay(
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
            kind,
            key,
        ));
        return;
    }
    // `cargo bench` passes --bench; `cargo test` does not: then only a smoke pass.
    let full = args.iter().any(|a| a == "--bench");
    // `cargo bench --bench load -- store` (or `-- nova`, `-- view-only`,
    // `-- recording`, `-- idle`; `-- proxies`: the comparison with direct
    // TCP, the relay and websockify without the idle table; `-- opens`: the
    // session rate of Porthole and the relays alone; `-- bulk`: every row
    // of the throughput grid through Porthole and relay+opts alone, five
    // interleaved samples each; `-- floor`: the upload rows through
    // Porthole, relay+opts and the floor relay): that part only.
    let only = args.iter().skip(1).find_map(|a| {
        [
            "store",
            "nova",
            "view-only",
            "recording",
            "idle",
            "proxies",
            "opens",
            "bulk",
            "floor",
        ]
        .into_iter()
        .find(|p| a == p)
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(full, only));
}

async fn run(full: bool, only: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(
        setup(
            dir.path(),
            // Enough tokens that no timed run waits for one to be minted:
            // the idle-memory table alone opens 30,000 Porthole sessions,
            // the session rate up to 90,000 each for Porthole and the
            // relay+jwt relays.
            match (full, only) {
                (true, None) => 200_000,
                (true, Some("idle")) => 30_000,
                (true, Some("proxies")) => 170_000,
                // About 35,000 a round on this machine (three targets
                // with tokens, four with PORTHOLE_BEFORE_BIN).
                (true, Some("opens")) => 70_000 * repeats_or(5),
                // A round opens 1 + 16 + 64 sessions per direction and
                // frame size for each Porthole: 324 (`-- floor`: 162, its
                // uploads only), twice that with PORTHOLE_BEFORE_BIN.
                (true, Some("bulk")) => 700 * repeats_or(5),
                (true, Some("floor")) => 400 * repeats_or(5),
                _ => 500,
            },
        )
        .await,
    );
    // The congestion control decides much of a throughput row's kernel
    // work (BBR paces every sender; benches/README.md, session 24): runs
    // under different ones do not compare.
    let congestion = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map_or_else(|_| "unknown".to_string(), |c| c.trim().to_string());
    println!(
        "# load tool ({}; TCP congestion control {congestion})",
        if full { "full" } else { "smoke" }
    );
    if only.is_none_or(|p| p == "proxies") {
        compare_proxies(&s, full, only.is_none()).await;
    }
    if only == Some("bulk") {
        // Porthole's own CPU per GB against relay+opts on every row of the
        // throughput grid, five interleaved samples each (about seven
        // minutes): one sample per row moves a one-client row by a third
        // between runs, for both proxies.
        let targets = s.with_before(&[Target::Porthole, Target::RelayOpts]);
        let (secs, repeats) = if full { (3.0, repeats_or(5)) } else { (0.3, 1) };
        let row = LoadRow::from_env();
        let grid = throughput_grid(full)
            .into_iter()
            .filter(|&(down, c, f)| row.is_none_or(|r| r.keeps(down, c, f)))
            .collect();
        throughput_table("bulk rows", repeats, &targets);
        throughput_rows(&s, &targets, grid, secs, repeats).await;
    }
    if only == Some("floor") || (only.is_none() && !full) {
        // The upload rows through Porthole, relay+opts and the floor, five
        // interleaved samples each (about five minutes): how far below
        // relay+opts any relay of these uploads can go on this machine.
        // A download row too when `LOAD_ROW=down,…` names one: the floor's
        // download is one read and one frame written from it, nothing else.
        let targets = s.with_before(&[
            Target::Porthole,
            Target::RelayOpts,
            Target::Floor,
            Target::FloorFresh,
        ]);
        let (secs, repeats) = if full { (3.0, repeats_or(5)) } else { (0.3, 1) };
        // The smoke pass: both frame sizes (64 KiB frames have 64-bit
        // lengths), one client.
        let grid = if full {
            let row = LoadRow::from_env();
            throughput_grid(full)
                .into_iter()
                .filter(|&(down, c, f)| match row {
                    None => !down,
                    Some(r) => r.keeps(down, c, f) && (!down || r.down == Some(true)),
                })
                .collect()
        } else {
            vec![(false, 1, 4096), (false, 1, 65536)]
        };
        throughput_table("against the floor", repeats, &targets);
        throughput_rows(&s, &targets, grid, secs, repeats).await;
    }
    if only == Some("opens") {
        // The session rate alone, five samples each: Porthole against the
        // relays with its socket options, with and without its token check.
        let targets = s.with_before(&[
            Target::Porthole,
            Target::RelayOpts,
            Target::RelayJwt,
            Target::RelayJwtRfb,
        ]);
        let (repeats, secs) = if full { (repeats_or(5), 3.0) } else { (1, 0.3) };
        session_rate_table(&s, &targets, repeats, secs).await;
    }
    if only == Some("idle") {
        // Porthole and the relay only (websockify is in the full run).
        let counts: &[usize] = if full { &[1000, 9000] } else { &[20] };
        let targets = [Target::Porthole, Target::PortholeNative, Target::Relay];
        idle_memory_table(&s, &targets, counts, full).await;
    }
    if only.is_none_or(|p| p == "view-only") {
        view_only_compare(&s, full).await;
    }
    if only.is_none_or(|p| p == "recording") {
        recording::compare(&s, full).await;
    }
    if only.is_none_or(|p| p == "store") {
        store::compare(&s, full).await;
    }
    if only.is_none_or(|p| p == "nova") {
        nova::compare(&s, full).await;
    }

    drop(s);
    println!("\nload tool: ok");
}

/// A view-only session beside a normal one and the plain relay, runs
/// interleaved: down is what a view-only client receives (its filter sees
/// only the client's few requests), up is the filter framing and dropping
/// a stream of KeyEvents (its bytes count as what the proxy took in).
async fn view_only_compare(s: &Arc<Setup>, full: bool) {
    let (secs, repeats) = if full { (3.0, 3) } else { (0.3, 1) };
    let targets = [Target::Porthole, Target::PortholeViewOnly, Target::Relay];
    throughput_table("view-only beside full sessions", repeats, &targets);
    let grid: Vec<(bool, usize, usize)> = if full {
        [true, false]
            .into_iter()
            .flat_map(|d| {
                [1, 16]
                    .into_iter()
                    .flat_map(move |c| [4096, 65536].into_iter().map(move |f| (d, c, f)))
            })
            .collect()
    } else {
        vec![(true, 1, 65536), (false, 1, 4096)]
    };
    throughput_rows(s, &targets, grid, secs, repeats).await;
}

/// What a throughput cell's two CPU figures are.
const CPU_PAIR: &str = "proxy / machine (proxy + client + far side)";

/// The title and head of a [`throughput_rows`] table: `what` it compares,
/// one column per target.
fn throughput_table(what: &str, repeats: usize, targets: &[Target]) {
    println!("\n## {what} (MB/s; CPU s/GB: {CPU_PAIR}), median of {repeats}, runs interleaved");
    let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
    println!("| direction | clients | frame | {} |", names.join(" | "));
    println!("|---|---|---|{}", "---|".repeat(targets.len()));
}

/// One table row per (direction, clients, frame) of `grid`: each target's
/// median MB/s, proxy CPU s/GB and machine CPU s/GB over `repeats` runs,
/// the order rotated each round (this machine is noisy).
async fn throughput_rows(
    s: &Arc<Setup>,
    targets: &[Target],
    grid: Vec<(bool, usize, usize)>,
    secs: f64,
    repeats: usize,
) {
    assert!(
        !grid.is_empty(),
        "no throughput row to run: LOAD_ROW names none of this part's rows"
    );
    let mut paired = Vec::new();
    for (down, clients, frame) in grid {
        let mut results: Vec<Vec<(f64, Option<f64>, f64)>> = vec![Vec::new(); targets.len()];
        for r in 0..repeats {
            for k in 0..targets.len() {
                let i = (k + r) % targets.len();
                match throughput(s, targets[i], down, clients, frame, secs).await {
                    Ok(t) => results[i].push((t.mb_per_s, t.cpu_s_per_gb, t.total_s_per_gb)),
                    Err(e) => panic!("{} throughput failed: {e}", targets[i].name()),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let ratios = paired_ratios(targets, &results);
        if !ratios.is_empty() {
            paired.push(format!(
                "- {} {clients} × {} KiB:",
                if down { "down" } else { "up" },
                frame / 1024
            ));
            paired.extend(ratios);
        }
        let cells: Vec<String> = results
            .into_iter()
            .map(|r| {
                let mb = median(r.iter().map(|x| x.0).collect());
                let cpu: Vec<f64> = r.iter().filter_map(|x| x.1).collect();
                let total = median(r.iter().map(|x| x.2).collect());
                if cpu.is_empty() {
                    format!("{mb:.0} (- / {total:.2})")
                } else {
                    format!("{mb:.0} ({:.2} / {total:.2})", median(cpu))
                }
            })
            .collect();
        println!(
            "| {} | {clients} | {} KiB | {} |",
            if down { "down" } else { "up" },
            frame / 1024,
            cells.join(" | ")
        );
    }
    // After the table (a list line would end it).
    if !paired.is_empty() {
        println!("\nPaired by round:");
        for line in paired {
            println!("{line}");
        }
    }
}

/// Each target's own CPU per GB over relay+opts's *in the same round*,
/// when a row has relay+opts and at least five rounds: adjacent samples
/// share the machine's mood, so their ratio drifts less than the ratio of
/// two medians. One line per target: the median, the quartiles and the
/// count of rounds at or under #21's 0.85x.
fn paired_ratios(targets: &[Target], results: &[Vec<(f64, Option<f64>, f64)>]) -> Vec<String> {
    let Some(base) = targets.iter().position(|t| *t == Target::RelayOpts) else {
        return Vec::new();
    };
    if results[base].len() < 5 {
        return Vec::new();
    }
    let mut lines = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        if i == base {
            continue;
        }
        let ratios: Vec<f64> = results[i]
            .iter()
            .zip(&results[base])
            .filter_map(|(x, b)| Some(x.1? / b.1?))
            .collect();
        if ratios.len() < 5 {
            continue;
        }
        lines.push(format!(
            "  - {} / relay+opts, {}",
            t.name(),
            paired_summary(ratios, "under 0.85", |r| r <= 0.85)
        ));
    }
    lines
}

/// "paired by round: median (quartiles; how many rounds meet the target)"
/// for one target's per-round `ratios`; `meets` is #21's target, `target`
/// its words.
fn paired_summary(mut ratios: Vec<f64>, target: &str, meets: impl Fn(f64) -> bool) -> String {
    ratios.sort_by(f64::total_cmp);
    let q = |f: f64| quantile(&ratios, f);
    let met = ratios.iter().filter(|r| meets(**r)).count();
    format!(
        "paired by round: median {:.3} (quartiles {:.3}-{:.3}; {met} of {} rounds at or {target})",
        q(0.5),
        q(0.25),
        q(0.75),
        ratios.len()
    )
}

/// `LOAD_ROW=[up,|down,]CLIENTS,FRAME` (bytes): one throughput row of
/// `-- bulk` or `-- floor`, or both directions of one without `up` or
/// `down`: for a profiler, or many rounds of one row.
#[derive(Clone, Copy)]
struct LoadRow {
    /// `Some(true)` for `down`, `Some(false)` for `up`, `None` for both.
    down: Option<bool>,
    clients: usize,
    frame: usize,
}

impl LoadRow {
    /// The row `LOAD_ROW` names, if it is set (a malformed one panics).
    fn from_env() -> Option<Self> {
        let row = std::env::var("LOAD_ROW").ok()?;
        let bad = || -> ! { panic!("LOAD_ROW=[up,|down,]CLIENTS,FRAME, not {row}") };
        let parts: Vec<&str> = row.split(',').collect();
        let (down, clients, frame) = match parts[..] {
            ["up", c, f] => (Some(false), c, f),
            ["down", c, f] => (Some(true), c, f),
            [c, f] => (None, c, f),
            _ => bad(),
        };
        Some(Self {
            down,
            clients: clients.parse().unwrap_or_else(|_| bad()),
            frame: frame.parse().unwrap_or_else(|_| bad()),
        })
    }

    fn keeps(self, down: bool, clients: usize, frame: usize) -> bool {
        self.down.is_none_or(|d| d == down) && self.clients == clients && self.frame == frame
    }
}

/// `LOAD_REPEATS=N` runs N interleaved samples per target and row instead
/// of `default` (a full run's five): more rounds, a tighter median.
fn repeats_or(default: usize) -> usize {
    std::env::var("LOAD_REPEATS")
        .ok()
        .map(|n| match n.parse() {
            Ok(n) if n >= 1 => n,
            _ => panic!("LOAD_REPEATS={n}: a count of rounds, at least 1"),
        })
        .unwrap_or(default)
}

/// The `f` quantile of sorted `v`, interpolated between ranks.
fn quantile(v: &[f64], f: f64) -> f64 {
    let at = (v.len() - 1) as f64 * f;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
}

/// The idle-memory table: resident memory per idle session on fresh
/// processes, for sessions that carried nothing, a first screen, or 64 KiB
/// each way (websockify: fresh only; a Python process per session, its
/// buffers are not the question).
async fn idle_memory_table(s: &Arc<Setup>, targets: &[Target], counts: &[usize], full: bool) {
    let settle = if full { Settle::MEASURE } else { Settle::SMOKE };
    println!(
        "\n## resident memory per idle session (KiB; RSS of a fresh process, per session, sessions opened one after another)"
    );
    println!(
        "| target | sessions | {} |",
        Carried::ALL.map(Carried::name).join(" | ")
    );
    println!("|---|---|{}", "---|".repeat(Carried::ALL.len()));
    assert!(
        counts.iter().all(|&n| n < PORTHOLE_MAX_SESSIONS),
        "idle session counts must stay below Porthole's caps in the bench config"
    );
    let mut measured = Vec::new();
    for &n in counts {
        for &t in targets.iter().filter(|t| **t != Target::Direct) {
            let asked = idle_sessions_for(t, n);
            if measured.contains(&(t, asked)) {
                continue; // websockify: already measured at its cap
            }
            measured.push((t, asked));
            let mut cells = Vec::new();
            if t == Target::PortholeNative && asked > 1000 {
                // Each native session costs a ticket exchange and a TLS
                // handshake: measured at 1000.
                continue;
            }
            for carried in Carried::ALL {
                if t == Target::Websockify && carried != Carried::Nothing {
                    cells.push("n/m".to_string());
                    continue;
                }
                cells.push(match idle_memory(s, t, asked, carried, settle).await {
                    Some(kib) => format!("{kib:.1}"),
                    None => "n/a".into(),
                });
                tokio::time::sleep(settle.started).await;
            }
            println!("| {} | {asked} | {} |", t.name(), cells.join(" | "));
        }
    }
}

/// Porthole against direct TCP, the plain relay and websockify.
async fn compare_proxies(s: &Arc<Setup>, full: bool, idle: bool) {
    let (secs, repeats, idle_counts, rate_secs) = if full {
        (3.0, 3, vec![1000, 9000], 3.0)
    } else {
        (0.3, 1, vec![20], 0.3)
    };
    let mut targets = vec![
        Target::Direct,
        Target::Porthole,
        Target::Relay,
        Target::RelayOpts,
    ];
    if s.websockify.is_some() {
        targets.push(Target::Websockify);
    }
    if idle {
        // Socket options change no user-space buffer: the plain relay only.
        let mut idle_targets: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|t| *t != Target::RelayOpts)
            .collect();
        idle_targets.insert(2, Target::PortholeNative);
        idle_memory_table(s, &idle_targets, &idle_counts, full).await;
    }

    throughput_table("throughput", repeats, &targets);
    throughput_rows(s, &targets, throughput_grid(full), secs, repeats).await;

    println!("\n## round trip of a 32-byte message (µs, p50 / p99)");
    for &t in &targets {
        let (p50, p99) = latency(s, t, if full { 5000 } else { 50 })
            .await
            .expect("latency");
        println!("- {}: {p50:.0} / {p99:.0}", t.name());
    }

    // relay+jwt: the like-for-like reference for opens (a token checked);
    // relay+jwt+rfb also does the far side's RFB handshake, as Porthole.
    let mut rate_targets = targets.clone();
    let after_opts = rate_targets
        .iter()
        .position(|t| *t == Target::RelayOpts)
        .unwrap()
        + 1;
    rate_targets.splice(
        after_opts..after_opts,
        [Target::RelayJwt, Target::RelayJwtRfb],
    );
    session_rate_table(s, &rate_targets, repeats, rate_secs).await;
}

/// The throughput table's rows (down?, clients, message bytes): down and
/// up, 1, 16 and 64 clients, 4 and 64 KiB messages; two rows in a smoke pass.
fn throughput_grid(full: bool) -> Vec<(bool, usize, usize)> {
    if !full {
        return vec![(true, 1, 65536), (false, 1, 4096)];
    }
    [true, false]
        .into_iter()
        .flat_map(|d| {
            [1, 16, 64]
                .into_iter()
                .flat_map(move |c| [4096, 65536].into_iter().map(move |f| (d, c, f)))
        })
        .collect()
}

/// New sessions per second for `targets`, `repeats` samples of `secs` each,
/// interleaved, with the CPU each open cost.
async fn session_rate_table(s: &Arc<Setup>, targets: &[Target], repeats: usize, secs: f64) {
    println!(
        "\n## new sessions per second (16 concurrent; Porthole and the relay+jwt relays check an Ed25519 token each; \
         median of {repeats} samples of {secs} s, interleaved; CPU µs per open: proxy / machine)"
    );
    let mut rates: Vec<Vec<Rate>> = targets.iter().map(|_| Vec::new()).collect();
    for r in 0..repeats {
        // The order rotated each round, as the throughput rows do.
        for k in 0..targets.len() {
            let i = (k + r) % targets.len();
            rates[i].push(session_rate(s, targets[i], 16, secs).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let base = targets.iter().position(|t| *t == Target::RelayJwtRfb);
    // Each target's rate over relay+jwt+rfb's in the same round (#21's
    // like-for-like ratio; see `paired_ratios`), with five rounds or more.
    let paired: Vec<Option<String>> = (0..targets.len())
        .map(|i| {
            let b = base.filter(|&b| b != i && repeats >= 5)?;
            let ratios = rates[i]
                .iter()
                .zip(&rates[b])
                .map(|(x, y)| x.per_s / y.per_s)
                .collect();
            Some(paired_summary(ratios, "over 0.9", |r| r >= 0.9))
        })
        .collect();
    for ((&t, r), paired) in targets.iter().zip(rates).zip(paired) {
        let per_s = median(r.iter().map(|x| x.per_s).collect());
        let proxy: Vec<f64> = r.iter().filter_map(|x| x.proxy_us).collect();
        let proxy = if proxy.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}", median(proxy))
        };
        let total = median(r.iter().map(|x| x.total_us).collect());
        let samples: Vec<String> = r.iter().map(|x| format!("{:.0}", x.per_s)).collect();
        println!(
            "- {}: {per_s:.0}/s ({proxy} / {total:.0} µs; samples {})",
            t.name(),
            samples.join(", ")
        );
        if let Some(summary) = paired {
            println!("  - over relay+jwt+rfb, {summary}");
        }
    }
}
