//! SPICE through Porthole, side by side with a direct connection.
//!
//! `cargo bench --bench spice` runs the full comparison; under `cargo test`
//! (no `--bench` argument) a smoke pass proves every part works.
//!
//! The far side is a minimal SPICE server written here: it answers links
//! with its own RSA-1024 key, decrypts the ticket (as spice-server does),
//! sends INIT on the main channel and floods on the display channel (or,
//! for the memory table, sends a first screen and goes quiet). The client
//! links over TLS to Porthole's SPICE listener with tickets fetched
//! beforehand, or straight to the far side: over TLS to a far side that
//! speaks TLS itself (a hypervisor's TLS port: the like-for-like line), and
//! over plain TCP (the cheapest possible path, a bound, not a peer).
//!
//! Measured:
//! - links per second (main channel: TLS + link + RSA ticket both legs) through
//!   Porthole, against the far side directly, and what generating a key per
//!   link (spice-server's way) would cap a core at;
//! - display-channel throughput through Porthole against direct;
//! - resident memory per idle channel of SPICE sessions (main, display,
//!   inputs and cursor each) through Porthole, fresh or after a first screen,
//!   on a Porthole started for each measurement.
//!
//! `cargo bench --bench spice -- memory` runs only the memory table,
//! `-- compare` only the links and throughput.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use porthole::protocol::spice::crypto::{decrypt_ticket, encrypt_ticket, public_key_der};
use porthole::protocol::spice::link::offered_caps;
use porthole::protocol::spice::messages::{Caps, LinkMess, LinkReply, channel};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SESSION_ID: u32 = 0x5eed_5eed;

// ---------------------------------------------------------------- far side

async fn read_link_mess<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<LinkMess> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Ok((m, _)) = LinkMess::decode(&buf) {
            return Ok(m);
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What the far side's channels do after the link (besides main's INIT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Every other channel floods 64 KiB blocks.
    Flood,
    /// The display channel sends this many bytes of messages (a first
    /// screen, in pieces of [`SCREEN_PIECES`]); every channel then idles.
    Screen(usize),
}

/// A first screen: a real SPICE console's is about a megabyte.
const FIRST_SCREEN: usize = 1 << 20;

/// The message sizes (mini header included) a first screen is written in,
/// in turn, as in the load tool's VNC memory table.
const SCREEN_PIECES: [usize; 4] = [64 * 1024, 16 * 1024, 4 * 1024, 1024];

/// `SPICE_MSG_DISPLAY_DRAW_COPY`: what a first screen is mostly made of.
const DRAW_COPY: u16 = 304;

/// One far-side channel, on plain TCP or TLS.
async fn serve_link<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    key: Arc<rsa::RsaPrivateKey>,
    der: [u8; 162],
    mode: Mode,
) -> std::io::Result<()> {
    let mess = read_link_mess(&mut s).await?;
    let reply = LinkReply {
        error: 0,
        public_key: der,
        caps: offered_caps(mess.channel_type),
    };
    s.write_all(&reply.encode()).await?;
    s.flush().await?;
    let mut auth = [0u8; 132];
    s.read_exact(&mut auth).await?;
    let ct: [u8; 128] = auth[4..].try_into().unwrap();
    let ok = decrypt_ticket(&key, &ct).is_ok();
    s.write_all(&(if ok { 0u32 } else { 7 }).to_le_bytes())
        .await?;
    s.flush().await?;
    let mut sink = [0u8; 1024];
    match (mess.channel_type, mode) {
        (channel::MAIN, _) => {
            // INIT, mini header: type 103, 32 bytes, session id first.
            let mut init = vec![103, 0, 32, 0, 0, 0];
            init.extend_from_slice(&SESSION_ID.to_le_bytes());
            init.extend_from_slice(&[0; 28]);
            s.write_all(&init).await?;
            s.flush().await?;
        }
        (_, Mode::Flood) => {
            let block = vec![0x5a; 64 * 1024];
            loop {
                s.write_all(&block).await?;
            }
        }
        (channel::DISPLAY, Mode::Screen(total)) => {
            let mut sent = 0;
            for piece in SCREEN_PIECES.into_iter().cycle() {
                if sent >= total {
                    break;
                }
                let n = piece.min(total - sent);
                let mut m = Vec::with_capacity(n);
                m.extend_from_slice(&DRAW_COPY.to_le_bytes());
                m.extend_from_slice(&((n - 6) as u32).to_le_bytes());
                m.resize(n, 0x5a);
                s.write_all(&m).await?;
                sent += n;
            }
            s.flush().await?;
        }
        (_, Mode::Screen(_)) => {}
    }
    while s.read(&mut sink).await? > 0 {}
    Ok(())
}

/// The far side on plain TCP, or over TLS with `tls`.
async fn far_side(
    listener: TcpListener,
    key: Arc<rsa::RsaPrivateKey>,
    mode: Mode,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let der = public_key_der(&key.to_public_key()).unwrap();
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let (key, tls) = (key.clone(), tls.clone());
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            match tls {
                None => serve_link(s, key, der, mode).await,
                Some(tls) => serve_link(tls.accept(s).await?, key, der, mode).await,
            }
        });
    }
}

// ---------------------------------------------------------------- client

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

async fn connect(t: &Target) -> Box<dyn Io> {
    let tcp = TcpStream::connect(t.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    match &t.tls {
        None => Box::new(tcp),
        Some(c) => Box::new(
            tokio_rustls::TlsConnector::from(c.clone())
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap(),
        ),
    }
}

/// Links one channel; returns the stream ready for data.
async fn link(t: &Target, kind: u8, connection_id: u32, ticket: &str) -> Box<dyn Io> {
    let mut s = connect(t).await;
    let mess = LinkMess {
        connection_id,
        channel_type: kind,
        channel_id: 0,
        caps: Caps {
            common: vec![0b1011],
            channel: vec![],
        },
    };
    s.write_all(&mess.encode()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let reply = loop {
        if let Ok((r, _)) = LinkReply::decode(&buf) {
            break r;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed during the link");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert_eq!(reply.error, 0, "link refused");
    let ct = encrypt_ticket(&mut rand::rngs::OsRng, &reply.public_key, ticket.as_bytes()).unwrap();
    let mut auth = 1u32.to_le_bytes().to_vec();
    auth.extend_from_slice(&ct);
    s.write_all(&auth).await.unwrap();
    let mut result = [0u8; 4];
    s.read_exact(&mut result).await.unwrap();
    assert_eq!(u32::from_le_bytes(result), 0, "ticket refused");
    s
}

async fn read_init(s: &mut Box<dyn Io>) -> u32 {
    let mut init = [0u8; 38];
    s.read_exact(&mut init).await.unwrap();
    u32::from_le_bytes(init[6..10].try_into().unwrap())
}

/// Main-channel links per second with `concurrency` clients for `secs`.
async fn link_rate(
    t: &Target,
    tickets: Arc<std::sync::Mutex<Vec<String>>>,
    concurrency: usize,
    secs: f64,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let t = t.clone();
        let tickets = tickets.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let Some(ticket) = tickets.lock().unwrap().pop() else {
                    break;
                };
                let mut s = link(&t, channel::MAIN, 0, &ticket).await;
                read_init(&mut s).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// MB/s read from a display channel for `bytes`.
async fn throughput(t: &Target, ticket: &str, bytes: u64) -> f64 {
    let mut main = link(t, channel::MAIN, 0, ticket).await;
    let session = read_init(&mut main).await;
    let mut display = link(t, channel::DISPLAY, session, ticket).await;
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut got = 0u64;
    while got < bytes {
        let n = display.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n as u64;
    }
    got as f64 / start.elapsed().as_secs_f64() / 1e6
}

// ---------------------------------------------------------------- set-up

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Whether `child` listens on `addr` within 30 s; `false` once it exited
/// (a port `free_addr` picked was taken before it bound it).
fn listens(child: &mut Child, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

struct Porthole {
    process: Killed,
    public: SocketAddr,
    spice: Target,
    signer: porthole::token::signing::Signer,
    far_port: u16,
    /// Porthole's certificate and key, for a far side that speaks TLS.
    server_tls: Arc<rustls::ServerConfig>,
}

fn start_porthole(dir: &Path, far_port: u16) -> Porthole {
    (0..3)
        .find_map(|_| try_start_porthole(dir, far_port))
        .expect("porthole exited at start three times (its ports taken?)")
}

fn try_start_porthole(dir: &Path, far_port: u16) -> Option<Porthole> {
    let ca_params = {
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p
    };
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    std::fs::write(dir.join("spice.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("spice.key"), server_key.serialize_pem()).unwrap();
    let server_tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![server.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();

    let key = porthole::token::signing::generate(porthole::token::signing::KeyKind::Ed25519, "b")
        .unwrap();
    std::fs::write(dir.join("b.pub.pem"), key.public_pem.as_ref().unwrap()).unwrap();
    let signer = porthole::token::signing::Signer::from_private_pem(
        key.private.expose().as_bytes(),
        Some("b".into()),
    )
    .unwrap();
    let (public, admin, spice) = (free_addr(), free_addr(), free_addr());
    std::fs::write(
        dir.join("porthole.toml"),
        format!(
            "[listen]\npublic = \"{public}\"\nadmin = \"{admin}\"\n\
             max_pending_connections = 100000\nmax_pending_per_address = 100000\n\n[tokens]\nstore_capacity = 1000000\n\n\
             [[tokens.keys]]\nkid = \"b\"\nalgorithm = \"EdDSA\"\npublic_key = \"{}\"\n\n\
             [websocket]\nmax_sessions = 100000\nmax_sessions_per_client = 100000\n\n\
             [spice]\nlisten_tls = \"{spice}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n\
             [[backends]]\nnetworks = [\"127.0.0.0/8\"]\nports = [\"1024-65535\"]\n",
            dir.join("b.pub.pem").display(),
            dir.join("spice.pem").display(),
            dir.join("spice.key").display(),
        ),
    )
    .unwrap();
    let bin = std::env::var_os("PORTHOLE_BIN").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_BIN_EXE_porthole")),
        Into::into,
    );
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(dir.join("porthole.toml"))
        .env("PORTHOLE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start porthole");
    let mut process = Killed(child);
    if !listens(&mut process.0, public) || !listens(&mut process.0, spice) {
        return None;
    }
    Some(Porthole {
        process,
        public,
        spice: Target {
            addr: spice,
            tls: Some(Arc::new(tls)),
        },
        signer,
        far_port,
        server_tls: Arc::new(server_tls),
    })
}

impl Porthole {
    /// Tickets from the exchange (HTTP), fetched before anything is timed.
    async fn tickets(&self, n: usize) -> Vec<String> {
        self.tickets_to(self.far_port, n).await
    }

    /// [`Porthole::tickets`] for the far side on `port`.
    async fn tickets_to(&self, port: u16, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let req = porthole::token::signing::MintRequest {
                issuer: "porthole".into(),
                audience: "porthole".into(),
                instance: "bench".into(),
                user: None,
                console: porthole::token::claims::ConsoleClaim {
                    kind: porthole::token::ConsoleType::SpiceDirect,
                    host: "127.0.0.1".into(),
                    port,
                    tls_port: None,
                    view_only: false,
                    record: false,
                },
                ttl_secs: 300,
            };
            let token = self
                .signer
                .sign(&req.claims(porthole::token::unix_now()))
                .unwrap();
            let mut s = TcpStream::connect(self.public).await.unwrap();
            s.write_all(
                format!(
                    "GET /spice-direct?format=json&token={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    token.expose()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            let json = body.split("\r\n\r\n").nth(1).expect("a body");
            let v: serde_json::Value = serde_json::from_str(json).expect("JSON details");
            out.push(v["ticket"].as_str().expect("a ticket").to_string());
        }
        out
    }
}

// ---------------------------------------------------------------- idle memory

/// The channels of a SPICE session in the memory table, as remote-viewer
/// opens them for a plain VM (main first; the others join its session).
const SESSION_CHANNELS: [u8; 4] = [
    channel::MAIN,
    channel::DISPLAY,
    channel::INPUTS,
    channel::CURSOR,
];

/// Resident memory of `pid` (KiB).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// On a Porthole started for this measurement, opens `sessions` SPICE
/// sessions one after another (every channel of [`SESSION_CHANNELS`]),
/// each reading `screen` bytes on its display channel before the next
/// opens, against the far side on `far_port`; returns the resident memory
/// they added per channel once all are idle (KiB).
async fn idle_memory(dir: &Path, far_port: u16, sessions: usize, screen: usize) -> f64 {
    let p = start_porthole(dir, far_port);
    let tickets = p.tickets(sessions).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = p.process.0.id();
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(sessions * SESSION_CHANNELS.len());
    let mut buf = vec![0u8; 64 * 1024];
    for ticket in &tickets {
        let mut main = link(&p.spice, channel::MAIN, 0, ticket).await;
        let session = read_init(&mut main).await;
        held.push(main);
        for kind in &SESSION_CHANNELS[1..] {
            let mut c = link(&p.spice, *kind, session, ticket).await;
            if *kind == channel::DISPLAY {
                let mut got = 0;
                while got < screen {
                    let n = c.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the display channel closed during its first screen");
                    got += n;
                }
            }
            held.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    assert_eq!(held.len(), sessions * SESSION_CHANNELS.len());
    drop(held);
    after.saturating_sub(before) as f64 / (sessions * SESSION_CHANNELS.len()) as f64
}

/// The memory table: per channel, fresh and after a first screen.
async fn memory_table(dir: &Path, key: &Arc<rsa::RsaPrivateKey>, counts: &[usize]) {
    let mut far = Vec::new();
    for total in [0, FIRST_SCREEN] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        far.push(listener.local_addr().unwrap().port());
        tokio::spawn(far_side(listener, key.clone(), Mode::Screen(total), None));
    }
    println!(
        "\n## resident memory per idle SPICE channel through Porthole (KiB; RSS of a fresh Porthole, \
         sessions of {} channels (main, display, inputs, cursor) opened one after another)",
        SESSION_CHANNELS.len()
    );
    println!("| sessions | channels | fresh | after 1 MiB down on display |");
    println!("|---|---|---|---|");
    for &n in counts {
        let mut cells = Vec::new();
        for (port, screen) in far.iter().zip([0, FIRST_SCREEN]) {
            cells.push(format!("{:.1}", idle_memory(dir, *port, n, screen).await));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        println!(
            "| {n} | {} | {} |",
            n * SESSION_CHANNELS.len(),
            cells.join(" | ")
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    // `cargo bench --bench spice -- memory` (or `-- compare`): that part only.
    let only = args
        .iter()
        .skip(1)
        .find_map(|a| ["memory", "compare"].into_iter().find(|p| a == p));
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(run(full, only));
}

async fn run(full: bool, only: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let far_key = Arc::new(porthole::session::link_keys::LinkKey::generate().private);
    if only.is_none_or(|p| p == "compare") {
        compare(dir.path(), &far_key, full).await;
    }
    if only.is_none_or(|p| p == "memory") {
        let counts: &[usize] = if full { &[250, 1000] } else { &[3] };
        memory_table(dir.path(), &far_key, counts).await;
    }
}

/// Links per second and display throughput: Porthole, direct over TLS,
/// direct over plain TCP.
async fn compare(dir: &Path, far_key: &Arc<rsa::RsaPrivateKey>, full: bool) {
    let far_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far = far_listener.local_addr().unwrap();
    tokio::spawn(far_side(far_listener, far_key.clone(), Mode::Flood, None));
    let p = start_porthole(dir, far.port());
    // The far side again, speaking TLS with Porthole's certificate (which
    // the client trusts): a hypervisor's TLS port, no proxy.
    let far_tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far_tls = far_tls_listener.local_addr().unwrap();
    tokio::spawn(far_side(
        far_tls_listener,
        far_key.clone(),
        Mode::Flood,
        Some(tokio_rustls::TlsAcceptor::from(p.server_tls.clone())),
    ));
    let direct = Target {
        addr: far,
        tls: None,
    };
    let direct_tls = Target {
        addr: far_tls,
        tls: p.spice.tls.clone(),
    };
    let (secs, links, bytes) = if full {
        (3.0, 20_000, 2_000_000_000)
    } else {
        (0.5, 40, 8_000_000)
    };

    // What spice-server's key-per-link would cost: one core, back to back.
    let n = if full { 20 } else { 2 };
    let start = Instant::now();
    for _ in 0..n {
        porthole::session::link_keys::LinkKey::generate();
    }
    let keygen_per_sec = n as f64 / start.elapsed().as_secs_f64();

    println!(
        "SPICE (fake server; client over TLS to Porthole; direct over TLS to a TLS far side, and over plain TCP)"
    );
    println!("  key generation per link would cap a core at {keygen_per_sec:.0} links/s");
    for concurrency in [1, 8] {
        let tickets = Arc::new(std::sync::Mutex::new(p.tickets(links / 2).await));
        let through = link_rate(&p.spice, tickets, concurrency, secs).await;
        let fake = Arc::new(std::sync::Mutex::new(vec![String::new(); links]));
        let tls = link_rate(&direct_tls, fake, concurrency, secs).await;
        let fake = Arc::new(std::sync::Mutex::new(vec![String::new(); links]));
        let straight = link_rate(&direct, fake, concurrency, secs).await;
        println!(
            "  main-channel links/s, {concurrency} at a time: porthole {through:.0}, direct TLS {tls:.0} ({:.2}x), direct plain {straight:.0} ({:.2}x)",
            through / tls,
            through / straight
        );
    }
    let ticket = p.tickets(1).await.remove(0);
    let through = throughput(&p.spice, &ticket, bytes).await;
    let tls = throughput(&direct_tls, "", bytes).await;
    let straight = throughput(&direct, "", bytes).await;
    println!(
        "  display channel MB/s: porthole (TLS to client, plain upstream) {through:.0}, direct TLS {tls:.0} ({:.2}x), direct plain {straight:.0} ({:.2}x)",
        through / tls,
        through / straight
    );
}
