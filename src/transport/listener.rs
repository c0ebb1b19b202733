//! The public listener's accept loop: plain TCP or TLS, HTTP/1.1 with upgrades.
//!
//! The loop only accepts. Each connection is served in its own task: the TLS
//! handshake runs there under a deadline, then hyper reads the request with a
//! header deadline (a slow-loris client cannot hold a connection open by
//! trickling headers), and WebSocket upgrades go through. The TLS config is
//! read once per connection from an atomically swappable slot, so certificate
//! reloads apply to new connections and never touch live ones.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::pem::PemFileError;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

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
}

/// Accepts on `listener` until `stop` fires, handing each connection to
/// `on_accept` (which spawns what serves it: the loop itself never waits on
/// a peer).
pub async fn accept_loop<F>(listener: TcpListener, stop: CancellationToken, mut on_accept: F)
where
    F: FnMut(TcpStream, SocketAddr),
{
    accept_limited(listener, stop, None, move |tcp, peer, _| {
        on_accept(tcp, peer)
    })
    .await;
}

/// The one accept loop of every listener, HTTP and native. With `slots`, a
/// permit is taken *before* each accept and handed over with the
/// connection (held for its life): when all are taken, new connections wait
/// in the kernel's backlog instead of costing descriptors and memory.
pub async fn accept_limited<F>(
    listener: TcpListener,
    stop: CancellationToken,
    slots: Option<Arc<Semaphore>>,
    mut on_accept: F,
) where
    F: FnMut(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>),
{
    loop {
        let permit = match &slots {
            None => None,
            Some(slots) => tokio::select! {
                _ = stop.cancelled() => return,
                p = slots.clone().acquire_owned() => p.ok(),
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Interactive traffic: small writes must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        on_accept(tcp, peer, permit);
    }
}

/// Serves HTTP/1.1 (plain or TLS) on `listener` until `cancel` fires.
/// Connections still open then finish their current request; upgraded
/// WebSockets are ended by their own sessions.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsSlot>,
    router: Router,
    deadlines: HttpDeadlines,
    cancel: CancellationToken,
) {
    serve_limited(listener, tls, router, deadlines, cancel, None).await;
}

/// [`serve`], with at most `max_connections` open at once (the admin
/// listener: a trusted network, but no peer may exhaust descriptors).
pub async fn serve_limited(
    listener: TcpListener,
    tls: Option<TlsSlot>,
    router: Router,
    deadlines: HttpDeadlines,
    cancel: CancellationToken,
    max_connections: Option<usize>,
) {
    let stop = cancel.clone();
    let slots = max_connections.map(|n| Arc::new(Semaphore::new(n)));
    accept_limited(listener, stop, slots, move |tcp, peer, permit| {
        let tls = tls.as_ref().map(|slot| slot.load_full());
        let router = router.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = match tls {
                None => Either::Left(tcp),
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(deadlines.tls_handshake, acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => Either::Right(stream),
                        Ok(Err(e)) => {
                            crate::metrics::handshake_failed("tls", "tls_handshake", "client");
                            if crate::audit::refusal_log_allowed() {
                                tracing::info!(%peer, "TLS handshake failed: {e}");
                            }
                            return;
                        }
                        Err(_) => {
                            crate::metrics::handshake_failed("tls", "handshake_timeout", "client");
                            if crate::audit::refusal_log_allowed() {
                                tracing::info!(%peer, "TLS handshake timed out");
                            }
                            return;
                        }
                    }
                }
            };
            serve_connection(io, peer, router, deadlines, cancel).await;
        });
    })
    .await;
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    deadlines: HttpDeadlines,
    cancel: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = tower::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(req)
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
