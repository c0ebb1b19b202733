//! SPICE through Porthole, side by side with a direct connection.
//!
//! `cargo bench --bench spice` runs the full comparison; under `cargo test`
//! (no `--bench` argument) a smoke pass proves every part works.
//!
//! The far side is a minimal SPICE server written here: it answers links
//! with its own RSA-1024 key, decrypts the ticket (as spice-server does),
//! sends INIT on the main channel and floods on the display channel. The
//! client links over TLS to Porthole's SPICE listener with tickets fetched
//! beforehand, or straight to the far side (plain TCP: the cheapest possible
//! path, a bound, not a peer).
//!
//! Measured:
//! - links per second (main channel: TLS + link + RSA ticket both legs) through
//!   Porthole, against the far side directly, and what generating a key per
//!   link (spice-server's way) would cap a core at;
//! - display-channel throughput through Porthole against direct.

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

async fn far_side(listener: TcpListener, key: Arc<rsa::RsaPrivateKey>) {
    let der = public_key_der(&key.to_public_key()).unwrap();
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let key = key.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mess = read_link_mess(&mut s).await?;
            let reply = LinkReply {
                error: 0,
                public_key: der,
                caps: offered_caps(mess.channel_type),
            };
            s.write_all(&reply.encode()).await?;
            let mut auth = [0u8; 132];
            s.read_exact(&mut auth).await?;
            let ct: [u8; 128] = auth[4..].try_into().unwrap();
            let ok = decrypt_ticket(&key, &ct).is_ok();
            s.write_all(&(if ok { 0u32 } else { 7 }).to_le_bytes())
                .await?;
            match mess.channel_type {
                channel::MAIN => {
                    // INIT, mini header: type 103, 32 bytes, session id first.
                    let mut init = vec![103, 0, 32, 0, 0, 0];
                    init.extend_from_slice(&SESSION_ID.to_le_bytes());
                    init.extend_from_slice(&[0; 28]);
                    s.write_all(&init).await?;
                    let mut sink = [0u8; 1024];
                    while s.read(&mut sink).await? > 0 {}
                }
                _ => {
                    let block = vec![0x5a; 64 * 1024];
                    loop {
                        s.write_all(&block).await?;
                    }
                }
            }
            Ok::<_, std::io::Error>(())
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

fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Porthole {
    _process: Killed,
    public: SocketAddr,
    spice: Target,
    signer: porthole::token::signing::Signer,
    far_port: u16,
}

fn start_porthole(dir: &Path, far_port: u16) -> Porthole {
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
            "[listen]\npublic = \"{public}\"\nadmin = \"{admin}\"\n\n[tokens]\nstore_capacity = 1000000\n\n\
             [[tokens.keys]]\nkid = \"b\"\nalgorithm = \"EdDSA\"\npublic_key = \"{}\"\n\n\
             [websocket]\nmax_sessions = 100000\n\n\
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
    let process = Killed(child);
    wait_for_port(public);
    wait_for_port(spice);
    Porthole {
        _process: process,
        public,
        spice: Target {
            addr: spice,
            tls: Some(Arc::new(tls)),
        },
        signer,
        far_port,
    }
}

impl Porthole {
    /// Tickets from the exchange (HTTP), fetched before anything is timed.
    async fn tickets(&self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let req = porthole::token::signing::MintRequest {
                issuer: "porthole".into(),
                audience: "porthole".into(),
                instance: "bench".into(),
                console: porthole::token::claims::ConsoleClaim {
                    kind: porthole::token::ConsoleType::SpiceDirect,
                    host: "127.0.0.1".into(),
                    port: self.far_port,
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

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    tokio::runtime::Runtime::new().unwrap().block_on(run(full));
}

async fn run(full: bool) {
    let dir = tempfile::tempdir().unwrap();
    let far_key = Arc::new(porthole::session::link_keys::LinkKey::generate().private);
    let far_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far = far_listener.local_addr().unwrap();
    tokio::spawn(far_side(far_listener, far_key));
    let p = start_porthole(dir.path(), far.port());
    let direct = Target {
        addr: far,
        tls: None,
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

    println!("SPICE (fake server; client over TLS to Porthole, plain TCP direct)");
    println!("  key generation per link would cap a core at {keygen_per_sec:.0} links/s");
    for concurrency in [1, 8] {
        let tickets = Arc::new(std::sync::Mutex::new(p.tickets(links / 2).await));
        let through = link_rate(&p.spice, tickets, concurrency, secs).await;
        let fake = Arc::new(std::sync::Mutex::new(vec![String::new(); links]));
        let straight = link_rate(&direct, fake, concurrency, secs).await;
        println!(
            "  main-channel links/s, {concurrency} at a time: porthole {through:.0}, direct {straight:.0} ({:.2}x)",
            through / straight
        );
    }
    let ticket = p.tickets(1).await.remove(0);
    let through = throughput(&p.spice, &ticket, bytes).await;
    let straight = throughput(&direct, "", bytes).await;
    println!(
        "  display channel MB/s: porthole (TLS to client, plain upstream) {through:.0}, direct plain {straight:.0} ({:.2}x)",
        through / straight
    );
}
