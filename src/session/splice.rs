//! Splicing a linked console connection: bytes both ways until either side
//! ends, with the bytes that came early during the handshake first.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::registry::ByteCounters;
use super::{CloseReason, Stop};
use crate::transport::ws_bridge::Traffic;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// A byte stream either way: TCP, TLS, or a WebSocket seen as bytes.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Read chunk on both legs.
const CHUNK: usize = 64 * 1024;

/// How long a refusal or a shutdown may take to reach a peer that does not read.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// Splices `client` and `upstream` until either side ends or `stop` fires.
/// `inspect` sees every chunk from the hypervisor before the client does;
/// an error from it ends the session with that reason. Bytes are added to
/// `counters` as they move; the returned traffic is this connection's.
pub async fn splice<S: Io>(
    client: S,
    upstream: Box<dyn Io>,
    client_early: Vec<u8>,
    upstream_early: Vec<u8>,
    mut inspect: impl FnMut(&[u8]) -> Result<(), CloseReason>,
    stop: Stop,
    counters: &ByteCounters,
) -> (CloseReason, Traffic) {
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let up_bytes = std::sync::atomic::AtomicU64::new(0);
    let down_bytes = std::sync::atomic::AtomicU64::new(0);
    let up = async {
        // The handshake's early bytes first, then each chunk straight from the buffer.
        let mut chunk: &[u8] = &client_early;
        let mut buf = vec![0u8; CHUNK];
        loop {
            if !chunk.is_empty() {
                if up_w.write_all(chunk).await.is_err() || up_w.flush().await.is_err() {
                    return CloseReason::BackendError;
                }
                up_bytes.fetch_add(chunk.len() as u64, Relaxed);
                counters.up.fetch_add(chunk.len() as u64, Relaxed);
            }
            chunk = match client_r.read(&mut buf).await {
                Ok(0) | Err(_) => return CloseReason::ClientLeft,
                Ok(n) => &buf[..n],
            };
        }
    };
    let down = async {
        let mut chunk: &[u8] = &upstream_early;
        let mut buf = vec![0u8; CHUNK];
        loop {
            if !chunk.is_empty() {
                if let Err(reason) = inspect(chunk) {
                    return reason;
                }
                if client_w.write_all(chunk).await.is_err() || client_w.flush().await.is_err() {
                    return CloseReason::ClientLeft;
                }
                down_bytes.fetch_add(chunk.len() as u64, Relaxed);
                counters.down.fetch_add(chunk.len() as u64, Relaxed);
            }
            chunk = match up_r.read(&mut buf).await {
                Ok(0) => return CloseReason::BackendClosed,
                Err(_) => return CloseReason::BackendError,
                Ok(n) => &buf[..n],
            };
        }
    };
    // Idle: no byte either way for a whole `stop.idle`, on the session's
    // counters (a SPICE session's quiet channel is not idle while its display moves).
    let idle = async {
        let Some(limit) = stop.idle else {
            return std::future::pending().await;
        };
        let mut seen = (u64::MAX, u64::MAX);
        loop {
            tokio::time::sleep(limit).await;
            let now = (counters.up.load(Relaxed), counters.down.load(Relaxed));
            if now == seen {
                return CloseReason::IdleTimeout;
            }
            seen = now;
        }
    };
    let reason = tokio::select! {
        r = up => r,
        r = down => r,
        r = stop.stopped() => r,
        r = idle => r,
    };
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, client_w.shutdown()).await;
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, up_w.shutdown()).await;
    (
        reason,
        Traffic {
            up: up_bytes.into_inner(),
            down: down_bytes.into_inner(),
        },
    )
}
