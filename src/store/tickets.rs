//! Tickets in Redis: issued on any node, redeemed on any node.
//!
//! `<prefix>ticket:<id>` (a hash: the grant, its console type, `fresh` or
//! `open`, and the session id the hypervisor named) and
//! `<prefix>ticket-of:<jti>` (the token's one unused ticket, which a new
//! exchange replaces). A fresh ticket expires after its time-to-live; an open
//! one lives as long as its session, on a lease the node running the session
//! renews (so a SPICE channel linking on another node, hours later, still
//! finds it bound to its session). Every operation is one script: one round
//! trip, atomic.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::Script;
use tokio_util::sync::CancellationToken;

use super::Redis;
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

/// KEYS: ticket. ARGV: session id. Binds an open ticket to its session.
const BIND: &str = r"
if redis.call('HGET', KEYS[1], 'state') == 'open' then
  redis.call('HSET', KEYS[1], 'sid', ARGV[1])
end
return 1
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
static REVOKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REVOKE));

/// Tickets in Redis.
#[derive(Debug)]
pub struct RedisTickets {
    redis: Arc<Redis>,
    lease: Duration,
    /// Open tickets whose sessions run on this node (their leases are ours).
    open_here: Mutex<HashSet<TicketId>>,
}

impl RedisTickets {
    /// Tickets in `redis`; open ones live on leases renewed every `renew`
    /// until `stop`.
    pub fn new(
        redis: Arc<Redis>,
        lease: Duration,
        renew: Duration,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let store = Arc::new(Self {
            redis,
            lease,
            open_here: Mutex::default(),
        });
        tokio::spawn(store.clone().renew_every(renew, stop));
        store
    }

    fn open_here(&self) -> std::sync::MutexGuard<'_, HashSet<TicketId>> {
        self.open_here.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ticket_key(&self, id: &TicketId) -> String {
        self.redis.key(&["ticket", id.as_hex()])
    }

    async fn renew_every(self: Arc<Self>, period: Duration, stop: CancellationToken) {
        super::every(period, stop, || self.renew_open()).await;
    }

    /// Renews the leases of the open tickets this node's sessions hold, in
    /// one round trip.
    async fn renew_open(&self) {
        let ids: Vec<TicketId> = self.open_here().iter().cloned().collect();
        if ids.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.pexpire(self.ticket_key(id), self.lease.as_millis() as i64)
                .ignore();
        }
        if let Err(e) = self.redis.pipe::<()>(pipe).await {
            tracing::debug!("ticket lease renewal failed: {e}");
        }
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
                let grant: Grant =
                    serde_json::from_str(&grant).map_err(|_| TicketRefusal::Unavailable)?;
                if role == ChannelRole::Opens {
                    self.open_here().insert(id.clone());
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

    fn bind<'a>(&'a self, id: &'a TicketId, session_id: u32) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let sid = session_id.to_string();
            if let Err(e) = self
                .redis
                .eval::<i64>(&BIND_SCRIPT, &[&self.ticket_key(id)], &[&sid])
                .await
            {
                tracing::warn!(ticket = %id, "ticket not bound to its session: {e}");
            }
        })
    }

    fn end<'a>(&'a self, id: &'a TicketId) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.open_here().remove(id);
            let mut cmd = redis::cmd("DEL");
            cmd.arg(self.ticket_key(id));
            // Not answered: an open ticket's lease runs out by itself.
            let _: Result<i64, _> = self.redis.cmd(cmd).await;
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
