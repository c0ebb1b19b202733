//! The RSA-1024 keys SPICE clients encrypt their tickets to.
//!
//! spice-server makes a key per link, but generating one costs ~14 ms (release
//! build), far more than the ~0.2 ms a decryption takes, and anyone can open
//! links before logging in. So keys are made off the accept path: a small ring
//! of keys, one replaced every rotation period by a background task. A key
//! serves many links for a short while, which also bounds what the `rsa`
//! crate's decryption timing side channel (RUSTSEC-2023-0071) can be measured
//! against: a key serves links for `RING` rotation periods at most.
//!
//! A period in which no link picked a key skips its rotation: nothing was
//! measured against the ring, so the bound holds, and an idle node spends
//! nothing on keys (a key costs ~14 ms, more on a busy machine: 0.8% of
//! Porthole's CPU in a bulk upload that never opened a SPICE link).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use rsa::RsaPrivateKey;
use tokio_util::sync::CancellationToken;

use crate::protocol::spice::crypto::public_key_der;
use crate::protocol::spice::messages::PUBKEY_LEN;

/// Keys in the ring.
const RING: usize = 4;

/// One link key and its public half as a link reply carries it.
#[derive(Debug)]
pub struct LinkKey {
    /// Decrypts tickets.
    pub private: RsaPrivateKey,
    /// DER SubjectPublicKeyInfo (162 bytes).
    pub der: [u8; PUBKEY_LEN],
}

impl LinkKey {
    /// A fresh key (slow: run it off the async threads).
    pub fn generate() -> Self {
        loop {
            let Ok(private) = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024) else {
                continue;
            };
            if let Some(der) = public_key_der(&private.to_public_key()) {
                return Self { private, der };
            }
        }
    }
}

/// The ring of current link keys.
#[derive(Debug)]
pub struct LinkKeys {
    ring: ArcSwap<Vec<Arc<LinkKey>>>,
    next: AtomicUsize,
    /// A link picked a key since the last rotation.
    picked: AtomicBool,
}

impl LinkKeys {
    /// A full ring of fresh keys.
    pub fn generate() -> Self {
        let ring = (0..RING).map(|_| Arc::new(LinkKey::generate())).collect();
        Self {
            ring: ArcSwap::from_pointee(ring),
            next: AtomicUsize::new(0),
            picked: AtomicBool::new(false),
        }
    }

    /// The key for the next link (round robin); the link holds it to the end
    /// of its handshake, so rotation never pulls a key from under it.
    pub fn pick(&self) -> Arc<LinkKey> {
        self.picked.store(true, Relaxed);
        let ring = self.ring.load();
        ring[self.next.fetch_add(1, Relaxed) % ring.len()].clone()
    }

    /// Replaces the oldest key with `key`.
    pub fn rotate_in(&self, key: LinkKey) {
        let key = Arc::new(key);
        self.ring.rcu(|ring| {
            let mut next: Vec<_> = ring.iter().skip(1).cloned().collect();
            next.push(key.clone());
            next
        });
        crate::metrics::spice_key_rotated();
    }

    /// Whether a rotation is due: a link picked a key since the last one.
    /// Asking starts the next period.
    fn rotation_due(&self) -> bool {
        self.picked.swap(false, Relaxed)
    }

    /// Rotates one key every `every` in which a link picked one, until
    /// `cancel` fires.
    pub fn spawn_rotation(self: &Arc<Self>, every: Duration, cancel: CancellationToken) {
        let keys = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if !keys.rotation_due() {
                    continue;
                }
                match tokio::task::spawn_blocking(LinkKey::generate).await {
                    Ok(key) => keys.rotate_in(key),
                    Err(e) => tracing::error!("link key generation failed: {e}"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_take_turns_and_rotation_replaces_the_oldest() {
        let keys = LinkKeys::generate();
        let first: Vec<_> = (0..RING).map(|_| keys.pick().der).collect();
        assert_eq!(keys.pick().der, first[0], "round robin over the ring");
        let held = keys.pick();
        keys.rotate_in(LinkKey::generate());
        let now: Vec<_> = (0..RING).map(|_| keys.pick().der).collect();
        assert!(!now.contains(&first[0]), "the oldest key left the ring");
        assert!(now.contains(&first[1]));
        // A link that picked a key before the rotation can still decrypt with it.
        assert_eq!(held.der, first[1]);
    }

    #[test]
    fn a_period_without_links_skips_its_rotation() {
        let keys = LinkKeys::generate();
        assert!(!keys.rotation_due(), "no link yet: nothing to rotate");
        keys.pick();
        keys.pick();
        assert!(keys.rotation_due(), "links picked keys in this period");
        assert!(!keys.rotation_due(), "the next period has had no link");
        keys.pick();
        assert!(keys.rotation_due());
    }
}
