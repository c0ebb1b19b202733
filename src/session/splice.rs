//! The byte splice: every native console connection (SPICE channel, VNC)
//! after its handshake. Bytes both ways until either side ends, with the
//! bytes that came early during the handshake first.
//!
//! It ends like the WebSocket relay on the session's stop (terminate,
//! shutdown, maximum age), on the idle timeout (counted on the session's
//! bytes, so a SPICE session's quiet channel is not idle while its display
//! moves), and on the inspector's verdict.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use super::registry::ByteCounters;
use super::{CloseReason, Early, Inspect, Kept, Stop, Traffic};
use crate::transport::conn::Io;
use crate::transport::elastic::ElasticBuf;

/// Read chunk on both legs while bytes flow (a quiet leg waits with a
/// small buffer: [`ElasticBuf`]).
const CHUNK: usize = 64 * 1024;

/// How long a refusal or a shutdown may take to reach a peer that does not read.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// Splices `client` and `upstream` until either side ends or `stop` fires.
/// `inspect` sees every chunk from the hypervisor before the client does
/// (and its client tap every chunk the other way); an error from it ends the
/// session with that reason. Bytes are added to `counters` as they move; the
/// returned traffic is this connection's. The hypervisor connection comes
/// back, open, when the inspector keeps it for the end reason.
pub async fn splice<C: Io, U: Io, I: Inspect>(
    client: C,
    upstream: U,
    early: Early,
    mut inspect: I,
    stop: Stop,
    counters: &ByteCounters,
) -> (CloseReason, Traffic, Option<Kept<U>>) {
    let tap = inspect.client_tap();
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    // No clock read per chunk: idle is judged from the counters themselves.
    let moved = |n: usize, local: &AtomicU64, total: &AtomicU64| {
        local.fetch_add(n as u64, Relaxed);
        total.fetch_add(n as u64, Relaxed);
    };
    let up = async {
        // The handshake's early bytes first, then each chunk straight from the buffer.
        let mut chunk: &[u8] = &early.up;
        let mut buf = ElasticBuf::new(CHUNK);
        loop {
            if !chunk.is_empty() {
                let checked = tap.as_ref().map(|tap| tap(chunk));
                let going = checked.as_ref().map_or(chunk, |c| &c.forward[..]);
                if up_w.write_all(going).await.is_err() || up_w.flush().await.is_err() {
                    return CloseReason::BackendError;
                }
                moved(chunk.len(), &up_bytes, &counters.up);
                if checked.is_some_and(|c| c.refused.is_some()) {
                    return CloseReason::ProtocolError;
                }
            }
            chunk = match buf.read(&mut client_r).await {
                Ok([]) | Err(_) => return CloseReason::ClientLeft,
                Ok(read) => read,
            };
        }
    };
    let down = async {
        let mut chunk: &[u8] = &early.down;
        let mut buf = ElasticBuf::new(CHUNK);
        let mut ends = Vec::new();
        loop {
            if !chunk.is_empty() {
                if let Err(reason) = inspect.inspect(chunk).await {
                    return reason;
                }
                ends.clear();
                inspect.message_ends(chunk, &mut ends);
                if write_cut(&mut client_w, chunk, &ends).await.is_err()
                    || client_w.flush().await.is_err()
                {
                    return CloseReason::ClientLeft;
                }
                moved(chunk.len(), &down_bytes, &counters.down);
            }
            chunk = match buf.read(&mut up_r).await {
                Ok([]) => return CloseReason::BackendClosed,
                Err(_) => return CloseReason::BackendError,
                Ok(read) => read,
            };
        }
    };
    let idle = async {
        counters.unchanged_for(stop.idle).await;
        CloseReason::IdleTimeout
    };
    let reason = tokio::select! {
        r = up => r,
        r = down => r,
        r = stop.stopped() => r,
        r = idle => r,
    };
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, client_w.shutdown()).await;
    let kept = if inspect.keeps_upstream(reason) {
        Some(Kept {
            upstream: up_r.unsplit(up_w),
            unread: Vec::new(),
        })
    } else {
        let _ = tokio::time::timeout(REFUSAL_DEADLINE, up_w.shutdown()).await;
        None
    };
    let traffic = Traffic {
        up: up_bytes.into_inner(),
        down: down_bytes.into_inner(),
    };
    (reason, traffic, kept)
}

/// Writes `chunk` in one write per piece that `ends` cut it into (the last
/// piece runs to its end).
async fn write_cut<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    chunk: &[u8],
    ends: &[usize],
) -> std::io::Result<()> {
    let mut from = 0;
    for &end in ends.iter().chain(std::iter::once(&chunk.len())) {
        if end > from {
            w.write_all(&chunk[from..end]).await?;
            from = end;
        }
    }
    Ok(())
}
