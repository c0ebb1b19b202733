//! The one accept loop of every listener (behind its [`Gate`]), and the
//! HTTP listeners on it: plain TCP or TLS, HTTP/1.1 with upgrades.
//!
//! The loop only accepts. Each connection is served in its own task: a
//! PROXY protocol header (where the listener expects one from this peer)
//! and the TLS handshake run there under one deadline, then hyper reads the
//! request with a header deadline (a slow-loris client cannot hold a
//! connection open by trickling headers), and WebSocket upgrades go through. The TLS config is
//! read once per connection from an atomically swappable slot, so certificate
//! reloads apply to new connections and never touch live ones.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::gate::{Gate, GateRefusal, Pass, Permit};
use super::pem::PemFileError;
use super::proxy_header;
use super::write_stall::WriteStall;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::ConnectInfo;
use futures_util::future::BoxFuture;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tower_http::timeout::TimeoutBody;

/// What a connection's task goes on to run once hyper has handed its
/// upgraded socket over: the session the upgrade starts. Run there, not in a
/// task of its own, an open costs one spawn and one cross-task wake-up less
/// (the session would otherwise wait for the upgrade and be woken when the
/// 101 is out). A handler finds it in the request's extensions, and with it
/// the connection's place at the gate, for a session that is not admitted
/// yet when its socket is upgraded (spice-html5: its ticket comes inside).
#[derive(Clone, Default)]
pub struct AfterUpgrade(Arc<Mutex<Handover>>);

/// What a connection hands over at its upgrade (one allocation a
/// connection, as before the place joined the session).
#[derive(Default)]
struct Handover {
    session: Option<BoxFuture<'static, ()>>,
    place: Option<Pass>,
}

impl AfterUpgrade {
    fn lock(&self) -> std::sync::MutexGuard<'_, Handover> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `session` once the HTTP connection is over (upgraded, or ended
    /// without: the session then sees its upgrade fail).
    pub fn set(&self, session: impl Future<Output = ()> + Send + 'static) {
        self.lock().session = Some(Box::pin(session));
    }

    /// The connection's place at the gate, to keep until the session is
    /// admitted (instead of giving it back at the upgrade); `None` where
    /// the connection holds none. Its [`Pass::evicted`] still says when the
    /// gate takes it for another address.
    pub fn keep_place(&self) -> Option<Pass> {
        self.lock().place.take()
    }

    fn with_place(pass: Pass) -> Self {
        Self(Arc::new(Mutex::new(Handover {
            session: None,
            place: Some(pass),
        })))
    }

    fn take(&self) -> Option<BoxFuture<'static, ()>> {
        self.lock().session.take()
    }

    /// A request of this connection is being handled, or done (see
    /// [`Pass::handling`]).
    fn handling(&self, busy: bool) {
        if let Some(place) = &self.lock().place {
            place.handling(busy);
        }
    }

    /// Gives the place back unless a session kept it.
    fn give_back_place(&self) {
        drop(self.lock().place.take());
    }
}

impl std::fmt::Debug for AfterUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterUpgrade")
    }
}

/// A TLS server config that can be replaced while connections run.
pub type TlsSlot = Arc<ArcSwap<ServerConfig>>;

/// TLS 1.3 alone (`listen.tls_min_version = "1.3"`).
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Why a listener's certificate could not be loaded. The messages name the
/// file; each carries its cause in its text (logs print `{e}`), so none has a
/// `source` that `{:#}` would print twice.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate or key file is unusable.
    #[error(transparent)]
    File(#[from] PemFileError),
    /// rustls refused the protocol versions asked for.
    #[error("{0}")]
    Versions(rustls::Error),
    /// The key does not belong to the certificate (or rustls cannot use it).
    #[error("certificate and key do not match: {0}")]
    KeyMismatch(rustls::Error),
}

/// Builds a TLS server config from PEM files (certificate chain, private key),
/// accepting TLS 1.2 and 1.3, or 1.3 only.
pub fn load_tls(cert: &Path, key: &Path, tls13_only: bool) -> Result<ServerConfig, TlsError> {
    let certs = super::pem::certificates(cert)?;
    let key = super::pem::private_key(key)?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(if tls13_only {
                TLS13_ONLY
            } else {
                rustls::DEFAULT_VERSIONS
            })
            .map_err(TlsError::Versions)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(TlsError::KeyMismatch)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// [`load_tls`] for a listener whose protocol is not HTTP: no ALPN.
pub fn load_tls_without_alpn(
    cert: &Path,
    key: &Path,
    tls13_only: bool,
) -> Result<ServerConfig, TlsError> {
    let mut config = load_tls(cert, key, tls13_only)?;
    config.alpn_protocols.clear();
    Ok(config)
}

/// Deadlines of the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct HttpDeadlines {
    /// TLS handshake, from accept.
    pub tls_handshake: Duration,
    /// Request headers, from the start of the request (covers the WebSocket upgrade request).
    pub request_headers: Duration,
    /// How long a response write may wait on a peer that takes none of it
    /// before the connection is closed (see [`super::write_stall`]); off
    /// once the connection is upgraded to a session.
    pub write_stall: Duration,
}

/// Which peers of a listener announce their client with a PROXY protocol
/// header: the trusted proxies, on a listener that expects headers
/// (`listen.proxy_protocol`, `spice.proxy_protocol`, `vnc.proxy_protocol`);
/// nobody otherwise.
///
/// From those peers the header is required: a connection from one that does
/// not start with a header is closed (with a server-speaks-first protocol
/// such as RFB, waiting to see whether one comes would stall a direct
/// client until its deadline). From anyone else nothing is read: a header
/// is then just the first bytes of a bad client's handshake.
#[derive(Debug, Clone, Default)]
pub struct ProxyHeaders(Arc<[ipnet::IpNet]>);

impl ProxyHeaders {
    /// No peer sends a header.
    pub fn none() -> Self {
        Self::default()
    }

    /// `trusted` send one when `expected`, else nobody does.
    pub fn from_trusted(expected: bool, trusted: &[ipnet::IpNet]) -> Self {
        if expected {
            Self(trusted.into())
        } else {
            Self::none()
        }
    }

    fn expected_from(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&peer))
    }
}

/// A connection just accepted, with its place behind the gate; a
/// connection that owes a PROXY header holds only a permit, and takes its
/// client's place in [`Arrival::client`].
#[derive(Debug)]
pub struct Arrival {
    tcp: TcpStream,
    peer: SocketAddr,
    place: Place,
    evictable: bool,
}

#[derive(Debug)]
enum Place {
    /// Counted for the peer, which is the client.
    Entered(Pass),
    /// Counted once the header names the client.
    AfterHeader(Permit, Arc<Gate>),
}

/// A connection whose client is known, holding its place behind the gate.
#[derive(Debug)]
pub struct Accepted {
    /// The socket, at the first byte after any PROXY header.
    pub tcp: TcpStream,
    /// The client: the peer, or whom its PROXY header names.
    pub client: SocketAddr,
    /// Its place behind the gate.
    pub pass: Pass,
}

impl Arrival {
    /// The connection's client and its place, in the connection's own task,
    /// by `deadline` (the one its handshakes share). This is the one place
    /// the client address is decided for every listener: the gate counts it,
    /// and the sessions' caps, the ticket backoff, the logs and the audit
    /// trail are handed it. `None`: the connection was refused (logged and
    /// counted) and is dropped.
    pub async fn client(self, deadline: Instant) -> Option<Accepted> {
        let Arrival {
            mut tcp,
            peer,
            place,
            evictable,
        } = self;
        let (permit, gate) = match place {
            Place::Entered(pass) => {
                return Some(Accepted {
                    tcp,
                    client: peer,
                    pass,
                });
            }
            Place::AfterHeader(permit, gate) => (permit, gate),
        };
        let client = match tokio::time::timeout_at(deadline, proxy_header::read(&mut tcp)).await {
            Ok(Ok(named)) => named.map_or(peer, canonical),
            Ok(Err(e)) => {
                crate::metrics::handshake_failed("proxy", e.as_str(), "client");
                if crate::audit::refusal_log_allowed() {
                    tracing::warn!(%peer, "connection refused: {e}");
                }
                return None;
            }
            Err(_) => {
                crate::metrics::handshake_failed("proxy", "handshake_timeout", "client");
                if crate::audit::refusal_log_allowed() {
                    tracing::info!(%peer, "connection refused: no PROXY header in time");
                }
                return None;
            }
        };
        let pass = match gate.enter(permit, client.ip(), evictable) {
            Ok(pass) => pass,
            Err(why) => {
                refused_at_gate(&gate, client, Some(peer), why);
                return None;
            }
        };
        Some(Accepted { tcp, client, pass })
    }
}

fn refused_at_gate(gate: &Gate, client: SocketAddr, proxy: Option<SocketAddr>, why: GateRefusal) {
    crate::metrics::limit_hit(gate.label(why));
    if crate::audit::refusal_log_allowed() {
        let connection = gate.connection();
        tracing::info!(%client, ?proxy, "{connection} refused: {why}");
    }
}

/// Connections the kernel may hold for a listener before Porthole accepts
/// them. Linux caps it at `net.core.somaxconn` (4096 by default since 5.4).
/// The standard library's (and mio's) 128 is small for a gateway: a burst
/// of reconnects (a load balancer failing over, or the gate's spare places
/// all taken) past a full queue loses SYNs, and each lost one costs its
/// client a retry 1, 3, 7 s later, by which time a flood's held connections
/// may have left and the late ones count against a fresh per-address cap.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as
/// `TcpListener::bind` sets, so a restart does not wait out TIME_WAIT).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts on `listener` until `stop` fires, handing each connection to
/// `on_accept` (which spawns what serves it: the loop itself never waits on
/// a peer) as an [`Arrival`] behind `gate`, whose place it holds for as
/// long as it is not admitted. The permit is taken *before* each accept:
/// when all are taken, new connections wait in the kernel's backlog instead
/// of costing descriptors and memory. A connection from an address that
/// holds its most places is closed at once; one that owes a PROXY header
/// (`proxy`) is counted for its client once the header is read, in its task.
pub async fn accept_loop<F>(
    listener: TcpListener,
    stop: CancellationToken,
    gate: Arc<Gate>,
    proxy: ProxyHeaders,
    evictable: bool,
    mut on_accept: F,
) where
    F: FnMut(Arrival),
{
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = gate.permit() => p,
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off (longer each
                    // time, up to a second) instead of spinning, and say so.
                    crate::metrics::accept_failed();
                    if crate::audit::refusal_log_allowed() {
                        tracing::warn!(retry_in = ?backoff, "accept failed: {e}");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let peer = canonical(peer);
        let place = if proxy.expected_from(peer.ip()) {
            Place::AfterHeader(permit, gate.clone())
        } else {
            match gate.enter(permit, peer.ip(), evictable) {
                Ok(pass) => Place::Entered(pass),
                Err(why) => {
                    refused_at_gate(&gate, peer, None, why);
                    continue;
                }
            }
        };
        tune(&tcp);
        on_accept(Arrival {
            tcp,
            peer,
            place,
            evictable,
        });
    }
}

/// `addr` with an IPv4 client of a dual-stack socket (`::ffff:a.b.c.d`) as
/// the IPv4 address it is, so that the trusted proxies, the networks and
/// the logs see one form of each client: `ipnet` never matches an IPv4
/// network against a mapped address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Unsent bytes the kernel may hold for one connection. Small, so that a
/// write waits as soon as the client stops reading (what tells the relays a
/// client is alive, see [`super::drain_watch`]), and console output does not
/// sit behind megabytes of stale bytes; large enough to keep a fast link busy.
const NOTSENT_LOWAT: u32 = 64 * 1024;

fn tune(tcp: &TcpStream) {
    // Interactive traffic: small writes must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOTSENT_LOWAT);
}

/// Serves HTTP/1.1 (plain or TLS) on `listener` until `cancel` fires,
/// behind `gate` (a connection holds its place until it ends or is upgraded
/// to a session), reading a PROXY header first where `proxy` expects one.
/// Connections still open then finish their current request; upgraded
/// WebSockets are ended by their own sessions.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsSlot>,
    router: Router,
    deadlines: HttpDeadlines,
    cancel: CancellationToken,
    gate: Arc<Gate>,
    proxy: ProxyHeaders,
) {
    let stop = cancel.clone();
    let connection = gate.connection();
    let protect = gate.protects_requests();
    // An HTTP connection not yet upgraded carries no session: it may be
    // closed to make room.
    accept_loop(listener, stop, gate, proxy, true, move |arrival| {
        let tls = tls.as_ref().map(|slot| slot.load_full());
        let router = router.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            // Boxed, all of it up to the upgrade (the PROXY header, TLS,
            // HTTP): its state is freed when it ends, and the task that goes
            // on to hold a session for hours holds only the session.
            let http = Box::pin(async move {
                // One deadline from accept for the PROXY header and the TLS handshake.
                let deadline = Instant::now() + deadlines.tls_handshake;
                let Accepted { tcp, client, pass } = arrival.client(deadline).await?;
                // Given back when the connection ends, or when hyper hands an
                // upgraded socket to its session (which may keep it until it
                // is admitted); until then the gate may close it to make
                // room for another address.
                let evicted = pass.evicted();
                let after = AfterUpgrade::with_place(pass);
                let serving = async {
                    let Some(io) = accept_tls(tcp, client, tls, deadline).await else {
                        return;
                    };
                    let (io, stall) = WriteStall::new(io, deadlines.write_stall);
                    let after = after.clone();
                    serve_connection(io, client, router, deadlines, cancel, after, protect).await;
                    // Upgraded (or over): a session judges its client itself.
                    stall.off();
                };
                tokio::select! {
                    () = evicted.cancelled() => evicted_at_gate(connection, client),
                    () = serving => {}
                }
                after.give_back_place();
                after.take()
            });
            if let Some(session) = http.await {
                session.await;
            }
        });
    })
    .await;
}

/// An accepted connection's TLS, within `deadline`, where the listener has
/// one: the stream HTTP is served on, or `None` (failure counted and logged).
async fn accept_tls(
    tcp: TcpStream,
    client: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    deadline: Instant,
) -> Option<Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>> {
    let io = match tls {
        None => Either::Left(tcp),
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Either::Right(stream),
                Ok(Err(e)) => {
                    crate::metrics::handshake_failed("tls", "tls_handshake", "client");
                    if crate::audit::refusal_log_allowed() {
                        tracing::info!(peer = %client, "TLS handshake failed: {e}");
                    }
                    return None;
                }
                Err(_) => {
                    crate::metrics::handshake_failed("tls", "handshake_timeout", "client");
                    if crate::audit::refusal_log_allowed() {
                        tracing::info!(peer = %client, "TLS handshake timed out");
                    }
                    return None;
                }
            }
        }
    };
    Some(io)
}

/// A connection the gate closed to make room for another address.
fn evicted_at_gate(connection: &str, client: SocketAddr) {
    if crate::audit::refusal_log_allowed() {
        tracing::info!(%client, "{connection} closed to make room: its address held the most places of a full gate");
    }
}

/// In a response's extensions, on a listener whose gate protects requests
/// in flight (the admin one): the connection keeps its place until the
/// body is sent, not only until the handler answers. For authorised
/// answers worth finishing (a recording's download): an answer anyone may
/// ask for and leave unread (`/metrics`) must not make its connection
/// unevictable. The write deadline still ends one its client stops reading.
#[derive(Debug, Clone, Copy)]
pub struct KeepPlaceWhileSent;

/// A request in flight on a gate that protects those: its connection's
/// place is marked busy from here until this is dropped, so that every
/// start has exactly one end ([`Pass::handling`] counts them).
struct InFlight(AfterUpgrade);

impl InFlight {
    fn new(after: AfterUpgrade) -> Self {
        after.handling(true);
        Self(after)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.handling(false);
    }
}

/// A response body that keeps its request in flight until its last frame
/// is out, it fails, or hyper drops it unsent.
struct BusyUntilSent {
    body: axum::body::Body,
    in_flight: Option<InFlight>,
}

impl hyper::body::Body for BusyUntilSent {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    deadlines: HttpDeadlines,
    cancel: CancellationToken,
    after: AfterUpgrade,
    protect: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let body_stall = deadlines.request_headers;
    let service = tower::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        // A body that stops arriving fails its request at the header
        // deadline (per frame): on the admin listener, a request keeps its
        // place while handled, and must not keep it by stalling.
        let mut req = req.map(|body| axum::body::Body::new(TimeoutBody::new(body_stall, body)));
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(after.clone());
        let handled = router.clone().oneshot(req);
        if !protect {
            return futures_util::future::Either::Left(handled);
        }
        // Its place is not taken while the handler runs, nor while an
        // answer its handler marked is on its way (see `KeepPlaceWhileSent`).
        let in_flight = InFlight::new(after.clone());
        futures_util::future::Either::Right(async move {
            let response = handled.await;
            response.map(|r| {
                if r.extensions().get::<KeepPlaceWhileSent>().is_none() {
                    return r;
                }
                r.map(|body| {
                    axum::body::Body::new(BusyUntilSent {
                        body,
                        in_flight: Some(in_flight),
                    })
                })
            })
        })
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadlines.request_headers)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        }
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test(start_paused = true)]
    async fn a_response_its_peer_does_not_read_is_given_up_at_the_write_stall() {
        let stall = Duration::from_secs(30);
        let router = Router::new().route("/big", get(|| async { vec![0u8; 1 << 20] }));
        let (mut client, server) = tokio::io::duplex(4096);
        let (server, _switch) = WriteStall::new(server, stall);
        let deadlines = HttpDeadlines {
            tls_handshake: Duration::from_secs(10),
            request_headers: Duration::from_secs(10),
            write_stall: stall,
        };
        let served = tokio::spawn(serve_connection(
            server,
            "127.0.0.1:1".parse().unwrap(),
            router,
            deadlines,
            CancellationToken::new(),
            AfterUpgrade::default(),
            false,
        ));
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        tokio::time::timeout(stall * 3, served)
            .await
            .expect("the connection ended")
            .unwrap();
        assert!(
            started.elapsed() >= stall,
            "ended after {:?}, before the stall deadline",
            started.elapsed()
        );
    }
}
