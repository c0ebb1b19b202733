//! Token reuse: the `jti` store and the policy it enforces.
//!
//! A token is *redeemed* when a session starts with it, and released when that
//! session ends. The default policy (`reconnect`) lets a page refresh or
//! noVNC's automatic reconnect use the token again within its life, while one
//! token never runs two sessions at once, and a revoked token (or one whose
//! session was killed) is dead for good. SPICE opens one connection per
//! channel with the same credential: a redemption may name a *session key*, and
//! further redemptions that present the same key join the running session
//! instead of being refused.
//!
//! The store is a trait so that a shared store can replace the in-memory one
//! for multi-node deployments; the in-memory store is bounded and forgets
//! entries once their token has expired.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::RefusalReason;

/// How often one token may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReusePolicy {
    /// One session, ever.
    SingleUse,
    /// Any number of sessions within the token's life, one at a time.
    Reconnect,
    /// As `reconnect`, but a new connection ends the running session instead
    /// of being refused (Horizon's "show only console" tab). The store
    /// treats it as `reconnect`: the session layer ends the running session
    /// and redeems again, so one token still never runs two at once.
    Takeover,
}

/// Why a redemption was refused, with the reason it is counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedeemError {
    /// `replayed`, `revoked` or `unavailable`.
    pub reason: RefusalReason,
    /// Detail for the log.
    pub detail: &'static str,
}

impl RedeemError {
    /// The refusal of token `jti` this stands for.
    pub fn refusal(&self, jti: &str) -> super::Refusal {
        super::Refusal {
            reason: self.reason,
            detail: self.detail.to_string(),
            jti: Some(jti.to_string()),
        }
    }
}

/// Storage for token redemptions. Async, so that a networked store (shared
/// by several nodes) can implement it; implementations answer within their
/// own deadline and fail closed (`unavailable`), never open.
pub trait RedemptionStore: Send + Sync + std::fmt::Debug {
    /// Starts (or joins) a session with the token `jti`, which expires at `exp`.
    /// `session_key` lets the channels of one SPICE session share the token.
    fn redeem<'a>(
        &'a self,
        jti: &'a str,
        exp: u64,
        policy: ReusePolicy,
        session_key: Option<&'a str>,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RedeemError>>;

    /// Whether `redeem` would succeed now, without redeeming (for preflights).
    fn would_redeem<'a>(
        &'a self,
        jti: &'a str,
        policy: ReusePolicy,
        session_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), RedeemError>>;

    /// Ends one session (or one channel of it) started with `jti`.
    fn release<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, ()>;

    /// Kills the token: every later redemption is refused as `revoked`. The
    /// entry is kept until `exp` (plus leeway) has passed.
    fn revoke<'a>(
        &'a self,
        jti: &'a str,
        exp: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RedeemError>>;

    /// Whether `jti` has been revoked (an error: the store cannot say).
    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool, RedeemError>>;
}

/// A redeemed token, held for the life of a session and given back with
/// [`Redemption::release`]. Dropped unreleased (a task that panicked), it
/// releases in the background, so a token is never locked for good.
#[derive(Debug)]
pub struct Redemption {
    store: Arc<dyn RedemptionStore>,
    jti: String,
    released: bool,
}

impl Redemption {
    /// Redeems `jti` in `store` and returns the redemption to release.
    pub async fn begin(
        store: Arc<dyn RedemptionStore>,
        jti: &str,
        exp: u64,
        policy: ReusePolicy,
        session_key: Option<&str>,
        now: u64,
    ) -> Result<Redemption, RedeemError> {
        store.redeem(jti, exp, policy, session_key, now).await?;
        Ok(Redemption {
            store,
            jti: jti.to_string(),
            released: false,
        })
    }

    /// Gives the token back: the session it admitted has ended.
    pub async fn release(mut self) {
        self.released = true;
        self.store.release(&self.jti).await;
    }
}

impl Drop for Redemption {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let store = self.store.clone();
        let jti = std::mem::take(&mut self.jti);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { store.release(&jti).await });
            }
            // No runtime (a synchronous caller): a store that answers at
            // once has acted when called.
            Err(_) => drop(store.release(&jti)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Use {
    /// Sessions running now, and the key that lets more channels join them.
    Active { sessions: u32, key: Option<String> },
    /// Redeemed before, nothing running; may be redeemed again under `reconnect`.
    Idle,
    /// Redeemed under `single-use`: never again.
    Spent { sessions: u32 },
    /// Revoked or killed.
    Revoked { sessions: u32 },
}

#[derive(Debug)]
struct Entry {
    /// Forget the entry after this time (the token's `exp` plus leeway).
    forget_after: u64,
    state: Use,
}

/// Whether a token in state `state` may start (or join) a session.
fn admit(state: &Use, policy: ReusePolicy, session_key: Option<&str>) -> Result<(), RedeemError> {
    let replayed = |detail| {
        Err(RedeemError {
            reason: RefusalReason::Replayed,
            detail,
        })
    };
    match state {
        Use::Revoked { .. } => Err(RedeemError {
            reason: RefusalReason::Revoked,
            detail: "token was revoked",
        }),
        Use::Spent { .. } => replayed("single-use token was already used"),
        Use::Active { key, .. } => {
            let joins = matches!((session_key, key.as_deref()), (Some(a), Some(b)) if a == b);
            if joins {
                Ok(())
            } else {
                replayed("token is in use by another session")
            }
        }
        Use::Idle if policy == ReusePolicy::SingleUse => {
            replayed("single-use token was already used")
        }
        Use::Idle => Ok(()),
    }
}

/// The default store: in memory, bounded, expiring.
#[derive(Debug)]
pub struct MemoryRedemptions {
    /// Maximum entries; past it, expired entries are swept and, if the store is
    /// still full, new tokens are refused as `unavailable` (never evicting a live
    /// entry, which would allow a replay).
    capacity: usize,
    /// Added to `exp` so a token refused late by leeway is still remembered.
    grace_secs: u64,
    entries: Mutex<HashMap<String, Entry>>,
}

impl MemoryRedemptions {
    /// A store holding at most `capacity` tokens.
    pub fn new(capacity: usize, grace_secs: u64) -> Self {
        Self {
            capacity,
            grace_secs,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Entries currently held (for metrics and tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave an entry half-written
        // (every update is a single assignment), so the data stays usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make_room(&self, entries: &mut HashMap<String, Entry>, now: u64) -> Result<(), RedeemError> {
        if entries.len() < self.capacity {
            return Ok(());
        }
        entries.retain(|_, e| {
            now <= e.forget_after
                || matches!(e.state, Use::Active { .. })
                || matches!(e.state, Use::Spent { sessions } | Use::Revoked { sessions } if sessions > 0)
        });
        if entries.len() < self.capacity {
            Ok(())
        } else {
            Err(RedeemError {
                reason: RefusalReason::Unavailable,
                detail: "token store is full",
            })
        }
    }
}

impl MemoryRedemptions {
    /// See [`RedemptionStore::redeem`].
    pub fn redeem(
        &self,
        jti: &str,
        exp: u64,
        policy: ReusePolicy,
        session_key: Option<&str>,
        now: u64,
    ) -> Result<(), RedeemError> {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(jti) {
            admit(&entry.state, policy, session_key)?;
            entry.state = match &entry.state {
                Use::Active { sessions, key } => Use::Active {
                    sessions: sessions + 1,
                    key: key.clone(),
                },
                _ => Use::Active {
                    sessions: 1,
                    key: session_key.map(str::to_string),
                },
            };
            return Ok(());
        }
        self.make_room(&mut entries, now)?;
        let state = match policy {
            ReusePolicy::SingleUse => Use::Spent { sessions: 1 },
            ReusePolicy::Reconnect | ReusePolicy::Takeover => Use::Active {
                sessions: 1,
                key: session_key.map(str::to_string),
            },
        };
        entries.insert(
            jti.to_string(),
            Entry {
                forget_after: exp.saturating_add(self.grace_secs),
                state,
            },
        );
        Ok(())
    }

    /// See [`RedemptionStore::would_redeem`].
    pub fn would_redeem(
        &self,
        jti: &str,
        policy: ReusePolicy,
        session_key: Option<&str>,
    ) -> Result<(), RedeemError> {
        match self.lock().get(jti) {
            Some(entry) => admit(&entry.state, policy, session_key),
            None => Ok(()),
        }
    }

    /// See [`RedemptionStore::release`].
    pub fn release(&self, jti: &str) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(jti) else {
            return;
        };
        match &mut entry.state {
            Use::Active { sessions, .. } => {
                *sessions = sessions.saturating_sub(1);
                if *sessions == 0 {
                    entry.state = Use::Idle;
                }
            }
            Use::Spent { sessions } | Use::Revoked { sessions } => {
                *sessions = sessions.saturating_sub(1);
            }
            Use::Idle => {}
        }
    }

    /// See [`RedemptionStore::revoke`].
    pub fn revoke(&self, jti: &str, exp: u64, now: u64) -> Result<(), RedeemError> {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(jti) {
            let sessions = match entry.state {
                Use::Active { sessions, .. }
                | Use::Spent { sessions }
                | Use::Revoked { sessions } => sessions,
                Use::Idle => 0,
            };
            entry.state = Use::Revoked { sessions };
            entry.forget_after = entry.forget_after.max(exp.saturating_add(self.grace_secs));
            return Ok(());
        }
        self.make_room(&mut entries, now)?;
        entries.insert(
            jti.to_string(),
            Entry {
                forget_after: exp.saturating_add(self.grace_secs),
                state: Use::Revoked { sessions: 0 },
            },
        );
        Ok(())
    }

    /// See [`RedemptionStore::is_revoked`].
    pub fn is_revoked(&self, jti: &str) -> bool {
        matches!(
            self.lock().get(jti).map(|e| &e.state),
            Some(Use::Revoked { .. })
        )
    }
}

impl RedemptionStore for MemoryRedemptions {
    fn redeem<'a>(
        &'a self,
        jti: &'a str,
        exp: u64,
        policy: ReusePolicy,
        session_key: Option<&'a str>,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RedeemError>> {
        Box::pin(std::future::ready(MemoryRedemptions::redeem(
            self,
            jti,
            exp,
            policy,
            session_key,
            now,
        )))
    }

    fn would_redeem<'a>(
        &'a self,
        jti: &'a str,
        policy: ReusePolicy,
        session_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), RedeemError>> {
        Box::pin(std::future::ready(MemoryRedemptions::would_redeem(
            self,
            jti,
            policy,
            session_key,
        )))
    }

    fn release<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, ()> {
        // Done at the call, not at the first poll: see `Redemption`'s drop.
        MemoryRedemptions::release(self, jti);
        Box::pin(std::future::ready(()))
    }

    fn revoke<'a>(
        &'a self,
        jti: &'a str,
        exp: u64,
        now: u64,
    ) -> BoxFuture<'a, Result<(), RedeemError>> {
        Box::pin(std::future::ready(MemoryRedemptions::revoke(
            self, jti, exp, now,
        )))
    }

    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool, RedeemError>> {
        Box::pin(std::future::ready(Ok(MemoryRedemptions::is_revoked(
            self, jti,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const EXP: u64 = NOW + 60;

    fn store(capacity: usize) -> Arc<MemoryRedemptions> {
        Arc::new(MemoryRedemptions::new(capacity, 5))
    }

    fn begin(
        s: &Arc<MemoryRedemptions>,
        jti: &str,
        policy: ReusePolicy,
        key: Option<&str>,
    ) -> Result<Redemption, RefusalReason> {
        use futures_util::FutureExt as _;
        Redemption::begin(s.clone(), jti, EXP, policy, key, NOW)
            .now_or_never()
            .expect("the memory store answers at once")
            .map_err(|e| e.reason)
    }

    #[test]
    fn reconnect_allows_reuse_one_session_at_a_time() {
        let s = store(10);
        let first = begin(&s, "a", ReusePolicy::Reconnect, None).expect("first use");
        // A second tab while the first session runs: refused.
        assert_eq!(
            begin(&s, "a", ReusePolicy::Reconnect, None).unwrap_err(),
            RefusalReason::Replayed
        );
        drop(first);
        // noVNC reconnecting after the session ended: allowed, within the token's life.
        let again = begin(&s, "a", ReusePolicy::Reconnect, None).expect("reconnect");
        drop(again);
        // Another token is unaffected throughout.
        begin(&s, "b", ReusePolicy::Reconnect, None).expect("other token");
    }

    #[test]
    fn takeover_is_reconnect_to_the_store() {
        // The session layer ends the running session before redeeming again.
        let s = store(10);
        let first = begin(&s, "a", ReusePolicy::Takeover, None).expect("first use");
        assert_eq!(
            begin(&s, "a", ReusePolicy::Takeover, None).unwrap_err(),
            RefusalReason::Replayed
        );
        drop(first);
        drop(begin(&s, "a", ReusePolicy::Takeover, None).expect("after the old one ended"));
        begin(&s, "a", ReusePolicy::Takeover, None).expect("never spent");
    }

    #[test]
    fn single_use_refuses_any_second_use() {
        let s = store(10);
        drop(begin(&s, "a", ReusePolicy::SingleUse, None).expect("first use"));
        assert_eq!(
            begin(&s, "a", ReusePolicy::SingleUse, None).unwrap_err(),
            RefusalReason::Replayed
        );
        begin(&s, "b", ReusePolicy::SingleUse, None).expect("fresh token");
    }

    #[test]
    fn channels_of_one_session_join_but_other_sessions_are_refused() {
        let s = store(10);
        let main = begin(&s, "a", ReusePolicy::Reconnect, Some("sess-1")).expect("main channel");
        let display =
            begin(&s, "a", ReusePolicy::Reconnect, Some("sess-1")).expect("display channel");
        assert_eq!(
            begin(&s, "a", ReusePolicy::Reconnect, Some("sess-2")).unwrap_err(),
            RefusalReason::Replayed
        );
        assert_eq!(
            begin(&s, "a", ReusePolicy::Reconnect, None).unwrap_err(),
            RefusalReason::Replayed
        );
        drop(main);
        // One channel still open: the session still holds the token.
        assert_eq!(
            begin(&s, "a", ReusePolicy::Reconnect, Some("sess-2")).unwrap_err(),
            RefusalReason::Replayed
        );
        drop(display);
        begin(&s, "a", ReusePolicy::Reconnect, Some("sess-2"))
            .expect("new session after the old ended");
    }

    #[test]
    fn revoked_tokens_are_dead_used_or_not() {
        let s = store(10);
        // Revoking an unused token.
        s.revoke("unused", EXP, NOW).unwrap();
        assert_eq!(
            begin(&s, "unused", ReusePolicy::Reconnect, None).unwrap_err(),
            RefusalReason::Revoked
        );
        // Killing a token mid-session: the session's release does not revive it.
        let live = begin(&s, "live", ReusePolicy::Reconnect, None).expect("first use");
        s.revoke("live", EXP, NOW).unwrap();
        assert!(s.is_revoked("live"));
        drop(live);
        assert_eq!(
            begin(&s, "live", ReusePolicy::Reconnect, None).unwrap_err(),
            RefusalReason::Revoked
        );
        begin(&s, "other", ReusePolicy::Reconnect, None).expect("other token unaffected");
    }

    #[test]
    fn store_is_bounded_and_forgets_expired_tokens() {
        let s = store(2);
        drop(begin(&s, "a", ReusePolicy::Reconnect, None).unwrap());
        let _b = begin(&s, "b", ReusePolicy::Reconnect, None).unwrap();
        // Full of live tokens: a new one is refused, nothing live is evicted.
        assert_eq!(
            begin(&s, "c", ReusePolicy::Reconnect, None).unwrap_err(),
            RefusalReason::Unavailable
        );
        assert_eq!(
            begin(&s, "b", ReusePolicy::Reconnect, None).unwrap_err(),
            RefusalReason::Replayed
        );
        // Once "a" has expired (plus grace) it can be forgotten to make room.
        let later = EXP + 6;
        s.redeem("c", later + 60, ReusePolicy::Reconnect, None, later)
            .expect("room after expiry");
        assert_eq!(s.len(), 2);
    }
}
