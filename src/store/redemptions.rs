//! Token redemptions in Redis: one live session per token across nodes.
//!
//! A session holds its token by a *lease*: `<prefix>lease:<jti>`, whose value
//! names the holding node and whose expiry the node renews every
//! `store.renew_secs`. A node that dies stops renewing, and its tokens are
//! free again after `store.lease_secs`; one cut off from Redis keeps its
//! running sessions (they are already admitted) and re-takes their leases
//! when it is back, so during a partition a token could run a second session
//! elsewhere once the lease ran out: availability of running consoles over
//! strictness, documented in docs/scaling.md. A spent single-use token is
//! `<prefix>spent:<jti>`, a killed one `<prefix>revoked:jti:<jti>` (the same
//! key token revocations use), both kept until the token expires.
//!
//! One Redis round trip per redemption, release and check (a script or a
//! pipeline); the renewals of a node go in one pipeline per period.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::Script;

use super::remembered::Event;
use super::{Leasing, Redis};
use crate::token::RefusalReason;
use crate::token::redemption::{RedeemError, RedemptionStore, ReusePolicy};

/// Seconds a spent or killed token is remembered past its expiry (leeway).
const KEEP_PAST_EXP: u64 = 300;

/// KEYS: lease, spent, revoked, epoch. ARGV: holder, lease ms, single-use
/// (0/1), keep-spent-until ms, the epoch this node knows.
const REDEEM: &str = r"
if redis.call('GET', KEYS[4]) ~= ARGV[5] then return 'epoch' end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'revoked' end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 'spent' end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] == '1' then redis.call('SET', KEYS[2], '1', 'PXAT', ARGV[4]) end
  return 'ok'
end
return 'held'
";

/// KEYS: lease. ARGV: holder. Deletes the lease only if it is ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// KEYS: lease. ARGV: holder, lease ms. Renews our lease, or takes it back
/// if it is gone (Redis restarted empty, or it ran out during an outage);
/// 0 when another holder has it now.
const RENEW: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// KEYS: a token's revocation. ARGV: until (ms), `1` (its sessions end)
/// or `keep` (they are kept). Keeps the later of the two expiries; a
/// revocation that ends sessions is not made one that keeps them, and
/// supersedes one that did.
pub(super) const REVOKE_JTI: &str = r"
local old = redis.call('GET', KEYS[1])
local t = redis.call('PEXPIRETIME', KEYS[1])
local value = ARGV[2]
if old and old ~= 'keep' then value = old end
redis.call('SET', KEYS[1], value, 'PXAT', math.max(t, tonumber(ARGV[1])))
return 1
";

static REDEEM_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REDEEM));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));
pub(super) static REVOKE_JTI_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REVOKE_JTI));

/// Redemptions in Redis.
#[derive(Debug)]
pub struct RedisRedemptions {
    redis: Arc<Redis>,
    lease: Duration,
    /// The leases this node holds: token id -> sessions of it here (one,
    /// unless a release raced a new redemption).
    held: Mutex<HashMap<String, u32>>,
}

fn unavailable(_: super::StoreError) -> RedeemError {
    RedeemError {
        reason: RefusalReason::Unavailable,
        detail: "the shared store did not answer",
    }
}

impl RedisRedemptions {
    /// Redemptions on `leasing`'s Redis, on its leases.
    pub fn new(leasing: Leasing) -> Arc<Self> {
        leasing.start(|redis, lease| Self {
            redis,
            lease,
            held: Mutex::default(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keys(&self, jti: &str) -> [String; 3] {
        [
            self.redis.key(&["lease", jti]),
            self.redis.key(&["spent", jti]),
            self.redis.key(&["revoked", "jti", jti]),
        ]
    }

    /// Renews every lease this node holds, in one round trip.
    pub async fn renew_all(&self) {
        let jtis: Vec<String> = self.held().keys().cloned().collect();
        if jtis.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for jti in &jtis {
            pipe.cmd("EVAL")
                .arg(RENEW)
                .arg(1)
                .arg(self.redis.key(&["lease", jti]))
                .arg(&self.redis.holder)
                .arg(self.lease.as_millis() as u64);
        }
        match self.redis.pipe::<Vec<i64>>(pipe).await {
            Ok(results) => {
                let lost = results.iter().filter(|r| **r == 0).count();
                if lost > 0 {
                    tracing::warn!(
                        lost,
                        "leases held by another node now: a partition outlived them"
                    );
                }
            }
            Err(e) => tracing::debug!("lease renewal failed: {e}"),
        }
    }
}

impl super::Leases for RedisRedemptions {
    async fn renew(&self) {
        self.renew_all().await;
    }
}

impl RedemptionStore for RedisRedemptions {
    fn redeem<'a>(
        &'a self,
        jti: &'a str,
        exp: u64,
        policy: ReusePolicy,
        _session_key: Option<&'a str>,
        _now: u64,
    ) -> BoxFuture<'a, Result<(), RedeemError>> {
        Box::pin(async move {
            let [lease, spent, revoked] = self.keys(jti);
            let single = policy == ReusePolicy::SingleUse;
            let epoch_key = self.redis.key(&["epoch"]);
            let answer: String = self
                .redis
                .eval(
                    &REDEEM_SCRIPT,
                    &[&lease, &spent, &revoked, &epoch_key],
                    &[
                        &self.redis.holder,
                        &self.lease.as_millis().to_string(),
                        if single { "1" } else { "0" },
                        &((exp + KEEP_PAST_EXP) * 1000).to_string(),
                        &self.redis.known_epoch(),
                    ],
                )
                .await
                .map_err(unavailable)?;
            match answer.as_str() {
                // The store lost its data: it may have forgotten a
                // revocation. Refuse until it is re-seeded.
                "epoch" => {
                    self.redis.epoch_lost();
                    Err(RedeemError {
                        reason: RefusalReason::Unavailable,
                        detail: "the shared store lost its data and is being re-seeded",
                    })
                }
                "ok" => {
                    *self.held().entry(jti.to_string()).or_default() += 1;
                    if single {
                        self.redis
                            .note(Event::Spent {
                                jti: jti.to_string(),
                                until: (exp + KEEP_PAST_EXP) * 1000,
                            })
                            .await;
                    }
                    Ok(())
                }
                "revoked" => Err(RedeemError {
                    reason: RefusalReason::Revoked,
                    detail: "token was revoked",
                }),
                "spent" => Err(RedeemError {
                    reason: RefusalReason::Replayed,
                    detail: "single-use token was already used",
                }),
                _ => Err(RedeemError {
                    reason: RefusalReason::Replayed,
                    detail: "token is in use by another session",
                }),
            }
        })
    }

    fn would_redeem<'a>(
        &'a self,
        jti: &'a str,
        policy: ReusePolicy,
        _session_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), RedeemError>> {
        Box::pin(async move {
            let [lease, spent, revoked] = self.keys(jti);
            let mut pipe = redis::pipe();
            pipe.exists(revoked)
                .exists(spent)
                .exists(lease)
                .get(self.redis.key(&["epoch"]));
            let (revoked, spent, held, epoch): (bool, bool, bool, Option<String>) =
                self.redis.pipe(pipe).await.map_err(unavailable)?;
            if epoch.as_deref() != Some(self.redis.known_epoch().as_str()) {
                self.redis.epoch_lost();
                return Err(RedeemError {
                    reason: RefusalReason::Unavailable,
                    detail: "the shared store lost its data and is being re-seeded",
                });
            }
            if revoked {
                return Err(RedeemError {
                    reason: RefusalReason::Revoked,
                    detail: "token was revoked",
                });
            }
            if spent && policy == ReusePolicy::SingleUse {
                return Err(RedeemError {
                    reason: RefusalReason::Replayed,
                    detail: "single-use token was already used",
                });
            }
            if held {
                return Err(RedeemError {
                    reason: RefusalReason::Replayed,
                    detail: "token is in use by another session",
                });
            }
            Ok(())
        })
    }

    fn release<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let last = {
                let mut held = self.held();
                match held.get_mut(jti) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        false
                    }
                    Some(_) => {
                        held.remove(jti);
                        true
                    }
                    None => false,
                }
            };
            if last {
                // Not answered: the lease runs out by itself.
                let lease = self.redis.key(&["lease", jti]);
                let _: Result<i64, _> = self
                    .redis
                    .eval(&RELEASE_SCRIPT, &[&lease], &[&self.redis.holder])
                    .await;
            }
        })
    }

    fn revoke<'a>(
        &'a self,
        jti: &'a str,
        exp: u64,
        _now: u64,
    ) -> BoxFuture<'a, Result<(), RedeemError>> {
        Box::pin(async move {
            let key = self.redis.key(&["revoked", "jti", jti]);
            let until = ((exp + KEEP_PAST_EXP) * 1000).to_string();
            self.redis
                .eval::<i64>(&REVOKE_JTI_SCRIPT, &[&key], &[&until, "1"])
                .await
                .map_err(unavailable)?;
            self.redis
                .note(Event::RevokedJti {
                    jti: jti.to_string(),
                    until: (exp + KEEP_PAST_EXP) * 1000,
                    keep: false,
                })
                .await;
            Ok(())
        })
    }

    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool, RedeemError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.exists(self.redis.key(&["revoked", "jti", jti]))
                .get(self.redis.key(&["epoch"]));
            let (revoked, epoch): (bool, Option<String>) =
                self.redis.pipe(pipe).await.map_err(unavailable)?;
            if epoch.as_deref() != Some(self.redis.known_epoch().as_str()) {
                self.redis.epoch_lost();
                return Err(RedeemError {
                    reason: RefusalReason::Unavailable,
                    detail: "the shared store lost its data and is being re-seeded",
                });
            }
            Ok(revoked)
        })
    }
}
