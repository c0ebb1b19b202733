//! The drain of a SPICE display channel whose client left: its hypervisor
//! side stays open and is answered as a client would
//! ([`crate::protocol::spice::display_drain`] says why: QEMU 7.2's
//! spice-server crashes when a display channel closes before it settled)
//! until the hypervisor closes it, which it does when the session's main
//! channel ends. Porthole closes it itself once the session has stopped
//! (main channel gone, terminate, shutdown, maximum age) and the grace has
//! passed, or at the drain's own deadline.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;

use super::splice::REFUSAL_DEADLINE;
use super::{CloseReason, Kept, Stop};
use crate::protocol::spice::display_drain::{DisplayTrack, DrainLimits};
use crate::transport::conn::Conn;
use crate::transport::elastic::ElasticBuf;

/// What the drain accepts from the hypervisor: no display message a
/// spice-server sends comes near (a 4K screen uncompressed is 33 MB), and
/// bodies are skipped by count, never buffered.
const LIMITS: DrainLimits = DrainLimits {
    max_message: 64 << 20,
    // A client's messages on a display channel are a few bytes to a few KiB.
    max_padding: 64 << 10,
};

/// Read chunk while the hypervisor sends (a quiet channel waits with a
/// small buffer: [`ElasticBuf`]).
const CHUNK: usize = 16 * 1024;

/// How long a drain may last.
#[derive(Debug, Clone, Copy)]
pub struct DrainTimes {
    /// After the session stopped.
    pub grace: Duration,
    /// In all.
    pub max: Duration,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainEnd {
    /// The hypervisor closed the channel (the expected end).
    HypervisorClosed,
    /// The session stopped and the hypervisor had not closed it within the grace.
    GraceOver(CloseReason),
    /// The drain's own deadline.
    Deadline,
    /// The hypervisor's messages broke the framing or a cap.
    Malformed,
    /// Reading or writing the hypervisor failed.
    Io,
}

impl DrainEnd {
    fn as_str(self) -> &'static str {
        match self {
            DrainEnd::HypervisorClosed => "hypervisor_closed",
            DrainEnd::GraceOver(_) => "grace_over",
            DrainEnd::Deadline => "deadline",
            DrainEnd::Malformed => "malformed",
            DrainEnd::Io => "io_error",
        }
    }
}

/// spice-server closes a channel with a reset (measured), so a reset is
/// the hypervisor closing it, not a failure.
fn io_end(e: &std::io::Error) -> DrainEnd {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
            DrainEnd::HypervisorClosed
        }
        _ => DrainEnd::Io,
    }
}

/// Who the drain is for, for its log lines.
#[derive(Debug, Clone, Copy)]
pub struct DrainOf<'a> {
    /// The client that left.
    pub client: IpAddr,
    /// Its token's id.
    pub jti: &'a str,
}

/// Drains `kept` (a display channel's hypervisor side, with what the relay
/// had read of it) from where `track` saw it, until the hypervisor closes it
/// or `stop` fires and `times.grace` passes, or `times.max`; then closes it.
pub async fn drain(
    kept: Kept<Conn>,
    track: DisplayTrack,
    stop: Stop,
    times: DrainTimes,
    of: DrainOf<'_>,
) {
    let Kept {
        mut upstream,
        unread,
    } = kept;
    let (mut machine, first) = match track.into_drain(LIMITS) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(client = %of.client, jti = %of.jti, "spice display channel closed undrained: {e}");
            crate::metrics::spice_drain_ended("not_drainable");
            let _ = tokio::time::timeout(REFUSAL_DEADLINE, upstream.shutdown()).await;
            return;
        }
    };
    tracing::info!(client = %of.client, jti = %of.jti, "spice display channel drained after its client left");
    crate::metrics::spice_drains_active(1);
    let started = Instant::now();
    let mut discarded = 0u64;
    let work = async {
        let mut reply = first;
        let mut pending = unread;
        let mut buf = ElasticBuf::new(CHUNK);
        loop {
            if !reply.is_empty()
                && let Err(e) = upstream.write_all(&reply).await
            {
                return io_end(&e);
            }
            if pending.is_empty() {
                pending = match buf.read(&mut upstream).await {
                    Ok([]) => return DrainEnd::HypervisorClosed,
                    Ok(read) => read.to_vec(),
                    Err(e) => return io_end(&e),
                };
            }
            discarded += pending.len() as u64;
            reply = match machine.feed(&pending) {
                Ok(r) => r,
                Err(_) => return DrainEnd::Malformed,
            };
            pending.clear();
        }
    };
    let ending = async {
        let reason = stop.stopped().await;
        tokio::time::sleep(times.grace).await;
        reason
    };
    let end = tokio::select! {
        e = work => e,
        r = ending => DrainEnd::GraceOver(r),
        _ = tokio::time::sleep_until(started + times.max) => DrainEnd::Deadline,
    };
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, upstream.shutdown()).await;
    crate::metrics::spice_drains_active(-1);
    crate::metrics::spice_drain_ended(end.as_str());
    let session = match end {
        DrainEnd::GraceOver(r) => r.as_str(),
        _ => "",
    };
    tracing::info!(
        client = %of.client, jti = %of.jti, end = end.as_str(), session_end = session,
        bytes_discarded = discarded, secs = started.elapsed().as_secs_f64(),
        "spice display drain ended"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;
    use tokio_util::sync::CancellationToken;

    fn stop() -> Stop {
        Stop {
            shutdown: CancellationToken::new(),
            kill: CancellationToken::new(),
            ended: CancellationToken::new(),
            limit: CancellationToken::new(),
            deadline: None,
            idle: None,
            session: None,
        }
    }

    const OF: DrainOf<'static> = DrainOf {
        client: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        jti: "t",
    };

    fn kept() -> (Kept<Conn>, tokio::io::DuplexStream) {
        let (ours, hypervisor) = tokio::io::duplex(1 << 16);
        let kept = Kept {
            upstream: Conn::boxed(ours),
            unread: Vec::new(),
        };
        (kept, hypervisor)
    }

    /// Reads what the drain sent until it closes; the drain's first words
    /// are the DISPLAY_INIT the client never sent.
    async fn sent_until_closed(mut hypervisor: tokio::io::DuplexStream) -> Vec<u8> {
        let mut all = Vec::new();
        let _ = hypervisor.read_to_end(&mut all).await;
        all
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_session_ends_the_drain_after_the_grace() {
        let (kept, hypervisor) = kept();
        let stop = stop();
        let times = DrainTimes {
            grace: Duration::from_secs(5),
            max: Duration::from_secs(3600),
        };
        let ended = stop.ended.clone();
        let started = Instant::now();
        let draining = tokio::spawn(drain(kept, DisplayTrack::new(true), stop, times, OF));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !draining.is_finished(),
            "the drain lasts while its session does"
        );
        ended.cancel();
        let sent = sent_until_closed(hypervisor).await;
        draining.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(65));
        assert_eq!(&sent[..2], &[101, 0], "DISPLAY_INIT first");
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_never_outlasts_its_maximum() {
        let (kept, hypervisor) = kept();
        let times = DrainTimes {
            grace: Duration::from_secs(5),
            max: Duration::from_secs(600),
        };
        let started = Instant::now();
        let draining = tokio::spawn(drain(kept, DisplayTrack::new(true), stop(), times, OF));
        sent_until_closed(hypervisor).await;
        draining.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hypervisor_closing_ends_it_at_once() {
        let (kept, mut hypervisor) = kept();
        let times = DrainTimes {
            grace: Duration::from_secs(5),
            max: Duration::from_secs(600),
        };
        let draining = tokio::spawn(drain(kept, DisplayTrack::new(true), stop(), times, OF));
        // SET_ACK generation 1, window 1, then one message: ACK_SYNC and an ACK back.
        hypervisor
            .write_all(&[
                3, 0, 8, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x30, 1, 0, 0, 0, 0,
            ])
            .await
            .unwrap();
        let mut got = vec![0u8; 20 + 10 + 6];
        hypervisor.read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got[20..],
            &[1, 0, 4, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0]
        );
        drop(hypervisor);
        let started = Instant::now();
        draining.await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
