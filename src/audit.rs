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

use crate::session::registry::LiveSession;

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
    fields: Map<String, Value>,
}

impl AuditEvent {
    /// An event named `event`, stamped now.
    pub fn new(event: &'static str) -> Self {
        let mut fields = Map::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        fields.insert("ts".into(), json!(now.as_secs_f64()));
        fields.insert("event".into(), json!(event));
        Self { fields }
    }

    /// An admin action by `by`, for `reason`.
    pub fn admin(event: &'static str, by: &str, reason: &str) -> Self {
        Self::new(event)
            .field("by", Some(by.to_string()))
            .field("reason", Some(reason.to_string()))
    }

    /// Adds a field (skipped when `None`).
    pub fn field(mut self, key: &str, value: Option<impl Into<Value>>) -> Self {
        if let Some(v) = value {
            self.fields.insert(key.into(), v.into());
        }
        self
    }

    /// Adds what identifies a session.
    pub fn session(self, s: &LiveSession) -> Self {
        self.field("session", Some(s.id.clone()))
            .field("console", Some(s.console.as_str()))
            .field("instance", Some(s.instance.clone()))
            .field("jti", Some(s.jti.clone()))
            .field("client", Some(s.client.to_string()))
            .field("target", Some(s.target.clone()))
    }

    /// Sends it to the sink.
    pub fn emit(self) {
        let line = Value::Object(self.fields).to_string();
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
pub fn session_started(s: &LiveSession) {
    AuditEvent::new("session_started").session(s).emit();
}

/// A session ended, for `reason`, after `secs`.
pub fn session_ended(s: &LiveSession, reason: &'static str, secs: f64) {
    let bytes = &s.bytes;
    let mut e = AuditEvent::new("session_ended")
        .session(s)
        .field("outcome", Some(reason))
        .field("secs", Some(secs))
        .field(
            "bytes_up",
            Some(bytes.up.load(std::sync::atomic::Ordering::Relaxed)),
        )
        .field(
            "bytes_down",
            Some(bytes.down.load(std::sync::atomic::Ordering::Relaxed)),
        );
    if let Some(t) = s.terminated.get() {
        e = e
            .field("terminated_by", Some(t.by.clone()))
            .field("reason", Some(t.reason.clone()));
    }
    e.emit();
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
