//! Console sessions, from admission to their end. After a front end has
//! parsed a request, checked its Origin and found its token, everything
//! else happens here:
//!
//! - [`admission`]: turning a token into a grant (through the pluggable
//!   resolver), the caps (global, per client, per token), the token's reuse
//!   policy, tickets for native and spice-html5 clients, console claims, and
//!   the hypervisor connect, all held in guards released when the session ends;
//! - [`lifecycle`]: the one guard every session kind carries from admission
//!   to its end: its registry entry, start and end audit events, metrics and
//!   log lines, and the one place that maps blame to a log level;
//! - [`browser`], [`vnc`], [`spice`]: the session bodies: the hypervisor
//!   handshake with the credentials the session layer holds (the VNC security
//!   proxy, the SPICE link proxy), raced against the session's stop;
//! - [`driver`]: the one loop that runs the sans-IO handshake machines;
//! - [`ws_relay`] and [`splice`]: the two relays, browser and native, with the
//!   same stop, idle and age handling; close codes for pages live here;
//! - [`display_drain`]: a SPICE display channel whose client left, answered
//!   until its session ends (QEMU 7.2 crashes on an early display close);
//! - [`registry`]: the live sessions, for the admin API; [`link_keys`]: the
//!   SPICE link key ring.

pub mod admission;
pub mod browser;
pub mod display_drain;
pub mod driver;
pub mod failed_tickets;
pub mod lifecycle;
pub mod link_keys;
pub mod oversight;
pub mod registry;
pub mod spice;
pub mod splice;
pub mod vnc;
pub mod ws_relay;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use admission::{Admission, OpenError, Opened, SessionGuards, Sessions};

/// How a session ended; front ends turn it into a close code a page can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed or went away.
    ClientLeft,
    /// The client answered no ping for several intervals.
    ClientUnresponsive,
    /// The hypervisor closed the console connection.
    BackendClosed,
    /// Reading from or writing to the hypervisor failed.
    BackendError,
    /// The token expired and sessions end with it.
    TokenExpired,
    /// Nothing moved either way for the idle timeout.
    IdleTimeout,
    /// The client broke a limit (message too large, slow reader past the buffer cap).
    LimitHit,
    /// The client broke the protocol (e.g. a text frame on a binary console).
    ProtocolError,
    /// Porthole is shutting down.
    Shutdown,
    /// An operator ended the session (admin API or CLI).
    Terminated,
    /// A newer connection with the same token ended it (the `takeover`
    /// reuse policy: Horizon's "show only console" tab).
    TakenOver,
    /// The session reached `max_session_age_secs`.
    MaxAge,
    /// Its recording is required (`[recording] required`, the token's
    /// `console.record`) and could not be made or stopped.
    RecordingStopped,
    /// The session this connection joined has ended.
    SessionEnded,
    /// The client broke the WebSocket protocol (an unmasked frame, reserved
    /// bits, a bad opcode or close code).
    WebSocketProtocol,
    /// The client sent text that is not UTF-8.
    InvalidUtf8,
    /// Before it was admitted, its place at the gate went to another
    /// address's (its own held the most of a full gate).
    EvictedAtGate,
}

impl CloseReason {
    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientLeft => "client_left",
            CloseReason::ClientUnresponsive => "client_unresponsive",
            CloseReason::BackendClosed => "backend_closed",
            CloseReason::BackendError => "backend_error",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::LimitHit => "limit_hit",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Terminated => "terminated",
            CloseReason::TakenOver => "taken_over",
            CloseReason::MaxAge => "max_age",
            CloseReason::RecordingStopped => "recording_stopped",
            CloseReason::SessionEnded => "session_ended",
            CloseReason::WebSocketProtocol => "client_protocol_error",
            CloseReason::InvalidUtf8 => "client_invalid_utf8",
            CloseReason::EvictedAtGate => "evicted_at_gate",
        }
    }
}

/// How a session is told to stop: Porthole's shutdown, or an operator
/// ending this one session (its registry entry's token, a child of shutdown).
#[derive(Debug, Clone)]
pub struct Stop {
    /// Porthole is shutting down.
    pub shutdown: CancellationToken,
    /// This session was terminated.
    pub kill: CancellationToken,
    /// The session this connection joined has ended (a SPICE channel whose
    /// main channel is gone; a shadow's watched session); never, for the
    /// session's own connection.
    pub ended: CancellationToken,
    /// The session broke a limit of its own (a shadow that fell behind or
    /// took nothing): it ends as `LimitHit`.
    pub limit: CancellationToken,
    /// The session's maximum age runs out then, if one is configured.
    pub deadline: Option<tokio::time::Instant>,
    /// End after this long with no byte either way (native sessions; the
    /// WebSocket relay has its own).
    pub idle: Option<Duration>,
    /// The session `kill` ends, whose termination says who ended it (an
    /// operator, or a newer connection taking it over).
    pub session: Option<std::sync::Arc<registry::LiveSession>>,
}

impl Stop {
    /// Waits for the first of: shutdown, terminate, the joined session's
    /// end, the maximum age; says which (shutdown wins when several fired).
    pub async fn stopped(&self) -> CloseReason {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => CloseReason::Shutdown,
            _ = self.kill.cancelled() => {
                if self.shutdown.is_cancelled() {
                    CloseReason::Shutdown
                } else if self.taken_over() {
                    CloseReason::TakenOver
                } else {
                    CloseReason::Terminated
                }
            }
            _ = self.ended.cancelled() => CloseReason::SessionEnded,
            _ = self.limit.cancelled() => CloseReason::LimitHit,
            _ = async {
                match self.deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => CloseReason::MaxAge,
        }
    }
}

impl Stop {
    fn taken_over(&self) -> bool {
        self.session
            .as_ref()
            .and_then(|s| s.terminated.get())
            .is_some_and(|t| t.by == registry::TAKEOVER)
    }

    /// Runs `work` (a handshake) unless the session is stopped first: a
    /// terminate or a shutdown reaches a session that is still linking.
    pub async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Result<T, CloseReason> {
        tokio::select! {
            biased;
            r = self.stopped() => Err(r),
            v = work => Ok(v),
        }
    }
}

/// Bytes moved by one connection, for its end-of-life log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    /// Client to hypervisor.
    pub up: u64,
    /// Hypervisor to client.
    pub down: u64,
}

/// Bytes that arrived during a handshake past its last message: they go
/// first when the relay starts.
#[derive(Debug, Default)]
pub struct Early {
    /// From the client, for the hypervisor.
    pub up: Vec<u8>,
    /// From the hypervisor, for the client (inspected first).
    pub down: Vec<u8>,
}

/// The client's early bytes once a handshake over a WebSocket is done: what
/// the machine read past its last message, then what the socket had
/// received and the driver had not read yet (in that order on the wire).
pub(crate) fn after_handshake(mut leftover: Vec<u8>, unread: &[u8]) -> Vec<u8> {
    leftover.extend_from_slice(unread);
    leftover
}

/// Sees every chunk from the hypervisor before the client does; an error
/// ends the session with that reason. Async, so that what it learns can go
/// to a store before the chunk is forwarded (a SPICE session's id).
pub trait Inspect: Send {
    /// Looks at one chunk.
    fn inspect(&mut self, chunk: &[u8]) -> impl Future<Output = Result<(), CloseReason>> + Send;

    /// What sees every chunk from the client before the hypervisor does, if
    /// anything (a SPICE display channel's tracker). Shared, because the
    /// relay's two directions run side by side.
    fn client_tap(&self) -> Option<ClientTap> {
        None
    }

    /// Whether a relay that ended for `reason` hands the hypervisor
    /// connection back instead of closing it (a SPICE display channel whose
    /// client left is drained, not closed).
    fn keeps_upstream(&self, _reason: CloseReason) -> bool {
        false
    }

    /// Where the hypervisor's messages end in `chunk` (offsets into it,
    /// ascending), for a splice that writes its client each message on its
    /// own (one TLS record each: see `spice::EachMessage`). None by
    /// default: a chunk goes in one write.
    fn message_ends(&mut self, _chunk: &[u8], _ends: &mut Vec<usize>) {}
}

/// Sees client bytes on their way to the hypervisor and says which go:
/// [`Checked::forward`] now, and none after a [`Checked::refused`] message
/// (the client's side then ends, a protocol error).
///
/// [`Checked::forward`]: crate::protocol::client_filter::Checked::forward
/// [`Checked::refused`]: crate::protocol::client_filter::Checked::refused
pub type ClientTap =
    std::sync::Arc<dyn Fn(&[u8]) -> crate::protocol::client_filter::Checked + Send + Sync>;

/// A hypervisor connection a relay handed back, with bytes it had read
/// from it and not yet inspected (they come first).
#[derive(Debug)]
pub struct Kept<U> {
    /// The connection.
    pub upstream: U,
    /// Read, not inspected, not forwarded.
    pub unread: Vec<u8>,
}

/// Inspects nothing.
#[derive(Debug, Clone, Copy)]
pub struct Pass;

impl Inspect for Pass {
    async fn inspect(&mut self, _chunk: &[u8]) -> Result<(), CloseReason> {
        Ok(())
    }
}
