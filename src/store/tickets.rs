//! Tickets in Redis: issued on any node, redeemed on any node.
//!
//! `<prefix>ticket:<id>` (a hash: the grant, its console type, `fresh` or
//! `open`, and the session id the hypervisor named),
//! `<prefix>ticket-of:<jti>` (the token's one unused ticket, which a new
//! exchange replaces) and `<prefix>ticket-bound:<jti>:<session id>` (the
//! open ticket whose session the hypervisor named so, for channels that
//! carry their token instead of a ticket). A fresh ticket expires after its time-to-live; an open
//! one lives as long as its session, on a lease the node running the session
//! renews (so a SPICE channel linking on another node, hours later, still
//! finds it bound to its session). Every operation is one script: one round
//! trip, atomic.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::Script;

use super::{Leasing, Redis};
use crate::console::ConsoleType;
use crate::secret::Secret;
use crate::token::Grant;
use crate::token::ticket::{
    Admitted, ChannelRole, TICKET_BYTES, TicketId, TicketRefusal, TicketStore,
};

/// KEYS: ticket-of, ticket. ARGV: id, grant, console, jti, ttl ms, prefix.
const ISSUE: &str = r"
local old = redis.call('GET', KEYS[1])
if old then
  local k = ARGV[6] .. 'ticket:' .. old
  if redis.call('HGET', k, 'state') == 'fresh' then redis.call('DEL', k) end
end
redis.call('HSET', KEYS[2], 'grant', ARGV[2], 'console', ARGV[3], 'jti', ARGV[4], 'state', 'fresh')
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[5])
return 1
";

/// KEYS: ticket. ARGV: console, role (`opens` or a session id), lease ms,
/// prefix. Returns {verdict, grant}.
const ADMIT: &str = r"
local t = redis.call('HMGET', KEYS[1], 'grant', 'console', 'state', 'sid', 'jti')
if not t[1] then return {'unknown', ''} end
if t[2] ~= ARGV[1] then return {'wrong_console_type', ''} end
if ARGV[2] == 'opens' then
  if t[3] ~= 'fresh' then return {'used', ''} end
  redis.call('HSET', KEYS[1], 'state', 'open')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  local of = ARGV[4] .. 'ticket-of:' .. t[5]
  if redis.call('GET', of) == string.sub(KEYS[1], string.len(ARGV[4]) + 8) then
    redis.call('DEL', of)
  end
  return {'ok', t[1]}
end
if t[3] ~= 'open' or not t[4] then return {'no_session', ''} end
if t[4] ~= ARGV[2] then return {'foreign_session', ''} end
return {'ok', t[1]}
";

/// KEYS: ticket. ARGV: session id, id, prefix. Binds an open ticket to its
/// session, and indexes it by token and session (on the ticket's lease);
/// returns that index's key, or '' for a ticket no longer open.
const BIND: &str = r"
local t = redis.call('HMGET', KEYS[1], 'state', 'jti')
if t[1] ~= 'open' then return '' end
redis.call('HSET', KEYS[1], 'sid', ARGV[1])
local bound = ARGV[3] .. 'ticket-bound:' .. t[2] .. ':' .. ARGV[1]
redis.call('SET', bound, ARGV[2], 'PX', math.max(redis.call('PTTL', KEYS[1]), 1))
return bound
";

/// KEYS: ticket-bound. ARGV: console, session id, prefix. Returns
/// {verdict, grant, id}.
const ADMIT_BOUND: &str = r"
local id = redis.call('GET', KEYS[1])
if not id then return {'no_session', '', ''} end
local t = redis.call('HMGET', ARGV[3] .. 'ticket:' .. id, 'grant', 'console', 'state', 'sid')
if not t[1] or t[2] ~= ARGV[1] or t[3] ~= 'open' or t[4] ~= ARGV[2] then
  return {'no_session', '', ''}
end
return {'ok', t[1], id}
";

/// KEYS: ticket-of. ARGV: prefix. Kills the token's unused ticket.
const REVOKE: &str = r"
local old = redis.call('GET', KEYS[1])
if old then redis.call('DEL', ARGV[1] .. 'ticket:' .. old) end
redis.call('DEL', KEYS[1])
return 1
";

static ISSUE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ISSUE));
static ADMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT));
static BIND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(BIND));
static ADMIT_BOUND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT_BOUND));
static REVOKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REVOKE));

/// Tickets in Redis.
#[derive(Debug)]
pub struct RedisTickets {
    redis: Arc<Redis>,
    lease: Duration,
    /// Open tickets whose sessions run on this node (their leases are
    /// ours), with what it takes to write each back whole.
    open_here: Mutex<HashMap<TicketId, OpenTicket>>,
}

/// An open ticket of a session on this node, as Redis should hold it.
#[derive(Debug)]
struct OpenTicket {
    /// The grant, as stored (JSON).
    grant: String,
    console: ConsoleType,
    jti: String,
    /// The hypervisor's session id and the key that indexes the ticket by
    /// it, once bound.
    bound: Option<(String, String)>,
}

impl RedisTickets {
    /// Tickets on `leasing`'s Redis; open ones live on its leases.
    pub fn new(leasing: Leasing) -> Arc<Self> {
        leasing.start(|redis, lease| Self {
            redis,
            lease,
            open_here: Mutex::default(),
        })
    }

    fn open_here(&self) -> std::sync::MutexGuard<'_, HashMap<TicketId, OpenTicket>> {
        self.open_here.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ticket_key(&self, id: &TicketId) -> String {
        self.redis.key(&["ticket", id.as_hex()])
    }

    /// Deletes a ticket and its index by session (not answered: an open
    /// ticket's lease runs out by itself).
    async fn delete(&self, id: &TicketId, bound: Option<String>) {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.ticket_key(id));
        cmd.arg(bound);
        let _: Result<i64, _> = self.redis.cmd(cmd).await;
    }

    async fn issue(
        &self,
        grant: Grant,
        ttl_secs: u64,
        now: u64,
    ) -> Result<Secret<String>, TicketRefusal> {
        let ticket = crate::token::signing::random_token(TICKET_BYTES);
        let id = TicketId::of(ticket.as_bytes());
        let ttl = ttl_secs.min(grant.expires_at.saturating_sub(now)).max(1);
        let json = serde_json::to_string(&grant).map_err(|_| TicketRefusal::Unavailable)?;
        let of = self.redis.key(&["ticket-of", &grant.jti]);
        self.redis
            .eval::<i64>(
                &ISSUE_SCRIPT,
                &[&of, &self.ticket_key(&id)],
                &[
                    id.as_hex(),
                    &json,
                    grant.console.as_str(),
                    &grant.jti,
                    &(ttl * 1000).to_string(),
                    self.redis.prefix(),
                ],
            )
            .await
            .map_err(|_| TicketRefusal::Unavailable)?;
        Ok(Secret::new(ticket))
    }

    async fn admit(
        &self,
        ticket: &[u8],
        console: ConsoleType,
        role: ChannelRole,
    ) -> Result<Admitted, TicketRefusal> {
        let id = TicketId::of(ticket);
        let role_arg = match role {
            ChannelRole::Opens => "opens".to_string(),
            ChannelRole::Joins { session_id } => session_id.to_string(),
        };
        let (verdict, grant): (String, String) = self
            .redis
            .eval(
                &ADMIT_SCRIPT,
                &[&self.ticket_key(&id)],
                &[
                    console.as_str(),
                    &role_arg,
                    &self.lease.as_millis().to_string(),
                    self.redis.prefix(),
                ],
            )
            .await
            .map_err(|_| TicketRefusal::Unavailable)?;
        match verdict.as_str() {
            "ok" => {
                let grant_json = grant;
                let grant: Grant =
                    serde_json::from_str(&grant_json).map_err(|_| TicketRefusal::Unavailable)?;
                if role == ChannelRole::Opens {
                    let open = OpenTicket {
                        jti: grant.jti.clone(),
                        grant: grant_json,
                        console,
                        bound: None,
                    };
                    self.open_here().insert(id.clone(), open);
                }
                Ok(Admitted { grant, id })
            }
            "wrong_console_type" => Err(TicketRefusal::WrongConsoleType),
            "used" => Err(TicketRefusal::Used),
            "no_session" => Err(TicketRefusal::NoSession),
            "foreign_session" => Err(TicketRefusal::ForeignSession),
            _ => Err(TicketRefusal::Unknown),
        }
    }

    async fn admit_bound(
        &self,
        jti: &str,
        console: ConsoleType,
        session_id: u32,
    ) -> Result<Admitted, TicketRefusal> {
        let sid = session_id.to_string();
        let (verdict, grant, id): (String, String, String) = self
            .redis
            .eval(
                &ADMIT_BOUND_SCRIPT,
                &[&self.redis.key(&["ticket-bound", jti, &sid])],
                &[console.as_str(), &sid, self.redis.prefix()],
            )
            .await
            .map_err(|_| TicketRefusal::Unavailable)?;
        if verdict != "ok" {
            return Err(TicketRefusal::NoSession);
        }
        let grant: Grant = serde_json::from_str(&grant).map_err(|_| TicketRefusal::Unavailable)?;
        Ok(Admitted {
            grant,
            id: TicketId::from_hex(id).ok_or(TicketRefusal::Unavailable)?,
        })
    }
}

impl super::Leases for RedisTickets {
    /// Writes the open tickets this node's sessions hold back whole, on
    /// fresh leases, in one round trip: a ticket Redis lost (restarted
    /// empty, failed over) is back within one renewal, so a SPICE channel
    /// can still join its session on another node.
    async fn renew(&self) {
        let lease = self.lease.as_millis() as i64;
        let mut pipe = redis::pipe();
        let renewed: Vec<TicketId> = {
            let open = self.open_here();
            for (id, t) in open.iter() {
                let key = self.ticket_key(id);
                pipe.hset_multiple(
                    &key,
                    &[
                        ("grant", t.grant.as_str()),
                        ("console", t.console.as_str()),
                        ("jti", &t.jti),
                        ("state", "open"),
                    ],
                )
                .ignore();
                if let Some((sid, bound)) = &t.bound {
                    pipe.hset(&key, "sid", sid)
                        .ignore()
                        .set(bound, id.as_hex())
                        .ignore()
                        .pexpire(bound, lease)
                        .ignore();
                }
                pipe.pexpire(&key, lease).ignore();
            }
            open.keys().cloned().collect()
        };
        if renewed.is_empty() {
            return;
        }
        if let Err(e) = self.redis.pipe::<()>(pipe).await {
            tracing::debug!("ticket lease renewal failed: {e}");
            return;
        }
        // A session that ended while the renewal was on its way: its
        // ticket may have been written back after its end deleted it.
        let ended: Vec<TicketId> = {
            let open = self.open_here();
            renewed
                .into_iter()
                .filter(|id| !open.contains_key(id))
                .collect()
        };
        for id in ended {
            self.delete(&id, None).await;
        }
    }
}

impl TicketStore for RedisTickets {
    fn issue(
        &self,
        grant: Grant,
        ttl_secs: u64,
        now: u64,
    ) -> BoxFuture<'_, Result<Secret<String>, TicketRefusal>> {
        Box::pin(RedisTickets::issue(self, grant, ttl_secs, now))
    }

    fn admit<'a>(
        &'a self,
        ticket: &'a [u8],
        console: ConsoleType,
        role: ChannelRole,
        _now: u64,
    ) -> BoxFuture<'a, Result<Admitted, TicketRefusal>> {
        Box::pin(RedisTickets::admit(self, ticket, console, role))
    }

    fn admit_bound<'a>(
        &'a self,
        jti: &'a str,
        console: ConsoleType,
        session_id: u32,
    ) -> BoxFuture<'a, Result<Admitted, TicketRefusal>> {
        Box::pin(RedisTickets::admit_bound(self, jti, console, session_id))
    }

    fn bind<'a>(&'a self, id: &'a TicketId, session_id: u32) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let sid = session_id.to_string();
            // Remembered whatever Redis answers: the next renewal writes
            // the binding (again) if this write is lost or fails.
            if let Some(open) = self.open_here().get_mut(id) {
                let key = self.redis.key(&["ticket-bound", &open.jti, &sid]);
                open.bound = Some((sid.clone(), key));
            }
            let bound = self
                .redis
                .eval::<String>(
                    &BIND_SCRIPT,
                    &[&self.ticket_key(id)],
                    &[&sid, id.as_hex(), self.redis.prefix()],
                )
                .await;
            if let Err(e) = bound {
                tracing::warn!(ticket_ref = %id, "ticket not bound to its session yet: {e}");
            }
        })
    }

    fn end<'a>(&'a self, id: &'a TicketId) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let bound = self
                .open_here()
                .remove(id)
                .and_then(|t| t.bound)
                .map(|b| b.1);
            self.delete(id, bound).await;
        })
    }

    fn revoke_jti<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let of = self.redis.key(&["ticket-of", jti]);
            // Not answered: admission checks the revocation itself.
            let _: Result<i64, _> = self
                .redis
                .eval(&REVOKE_SCRIPT, &[&of], &[self.redis.prefix()])
                .await;
        })
    }
}
