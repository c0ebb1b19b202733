//! The session registry of every node, in Redis: `GET /v1/sessions` on any
//! node lists every node's sessions, and terminate on any node ends them
//! wherever they run.
//!
//! Each node keeps its own sessions in the in-memory [`Registry`] (they hold
//! the cancellation tokens) and publishes them: `<prefix>session:<id>` (a
//! hash: node, console, instance, jti, client, target, start, bytes), the set
//! `<prefix>sessions`, and `<prefix>session-key:<key>` for a SPICE session's
//! join key, all on the node's lease (written again whole, with its bytes,
//! every `store.renew_secs`, so what Redis lost is back within one renewal;
//! a dead node's entries expire, and the list drops them as it meets them). Two channels carry what must reach a session's node:
//! `<prefix>commands` (terminate; a shadow on another node started or ended)
//! and `<prefix>events` (a session ended, so the channels that joined it on
//! other nodes end too).
//!
//! A session's node counts the shadows other nodes run on it by their
//! session ids, not by messages alone: a shadow's node says again at each
//! renewal which shadows it runs, and the session's node drops a shadow
//! whose entry is gone from the store (its node died, or its end was never
//! heard), so the count and a serial session's forwarding to the store heal
//! within a lease.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Leasing, Redis};
use crate::console::ConsoleType;
use crate::hypervisor::ConsoleTarget;
use crate::session::registry::{
    LiveSession, NewSession, Oversight, Registry, Selector, SessionRegistry, SessionView,
    StoreUnanswered, Termination,
};

/// What travels on the command and event channels.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Message {
    /// End these sessions (whichever node runs them).
    Terminate {
        ids: Vec<String>,
        by: String,
        reason: String,
    },
    /// This session ended.
    Ended { id: String },
    /// Shadow session `shadow` of session `id` started (1) or ended (-1) on
    /// another node. Nodes before the shadow's id was sent leave it out:
    /// theirs are counted as a plain sum, as they were.
    Watched {
        id: String,
        #[serde(default)]
        shadow: String,
        delta: i32,
    },
    /// Shadow session `shadow` of session `id` still runs on another node
    /// (said at each renewal of its node). Its own message, not a repeated
    /// `Watched`: a node that predates it ignores it, where it would count
    /// every repetition as one more shadow.
    Watching { id: String, shadow: String },
}

/// Who is ending a session and why (`ending:<id>`), written before its
/// token is revoked: the renewal that sees the revocation before the
/// `Terminate` arrives ends it in their name.
#[derive(Debug, Serialize, Deserialize)]
struct Ending {
    by: String,
    reason: String,
}

/// Every node's sessions.
#[derive(Debug)]
pub struct RedisRegistry {
    /// Shared with writes in the background ([`RedisRegistry::publish_again`]).
    local: Arc<Registry>,
    redis: Arc<Redis>,
    node: String,
    lease: Duration,
    /// Sessions of other nodes that connections here joined (SPICE channels
    /// on another node than their main channel), by id.
    remote: Mutex<HashMap<String, Arc<LiveSession>>>,
    /// This node's sessions watched by shadows on other nodes, by session
    /// id. A serial one's output goes to the store while any do.
    watched_from_afar: Arc<Mutex<HashMap<String, AfarWatchers>>>,
}

/// The shadows other nodes run on one of this node's sessions.
#[derive(Debug, Default)]
struct AfarWatchers {
    /// Their session ids.
    shadows: HashSet<String>,
    /// Shadows of nodes that do not say their id (an older version, during
    /// a rolling upgrade): a count, never forgotten by the renewal.
    unnamed: u32,
    /// Stops the forwarder of a serial session's output to the store.
    forwarding: Option<CancellationToken>,
}

impl RedisRegistry {
    /// The registry of node `node`, publishing into `leasing`'s Redis on its
    /// leases; listens to the command and event channels until its `stop`.
    pub fn new(leasing: Leasing, node: String) -> Arc<Self> {
        let stop = leasing.stop.clone();
        let registry = leasing.start(|redis, lease| Self {
            local: Arc::default(),
            redis,
            node,
            lease,
            remote: Mutex::default(),
            watched_from_afar: Arc::default(),
        });
        tokio::spawn(registry.clone().listen(stop));
        registry
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveSession>>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Another node's session `id`, kept here while something on this
    /// node follows it: its `ended` fires on that node's `Ended` event.
    async fn remote_by_id(&self, id: &str) -> Option<Arc<LiveSession>> {
        if let Some(live) = self.remote().get(id) {
            return Some(live.clone());
        }
        let mut hgetall = redis::cmd("HGETALL");
        hgetall.arg(self.redis.key(&["session", id]));
        let h: HashMap<String, String> = self.redis.cmd(hgetall).await.ok()?;
        let live = Arc::new(remote_session(id, &h)?);
        self.remote().insert(id.to_string(), live.clone());
        // Its `Ended` may have gone by between the read and the insert.
        let mut exists = redis::cmd("EXISTS");
        exists.arg(self.redis.key(&["session", id]));
        if matches!(self.redis.cmd::<bool>(exists).await, Ok(false)) {
            self.remote().remove(id);
            return None;
        }
        Some(live)
    }

    fn channel(&self, name: &str) -> String {
        self.redis.key(&[name])
    }

    async fn publish(&self, channel: &str, message: &Message) {
        let Ok(payload) = serde_json::to_string(message) else {
            return;
        };
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.channel(channel)).arg(payload);
        if let Err(e) = self.redis.cmd::<i64>(cmd).await {
            tracing::warn!("cannot tell the other nodes ({channel}): {e}");
        }
    }

    /// Follows the command and event channels (the subscription reconnects
    /// by itself; until it is up, commands from other nodes wait).
    async fn listen(self: Arc<Self>, stop: CancellationToken) {
        let channels = [self.channel("commands"), self.channel("events")];
        self.redis
            .follow(&channels, stop, |payload| self.on_message(payload))
            .await;
    }

    fn on_message(&self, payload: &[u8]) {
        match serde_json::from_slice::<Message>(payload) {
            Ok(Message::Terminate { ids, by, reason }) => {
                for id in ids {
                    let sel = Selector {
                        id: Some(id),
                        ..Selector::default()
                    };
                    // `by` says who: an operator, or a takeover by a newer connection.
                    for live in self.local.terminate(&sel, &by, &reason) {
                        tracing::info!(session = %live.id, by, reason, "session terminated from another node");
                    }
                }
            }
            Ok(Message::Watched { id, shadow, delta }) => {
                self.watched_from_afar(&id, &shadow, delta > 0);
            }
            Ok(Message::Watching { id, shadow }) => {
                self.watched_from_afar(&id, &shadow, true);
            }
            Ok(Message::Ended { id }) => {
                if let Some(live) = self.remote().remove(&id) {
                    live.cancel.cancel();
                    live.ended.cancel();
                }
            }
            Err(e) => tracing::debug!("ignored a message on the store's channels: {e}"),
        }
    }

    /// The writes that make `live` whole in Redis, on a fresh lease.
    fn publish_into(&self, pipe: &mut redis::Pipeline, live: &LiveSession) {
        let key = self.redis.key(&["session", &live.id]);
        let lease = self.lease.as_millis() as i64;
        let (up, down) = (live.bytes.up.load(Relaxed), live.bytes.down.load(Relaxed));
        pipe.hset_multiple(
            &key,
            &[
                ("node", self.node.as_str()),
                ("console", live.console.as_str()),
                ("instance", &live.instance),
                ("jti", &live.jti),
                ("user", live.user.as_deref().unwrap_or("")),
                ("client", &live.client.to_string()),
                ("target", &live.target),
                ("started_at", &live.started_at.to_string()),
                ("join_key", live.key.as_deref().unwrap_or("")),
                ("bytes_up", &up.to_string()),
                ("bytes_down", &down.to_string()),
                ("view_only", if live.view_only { "1" } else { "0" }),
                ("shadow_of", live.shadow_of.as_deref().unwrap_or("")),
                ("recorded", if live.recorded { "1" } else { "0" }),
                ("watchers", &live.watchers.load(Relaxed).to_string()),
            ],
        )
        .ignore()
        .pexpire(&key, lease)
        .ignore()
        .sadd(self.redis.key(&["sessions"]), &live.id)
        .ignore();
        // Who else is on a console (`list` by target) reads this index, not
        // every session of the cluster. Each publish of a session on it
        // keeps it for a lease; ids whose session is gone are dropped when read.
        let on = on_console(&self.redis, ConsoleTarget::address_in(&live.target));
        pipe.sadd(&on, &live.id)
            .ignore()
            .pexpire(&on, lease)
            .ignore();
        // A page asks by its token whether it is watched (`watchers_of`).
        let of_token = of_token(&self.redis, &live.jti);
        pipe.sadd(&of_token, &live.id)
            .ignore()
            .pexpire(&of_token, lease)
            .ignore();
        if let Some(k) = &live.key {
            pipe.set(self.redis.key(&["session-key", k]), &live.id)
                .ignore()
                .pexpire(self.redis.key(&["session-key", k]), lease)
                .ignore();
        }
    }

    async fn publish_session(&self, live: &LiveSession) {
        let mut pipe = redis::pipe();
        self.publish_into(&mut pipe, live);
        if let Err(e) = self.redis.pipe::<()>(pipe).await {
            // The session runs; the next renewal publishes it.
            tracing::warn!(session = %live.id, "session not published to the other nodes yet: {e}");
        }
    }

    /// Deletes `live`'s entries (not answered: their lease runs out by itself).
    async fn unpublish(&self, live: &LiveSession) {
        unpublish_from(&self.redis, live).await;
    }

    /// Writes this node's session `live` again, whole. A write of a session
    /// that ends meanwhile can reach Redis after its end's deletes (it was
    /// sent after them) and bring it back for a lease, where it would count
    /// as on its console: so once this write is answered, a session gone
    /// from `local` is deleted again. Its end removes it from `local` before
    /// it deletes it, so one of the two deletes comes last.
    async fn publish_again(
        redis: &Redis,
        local: &Registry,
        live: &LiveSession,
        pipe: redis::Pipeline,
    ) {
        let _ = redis.pipe::<()>(pipe).await;
        if local.by_id(&live.id).is_none() {
            unpublish_from(redis, live).await;
        }
    }

    /// How many shadows watch the sessions of token `jti` that other nodes
    /// run (`mine` are this node's): `None` when the store knows none.
    /// The sessions of token `jti` on other nodes than this one (`mine`
    /// are this node's), as the store has them.
    async fn elsewhere(
        &self,
        jti: &str,
        mine: &[Arc<LiveSession>],
    ) -> Result<Vec<Elsewhere>, StoreUnanswered> {
        // The token's sessions, and the one a node of the version before
        // names (one id under `session-jti`; this read can go once no node
        // of that version is left).
        let of_token = of_token(&self.redis, jti);
        let mut pipe = redis::pipe();
        pipe.smembers(&of_token)
            .get(self.redis.key(&["session-jti", jti]));
        let (mut ids, older): (Vec<String>, Option<String>) =
            self.redis.pipe(pipe).await.map_err(|_| StoreUnanswered)?;
        ids.extend(older);
        ids.retain(|id| !mine.iter().any(|s| &s.id == id));
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hmget(self.redis.key(&["session", id]), &["watchers", "recorded"]);
        }
        // Every session hash has `watchers`; `recorded` is absent from an
        // older node's.
        let fields: Vec<(Option<String>, Option<String>)> =
            self.redis.pipe(pipe).await.map_err(|_| StoreUnanswered)?;
        // An id whose session is gone (its node died before it took it
        // out) counts for nothing, and leaves the set: the set lives as
        // long as any session of the token renews it.
        let gone: Vec<&String> = ids
            .iter()
            .zip(&fields)
            .filter(|(_, (w, _))| w.is_none())
            .map(|(id, _)| id)
            .collect();
        if !gone.is_empty() {
            let mut srem = redis::cmd("SREM");
            srem.arg(&of_token).arg(&gone);
            let _ = self.redis.cmd::<i64>(srem).await;
        }
        let live: Vec<Elsewhere> = fields
            .into_iter()
            .filter_map(|(watchers, recorded)| {
                Some(Elsewhere {
                    watchers: watchers?.parse().unwrap_or(0),
                    recorded: recorded.is_some_and(|v| v == "1"),
                })
            })
            .collect();
        Ok(live)
    }

    /// Counts shadow session `shadow` on another node starting or ending
    /// (`starts`) on this node's session `id`, once each way however many
    /// times it is said. The first to start sends what a serial session
    /// reads to the store (`output:<id>`), the last one's end stops it.
    /// Chunks are published in order; when the store is slower than the
    /// console the forwarder lags and skips, the session never waits.
    fn watched_from_afar(&self, id: &str, shadow: &str, starts: bool) {
        let Some(live) = self.local.by_id(id) else {
            // Not (or no longer) a session of this node.
            forget_watchers(&self.watched_from_afar, id);
            return;
        };
        let (changed, forward) = {
            let mut afar = self
                .watched_from_afar
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let entry = afar.entry(id.to_string()).or_default();
            let changed = match (shadow.is_empty(), starts) {
                (false, true) => entry.shadows.insert(shadow.to_string()),
                (false, false) => entry.shadows.remove(shadow),
                (true, true) => {
                    entry.unnamed += 1;
                    true
                }
                (true, false) => match entry.unnamed.checked_sub(1) {
                    Some(n) => {
                        entry.unnamed = n;
                        true
                    }
                    None => false,
                },
            };
            if changed {
                self.local.watched(id, if starts { 1 } else { -1 });
            }
            // One forwarder per watched session, stopped when the last
            // shadow leaves: one that comes back at once never finds two,
            // or none.
            let mut forward = None;
            if entry.shadows.is_empty() && entry.unnamed == 0 {
                if let Some(stop) = entry.forwarding.take() {
                    stop.cancel();
                }
                afar.remove(id);
            } else if entry.forwarding.is_none()
                && let Some(fan_out) = &live.fan_out
            {
                let stop = CancellationToken::new();
                entry.forwarding = Some(stop.clone());
                forward = Some((fan_out.subscribe(), stop));
            }
            (changed, forward)
        };
        if changed {
            self.republish(id);
        }
        let Some((mut rx, stop)) = forward else {
            return;
        };
        let channel = self.redis.key(&["output", id]);
        let (redis, afar, id, ended) = (
            self.redis.clone(),
            self.watched_from_afar.clone(),
            id.to_string(),
            live.ended.clone(),
        );
        tokio::spawn(async move {
            loop {
                let chunk = tokio::select! {
                    _ = ended.cancelled() => break,
                    _ = stop.cancelled() => return,
                    got = rx.recv() => match got {
                        Ok(chunk) => chunk,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                };
                let mut publish = redis::cmd("PUBLISH");
                publish.arg(&channel).arg(&chunk[..]);
                let _ = redis.cmd::<i64>(publish).await;
            }
            // The session ended (its id is never used again): its entry goes.
            forget_watchers(&afar, &id);
        });
    }

    /// Shadows on other nodes counted on this node's sessions whose entry
    /// is gone from the store (their node died, or their end was never
    /// heard): no longer counted.
    async fn forget_departed_watchers(&self) {
        let counted: Vec<(String, String)> = {
            let mut afar = self
                .watched_from_afar
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Sessions that ended here take their entries with them.
            afar.retain(|id, w| {
                let runs = self.local.by_id(id).is_some();
                if let (false, Some(stop)) = (runs, &w.forwarding) {
                    stop.cancel();
                }
                runs
            });
            afar.iter()
                .flat_map(|(id, w)| w.shadows.iter().map(|s| (id.clone(), s.clone())))
                .collect()
        };
        if counted.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (_, shadow) in &counted {
            pipe.exists(self.redis.key(&["session", shadow]));
        }
        let Ok(exist) = self.redis.pipe::<Vec<bool>>(pipe).await else {
            return;
        };
        for ((id, shadow), _) in counted.iter().zip(exist).filter(|(_, e)| !*e) {
            tracing::info!(session = %id, shadow = %shadow, "a shadow on another node is gone from the store: no longer counted");
            self.watched_from_afar(id, shadow, false);
        }
    }

    /// Says again which shadows this node runs on other nodes' sessions
    /// (their `Watched` may have been lost, or their session's node
    /// forgotten them as gone while the store was away).
    async fn announce_shadows(&self, live: &[Arc<LiveSession>]) {
        for s in live {
            let Some(id) = &s.shadow_of else { continue };
            // Not for a shadow that ended since `live` was read: its end
            // (-1) may be on its way, and this would count it again. (One
            // that ends between this check and the publish can still be
            // counted again: its session's node forgets it once its entry
            // is gone from the store, within a lease or two.)
            if self.local.by_id(id).is_some() || self.local.by_id(&s.id).is_none() {
                continue;
            }
            let message = Message::Watching {
                id: id.clone(),
                shadow: s.id.clone(),
            };
            self.publish("commands", &message).await;
        }
    }

    /// Other nodes' sessions followed here whose entry is gone (their node
    /// died, or their `Ended` message was lost): they ended, and what
    /// follows them here (a shadow, a SPICE channel) ends now.
    async fn forget_ended_remotes(&self) {
        let ids: Vec<String> = self.remote().keys().cloned().collect();
        if ids.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.exists(self.redis.key(&["session", id]));
        }
        let Ok(exist) = self.redis.pipe::<Vec<bool>>(pipe).await else {
            return;
        };
        for (id, _) in ids.iter().zip(exist).filter(|(_, e)| !*e) {
            if let Some(live) = self.remote().remove(id) {
                tracing::info!(session = %id, "another node's session is gone from the store: ended here too");
                live.cancel.cancel();
                live.ended.cancel();
            }
        }
    }

    /// Writes this node's session `id` again (its watchers changed), in
    /// the background: the subscription's callback does not wait.
    fn republish(&self, id: &str) {
        let Some(live) = self.local.by_id(id) else {
            return;
        };
        let mut pipe = redis::pipe();
        self.publish_into(&mut pipe, &live);
        let (redis, local) = (self.redis.clone(), self.local.clone());
        tokio::spawn(async move { Self::publish_again(&redis, &local, &live, pipe).await });
    }

    /// Every node's sessions, as their hashes say.
    async fn all(&self) -> Vec<(String, HashMap<String, String>)> {
        self.members(self.redis.key(&["sessions"])).await
    }

    /// The sessions `sel` can name: those on its target (from their
    /// index) when it has one, else all of them.
    async fn candidates(&self, sel: &Selector) -> Vec<(String, HashMap<String, String>)> {
        match &sel.target {
            Some(target) => self.members(on_console(&self.redis, target)).await,
            None => self.all().await,
        }
    }

    /// The sessions whose ids set `set` holds, with their hashes; ids whose
    /// hash is gone (their node stopped renewing them) leave `set` and the
    /// set of all sessions.
    async fn members(&self, set: String) -> Vec<(String, HashMap<String, String>)> {
        let mut members = redis::cmd("SMEMBERS");
        members.arg(&set);
        let Ok(ids) = self.redis.cmd::<Vec<String>>(members).await else {
            return Vec::new();
        };
        if ids.is_empty() {
            return Vec::new();
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(self.redis.key(&["session", id]));
        }
        let Ok(hashes) = self.redis.pipe::<Vec<HashMap<String, String>>>(pipe).await else {
            return Vec::new();
        };
        let (live, gone): (Vec<_>, Vec<_>) = ids
            .into_iter()
            .zip(hashes)
            .partition(|(_, h)| !h.is_empty());
        if !gone.is_empty() {
            // Their nodes stopped renewing them (died): drop them.
            let mut pipe = redis::pipe();
            let ids: Vec<&String> = gone.iter().map(|(id, _)| id).collect();
            let all = self.redis.key(&["sessions"]);
            if set != all {
                pipe.srem(&set, &ids).ignore();
            }
            pipe.srem(&all, &ids).ignore();
            let _ = self.redis.pipe::<()>(pipe).await;
        }
        live
    }
}

/// A session of another node, as far as a page's questions go.
struct Elsewhere {
    /// Shadows watching it.
    watchers: u32,
    /// It is recorded.
    recorded: bool,
}

/// Drops what counted the remote shadows of session `id` (it ended here),
/// and stops its forwarder.
fn forget_watchers(afar: &Mutex<HashMap<String, AfarWatchers>>, id: &str) {
    let gone = afar.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    if let Some(stop) = gone.and_then(|w| w.forwarding) {
        stop.cancel();
    }
}

/// A session of another node, as its hash describes it.
fn remote_session(id: &str, h: &HashMap<String, String>) -> Option<LiveSession> {
    let console: ConsoleType =
        serde_json::from_value(serde_json::Value::String(h.get("console")?.clone())).ok()?;
    let bytes = Arc::<crate::session::registry::ByteCounters>::default();
    let number = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    bytes.up.store(number("bytes_up"), Relaxed);
    bytes.down.store(number("bytes_down"), Relaxed);
    Some(LiveSession {
        id: id.to_string(),
        console,
        instance: h.get("instance")?.clone(),
        jti: h.get("jti")?.clone(),
        // Absent from an older node's sessions.
        user: h.get("user").filter(|u| !u.is_empty()).cloned(),
        client: h.get("client")?.parse::<IpAddr>().ok()?,
        target: h.get("target")?.clone(),
        started_at: number("started_at"),
        bytes,
        cancel: CancellationToken::new(),
        ended: CancellationToken::new(),
        ends_at: OnceLock::new(),
        terminated: OnceLock::new(),
        key: h.get("join_key").filter(|k| !k.is_empty()).cloned(),
        view_only: h.get("view_only").is_some_and(|v| v == "1"),
        shadow_of: h.get("shadow_of").filter(|k| !k.is_empty()).cloned(),
        // Absent from an older node's sessions: not said to be recorded.
        recorded: h.get("recorded").is_some_and(|v| v == "1"),
        // Another node's output is not fanned out here.
        fan_out: None,
        watchers: number("watchers").try_into().unwrap_or(0).into(),
        // Another node's session records there.
        recording: Default::default(),
    })
}

/// The key of the index of the sessions on the console at `address`
/// (`host:port`, [`ConsoleTarget::address`]).
fn on_console(redis: &Redis, address: &str) -> String {
    redis.key(&["sessions-on", address])
}

/// Deletes `live`'s entries (see [`RedisRegistry::unpublish`]).
async fn unpublish_from(redis: &Redis, live: &LiveSession) {
    let mut pipe = redis::pipe();
    pipe.del(redis.key(&["session", &live.id]))
        .ignore()
        .srem(redis.key(&["sessions"]), &live.id)
        .ignore()
        .srem(
            on_console(redis, ConsoleTarget::address_in(&live.target)),
            &live.id,
        )
        .ignore();
    if let Some(k) = &live.key {
        pipe.del(redis.key(&["session-key", k])).ignore();
    }
    // Its id only: a newer session of the same token (a takeover, on any
    // node) keeps its own place in the index whatever order their writes
    // and deletes reach Redis in.
    pipe.srem(of_token(redis, &live.jti), &live.id).ignore();
    let _ = redis.pipe::<()>(pipe).await;
}

/// The key of the index of the sessions of token `jti`: a set of ids, not
/// one id, so that a session's late write and its delete cannot take the
/// place of a newer session of the same token (a takeover).
fn of_token(redis: &Redis, jti: &str) -> String {
    redis.key(&["sessions-of", jti])
}

impl super::Leases for RedisRegistry {
    /// Publishes this node's sessions again, whole (with their bytes), in
    /// one round trip: an entry Redis lost (restarted empty, failed over,
    /// a first publish that failed) is back within one renewal, and a
    /// lease is renewed by the same writes.
    async fn renew(&self) {
        self.forget_ended_remotes().await;
        self.forget_departed_watchers().await;
        let live = self.local.live();
        if live.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for s in &live {
            self.publish_into(&mut pipe, s);
            // A terminate revokes the token first and then tells the node
            // on the command channel, which keeps nothing: a node that was
            // not subscribed then (a failover, a restart) learns it here.
            // (`keep`: revoked with `keep_sessions`, and nothing since.)
            pipe.get(self.redis.key(&["revoked", "jti", &s.jti]));
        }
        let revoked = match self.redis.pipe::<Vec<Option<String>>>(pipe).await {
            // Per session: its token revoked, its sessions kept.
            Ok(values) => values
                .into_iter()
                .map(|v| (v.is_some(), v.as_deref() == Some("keep")))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!("session lease renewal failed: {e}");
                return;
            }
        };
        self.announce_shadows(&live).await;
        let revoked: Vec<_> = live.iter().zip(revoked).filter(|(_, (r, _))| *r).collect();
        // Mostly an operator's terminate, on its way on the command channel.
        let endings = if revoked.is_empty() {
            Vec::new()
        } else {
            let mut pipe = redis::pipe();
            for (s, _) in &revoked {
                pipe.get(self.redis.key(&["ending", &s.id]));
            }
            self.redis
                .pipe::<Vec<Option<String>>>(pipe)
                .await
                .unwrap_or_default()
        };
        for (i, (s, (_, kept))) in revoked.iter().enumerate() {
            let one = Selector {
                id: Some(s.id.clone()),
                ..Selector::default()
            };
            let ending = endings
                .get(i)
                .and_then(Option::as_deref)
                .and_then(|e| serde_json::from_str::<Ending>(e).ok());
            let (by, reason) = match &ending {
                Some(e) => (e.by.as_str(), e.reason.as_str()),
                // Revoked with `keep_sessions`, and nothing that ends it since.
                None if *kept => continue,
                None => ("revocation", "its token was revoked"),
            };
            if !self.local.terminate(&one, by, reason).is_empty() {
                tracing::info!(session = %s.id, jti = %s.jti, by, reason, "session ended: its token was revoked (seen at renewal)");
            }
        }
        // A session that ended while the renewal was on its way may have
        // been written back after its end deleted it: delete it again.
        let still: std::collections::HashSet<String> = self
            .local
            .live()
            .into_iter()
            .map(|s| s.id.clone())
            .collect();
        for s in live.iter().filter(|s| !still.contains(&s.id)) {
            self.unpublish(s).await;
        }
    }
}

impl SessionRegistry for RedisRegistry {
    fn register(
        &self,
        s: NewSession,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Arc<LiveSession>> {
        Box::pin(async move {
            let live = self.local.register(s, cancel).await;
            self.publish_session(&live).await;
            live
        })
    }

    fn deregister<'a>(&'a self, live: &'a LiveSession) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if self.remote().remove(&live.id).is_some() {
                return;
            }
            self.local.deregister(live).await;
            self.unpublish(live).await;
            self.publish(
                "events",
                &Message::Ended {
                    id: live.id.clone(),
                },
            )
            .await;
        })
    }

    fn by_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Arc<LiveSession>>> {
        Box::pin(async move {
            if let Some(live) = self.local.by_key(key) {
                return Some(live);
            }
            let mut get = redis::cmd("GET");
            get.arg(self.redis.key(&["session-key", key]));
            let id: String = self.redis.cmd::<Option<String>>(get).await.ok()??;
            self.remote_by_id(&id).await
        })
    }

    fn by_id<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Arc<LiveSession>>> {
        Box::pin(async move {
            match self.local.by_id(id) {
                Some(live) => Some(live),
                None => self.remote_by_id(id).await,
            }
        })
    }

    fn watched<'a>(&'a self, id: &'a str, shadow: &'a str, delta: i32) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if self.local.watched(id, delta) {
                if let Some(live) = self.local.by_id(id) {
                    let mut pipe = redis::pipe();
                    self.publish_into(&mut pipe, &live);
                    Self::publish_again(&self.redis, &self.local, &live, pipe).await;
                }
                return;
            }
            let message = Message::Watched {
                id: id.to_string(),
                shadow: shadow.to_string(),
                delta,
            };
            self.publish("commands", &message).await;
        })
    }

    fn output_of<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Option<tokio::sync::broadcast::Receiver<bytes::Bytes>>> {
        Box::pin(async move {
            if let Some(live) = self.local.by_id(id) {
                return live.fan_out.as_ref().map(|tx| tx.subscribe());
            }
            let watched = self.remote_by_id(id).await?;
            if watched.console != crate::console::ConsoleType::Serial {
                return None;
            }
            // Subscribed before the shadow's `Watched` reaches the session's
            // node (its lifecycle sends that), so nothing is missed after.
            let mut from_store = self
                .redis
                .subscribe(&[self.redis.key(&["output", id])])
                .await
                .ok()?;
            let (tx, rx) =
                tokio::sync::broadcast::channel(crate::session::registry::FAN_OUT_CHUNKS);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = watched.ended.cancelled() => return,
                        got = from_store.recv() => match got {
                            Some((_, chunk)) => {
                                let _ = tx.send(bytes::Bytes::from(chunk));
                            }
                            None => return,
                        },
                        // The shadow left: let the subscription go.
                        _ = tick.tick() => if tx.receiver_count() == 0 {
                            return;
                        },
                    }
                }
            });
            Some(rx)
        })
    }

    fn watchers_of<'a>(
        &'a self,
        jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<u32>, StoreUnanswered>> {
        Box::pin(async move { Ok(self.told_of(jti).await?.map(|o| o.watchers)) })
    }

    fn told_of<'a>(
        &'a self,
        jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<Oversight>, StoreUnanswered>> {
        Box::pin(async move {
            // This node's sessions of the token count as they are now; the
            // store adds those of other nodes (a token may run sessions on
            // several). A store that does not answer leaves this node's
            // answer, if it runs any.
            let mine = self.local.by_jti(jti);
            let here = crate::session::registry::oversight_of_sessions(&mine);
            match self.elsewhere(jti, &mine).await {
                Ok(there) if there.is_empty() => Ok(here),
                Ok(there) => {
                    let here = here.unwrap_or_default();
                    Ok(Some(Oversight {
                        watchers: here.watchers + there.iter().map(|s| s.watchers).sum::<u32>(),
                        recorded: here.recorded || there.iter().any(|s| s.recorded),
                    }))
                }
                Err(e) => here.map(Some).ok_or(e),
            }
        })
    }

    fn list<'a>(&'a self, sel: &'a Selector) -> BoxFuture<'a, Vec<SessionView>> {
        Box::pin(async move {
            let mut views: Vec<SessionView> = self
                .candidates(sel)
                .await
                .iter()
                .filter_map(|(id, h)| {
                    let s = remote_session(id, h)?;
                    sel.matches(&s).then(|| {
                        let mut v = s.view();
                        v.node = h.get("node").cloned().unwrap_or_default();
                        v
                    })
                })
                .collect();
            // This node's own, even those the store has not seen yet.
            for v in self.local.list(sel) {
                if !views.iter().any(|o| o.id == v.id) {
                    views.push(v);
                }
            }
            views.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
            views
        })
    }

    fn terminate<'a>(
        &'a self,
        sel: &'a Selector,
        by: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Vec<Arc<LiveSession>>> {
        Box::pin(async move {
            let mut hit = self.local.terminate(sel, by, reason);
            // The rest of what matches runs on other nodes.
            let elsewhere: Vec<Arc<LiveSession>> = self
                .candidates(sel)
                .await
                .iter()
                .filter(|(id, _)| !hit.iter().any(|h| &h.id == id))
                .filter_map(|(id, h)| remote_session(id, h))
                .filter(|s| sel.matches(s))
                .map(|s| {
                    let _ = s.terminated.set(Termination {
                        by: by.to_string(),
                        reason: reason.to_string(),
                    });
                    Arc::new(s)
                })
                .collect();
            if !elsewhere.is_empty() {
                let ids = elsewhere.iter().map(|s| s.id.clone()).collect();
                self.publish(
                    "commands",
                    &Message::Terminate {
                        ids,
                        by: by.to_string(),
                        reason: reason.to_string(),
                    },
                )
                .await;
            }
            hit.extend(elsewhere);
            hit
        })
    }

    fn ending<'a>(
        &'a self,
        sessions: &'a [SessionView],
        by: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if sessions.is_empty() {
                return;
            }
            let ending = serde_json::to_string(&Ending {
                by: by.to_string(),
                reason: reason.to_string(),
            })
            .expect("two strings serialise");
            // Read at the next renewal of the node that runs it, if the
            // revocation reaches it first; then no longer needed.
            let keep = (self.lease * 2).as_millis() as u64;
            let mut pipe = redis::pipe();
            for s in sessions {
                pipe.cmd("SET")
                    .arg(self.redis.key(&["ending", &s.id]))
                    .arg(&ending)
                    .arg("PX")
                    .arg(keep)
                    .ignore();
            }
            if let Err(e) = self.redis.pipe::<()>(pipe).await {
                // Its node then ends it as a bare revocation, if the
                // revocation reaches it before the command.
                tracing::debug!("who ends the sessions was not written: {e}");
            }
        })
    }

    fn not_ending<'a>(&'a self, sessions: &'a [SessionView]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if sessions.is_empty() {
                return;
            }
            let mut pipe = redis::pipe();
            for s in sessions {
                pipe.del(self.redis.key(&["ending", &s.id])).ignore();
            }
            if let Err(e) = self.redis.pipe::<()>(pipe).await {
                // They expire within two leases all the same.
                tracing::debug!("who ends the sessions was not taken back: {e}");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Message;

    /// What nodes of every version say to each other reads as meant.
    #[test]
    fn messages_read_across_versions() {
        // A node from before shadows were named: counted as a plain sum.
        let old: Message =
            serde_json::from_str(r#"{"op":"watched","id":"s1","delta":-1}"#).unwrap();
        assert!(
            matches!(&old, Message::Watched { id, shadow, delta: -1 } if id == "s1" && shadow.is_empty())
        );
        // This version's start and renewal, as they go on the wire.
        let start = serde_json::to_value(Message::Watched {
            id: "s1".into(),
            shadow: "s2".into(),
            delta: 1,
        })
        .unwrap();
        assert_eq!(
            start,
            serde_json::json!({"op": "watched", "id": "s1", "shadow": "s2", "delta": 1})
        );
        let renewal = serde_json::to_value(Message::Watching {
            id: "s1".into(),
            shadow: "s2".into(),
        })
        .unwrap();
        // Not "watched": an older node, which counts every "watched" +1,
        // must find nothing it knows here.
        assert_eq!(
            renewal,
            serde_json::json!({"op": "watching", "id": "s1", "shadow": "s2"})
        );
    }
}
