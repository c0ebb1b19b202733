//! The live sessions: who is connected to which console, since when, how
//! many bytes each way, and a handle to end them.
//!
//! One entry per console session: a browser console, a native VNC
//! connection, or a SPICE session with all its channels (the channels find
//! their session by its ticket and end with it). Each entry owns a child of
//! the shutdown token: cancelling it ends that session only, and the entry
//! remembers who ended it and why, so the session can say so (WebSocket close
//! 4003 with the reason, which the console page shows).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::console::ConsoleType;
use crate::hypervisor::ConsoleTarget;

/// Bytes moved, updated as they move, and when they last moved (the
/// session's idle clock: every connection of a session shares it).
#[derive(Debug)]
pub struct ByteCounters {
    /// Client to hypervisor.
    pub up: AtomicU64,
    /// Hypervisor to client.
    pub down: AtomicU64,
    origin: tokio::time::Instant,
    /// Milliseconds after `origin` of the last byte either way.
    last_active: AtomicU64,
}

impl Default for ByteCounters {
    fn default() -> Self {
        Self {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            origin: tokio::time::Instant::now(),
            last_active: AtomicU64::new(0),
        }
    }
}

impl ByteCounters {
    /// Notes that bytes moved now.
    pub fn touch(&self) {
        self.last_active
            .store(self.origin.elapsed().as_millis() as u64, Relaxed);
    }

    /// Returns once no byte was [touched](Self::touch) for `limit`; never,
    /// without a limit. Exact: the WebSocket relay touches per message.
    pub async fn silent_for(&self, limit: Option<std::time::Duration>) {
        silence(self.origin, &self.last_active, limit).await;
    }

    /// Returns once the byte counts stood still over a whole `limit` (so
    /// after between one and two `limit`s of silence); never, without a
    /// limit. Costs nothing per byte moved: the splice's idle clock.
    pub async fn unchanged_for(&self, limit: Option<std::time::Duration>) {
        let Some(limit) = limit else {
            return std::future::pending().await;
        };
        let mut seen = (u64::MAX, u64::MAX);
        loop {
            tokio::time::sleep(limit).await;
            let now = (self.up.load(Relaxed), self.down.load(Relaxed));
            if now == seen {
                return;
            }
            seen = now;
        }
    }
}

/// Returns once `limit` has passed since the instant `stamp` records (in
/// milliseconds after `origin`); never, if there is no limit.
async fn silence(
    origin: tokio::time::Instant,
    stamp: &AtomicU64,
    limit: Option<std::time::Duration>,
) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let deadline = origin + std::time::Duration::from_millis(stamp.load(Relaxed)) + limit;
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// The shared store did not answer (a page asking whether it is watched is
/// told nothing rather than "no").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUnanswered;

/// Who ended a session, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Termination {
    /// The admin caller (from the audit: `admin`, or the CLI's name).
    pub by: String,
    /// The reason given.
    pub reason: String,
}

/// Who ended a session that a newer connection with its token took over
/// (its [`Termination`]'s `by`): carried by terminate commands between
/// nodes, so a session taken over from another node closes the same way.
pub const TAKEOVER: &str = "takeover";

/// One live session.
#[derive(Debug)]
pub struct LiveSession {
    /// Its id: in logs, the audit trail and the admin API.
    pub id: String,
    /// Console type.
    pub console: ConsoleType,
    /// Instance (VM) id.
    pub instance: String,
    /// The token's id (never the token).
    pub jti: String,
    /// The user its token was issued to (the token's `user`).
    pub user: Option<String>,
    /// The client's address.
    pub client: IpAddr,
    /// The hypervisor target.
    pub target: String,
    /// Unix time it started.
    pub started_at: u64,
    /// Bytes moved so far.
    pub bytes: Arc<ByteCounters>,
    /// Ends this session only (terminate; a child of shutdown).
    pub cancel: CancellationToken,
    /// Cancelled when the session has ended: the connections that joined it
    /// (SPICE channels) end with it.
    pub ended: CancellationToken,
    /// When the session reaches its maximum age, if it has one (its joined
    /// connections share it).
    pub ends_at: OnceLock<Option<tokio::time::Instant>>,
    /// Set when an operator ended it.
    pub terminated: OnceLock<Termination>,
    /// Joins further connections to it (a SPICE ticket's id).
    pub key: Option<String>,
    /// Its client may watch, not act (Porthole drops its input).
    pub view_only: bool,
    /// The session it shadows, if it is a shadow.
    pub shadow_of: Option<String>,
    /// It is recorded: its page says so.
    pub recorded: bool,
    /// How many shadows watch it now (kept by the node that runs it).
    pub watchers: std::sync::atomic::AtomicU32,
    /// What the hypervisor sends this session, for shadows on this node to
    /// watch (a serial console serves one client: its shadows cannot
    /// connect themselves). Serial sessions that are not shadows only.
    pub fan_out: Option<tokio::sync::broadcast::Sender<bytes::Bytes>>,
    /// A SPICE session's recording, which its channels record into (each
    /// with its own tag); taken when its main channel ends, so that the
    /// file is finished with the session.
    pub recording: std::sync::Mutex<Option<crate::recording::Recorder>>,
}

/// How many chunks of a serial console's output a shadow may fall behind
/// before it is cut: the owner never waits for a shadow.
pub const FAN_OUT_CHUNKS: usize = 256;

/// What the admin API shows of a session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// Session id.
    pub id: String,
    /// Console type.
    pub console: &'static str,
    /// Instance id.
    pub instance: String,
    /// Token id.
    pub jti: String,
    /// The user its token was issued to, when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Client address.
    pub client: IpAddr,
    /// Hypervisor target.
    pub target: String,
    /// Unix start time.
    pub started_at: u64,
    /// Bytes client to hypervisor.
    pub bytes_up: u64,
    /// Bytes hypervisor to client.
    pub bytes_down: u64,
    /// `active`, or `terminating` once an operator ended it.
    pub state: &'static str,
    /// The node that holds it.
    pub node: String,
    /// Its client may watch, not act.
    pub view_only: bool,
    /// The session it shadows, if it is a shadow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_of: Option<String>,
    /// Its shadows' session ids.
    pub shadows: Vec<String>,
}

impl SessionView {
    /// What identifies it in the audit trail.
    pub fn record(&self) -> crate::audit::SessionRecord<'_> {
        crate::audit::SessionRecord {
            id: &self.id,
            console: self.console,
            instance: &self.instance,
            jti: &self.jti,
            user: self.user.as_deref(),
            client: self.client,
            target: &self.target,
            view_only: self.view_only,
        }
    }
}

impl LiveSession {
    /// What identifies it in the audit trail.
    pub fn record(&self) -> crate::audit::SessionRecord<'_> {
        crate::audit::SessionRecord {
            id: &self.id,
            console: self.console.as_str(),
            instance: &self.instance,
            jti: &self.jti,
            user: self.user.as_deref(),
            client: self.client,
            target: &self.target,
            view_only: self.view_only,
        }
    }

    /// A snapshot for the admin API.
    pub fn view(&self) -> SessionView {
        SessionView {
            id: self.id.clone(),
            console: self.console.as_str(),
            instance: self.instance.clone(),
            jti: self.jti.clone(),
            user: self.user.clone(),
            client: self.client,
            target: self.target.clone(),
            started_at: self.started_at,
            bytes_up: self.bytes.up.load(Relaxed),
            bytes_down: self.bytes.down.load(Relaxed),
            state: if self.terminated.get().is_some() {
                "terminating"
            } else {
                "active"
            },
            node: crate::node::name().to_string(),
            view_only: self.view_only,
            shadow_of: self.shadow_of.clone(),
            shadows: Vec::new(),
        }
    }
}

/// Which sessions an admin call means.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// One session.
    pub id: Option<String>,
    /// Every session of an instance.
    pub instance: Option<String>,
    /// Every session of a token.
    pub jti: Option<String>,
    /// Every session of a user (the tokens' `user`).
    pub user: Option<String>,
    /// Every session of a console type.
    #[serde(rename = "type")]
    pub console: Option<String>,
    /// Every session from a client address.
    pub client: Option<IpAddr>,
    /// Every session on one console: its `host:port` (a session's `target`
    /// without its TLS port, [`ConsoleTarget::address`]). The shared store
    /// keeps an index by it, so asking who else is on a console reads those
    /// sessions alone, not the whole cluster's.
    ///
    /// [`ConsoleTarget::address`]: crate::hypervisor::ConsoleTarget::address
    pub target: Option<String>,
}

impl Selector {
    /// Whether it names anything at all (a kill must).
    pub fn is_empty(&self) -> bool {
        self.id.is_none()
            && self.instance.is_none()
            && self.jti.is_none()
            && self.user.is_none()
            && self.console.is_none()
            && self.client.is_none()
            && self.target.is_none()
    }

    /// Whether it names `s` (every registry filters with this).
    pub(crate) fn matches(&self, s: &LiveSession) -> bool {
        self.id.as_ref().is_none_or(|v| *v == s.id)
            && self.instance.as_ref().is_none_or(|v| *v == s.instance)
            && self.jti.as_ref().is_none_or(|v| *v == s.jti)
            && self
                .user
                .as_ref()
                .is_none_or(|v| s.user.as_ref() == Some(v))
            && self
                .console
                .as_ref()
                .is_none_or(|v| v == s.console.as_str())
            && self.client.is_none_or(|v| v == s.client)
            && self
                .target
                .as_ref()
                .is_none_or(|v| v == ConsoleTarget::address_in(&s.target))
    }
}

/// What a new session tells the registry.
#[derive(Debug)]
pub struct NewSession {
    /// Console type.
    pub console: ConsoleType,
    /// Instance id.
    pub instance: String,
    /// Token id.
    pub jti: String,
    /// The user its token was issued to (the token's `user`).
    pub user: Option<String>,
    /// Client address.
    pub client: IpAddr,
    /// Hypervisor target.
    pub target: String,
    /// Joins further connections to it.
    pub key: Option<String>,
    /// Its client may watch, not act.
    pub view_only: bool,
    /// The session it shadows, if it is a shadow.
    pub shadow_of: Option<String>,
    /// It is recorded (its backend network's or its token's ask): its page
    /// says so.
    pub recorded: bool,
}

/// Every live session of this process.
#[derive(Debug, Default)]
pub struct Registry {
    maps: Mutex<Maps>,
}

#[derive(Debug, Default)]
struct Maps {
    /// By session id.
    live: HashMap<String, Arc<LiveSession>>,
    /// Session id by join key (a SPICE ticket's id): channel links look
    /// their session up without a scan.
    keys: HashMap<String, String>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // Inserts and removes only: a poisoned map is consistent.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, s: NewSession, cancel: CancellationToken) -> Arc<LiveSession> {
        let id = format!("s-{}", crate::token::signing::random_token(9));
        let live = Arc::new(LiveSession {
            id: id.clone(),
            console: s.console,
            instance: s.instance,
            jti: s.jti,
            user: s.user,
            client: s.client,
            target: s.target,
            started_at: crate::token::unix_now(),
            bytes: Arc::default(),
            cancel,
            ended: CancellationToken::new(),
            ends_at: OnceLock::new(),
            terminated: OnceLock::new(),
            fan_out: (s.console == ConsoleType::Serial && s.shadow_of.is_none())
                .then(|| tokio::sync::broadcast::channel(FAN_OUT_CHUNKS).0),
            key: s.key,
            view_only: s.view_only,
            shadow_of: s.shadow_of,
            recorded: s.recorded,
            watchers: Default::default(),
            recording: Default::default(),
        });
        let mut maps = self.lock();
        if let Some(key) = &live.key {
            maps.keys.insert(key.clone(), id.clone());
        }
        maps.live.insert(id, live.clone());
        crate::metrics::sessions_active(live.console.as_str(), 1);
        live
    }

    fn remove(&self, live: &LiveSession) {
        let mut maps = self.lock();
        if maps.live.remove(&live.id).is_some() {
            if let Some(key) = &live.key {
                maps.keys.remove(key);
            }
            crate::metrics::sessions_active(live.console.as_str(), -1);
        }
    }

    /// The session `id`, if it runs on this node.
    pub fn by_id(&self, id: &str) -> Option<Arc<LiveSession>> {
        self.lock().live.get(id).cloned()
    }

    /// How many shadows watch this node's sessions of token `jti`; `None`
    /// when none of them runs here.
    pub fn watchers_of(&self, jti: &str) -> Option<u32> {
        watchers_of_sessions(&self.by_jti(jti))
    }

    /// What this node's serial session `id` reads, for a shadow here.
    pub fn output_of(&self, id: &str) -> Option<tokio::sync::broadcast::Receiver<bytes::Bytes>> {
        self.by_id(id)?.fan_out.as_ref().map(|tx| tx.subscribe())
    }

    /// This node's sessions of token `jti`.
    pub fn by_jti(&self, jti: &str) -> Vec<Arc<LiveSession>> {
        self.lock()
            .live
            .values()
            .filter(|s| s.jti == jti)
            .cloned()
            .collect()
    }

    /// Counts a shadow starting (`+1`) or ending (`-1`) on session `id`,
    /// if it runs here; whether it does.
    pub fn watched(&self, id: &str, delta: i32) -> bool {
        match self.by_id(id) {
            Some(live) => {
                if delta >= 0 {
                    live.watchers.fetch_add(delta.unsigned_abs(), Relaxed);
                } else {
                    let _ = live.watchers.fetch_update(Relaxed, Relaxed, |n| {
                        Some(n.saturating_sub(delta.unsigned_abs()))
                    });
                }
                true
            }
            None => false,
        }
    }

    /// The session that further connections with `key` join.
    pub fn by_key(&self, key: &str) -> Option<Arc<LiveSession>> {
        let maps = self.lock();
        maps.keys.get(key).and_then(|id| maps.live.get(id)).cloned()
    }

    /// Snapshots of the sessions `sel` names (all, for an empty selector).
    pub fn list(&self, sel: &Selector) -> Vec<SessionView> {
        let mut v: Vec<_> = self
            .lock()
            .live
            .values()
            .filter(|s| sel.matches(s))
            .map(|s| s.view())
            .collect();
        v.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Ends the sessions `sel` names; returns them as they were.
    pub fn terminate(&self, sel: &Selector, by: &str, reason: &str) -> Vec<Arc<LiveSession>> {
        let hit: Vec<_> = self
            .lock()
            .live
            .values()
            .filter(|s| sel.matches(s))
            .cloned()
            .collect();
        for s in &hit {
            let _ = s.terminated.set(Termination {
                by: by.to_string(),
                reason: reason.to_string(),
            });
            // Out of the list (and unjoinable) at once: an operator who
            // ended it, or its client that sees it close, never finds it
            // still listed while its task winds down; that task's own
            // deregister is then a no-op.
            self.remove(s);
            s.cancel.cancel();
        }
        hit
    }

    /// Every live session.
    pub fn live(&self) -> Vec<Arc<LiveSession>> {
        self.lock().live.values().cloned().collect()
    }

    /// Sessions live now.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// Whether none is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The live sessions as the session layer uses them. Async, so that a
/// networked registry (every node's sessions in one list, terminate reaching
/// any node) can implement it; an entry is removed by an explicit
/// [`SessionRegistry::deregister`] at the session's end, not on drop.
pub trait SessionRegistry: Send + Sync + std::fmt::Debug {
    /// Adds a session ended by `cancel` (a child of the shutdown token).
    fn register(&self, s: NewSession, cancel: CancellationToken)
    -> BoxFuture<'_, Arc<LiveSession>>;

    /// Removes the session `id` (it ended).
    fn deregister<'a>(&'a self, live: &'a LiveSession) -> BoxFuture<'a, ()>;

    /// The session that further connections with `key` join.
    fn by_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Arc<LiveSession>>>;

    /// The session `id`, on whichever node: one that runs elsewhere is a
    /// handle whose `ended` fires when it ends there (a shadow's parent).
    fn by_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Arc<LiveSession>>>;

    /// Counts shadow session `shadow` starting (`delta` 1) or ending (-1)
    /// on session `id`, on whichever node runs it.
    fn watched<'a>(&'a self, id: &'a str, shadow: &'a str, delta: i32) -> BoxFuture<'a, ()>;

    /// How many shadows watch the sessions of token `jti`: `None` when no
    /// session of it runs (that any node knows of); `Err` when the shared
    /// store could not say.
    fn watchers_of<'a>(
        &'a self,
        jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<u32>, StoreUnanswered>>;

    /// What a page of token `jti` is told: how many shadows watch its
    /// sessions, and whether one of them is recorded, in one read of the
    /// store; `None` when no session of it runs (that any node knows of);
    /// `Err` when the shared store could not say and none runs here.
    fn told_of<'a>(
        &'a self,
        jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<Oversight>, StoreUnanswered>>;

    /// What serial session `id` reads from its console, from now on, for a
    /// shadow, wherever the session runs; `None` if it fans nothing out.
    fn output_of<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Option<tokio::sync::broadcast::Receiver<bytes::Bytes>>>;

    /// Snapshots of the sessions `sel` names (all, for an empty selector).
    fn list<'a>(&'a self, sel: &'a Selector) -> BoxFuture<'a, Vec<SessionView>>;

    /// Ends the sessions `sel` names; returns them as they were.
    fn terminate<'a>(
        &'a self,
        sel: &'a Selector,
        by: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Vec<Arc<LiveSession>>>;

    /// Says who is about to end `sessions` and why, before their tokens
    /// are revoked: a node that sees a revocation before it is told to end
    /// the session (its renewal reads revocations) ends it as `by`'s, not
    /// as a bare revocation. One registry alone reads no revocations.
    fn ending<'a>(
        &'a self,
        _sessions: &'a [SessionView],
        _by: &'a str,
        _reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Takes back what [`ending`](Self::ending) said of `sessions`: their
    /// end did not come (the revocation failed), and a later revocation of
    /// theirs must not be credited to that operator.
    fn not_ending<'a>(&'a self, _sessions: &'a [SessionView]) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
}

impl SessionRegistry for Registry {
    fn register(
        &self,
        s: NewSession,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Arc<LiveSession>> {
        Box::pin(std::future::ready(self.insert(s, cancel)))
    }

    fn deregister<'a>(&'a self, live: &'a LiveSession) -> BoxFuture<'a, ()> {
        self.remove(live);
        Box::pin(std::future::ready(()))
    }

    fn by_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Arc<LiveSession>>> {
        Box::pin(std::future::ready(Registry::by_key(self, key)))
    }

    fn by_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Arc<LiveSession>>> {
        Box::pin(std::future::ready(Registry::by_id(self, id)))
    }

    fn watched<'a>(&'a self, id: &'a str, _shadow: &'a str, delta: i32) -> BoxFuture<'a, ()> {
        Registry::watched(self, id, delta);
        Box::pin(std::future::ready(()))
    }

    fn watchers_of<'a>(
        &'a self,
        jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<u32>, StoreUnanswered>> {
        Box::pin(std::future::ready(Ok(Registry::watchers_of(self, jti))))
    }

    fn told_of<'a>(
        &'a self,
        jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<Oversight>, StoreUnanswered>> {
        Box::pin(std::future::ready(Ok(oversight_of_sessions(
            &self.by_jti(jti),
        ))))
    }

    fn output_of<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Option<tokio::sync::broadcast::Receiver<bytes::Bytes>>> {
        Box::pin(std::future::ready(Registry::output_of(self, id)))
    }

    fn list<'a>(&'a self, sel: &'a Selector) -> BoxFuture<'a, Vec<SessionView>> {
        Box::pin(std::future::ready(Registry::list(self, sel)))
    }

    fn terminate<'a>(
        &'a self,
        sel: &'a Selector,
        by: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Vec<Arc<LiveSession>>> {
        Box::pin(std::future::ready(Registry::terminate(
            self, sel, by, reason,
        )))
    }
}

/// How many shadows watch `sessions` (a token's); `None` when there are none.
pub fn watchers_of_sessions(sessions: &[Arc<LiveSession>]) -> Option<u32> {
    (!sessions.is_empty()).then(|| sessions.iter().map(|s| s.watchers.load(Relaxed)).sum())
}

/// What a page is told of a token's sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Oversight {
    /// Shadows watching them.
    pub watchers: u32,
    /// One of them is recorded.
    pub recorded: bool,
}

/// [`Oversight`] of `sessions` (a token's); `None` when there are none.
pub fn oversight_of_sessions(sessions: &[Arc<LiveSession>]) -> Option<Oversight> {
    Some(Oversight {
        watchers: watchers_of_sessions(sessions)?,
        recorded: sessions.iter().any(|s| s.recorded),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(instance: &str, jti: &str) -> NewSession {
        NewSession {
            console: ConsoleType::Novnc,
            instance: instance.into(),
            jti: jti.into(),
            user: None,
            client: "127.0.0.1".parse().unwrap(),
            target: "127.0.0.1:5900".into(),
            key: None,
            view_only: false,
            shadow_of: None,
            recorded: false,
        }
    }

    #[test]
    fn sessions_are_listed_filtered_and_terminated_one_by_one() {
        let r = Registry::default();
        let shutdown = CancellationToken::new();
        let register = |s| r.insert(s, shutdown.child_token());
        let a = register(new("vm-1", "j1"));
        let b = register(new("vm-2", "j2"));
        assert_eq!(r.list(&Selector::default()).len(), 2);
        let by_instance = Selector {
            instance: Some("vm-2".into()),
            ..Selector::default()
        };
        assert_eq!(r.list(&by_instance)[0].id, b.id);
        let ended = r.terminate(&by_instance, "admin", "leaked link");
        assert_eq!(ended.len(), 1);
        assert!(b.cancel.is_cancelled());
        assert!(!a.cancel.is_cancelled(), "other sessions are untouched");
        assert_eq!(b.view().state, "terminating");
        assert_eq!(b.terminated.get().unwrap().reason, "leaked link");
        r.remove(&b);
        assert_eq!(r.len(), 1);
        // Shutdown reaches every session through its parent.
        shutdown.cancel();
        assert!(a.cancel.is_cancelled());
    }
}
