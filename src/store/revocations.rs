//! Revocations in Redis: a token or an instance revoked on one node is
//! refused on every node from the next check on.
//!
//! `<prefix>revoked:jti:<jti>` (the key a killed session's token gets too)
//! and `<prefix>revoked:instance:<instance>` (its value: the time up to
//! which the instance's tokens were issued), each expiring when no token it
//! covers can still be valid. A check is one pipelined round trip; a store
//! that cannot answer refuses the token as `unavailable`.
//!
//! A token's revocation says whether its sessions end (`1`) or are kept
//! (`keep`, `keep_sessions`): every node's renewal ends the sessions of a
//! revoked token (a terminate's revocation seen before its message) unless
//! it says `keep` and no `ending` record names them. One that ends sessions
//! supersedes one that kept them, never the reverse.

use std::sync::{Arc, LazyLock};

use futures_util::future::BoxFuture;
use redis::Script;

use super::Redis;
use super::redemptions::REVOKE_JTI_SCRIPT;
use super::remembered::Event;
use crate::token::revocation::{RevocationError, RevocationStore};

/// KEYS: instance key. ARGV: revoked-at (seconds), until (ms). Keeps the
/// later revocation time and the later expiry.
const REVOKE_INSTANCE: &str = r"
local at = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = redis.call('PEXPIRETIME', KEYS[1])
local new_at = math.max(at, tonumber(ARGV[1]))
local keep = math.max(t, tonumber(ARGV[2]))
redis.call('SET', KEYS[1], tostring(new_at), 'PXAT', keep)
return 1
";

static REVOKE_INSTANCE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REVOKE_INSTANCE));

/// Revocations in Redis.
#[derive(Debug)]
pub struct RedisRevocations {
    redis: Arc<Redis>,
}

impl RedisRevocations {
    /// Revocations kept in `redis`.
    pub fn new(redis: Arc<Redis>) -> Self {
        Self { redis }
    }

    /// Revokes `jti` until `until` (unix s), keeping its sessions when
    /// `keep` (by the script's rule), and remembers it for a re-seed.
    async fn revoke(&self, jti: &str, until: u64, keep: bool) -> Result<(), RevocationError> {
        let key = self.redis.key(&["revoked", "jti", jti]);
        let value = if keep { "keep" } else { "1" };
        self.redis
            .eval::<i64>(
                &REVOKE_JTI_SCRIPT,
                &[&key],
                &[&(until * 1000).to_string(), value],
            )
            .await
            .map_err(|e| RevocationError::Unavailable(e.to_string()))?;
        self.redis
            .note(Event::RevokedJti {
                jti: jti.to_string(),
                until: until * 1000,
                keep,
            })
            .await;
        Ok(())
    }
}

impl RevocationStore for RedisRevocations {
    fn revoke_jti<'a>(
        &'a self,
        jti: &'a str,
        until: u64,
        _now: u64,
    ) -> BoxFuture<'a, Result<(), RevocationError>> {
        Box::pin(self.revoke(jti, until, false))
    }

    fn revoke_jti_keeping_sessions<'a>(
        &'a self,
        jti: &'a str,
        until: u64,
        _now: u64,
    ) -> BoxFuture<'a, Result<(), RevocationError>> {
        Box::pin(self.revoke(jti, until, true))
    }

    fn revoke_instance<'a>(
        &'a self,
        instance: &'a str,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RevocationError>> {
        Box::pin(async move {
            let key = self.redis.key(&["revoked", "instance", instance]);
            self.redis
                .eval::<i64>(
                    &REVOKE_INSTANCE_SCRIPT,
                    &[&key],
                    &[&now.to_string(), &(until * 1000).to_string()],
                )
                .await
                .map_err(|e| RevocationError::Unavailable(e.to_string()))?;
            self.redis
                .note(Event::RevokedInstance {
                    instance: instance.to_string(),
                    at: now,
                    until: until * 1000,
                })
                .await;
            Ok(())
        })
    }

    fn check<'a>(
        &'a self,
        jti: &'a str,
        instance: &'a str,
        iat: u64,
    ) -> BoxFuture<'a, Result<Option<&'static str>, RevocationError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.exists(self.redis.key(&["revoked", "jti", jti]))
                .get(self.redis.key(&["revoked", "instance", instance]))
                .get(self.redis.key(&["epoch"]));
            let (jti_revoked, instance_at, epoch): (bool, Option<u64>, Option<String>) = self
                .redis
                .pipe(pipe)
                .await
                .map_err(|e| RevocationError::Unavailable(e.to_string()))?;
            // A store that lost its data may have forgotten this revocation.
            if epoch.as_deref() != Some(self.redis.known_epoch().as_str()) {
                self.redis.epoch_lost();
                return Err(RevocationError::Unavailable(
                    "the store lost its data and is being re-seeded".into(),
                ));
            }
            Ok(if jti_revoked {
                Some("token was revoked")
            } else if instance_at.is_some_and(|at| iat <= at) {
                Some("the instance's tokens were revoked")
            } else {
                None
            })
        })
    }
}
