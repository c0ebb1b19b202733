//! The audit trail: one JSON object per line for every session start, every
//! refusal and every session end, and for every admin action (who ended or
//! revoked what, and why). Session events carry the session id that the log
//! lines of that session carry too (`session=s-...`).
//!
//! Events go to `[audit] path` (appended; a writer thread behind a bounded
//! queue), or, without a path, to the log (target `porthole::audit`; with
//! `--log-format json` they are JSON lines as well).
//!
//! A failing or slow sink never holds up or refuses a session: an event that
//! cannot be queued or written is dropped and counted
//! (`porthole_audit_events_dropped_total`), and the failure is logged at most
//! once a minute. Refusal events share the refusal log's rate limit under a
//! flood (the refusal counters still count every one).

use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// What identifies a session in the trail; the session layer fills it in
/// (the trail knows nothing of sessions beyond these fields).
#[derive(Debug, Clone, Copy)]
pub struct SessionRecord<'a> {
    /// Session id (the one its log lines carry).
    pub id: &'a str,
    /// Console type label.
    pub console: &'static str,
    /// Instance (VM) id.
    pub instance: &'a str,
    /// Token id (never the token).
    pub jti: &'a str,
    /// The user the token was issued to, when it names one.
    pub user: Option<&'a str>,
    /// Client address.
    pub client: std::net::IpAddr,
    /// Hypervisor target.
    pub target: &'a str,
    /// Its client may watch, not act.
    pub view_only: bool,
}

/// How a session ended, for its `session_ended` event.
#[derive(Debug, Clone, Copy)]
pub struct SessionOutcome<'a> {
    /// Why it ended (a stable label).
    pub outcome: &'static str,
    /// How long it ran.
    pub secs: f64,
    /// Bytes client to hypervisor.
    pub bytes_up: u64,
    /// Bytes hypervisor to client.
    pub bytes_down: u64,
    /// Who ended it and why, when an operator did.
    pub terminated: Option<(&'a str, &'a str)>,
}

/// Events queued for the writer at most; past it they are dropped and counted.
const QUEUE: usize = 10_000;

static SINK: OnceLock<Sink> = OnceLock::new();

#[derive(Debug)]
enum Sink {
    File(SyncSender<String>),
}

/// One audit event.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// `None` when nothing would take the event: it is not built.
    fields: Option<Map<String, Value>>,
}

/// Whether an event would go anywhere: a file, or the log at the level
/// its filter lets through. (Building one that is then dropped cost about
/// 4 µs of each session's open, measured under the load tool.)
fn consumed() -> bool {
    SINK.get().is_some() || tracing::enabled!(target: "porthole::audit", tracing::Level::INFO)
}

impl AuditEvent {
    /// An event named `event`, stamped now.
    pub fn new(event: &'static str) -> Self {
        if !consumed() {
            return Self { fields: None };
        }
        let mut fields = Map::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        fields.insert("ts".into(), json!(now.as_secs_f64()));
        fields.insert("event".into(), json!(event));
        fields.insert("node".into(), json!(crate::node::name()));
        Self {
            fields: Some(fields),
        }
    }

    /// An admin action by `by`, for `reason`.
    pub fn admin(event: &'static str, by: &str, reason: &str) -> Self {
        Self::new(event)
            .field("by", Some(by.to_string()))
            .field("reason", Some(reason.to_string()))
    }

    /// Adds a field (skipped when `None`).
    pub fn field(mut self, key: &str, value: Option<impl Into<Value>>) -> Self {
        if let (Some(fields), Some(v)) = (&mut self.fields, value) {
            fields.insert(key.into(), v.into());
        }
        self
    }

    /// Adds what identifies a session.
    pub fn session(self, s: &SessionRecord<'_>) -> Self {
        self.field("session", Some(s.id))
            .field("console", Some(s.console))
            .field("instance", Some(s.instance))
            .field("jti", Some(s.jti))
            .field("user", s.user)
            .field("client", Some(s.client.to_string()))
            .field("target", Some(s.target))
            .field("view_only", s.view_only.then_some(true))
    }

    /// Sends it to the sink.
    pub fn emit(self) {
        let Some(fields) = self.fields else {
            return;
        };
        let line = Value::Object(fields).to_string();
        match SINK.get() {
            None => tracing::info!(target: "porthole::audit", "{line}"),
            Some(Sink::File(tx)) => match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => dropped("the audit queue is full"),
                Err(TrySendError::Disconnected(_)) => dropped("the audit writer stopped"),
            },
        }
    }
}

fn dropped(why: &str) {
    crate::metrics::audit_dropped();
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
        *last = Some(Instant::now());
        tracing::error!("audit events are being dropped: {why}");
    }
}

/// Sends audit events to `path` (appended) from now on. Once per process.
pub fn to_file(path: &Path) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let (tx, rx) = sync_channel::<String>(QUEUE);
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || {
            for line in rx {
                let ok = writeln!(file, "{line}").and_then(|()| file.flush());
                if let Err(e) = ok {
                    dropped(&format!("cannot write the audit file: {e}"));
                }
            }
        })?;
    let _ = SINK.set(Sink::File(tx));
    Ok(())
}

/// A session started.
pub fn session_started(s: &SessionRecord<'_>) {
    AuditEvent::new("session_started").session(s).emit();
}

/// A session ended: the event, stamped now, for its caller to emit.
#[must_use = "the event is stamped now and emitted by the caller"]
pub fn session_ended(s: &SessionRecord<'_>, end: &SessionOutcome<'_>) -> AuditEvent {
    let mut e = AuditEvent::new("session_ended")
        .session(s)
        .field("outcome", Some(end.outcome))
        .field("secs", Some(end.secs))
        .field("bytes_up", Some(end.bytes_up))
        .field("bytes_down", Some(end.bytes_down));
    if let Some((by, reason)) = end.terminated {
        e = e
            .field("terminated_by", Some(by))
            .field("reason", Some(reason));
    }
    e
}

/// A request, token or handshake was refused (rate-limited with the refusal log).
pub fn refused(
    what: &'static str,
    reason: &'static str,
    jti: Option<&str>,
    client: Option<std::net::IpAddr>,
) {
    AuditEvent::new("refused")
        .field("what", Some(what))
        .field("outcome", Some(reason))
        .field("jti", jti.map(str::to_string))
        .field("client", client.map(|c| c.to_string()))
        .emit();
}

/// Refusal log lines (and refusal audit events) allowed per second; past it
/// they are suppressed and summed up once the flood eases. Counters count all.
const REFUSAL_LINES_PER_SEC: u32 = 20;

/// Whether this refusal may be logged (and audited) now.
pub fn refusal_log_allowed() -> bool {
    struct Window {
        start: Option<Instant>,
        used: u32,
        suppressed: u64,
    }
    static WINDOW: std::sync::Mutex<Window> = std::sync::Mutex::new(Window {
        start: None,
        used: 0,
        suppressed: 0,
    });
    let mut w = WINDOW.lock().unwrap_or_else(|p| p.into_inner());
    if w.start
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    {
        if w.suppressed > 0 {
            tracing::warn!(
                suppressed = w.suppressed,
                "refusal log lines suppressed under a flood (counters have them all)"
            );
        }
        *w = Window {
            start: Some(Instant::now()),
            used: 0,
            suppressed: 0,
        };
    }
    if w.used < REFUSAL_LINES_PER_SEC {
        w.used += 1;
        true
    } else {
        w.suppressed += 1;
        false
    }
}
