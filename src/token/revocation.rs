//! Revocation: tokens stopped before (or while) they are used.
//!
//! An operator revokes a token by `jti` (a leaked link), or every token of an
//! instance issued up to now (a deleted or migrated VM, whose old console
//! port may be reused by another VM). Entries are kept until no token they
//! cover can still be valid: `now + max_ttl + leeway` at revocation time,
//! since a token's lifetime is capped at `max_ttl`. The list is checked by
//! every validation, so a revoked token is refused everywhere (pages,
//! WebSockets, ticket exchanges) with the reason `revoked`.

use std::collections::HashMap;

use futures_util::future::BoxFuture;
use std::sync::Mutex;

/// Most entries held; past it, revocation is refused rather than forgetting one.
const CAPACITY: usize = 100_000;

#[derive(Debug, Default)]
struct Lists {
    /// jti -> keep until.
    jtis: HashMap<String, u64>,
    /// instance -> (revoked at, keep until): tokens issued at or before
    /// `revoked at` are refused.
    instances: HashMap<String, (u64, u64)>,
}

/// The deny-lists.
#[derive(Debug, Default)]
pub struct Revocations {
    lists: Mutex<Lists>,
}

/// Why a revocation could not be recorded, or a check not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// The deny-list is full of live entries.
    #[error("revocation list full")]
    Full,
    /// A shared store did not answer (a check then refuses the token).
    #[error("revocation store unavailable: {0}")]
    Unavailable(String),
}

impl Revocations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lists> {
        // Single-assignment updates: a poisoned lock's data is consistent.
        self.lists.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make_room(l: &mut Lists, now: u64) -> Result<(), RevocationError> {
        if l.jtis.len() + l.instances.len() < CAPACITY {
            return Ok(());
        }
        l.jtis.retain(|_, until| *until >= now);
        l.instances.retain(|_, (_, until)| *until >= now);
        if l.jtis.len() + l.instances.len() < CAPACITY {
            Ok(())
        } else {
            Err(RevocationError::Full)
        }
    }

    /// Revokes token `jti` until `until`.
    pub fn revoke_jti(&self, jti: &str, until: u64, now: u64) -> Result<(), RevocationError> {
        let mut l = self.lock();
        Self::make_room(&mut l, now)?;
        let e = l.jtis.entry(jti.to_string()).or_insert(until);
        *e = (*e).max(until);
        Ok(())
    }

    /// Revokes every token of `instance` issued at or before `now`, until `until`.
    pub fn revoke_instance(
        &self,
        instance: &str,
        until: u64,
        now: u64,
    ) -> Result<(), RevocationError> {
        let mut l = self.lock();
        Self::make_room(&mut l, now)?;
        let e = l
            .instances
            .entry(instance.to_string())
            .or_insert((now, until));
        *e = (now.max(e.0), until.max(e.1));
        Ok(())
    }

    /// Why a token (`jti`, `instance`, issued at `iat`) is revoked, if it is.
    pub fn check(&self, jti: &str, instance: &str, iat: u64) -> Option<&'static str> {
        let l = self.lock();
        if l.jtis.contains_key(jti) {
            return Some("token was revoked");
        }
        match l.instances.get(instance) {
            Some((at, _)) if iat <= *at => Some("the instance's tokens were revoked"),
            _ => None,
        }
    }
}

/// Where revocations live. Async, so that a networked store (a revocation
/// made on one node holds on every node) can implement it; a store that
/// cannot answer fails closed.
pub trait RevocationStore: Send + Sync + std::fmt::Debug {
    /// Revokes token `jti` until `until`.
    fn revoke_jti<'a>(
        &'a self,
        jti: &'a str,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RevocationError>>;

    /// Revokes every token of `instance` issued at or before `now`, until `until`.
    fn revoke_instance<'a>(
        &'a self,
        instance: &'a str,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RevocationError>>;

    /// Revokes token `jti` until `until` and keeps the sessions it runs
    /// (`keep_sessions`): a store whose nodes end the sessions of a revoked
    /// token on their own (a terminate's revocation seen before its
    /// message) must leave these until a revocation that ends them comes.
    /// Where only the terminate itself ends sessions, a plain revocation.
    fn revoke_jti_keeping_sessions<'a>(
        &'a self,
        jti: &'a str,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RevocationError>> {
        self.revoke_jti(jti, until, now)
    }

    /// Why a token (`jti`, `instance`, issued at `iat`) is revoked, if it is.
    fn check<'a>(
        &'a self,
        jti: &'a str,
        instance: &'a str,
        iat: u64,
    ) -> BoxFuture<'a, Result<Option<&'static str>, RevocationError>>;
}

impl RevocationStore for Revocations {
    fn revoke_jti<'a>(
        &'a self,
        jti: &'a str,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RevocationError>> {
        Box::pin(std::future::ready(Revocations::revoke_jti(
            self, jti, until, now,
        )))
    }

    fn revoke_instance<'a>(
        &'a self,
        instance: &'a str,
        until: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RevocationError>> {
        Box::pin(std::future::ready(Revocations::revoke_instance(
            self, instance, until, now,
        )))
    }

    fn check<'a>(
        &'a self,
        jti: &'a str,
        instance: &'a str,
        iat: u64,
    ) -> BoxFuture<'a, Result<Option<&'static str>, RevocationError>> {
        Box::pin(std::future::ready(Ok(Revocations::check(
            self, jti, instance, iat,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_jtis_and_earlier_instance_tokens_are_refused() {
        let r = Revocations::default();
        assert_eq!(r.check("a", "vm", 100), None);
        r.revoke_jti("a", 1000, 100).unwrap();
        assert!(r.check("a", "vm", 100).is_some());
        assert_eq!(r.check("b", "vm", 100), None);
        r.revoke_instance("vm", 1000, 200).unwrap();
        assert!(
            r.check("b", "vm", 150).is_some(),
            "issued before the revocation"
        );
        assert!(r.check("b", "vm", 200).is_some(), "issued the same second");
        assert_eq!(
            r.check("c", "vm", 201),
            None,
            "a token for the VM's new life"
        );
        assert_eq!(r.check("c", "other", 100), None);
    }
}
