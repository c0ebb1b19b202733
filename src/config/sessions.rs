//! `[sessions]` and `[websocket]`: caps and timers of every session, and the
//! WebSocket limits of browser sessions. Session settings that used to live in
//! `[websocket]` are still read there (with a warning) while their new names
//! are unset.

use std::time::Duration;

use serde::Deserialize;

use super::issues::{Issues, nonzero_secs, secs_within, within};

/// `[sessions]`: caps and timers of every console session, browser or native.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    /// Most concurrent sessions; more get 503 (or a SPICE / RFB error). Default 5000.
    pub max_sessions: Option<usize>,
    /// Most concurrent connections from one client address (a SPICE session
    /// counts each channel). Default 64.
    pub max_sessions_per_client: Option<usize>,
    /// Most concurrent connections with one token (SPICE: its channels). Default 16.
    pub max_sessions_per_token: Option<usize>,
    /// Deadline for connecting to the hypervisor, seconds. Default 5.
    pub connect_timeout_secs: Option<u64>,
    /// A session ends after this long with no byte either way, seconds (0: off). Default 3600.
    pub idle_timeout_secs: Option<u64>,
    /// End every session after this long, seconds (0: never). Default 0.
    pub max_session_age_secs: Option<u64>,
    /// Grace period for open sessions at shutdown, seconds. Default 10.
    pub shutdown_grace_secs: Option<u64>,
    /// Porthole's pages tell their user while an operator watches the
    /// session (a shadow), and that it is recorded. Default true.
    pub tell_watched: Option<bool>,
    /// A hypervisor connection that carried nothing for this long is probed
    /// (TCP keepalive); one that answers no probe, leaves bytes
    /// unacknowledged or keeps its receive window closed for twice this long
    /// is given up and its session ends, seconds (0: off, as a dead host
    /// then holds its sessions until they idle out). Default 30.
    pub hypervisor_keepalive_secs: Option<u64>,
    /// The same for native clients' connections (SPICE, VNC): a client that
    /// vanished (a laptop asleep, a network changed) is given up and its
    /// session ends, so its user can open the console again, seconds (0:
    /// off). Browsers have `websocket.ping_interval_secs`. Default 30.
    pub client_keepalive_secs: Option<u64>,
}

/// `[websocket]`: limits and timers of browser sessions' WebSockets.
///
/// The session caps and timers that are not about WebSockets moved to
/// [`RawSessions`]; their old names here are still read (with a warning) while
/// the new ones are unset, and setting both is an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebSocket {
    /// Largest message a client may send, bytes. Default 1048576.
    pub max_message_bytes: Option<usize>,
    /// Largest frame a client may send, bytes. Default 1048576.
    pub max_frame_bytes: Option<usize>,
    /// tungstenite's read buffer per session (headers and control frames: binary payloads bypass it), bytes. Default 4096.
    pub read_buffer_bytes: Option<usize>,
    /// Outgoing bytes queued before the relay waits for the client, bytes. Default 65536.
    pub write_buffer_bytes: Option<usize>,
    /// Hard cap on what tungstenite itself buffers outgoing (pongs, the close, a handshake's messages; the relay's data waits at `write_buffer_bytes`), bytes. Default 4194304.
    pub max_write_buffer_bytes: Option<usize>,
    /// Deadline for the HTTP upgrade request (and how long an HTTP response
    /// may wait on a client that takes none of it), seconds. Default 10.
    pub upgrade_timeout_secs: Option<u64>,
    /// WebSocket ping interval, seconds (0: off). Default 20.
    pub ping_interval_secs: Option<u64>,
    /// A browser session ends after this long with no byte either way,
    /// seconds (0: off). Default: `sessions.idle_timeout_secs`. While that is
    /// unset this also ends idle native sessions, as it did before `[sessions]`.
    pub idle_timeout_secs: Option<u64>,
    /// End sessions when their token expires. Default false (the token only opens the session).
    pub end_at_token_expiry: Option<bool>,
    /// Deprecated: `sessions.connect_timeout_secs`.
    pub connect_timeout_secs: Option<u64>,
    /// Deprecated: `sessions.max_sessions`.
    pub max_sessions: Option<usize>,
    /// Deprecated: `sessions.max_sessions_per_client`.
    pub max_sessions_per_client: Option<usize>,
    /// Deprecated: `sessions.max_sessions_per_token`.
    pub max_sessions_per_token: Option<usize>,
    /// Deprecated: `sessions.shutdown_grace_secs`.
    pub shutdown_grace_secs: Option<u64>,
    /// Deprecated: `sessions.max_session_age_secs`.
    pub max_session_age_secs: Option<u64>,
}

/// Validated `[sessions]` (with the old `[websocket]` names read into it).
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// Most concurrent sessions.
    pub max_sessions: usize,
    /// Concurrent connections per client address.
    pub max_sessions_per_client: usize,
    /// Concurrent connections per token.
    pub max_sessions_per_token: usize,
    /// Hypervisor connect deadline.
    pub connect_timeout: Duration,
    /// Idle timeout of native sessions, and of browser sessions unless
    /// `[websocket]` gives them their own; `None` is off.
    pub idle_timeout: Option<Duration>,
    /// End every session after this long.
    pub max_session_age: Option<Duration>,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Pages tell their user while a shadow watches, and that it is recorded.
    pub tell_watched: bool,
    /// Hypervisor connections are probed after this long without a byte,
    /// and given up after twice as long; `None` is off.
    pub hypervisor_keepalive: Option<Duration>,
    /// The same for native clients' connections; `None` is off.
    pub client_keepalive: Option<Duration>,
}

/// Validated `[websocket]`.
#[derive(Debug, Clone)]
pub struct WebSocketConfig {
    /// Largest client message.
    pub max_message_bytes: usize,
    /// Largest client frame.
    pub max_frame_bytes: usize,
    /// Read buffer per session.
    pub read_buffer_bytes: usize,
    /// Write buffer before a flush.
    pub write_buffer_bytes: usize,
    /// Hard cap on buffered outgoing bytes.
    pub max_write_buffer_bytes: usize,
    /// HTTP upgrade deadline.
    pub upgrade_timeout: Duration,
    /// Ping interval; `None` is off.
    pub ping_interval: Option<Duration>,
    /// Browser sessions' idle timeout; `None` is off.
    pub idle_timeout: Option<Duration>,
    /// End sessions at token expiry.
    pub end_at_token_expiry: bool,
}

/// The section a moved session setting was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFrom {
    /// `[sessions]` (or neither: the default).
    Sessions,
    /// Its old name in `[websocket]`.
    WebSocket,
}

impl ReadFrom {
    /// The setting's key where it was read, for its problems.
    fn key(self, name: &str) -> String {
        match self {
            ReadFrom::Sessions => format!("sessions.{name}"),
            ReadFrom::WebSocket => format!("websocket.{name}"),
        }
    }
}

/// A session setting that used to live in `[websocket]`: the value given, and
/// where it was read from. The old name is read, with a warning, while the new
/// one is unset; both set is a problem, since no reading of the file could
/// tell which one the operator meant.
fn moved<T>(
    issues: &mut Issues,
    name: &str,
    new: Option<T>,
    old: Option<T>,
) -> (Option<T>, ReadFrom) {
    match (new, old) {
        (None, Some(v)) => {
            issues.warn(
                format!("websocket.{name}"),
                format!(
                    "deprecated: moved to `sessions.{name}` (read from here while that is unset)"
                ),
            );
            (Some(v), ReadFrom::WebSocket)
        }
        (new, old) => {
            if new.is_some() && old.is_some() {
                issues.push(
                    format!("websocket.{name}"),
                    format!("moved to `sessions.{name}`, which is also set: remove this one"),
                );
            }
            (new, ReadFrom::Sessions)
        }
    }
}

/// What `[websocket]` has always said about its deadlines being zero.
const DEADLINES_POSITIVE: &str =
    "upgrade_timeout_secs and connect_timeout_secs must be positive: every wait has a deadline";

/// `[sessions]`, reading the old names in `[websocket]` (`old`) while the new ones are unset.
pub(super) fn validate_sessions(
    raw: &RawSessions,
    old: &RawWebSocket,
    issues: &mut Issues,
) -> SessionsConfig {
    let mut cap = |name: &str, new: Option<usize>, old: Option<usize>, default, max| {
        let (v, from) = moved(issues, name, new, old);
        within(issues, &from.key(name), v.unwrap_or(default), 1, max)
    };
    let max_sessions = cap(
        "max_sessions",
        raw.max_sessions,
        old.max_sessions,
        5000,
        1_000_000,
    );
    let max_sessions_per_client = cap(
        "max_sessions_per_client",
        raw.max_sessions_per_client,
        old.max_sessions_per_client,
        64,
        1_000_000,
    );
    let max_sessions_per_token = cap(
        "max_sessions_per_token",
        raw.max_sessions_per_token,
        old.max_sessions_per_token,
        16,
        1_000,
    );
    let mut secs = |name: &str, new: Option<u64>, old: Option<u64>, default: u64| {
        let (v, from) = moved(issues, name, new, old);
        (Duration::from_secs(v.unwrap_or(default)), from)
    };
    let (connect_timeout, from) = secs(
        "connect_timeout_secs",
        raw.connect_timeout_secs,
        old.connect_timeout_secs,
        5,
    );
    let (max_age, _) = secs(
        "max_session_age_secs",
        raw.max_session_age_secs,
        old.max_session_age_secs,
        0,
    );
    let (shutdown_grace, _) = secs(
        "shutdown_grace_secs",
        raw.shutdown_grace_secs,
        old.shutdown_grace_secs,
        10,
    );
    if connect_timeout.is_zero() {
        match from {
            ReadFrom::WebSocket => issues.push("websocket", DEADLINES_POSITIVE),
            ReadFrom::Sessions => issues.push(
                from.key("connect_timeout_secs"),
                "must be positive: every wait has a deadline",
            ),
        }
    }
    // `websocket.idle_timeout_secs` keeps a meaning of its own (browser
    // sessions), so it is no error beside this one; alone, it still ends idle
    // native sessions too, as it always did.
    let idle_secs = match (raw.idle_timeout_secs, old.idle_timeout_secs) {
        (Some(v), _) => v,
        (None, Some(v)) => {
            issues.warn(
                "websocket.idle_timeout_secs",
                "also ends idle native SPICE and VNC sessions while `sessions.idle_timeout_secs` \
                 is unset: set that one (this one then applies to browser sessions only)",
            );
            v
        }
        (None, None) => 3600,
    };
    SessionsConfig {
        max_sessions,
        max_sessions_per_client,
        max_sessions_per_token,
        connect_timeout,
        idle_timeout: nonzero_secs(idle_secs),
        max_session_age: Some(max_age).filter(|d| !d.is_zero()),
        shutdown_grace,
        tell_watched: raw.tell_watched.unwrap_or(true),
        hypervisor_keepalive: nonzero_secs(secs_within(
            issues,
            "sessions.hypervisor_keepalive_secs",
            raw.hypervisor_keepalive_secs,
            30,
            0,
            3600,
        )),
        client_keepalive: nonzero_secs(secs_within(
            issues,
            "sessions.client_keepalive_secs",
            raw.client_keepalive_secs,
            30,
            0,
            3600,
        )),
    }
}

/// `[websocket]`; its idle timeout defaults to the sessions' one.
pub(super) fn validate_websocket(
    w: &RawWebSocket,
    sessions: &SessionsConfig,
    issues: &mut Issues,
) -> WebSocketConfig {
    let mut bytes = |name: &str, v: Option<usize>, default, min, max| {
        within(
            issues,
            &format!("websocket.{name}"),
            v.unwrap_or(default),
            min,
            max,
        )
    };
    let max_message_bytes = bytes(
        "max_message_bytes",
        w.max_message_bytes,
        1 << 20,
        1024,
        64 << 20,
    );
    let max_frame_bytes = bytes(
        "max_frame_bytes",
        w.max_frame_bytes,
        1 << 20,
        1024,
        64 << 20,
    );
    let read_buffer_bytes = bytes("read_buffer_bytes", w.read_buffer_bytes, 4096, 512, 1 << 20);
    let write_buffer_bytes = bytes(
        "write_buffer_bytes",
        w.write_buffer_bytes,
        64 << 10,
        0,
        16 << 20,
    );
    let max_write_buffer_bytes = bytes(
        "max_write_buffer_bytes",
        w.max_write_buffer_bytes,
        4 << 20,
        1,
        256 << 20,
    );
    if max_write_buffer_bytes <= write_buffer_bytes + (16 << 10) {
        issues.push(
            "websocket.max_write_buffer_bytes",
            "must exceed write_buffer_bytes by more than 16 KiB",
        );
    }
    let upgrade_timeout = Duration::from_secs(w.upgrade_timeout_secs.unwrap_or(10));
    if upgrade_timeout.is_zero() {
        issues.push("websocket", DEADLINES_POSITIVE);
    }
    WebSocketConfig {
        max_message_bytes,
        max_frame_bytes,
        read_buffer_bytes,
        write_buffer_bytes,
        max_write_buffer_bytes,
        upgrade_timeout,
        ping_interval: nonzero_secs(w.ping_interval_secs.unwrap_or(20)),
        idle_timeout: w
            .idle_timeout_secs
            .map_or(sessions.idle_timeout, nonzero_secs),
        end_at_token_expiry: w.end_at_token_expiry.unwrap_or(false),
    }
}
