//! Failed ticket attempts per client address, and the backoff they earn.
//!
//! Tickets are 192 bits: guessing one is hopeless, but a client that keeps
//! presenting bad ones is either broken or guessing, and either way should
//! not get 500 tries a second. Like a login endpoint, the first few failures
//! from an address are free; after that the address must wait before its
//! next try, twice as long after each further failure (up to a minute),
//! until it has been quiet for a while. IPv6 addresses count by /64 (one
//! host holds a whole one). The table is bounded; past its size, new
//! addresses are not tracked (and pruning happens at most once a second),
//! so a flood of addresses costs memory no more than time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::transport::gate::counted_as;

/// Failures an address may have before it must wait.
const FREE: u32 = 10;
/// The first wait; doubled after each further failure.
const FIRST_WAIT: Duration = Duration::from_millis(500);
/// The longest wait.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// An address quiet this long starts over.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses tracked at most.
const CAPACITY: usize = 65_536;

#[derive(Debug)]
struct Failures {
    count: u32,
    last: Instant,
    wait_until: Instant,
}

#[derive(Debug)]
struct Table {
    by_address: HashMap<IpAddr, Failures>,
    next_prune: Instant,
}

/// Failed ticket attempts by client address.
#[derive(Debug)]
pub struct FailedTickets {
    table: Mutex<Table>,
}

impl Default for FailedTickets {
    fn default() -> Self {
        Self {
            table: Mutex::new(Table {
                by_address: HashMap::new(),
                next_prune: Instant::now(),
            }),
        }
    }
}

impl FailedTickets {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every update completes under the lock: a poisoned table is consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `addr` must still wait before its next try, if it must.
    pub fn wait_for(&self, addr: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let table = self.lock();
        let f = table.by_address.get(&counted_as(addr))?;
        (f.wait_until > now).then(|| f.wait_until - now)
    }

    /// Whether `addr` failed lately (and has not succeeded since).
    pub fn failed_lately(&self, addr: IpAddr) -> bool {
        let now = Instant::now();
        let table = self.lock();
        table
            .by_address
            .get(&counted_as(addr))
            .is_some_and(|f| now.duration_since(f.last) < FORGET_AFTER)
    }

    /// `addr` presented a ticket that admitted nothing.
    pub fn failed(&self, addr: IpAddr) {
        let now = Instant::now();
        let mut table = self.lock();
        let key = counted_as(addr);
        if !table.by_address.contains_key(&key) && table.by_address.len() >= CAPACITY {
            if now < table.next_prune {
                return;
            }
            table.next_prune = now + Duration::from_secs(1);
            table
                .by_address
                .retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if table.by_address.len() >= CAPACITY {
                return;
            }
        }
        let f = table.by_address.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            wait_until: now,
        });
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        if f.count > FREE {
            let doublings = (f.count - FREE - 1).min(16);
            f.wait_until = now + (FIRST_WAIT * 2u32.pow(doublings)).min(MAX_WAIT);
        }
    }

    /// `addr` presented a good ticket: its failures are forgiven.
    pub fn succeeded(&self, addr: IpAddr) {
        let mut table = self.lock();
        table.by_address.remove(&counted_as(addr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_address_that_keeps_failing_waits_longer_each_time() {
        let t = FailedTickets::default();
        let guesser: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..FREE {
            t.failed(guesser);
            assert_eq!(t.wait_for(guesser), None, "the first failures are free");
        }
        t.failed(guesser);
        assert_eq!(t.wait_for(guesser), Some(FIRST_WAIT));
        t.failed(guesser);
        assert_eq!(t.wait_for(guesser), Some(FIRST_WAIT * 2));
        assert_eq!(t.wait_for(other), None, "another address is not held up");
        for _ in 0..40 {
            t.failed(guesser);
        }
        assert_eq!(t.wait_for(guesser), Some(MAX_WAIT));
        tokio::time::advance(MAX_WAIT).await;
        assert_eq!(t.wait_for(guesser), None);
        // Quiet for long enough, it starts over.
        tokio::time::advance(FORGET_AFTER).await;
        t.failed(guesser);
        assert_eq!(t.wait_for(guesser), None);
        t.succeeded(guesser);
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_counts_by_64_and_success_forgives() {
        let t = FailedTickets::default();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..=FREE {
            t.failed(a);
        }
        assert!(t.wait_for(b).is_some(), "the same /64");
        assert!(t.wait_for("2001:db8:1:3::1".parse().unwrap()).is_none());
        t.succeeded(b);
        assert_eq!(t.wait_for(a), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ipv4_client_of_a_dual_stack_listener_counts_as_itself() {
        let t = FailedTickets::default();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        for _ in 0..=FREE {
            t.failed(mapped);
        }
        assert!(t.wait_for("192.0.2.7".parse().unwrap()).is_some());
        assert!(
            t.wait_for("::ffff:192.0.2.8".parse().unwrap()).is_none(),
            "another IPv4 client is not in the guesser's /64 (::/64)"
        );
    }
}
