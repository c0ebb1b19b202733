//! What every node remembers so that a Redis that lost its data (restarted
//! without persistence, failed over to an empty replica) never forgets a
//! revocation (nor whether it keeps its sessions) or a spent single-use token.
//!
//! Every revocation and every spent single-use token is published on the
//! `<prefix>events` channel; every node keeps them (until they expire, at
//! most [`CAPACITY`]) and, at start, reads the ones already in the store.
//! The store carries an *epoch* (`<prefix>epoch`, a random value the first
//! node sets). A node that finds it missing or changed knows the store lost
//! its data: it refuses every operation meanwhile (`/readyz` 503), writes
//! back what it remembers, sets the epoch again, and admits again. Leases
//! come back by their nodes' renewals; unused tickets are lost (users
//! exchange again).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;

use redis::FromRedisValue as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Redis;

/// Entries remembered at most; past it, new ones are not (and that is logged).
const CAPACITY: usize = 200_000;

/// What a node publishes for the others to remember.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Event {
    /// A token revoked (or its session killed) until `until` (unix ms);
    /// `keep`: with `keep_sessions` (a node that predates it reads a plain
    /// revocation, as it wrote them).
    RevokedJti {
        jti: String,
        until: u64,
        #[serde(default)]
        keep: bool,
    },
    /// An instance's tokens issued up to `at` (unix s) revoked until `until` (ms).
    RevokedInstance {
        instance: String,
        at: u64,
        until: u64,
    },
    /// A single-use token spent, remembered until `until` (ms).
    Spent { jti: String, until: u64 },
}

#[derive(Debug, Default)]
struct Entries {
    /// Until when, and whether every revocation of it kept its sessions.
    jtis: HashMap<String, (u64, bool)>,
    instances: HashMap<String, (u64, u64)>,
    spent: HashMap<String, u64>,
}

impl Entries {
    fn len(&self) -> usize {
        self.jtis.len() + self.instances.len() + self.spent.len()
    }

    fn prune(&mut self, now_ms: u64) {
        self.jtis.retain(|_, (u, _)| *u > now_ms);
        self.instances.retain(|_, (_, u)| *u > now_ms);
        self.spent.retain(|_, u| *u > now_ms);
    }
}

/// A node's memory of revocations and spent tokens.
#[derive(Debug, Default)]
pub(super) struct Remembered {
    entries: Mutex<Entries>,
}

fn now_ms() -> u64 {
    crate::token::unix_now() * 1000
}

impl Remembered {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn add(&self, e: &Event) {
        let mut entries = self.lock();
        if entries.len() >= CAPACITY {
            entries.prune(now_ms());
            if entries.len() >= CAPACITY {
                tracing::warn!(
                    "too many revocations to remember: a store that loses its data would forget this one"
                );
                return;
            }
        }
        match e {
            Event::RevokedJti { jti, until, keep } => {
                // As the store's script: one that ends sessions wins.
                let e = entries.jtis.entry(jti.clone()).or_insert((0, true));
                *e = (e.0.max(*until), e.1 && *keep);
            }
            Event::RevokedInstance {
                instance,
                at,
                until,
            } => {
                let e = entries.instances.entry(instance.clone()).or_default();
                *e = (e.0.max(*at), e.1.max(*until));
            }
            Event::Spent { jti, until } => {
                let u = entries.spent.entry(jti.clone()).or_default();
                *u = (*u).max(*until);
            }
        }
    }

    fn all(&self) -> Vec<Event> {
        let mut entries = self.lock();
        entries.prune(now_ms());
        let jtis = entries.jtis.iter().map(|(j, (u, keep))| Event::RevokedJti {
            jti: j.clone(),
            until: *u,
            keep: *keep,
        });
        let instances = entries
            .instances
            .iter()
            .map(|(i, (at, u))| Event::RevokedInstance {
                instance: i.clone(),
                at: *at,
                until: *u,
            });
        let spent = entries.spent.iter().map(|(j, u)| Event::Spent {
            jti: j.clone(),
            until: *u,
        });
        jtis.chain(instances).chain(spent).collect()
    }
}

impl Redis {
    /// Records `event` here and tells the other nodes (best effort: each
    /// also reads the store at start).
    pub(super) async fn note(&self, event: Event) {
        self.remembered.add(&event);
        let Ok(payload) = serde_json::to_string(&event) else {
            return;
        };
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.key(&["events"])).arg(payload);
        if let Err(e) = self.cmd::<i64>(cmd).await {
            tracing::warn!("cannot tell the other nodes of a revocation: {e}");
        }
    }

    /// Remembers what the other nodes publish, until `stop`.
    pub(super) async fn follow_events(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let channel = [self.key(&["events"])];
        self.follow(&channel, stop, |payload| {
            // Other messages share the channel (sessions ending).
            if let Ok(event) = serde_json::from_slice::<Event>(payload) {
                self.remembered.add(&event);
            }
        })
        .await;
    }

    /// The store's epoch as this node knows it.
    pub(super) fn known_epoch(&self) -> String {
        self.epoch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// An operation found the store's epoch changed (it lost its data):
    /// refuse everything until the probe has re-seeded it.
    pub(super) fn epoch_lost(&self) {
        if !self.reseeding.swap(true, Relaxed) {
            tracing::warn!("the store's epoch changed: refusing until it is re-seeded");
        }
    }

    /// Reads the store's epoch (once a second, from the probe): learns it at
    /// first contact (with what the store remembers), and re-seeds a store
    /// that lost it.
    pub(super) async fn check_epoch(&self) {
        let key = self.key(&["epoch"]);
        let mut get = redis::cmd("GET");
        get.arg(&key);
        let Ok(found) = self
            .run_now(|mut c| async move { get.query_async::<Option<String>>(&mut c).await })
            .await
        else {
            return;
        };
        let mut known = self.epoch.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match (&known, &found) {
            (Some(k), Some(f)) if k == f => {
                self.epoch_checked.store(true, Relaxed);
                if self.reseeding.swap(false, Relaxed) {
                    tracing::info!("store ready");
                }
                return;
            }
            (None, Some(_)) => {
                if let Err(e) = self.load_remembered().await {
                    tracing::warn!("cannot read the store's revocations yet: {e}");
                    return;
                }
            }
            (None, None) => {}
            (Some(_), _) => {
                let entries = self.remembered.all();
                if let Err(e) = self.reseed(&entries).await {
                    tracing::warn!("cannot re-seed the store yet: {e}");
                    return;
                }
                tracing::warn!(
                    entries = entries.len(),
                    "the store lost its data (its epoch changed): re-seeded it with the revocations and spent tokens this node remembers"
                );
            }
        }
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(crate::token::signing::random_token(12))
            .arg("NX");
        let mut get = redis::cmd("GET");
        get.arg(&key);
        let mut pipe = redis::pipe();
        pipe.add_command(set).ignore().add_command(get);
        let Ok((epoch,)) = self
            .run_now(|mut c| async move { pipe.query_async::<(String,)>(&mut c).await })
            .await
        else {
            return;
        };
        known = Some(epoch);
        *self.epoch.lock().unwrap_or_else(|p| p.into_inner()) = known;
        self.epoch_checked.store(true, Relaxed);
        if self.reseeding.swap(false, Relaxed) {
            tracing::info!("store ready");
        }
    }

    async fn reseed(&self, entries: &[Event]) -> Result<(), super::StoreError> {
        self.reseeding.store(true, Relaxed);
        for chunk in entries.chunks(1000) {
            let mut pipe = redis::pipe();
            for e in chunk {
                match e {
                    Event::RevokedJti { jti, until, keep } => {
                        pipe.cmd("SET")
                            .arg(self.key(&["revoked", "jti", jti]))
                            .arg(if *keep { "keep" } else { "1" })
                            .arg("PXAT")
                            .arg(*until)
                            .ignore();
                    }
                    Event::RevokedInstance {
                        instance,
                        at,
                        until,
                    } => {
                        pipe.cmd("SET")
                            .arg(self.key(&["revoked", "instance", instance]))
                            .arg(at.to_string())
                            .arg("PXAT")
                            .arg(*until)
                            .ignore();
                    }
                    Event::Spent { jti, until } => {
                        pipe.cmd("SET")
                            .arg(self.key(&["spent", jti]))
                            .arg("1")
                            .arg("PXAT")
                            .arg(*until)
                            .ignore();
                    }
                }
            }
            self.run_now(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await?;
        }
        Ok(())
    }

    /// At first contact: what the store holds already (a scan, once).
    async fn load_remembered(&self) -> Result<(), super::StoreError> {
        for (pattern, kind) in [
            (self.key(&["revoked", "jti", "*"]), 0),
            (self.key(&["revoked", "instance", "*"]), 1),
            (self.key(&["spent", "*"]), 2),
        ] {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<String>) = self
                    .run_now(|mut c| async move { scan.query_async(&mut c).await })
                    .await?;
                if !keys.is_empty() {
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.cmd("PEXPIRETIME").arg(k).get(k);
                    }
                    let found: Vec<(i64, Option<String>)> = self
                        .run_now(|mut c| async move {
                            let v: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                            Ok(v.chunks(2)
                                .map(|p| {
                                    let t = i64::from_redis_value(p[0].clone()).unwrap_or(-1);
                                    let v = Option::<String>::from_redis_value(p[1].clone())
                                        .unwrap_or(None);
                                    (t, v)
                                })
                                .collect())
                        })
                        .await?;
                    let prefix = pattern.trim_end_matches('*');
                    for (k, (until, value)) in keys.iter().zip(found) {
                        // The store's answer is not trusted to match the pattern.
                        let (Ok(until), Some(id)) = (u64::try_from(until), k.strip_prefix(prefix))
                        else {
                            continue;
                        };
                        let id = id.to_string();
                        self.remembered.add(&match kind {
                            0 => Event::RevokedJti {
                                jti: id,
                                until,
                                keep: value.as_deref() == Some("keep"),
                            },
                            1 => Event::RevokedInstance {
                                instance: id,
                                at: value.and_then(|v| v.parse().ok()).unwrap_or(0),
                                until,
                            },
                            _ => Event::Spent { jti: id, until },
                        });
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Event, Remembered};

    fn revoked(jti: &str, until: u64, keep: bool) -> Event {
        Event::RevokedJti {
            jti: jti.into(),
            until,
            keep,
        }
    }

    /// As the store's script: a revocation that ends sessions wins over one
    /// that keeps them, in either order; the later expiry holds.
    #[test]
    fn a_revocation_keeps_its_sessions_only_if_every_one_of_it_did() {
        let now = super::now_ms();
        let r = Remembered::default();
        r.add(&revoked("kept", now + 10_000, true));
        r.add(&revoked("kept", now + 5_000, true));
        r.add(&revoked("ended-after", now + 10_000, true));
        r.add(&revoked("ended-after", now + 5_000, false));
        r.add(&revoked("ended-before", now + 5_000, false));
        r.add(&revoked("ended-before", now + 20_000, true));
        let mut all: Vec<_> = r
            .all()
            .into_iter()
            .map(|e| match e {
                Event::RevokedJti { jti, until, keep } => (jti, until - now, keep),
                other => panic!("{other:?}"),
            })
            .collect();
        all.sort();
        assert_eq!(
            all,
            [
                ("ended-after".into(), 10_000, false),
                ("ended-before".into(), 20_000, false),
                ("kept".into(), 10_000, true),
            ]
        );
    }
}
