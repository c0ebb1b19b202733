//! The gate in front of every listener: connections that have not been
//! admitted yet.
//!
//! A connection costs a descriptor and some memory from the moment it is
//! accepted, long before a token says who it is. The gate bounds that cost:
//! a permit is taken *before* each accept (when all are taken, new
//! connections wait in the kernel's backlog), and each client address may
//! hold only so many of them, so a flood from one address cannot keep
//! another address from opening a console. A connection gives its permit
//! back when it ends or once it is admitted (an HTTP connection when it is
//! upgraded to a session, or once a spice-html5 socket's SPICE link is
//! done; a native one at its handshake deadline); admitted
//! sessions are bounded by the session layer's own caps.
//!
//! When every place is taken, the loop still accepts on one of a few spare
//! places, and the newcomer takes a place from the address holding the
//! most, if that holds more than the newcomer's would: the oldest of its
//! pending connections is closed and its place handed over. Otherwise the
//! newcomer is closed at once. Either way the spare place is free again at
//! once, so the loop keeps draining the backlog, and a flood spread over
//! many addresses cannot keep a fresh address out: it only ever loses its
//! own oldest connections. IPv6 addresses count by their /64, which one
//! client usually holds whole.
//!
//! The address is the client's: the peer's, or, where a listener expects
//! PROXY headers from a trusted proxy, the one its header names (the gate is
//! then entered after the header is read, see
//! `listener::Arrival::client`). Load balancers (`listen.trusted_proxies`)
//! carry many clients on one address and are not capped per address.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Caps on connections not admitted yet.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    /// Accepts past a full gate, each held only until it takes a place or is refused.
    spare: Arc<Semaphore>,
    per_address: Option<usize>,
    exempt: Vec<ipnet::IpNet>,
    held: Mutex<Held>,
    names: &'static Names,
}

/// Each counted address's pending connections, oldest first.
#[derive(Debug, Default)]
struct Held {
    by_address: HashMap<IpAddr, VecDeque<Waiting>>,
    next_id: u64,
}

/// One counted pending connection, holding its place.
#[derive(Debug)]
struct Waiting {
    id: u64,
    place: OwnedSemaphorePermit,
    evicted: CancellationToken,
    /// It may be closed to make room (an HTTP connection; not a native
    /// one, which may carry a session before its place is given back).
    evictable: bool,
    /// Requests of it being handled, or answers on their way (on a gate
    /// that protects those): not closed to make room meanwhile. A count,
    /// not a flag: hyper may read a pipelined request before it drops the
    /// body of the answer before it, so a start and the previous end can
    /// come in either order.
    busy: u32,
}

impl Waiting {
    fn may_go(&self) -> bool {
        self.evictable && self.busy == 0
    }
}

/// A place taken before an accept: a slot, or a spare one.
#[derive(Debug)]
pub struct Permit {
    permit: OwnedSemaphorePermit,
    spare: bool,
}

/// Why the gate closed a connection at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    /// Its address holds its most places already.
    #[error("this address holds its most connections not yet admitted")]
    AddressFull,
    /// Every place is taken and no address holds more than this one would.
    #[error(
        "every place for connections not yet admitted is taken, none by an address holding more"
    )]
    GateFull,
}

/// What a gate's refusals are counted (`porthole_limits_hit_total{limit}`)
/// and logged as: the consoles' listeners share one gate, the admin
/// listener has its own, and a dashboard must tell them apart.
#[derive(Debug)]
struct Names {
    address_full: &'static str,
    gate_full: &'static str,
    evicted: &'static str,
    connection: &'static str,
    /// A connection with a request in flight keeps its place.
    protects_requests: bool,
}

const CONSOLES: Names = Names {
    address_full: "pending_per_address",
    gate_full: "pending_full",
    evicted: "pending_evicted",
    connection: "connection",
    // Its requests are page loads and upgrades: cheap to lose, and an open
    // must not pay for two more locks.
    protects_requests: false,
};

const ADMIN: Names = Names {
    address_full: "admin_pending_per_address",
    gate_full: "admin_pending_full",
    evicted: "admin_pending_evicted",
    connection: "admin connection",
    protects_requests: true,
};

/// A connection's place behind the gate; given back on drop.
#[derive(Debug)]
pub struct Pass {
    /// The place of a connection not counted per address (counted ones
    /// keep theirs in the gate, which may hand it to a newcomer).
    _place: Option<OwnedSemaphorePermit>,
    counted: Option<(Arc<Gate>, IpAddr, u64)>,
    evicted: CancellationToken,
}

impl Pass {
    /// Fires when the gate has handed this connection's place to another
    /// address's: its task must end, closing the socket.
    pub fn evicted(&self) -> CancellationToken {
        self.evicted.clone()
    }

    /// Marks a request of this connection as being handled, its answer
    /// on its way (`true`), or one of those done (`false`, once for each
    /// `true`): a handler cut off halfway may have
    /// done half of what it was asked, and a download cut off must start
    /// again. Called only where the gate [protects requests in
    /// flight](Gate::protects_requests).
    pub fn handling(&self, busy: bool) {
        let Some((gate, key, id)) = &self.counted else {
            return;
        };
        let mut held = gate.lock();
        if let Some(w) = held
            .by_address
            .get_mut(key)
            .and_then(|q| q.iter_mut().find(|w| w.id == *id))
        {
            w.busy = if busy {
                w.busy + 1
            } else {
                w.busy.saturating_sub(1)
            };
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some((gate, key, id)) = self.counted.take() {
            let mut held = gate.lock();
            if let Some(queue) = held.by_address.get_mut(&key) {
                queue.retain(|w| w.id != id);
                if queue.is_empty() {
                    held.by_address.remove(&key);
                }
            }
        }
    }
}

/// The address a client counts as, wherever clients are counted (this
/// gate, the sessions' per-client caps and playbacks, the failed-ticket and
/// Nova-lookup backoffs): IPv6 by its /64, which one client usually holds
/// whole, and an IPv4 client of a dual-stack listener (`::ffff:a.b.c.d`)
/// by its IPv4 address. Counted by the exact IPv6 address, one client
/// could hold 2^64 caps; unmapped, every IPv4 client of a dual-stack
/// listener would share `::/64`.
pub fn counted_as(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

/// Spare places: accepts in flight past a full gate.
const SPARE: usize = 4;

impl Gate {
    /// At most `max` connections waiting for admission, at most
    /// `per_address` of them from one address (none: no per-address cap,
    /// and no taking places from others), except from the `exempt` networks.
    pub fn new(max: usize, per_address: Option<usize>, exempt: Vec<ipnet::IpNet>) -> Arc<Self> {
        Self::named(max, per_address, exempt, &CONSOLES)
    }

    fn named(
        max: usize,
        per_address: Option<usize>,
        exempt: Vec<ipnet::IpNet>,
        names: &'static Names,
    ) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max)),
            spare: Arc::new(Semaphore::new(if per_address.is_some() {
                SPARE
            } else {
                0
            })),
            per_address,
            exempt,
            held: Mutex::default(),
            names,
        })
    }

    /// The admin listener's gate: at most `max` connections, counted by
    /// address with no lower cap for one, so that when every place is
    /// taken a newcomer from another address (a health check, Prometheus)
    /// takes the oldest place of the address holding the most instead of
    /// waiting behind a flood; never one whose request is being handled
    /// ([`Pass::handling`]: a revocation or a reload is not cut off
    /// halfway). Its refusals are counted as `admin_pending_*`.
    pub fn admin(max: usize) -> Arc<Self> {
        Self::named(max, Some(max), Vec::new(), &ADMIN)
    }

    /// The metric label of a refusal of this gate.
    pub fn label(&self, why: GateRefusal) -> &'static str {
        match why {
            GateRefusal::AddressFull => self.names.address_full,
            GateRefusal::GateFull => self.names.gate_full,
        }
    }

    /// Whether a connection keeps its place while a request of it is
    /// handled ([`Pass::handling`]).
    pub fn protects_requests(&self) -> bool {
        self.names.protects_requests
    }

    /// What a refused connection is called in the log.
    pub fn connection(&self) -> &'static str {
        self.names.connection
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // Every update completes under the lock: a poisoned map is consistent.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a free place (before an accept): a slot, else a spare one.
    pub async fn permit(&self) -> Permit {
        let slot = |permit| Permit {
            permit,
            spare: false,
        };
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return slot(p);
        }
        tokio::select! {
            biased;
            p = self.slots.clone().acquire_owned() => slot(p.expect("never closed")),
            p = self.spare.clone().acquire_owned() => Permit {
                permit: p.expect("never closed"),
                spare: true,
            },
        }
    }

    /// Lets a connection from `addr` in with `permit`, unless its address
    /// holds its most places already; `evictable`: it may later be closed
    /// to make room for another. On a spare permit (a slot freed since is
    /// taken instead) it takes the place of the oldest evictable pending
    /// connection of the address holding the most, if that holds more than
    /// `addr` would (that connection is told by [`Pass::evicted`]); else it
    /// is refused, unless its address is exempt (a balancer's connections
    /// cannot be judged by address: it keeps the spare place).
    pub fn enter(
        self: &Arc<Self>,
        permit: Permit,
        addr: IpAddr,
        evictable: bool,
    ) -> Result<Pass, GateRefusal> {
        let evicted = CancellationToken::new();
        let counted = self.per_address.filter(|_| !self.is_exempt(addr));
        let key = counted_as(addr);
        let mut held = self.lock();
        let mine = match counted {
            Some(_) => held.by_address.get(&key).map_or(0, VecDeque::len),
            None => 0,
        };
        if counted.is_some_and(|cap| mine >= cap) {
            return Err(GateRefusal::AddressFull);
        }
        let freed = permit
            .spare
            .then(|| self.slots.clone().try_acquire_owned().ok())
            .flatten();
        // A spare permit that is not kept goes back as it drops here.
        let place = match (permit.spare, freed) {
            (false, _) => permit.permit,
            (true, Some(slot)) => slot,
            (true, None) => match take_place(&mut held, key, mine) {
                Some(taken) => {
                    crate::metrics::limit_hit(self.names.evicted);
                    taken
                }
                None if counted.is_none() => permit.permit,
                None => return Err(GateRefusal::GateFull),
            },
        };
        if counted.is_none() {
            return Ok(Pass {
                _place: Some(place),
                counted: None,
                evicted,
            });
        }
        let id = held.next_id;
        held.next_id += 1;
        held.by_address.entry(key).or_default().push_back(Waiting {
            id,
            place,
            evicted: evicted.clone(),
            evictable,
            busy: 0,
        });
        Ok(Pass {
            _place: None,
            counted: Some((self.clone(), key, id)),
            evicted,
        })
    }

    fn is_exempt(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.exempt.iter().any(|n| n.contains(&addr))
    }

    /// Places free now (for tests and the admin view).
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// Takes the place of the oldest evictable connection of the address (not
/// `key`) holding the most among those with one, if it holds more than
/// `mine + 1`, and tells it.
fn take_place(held: &mut Held, key: IpAddr, mine: usize) -> Option<OwnedSemaphorePermit> {
    let (&most, _) = held
        .by_address
        .iter()
        .filter(|(a, queue)| {
            **a != key && queue.len() > mine + 1 && queue.iter().any(Waiting::may_go)
        })
        .max_by_key(|(_, queue)| queue.len())?;
    let queue = held.by_address.get_mut(&most)?;
    let at = queue.iter().position(Waiting::may_go)?;
    let victim = queue.remove(at)?;
    if queue.is_empty() {
        held.by_address.remove(&most);
    }
    victim.evicted.cancel();
    Some(victim.place)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_address_cannot_take_every_place() {
        let gate = Gate::new(4, Some(2), vec!["10.0.0.0/8".parse().unwrap()]);
        let flood: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let a = gate.enter(gate.permit().await, flood, true).unwrap();
        let _b = gate.enter(gate.permit().await, flood, true).unwrap();
        assert_eq!(
            gate.enter(gate.permit().await, flood, true).unwrap_err(),
            GateRefusal::AddressFull,
            "third from one address"
        );
        // The refused one's permit came back: another address gets in.
        assert_eq!(gate.available(), 2);
        let _c = gate.enter(gate.permit().await, other, true).unwrap();
        drop(a);
        let _d = gate.enter(gate.permit().await, flood, true).unwrap();
        // A load balancer is not capped per address, only by the total.
        let lb: IpAddr = "10.1.2.3".parse().unwrap();
        let _lb = gate.enter(gate.permit().await, lb, true).unwrap();
        assert_eq!(gate.available(), 0);
    }

    #[tokio::test]
    async fn a_full_gate_hands_a_fresh_address_the_biggest_holders_oldest_place() {
        let gate = Gate::new(8, Some(3), vec![]);
        let addr = |i: u8| IpAddr::from([192, 0, 2, i]);
        // A spread flood: 1 holds three places, 2 and 3 hold two, 4 holds one.
        let mut flood = Vec::new();
        for i in [1, 1, 1, 2, 2, 3, 3, 4] {
            flood.push((i, gate.enter(gate.permit().await, addr(i), true).unwrap()));
        }
        assert_eq!(gate.available(), 0);
        let evicted = |flood: &[(u8, Pass)]| -> Vec<usize> {
            (0..flood.len())
                .filter(|&n| flood[n].1.evicted().is_cancelled())
                .collect()
        };
        // A fresh address takes the place of address 1's oldest.
        let fresh = gate.enter(gate.permit().await, addr(9), true).unwrap();
        assert_eq!(evicted(&flood), vec![0]);
        assert!(!fresh.evicted().is_cancelled());
        // Now everyone holds two at most: a newcomer from 4 (one) or from 2
        // (two) takes nothing, and is refused; its spare place comes back.
        for i in [4, 2] {
            assert_eq!(
                gate.enter(gate.permit().await, addr(i), true).unwrap_err(),
                GateRefusal::GateFull
            );
        }
        assert_eq!(evicted(&flood), vec![0]);
        // The evicted connection's end gives back nothing: its place moved.
        flood.remove(0);
        assert_eq!(gate.available(), 0);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), async {
                for _ in 0..SPARE + 1 {
                    drop(gate.permit().await);
                }
            })
            .await
            .is_ok(),
            "spare places are never kept"
        );
    }

    #[tokio::test]
    async fn native_connections_are_never_closed_and_never_shield_others() {
        let gate = Gate::new(6, Some(4), vec![]);
        let native: IpAddr = "192.0.2.1".parse().unwrap();
        let web: IpAddr = "192.0.2.2".parse().unwrap();
        let mut natives = Vec::new();
        for _ in 0..4 {
            natives.push(gate.enter(gate.permit().await, native, false).unwrap());
        }
        let webs = [
            gate.enter(gate.permit().await, web, true).unwrap(),
            gate.enter(gate.permit().await, web, true).unwrap(),
        ];
        // The biggest holder has nothing to give: the next biggest gives.
        let _fresh = gate
            .enter(gate.permit().await, "192.0.2.9".parse().unwrap(), true)
            .unwrap();
        assert!(natives.iter().all(|p| !p.evicted().is_cancelled()));
        assert!(webs[0].evicted().is_cancelled() && !webs[1].evicted().is_cancelled());
        // With only natives and a single web connection left, nobody gives.
        assert_eq!(
            gate.enter(gate.permit().await, "192.0.2.8".parse().unwrap(), true)
                .unwrap_err(),
            GateRefusal::GateFull
        );
    }

    #[tokio::test]
    async fn a_connection_stays_busy_until_each_of_its_requests_is_done() {
        let gate = Gate::admin(3);
        let flood: IpAddr = "192.0.2.1".parse().unwrap();
        let busy = gate.enter(gate.permit().await, flood, true).unwrap();
        let idle = gate.enter(gate.permit().await, flood, true).unwrap();
        let _younger = gate.enter(gate.permit().await, flood, true).unwrap();
        // A pipelined request starts before the answer before it is sent.
        busy.handling(true);
        busy.handling(true);
        busy.handling(false);
        let _fresh = gate
            .enter(gate.permit().await, "192.0.2.9".parse().unwrap(), true)
            .unwrap();
        assert!(!busy.evicted().is_cancelled(), "one request is still on");
        assert!(
            idle.evicted().is_cancelled(),
            "the oldest idle one made room"
        );
        // Once both are done, it is the oldest that may go.
        busy.handling(false);
        let _next = gate
            .enter(gate.permit().await, "192.0.2.8".parse().unwrap(), true)
            .unwrap();
        assert!(busy.evicted().is_cancelled());
    }

    #[tokio::test]
    async fn a_slot_freed_while_a_spare_waited_is_taken_instead() {
        let gate = Gate::new(1, Some(1), vec![]);
        let first = gate
            .enter(gate.permit().await, "192.0.2.1".parse().unwrap(), true)
            .unwrap();
        let spare = gate.permit().await;
        drop(first);
        let _second = gate
            .enter(spare, "192.0.2.2".parse().unwrap(), true)
            .unwrap();
        assert_eq!(gate.available(), 0);
        // The spare place came back: the next accept can go on.
        let _ = gate.permit().await;
    }

    #[tokio::test]
    async fn ipv4_clients_of_a_dual_stack_listener_count_one_by_one() {
        let gate = Gate::new(8, Some(1), vec![]);
        let _a = gate
            .enter(
                gate.permit().await,
                "::ffff:192.0.2.1".parse().unwrap(),
                true,
            )
            .unwrap();
        assert!(
            gate.enter(
                gate.permit().await,
                "::ffff:192.0.2.2".parse().unwrap(),
                true
            )
            .is_ok()
        );
        assert_eq!(
            gate.enter(gate.permit().await, "192.0.2.1".parse().unwrap(), true)
                .unwrap_err(),
            GateRefusal::AddressFull
        );
    }

    #[tokio::test]
    async fn ipv6_addresses_count_by_their_64() {
        let gate = Gate::new(8, Some(2), vec![]);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _a = gate.enter(gate.permit().await, a, true).unwrap();
        let _b = gate.enter(gate.permit().await, b, true).unwrap();
        assert_eq!(
            gate.enter(
                gate.permit().await,
                "2001:db8:1:2::7".parse().unwrap(),
                true
            )
            .unwrap_err(),
            GateRefusal::AddressFull
        );
        assert!(gate.enter(gate.permit().await, elsewhere, true).is_ok());
    }
}
