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
//! upgraded to a session, a native one at its handshake deadline); admitted
//! sessions are bounded by the session layer's own caps.
//!
//! The address is the client's: the peer's, or, where a listener expects
//! PROXY headers from a trusted proxy, the one its header names (the gate is
//! then entered after the header is read, see
//! `listener::Arrival::client`). Load balancers (`listen.trusted_proxies`)
//! carry many clients on one address and are not capped per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Caps on connections not admitted yet.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    per_address: Option<usize>,
    exempt: Vec<ipnet::IpNet>,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's place behind the gate; given back on drop.
#[derive(Debug)]
pub struct Pass {
    _permit: OwnedSemaphorePermit,
    counted: Option<(Arc<Gate>, IpAddr)>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some((gate, addr)) = self.counted.take() {
            let mut held = gate.lock();
            if let Some(n) = held.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&addr);
                }
            }
        }
    }
}

impl Gate {
    /// At most `max` connections waiting for admission, at most
    /// `per_address` of them from one address (none: no per-address cap),
    /// except from the `exempt` networks.
    pub fn new(max: usize, per_address: Option<usize>, exempt: Vec<ipnet::IpNet>) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max)),
            per_address,
            exempt,
            held: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Every update completes under the lock: a poisoned map is consistent.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a free place (before an accept).
    pub async fn permit(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the gate's semaphore is never closed")
    }

    /// Lets a connection from `addr` in with `permit`, unless its address
    /// holds its most places already.
    pub fn enter(self: &Arc<Self>, permit: OwnedSemaphorePermit, addr: IpAddr) -> Option<Pass> {
        let Some(cap) = self.per_address.filter(|_| !self.is_exempt(addr)) else {
            return Some(Pass {
                _permit: permit,
                counted: None,
            });
        };
        let mut held = self.lock();
        let n = held.entry(addr).or_default();
        if *n >= cap {
            if *n == 0 {
                held.remove(&addr);
            }
            return None;
        }
        *n += 1;
        Some(Pass {
            _permit: permit,
            counted: Some((self.clone(), addr)),
        })
    }

    fn is_exempt(&self, addr: IpAddr) -> bool {
        self.exempt.iter().any(|n| n.contains(&addr))
    }

    /// Places free now (for tests and the admin view).
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_address_cannot_take_every_place() {
        let gate = Gate::new(4, Some(2), vec!["10.0.0.0/8".parse().unwrap()]);
        let flood: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let a = gate.enter(gate.permit().await, flood).unwrap();
        let _b = gate.enter(gate.permit().await, flood).unwrap();
        assert!(
            gate.enter(gate.permit().await, flood).is_none(),
            "third from one address"
        );
        // The refused one's permit came back: another address gets in.
        assert_eq!(gate.available(), 2);
        let _c = gate.enter(gate.permit().await, other).unwrap();
        drop(a);
        let _d = gate.enter(gate.permit().await, flood).unwrap();
        // A load balancer is not capped per address, only by the total.
        let lb: IpAddr = "10.1.2.3".parse().unwrap();
        let _lb = gate.enter(gate.permit().await, lb).unwrap();
        assert_eq!(gate.available(), 0);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), gate.permit())
                .await
                .is_err(),
            "the next accept waits"
        );
    }
}
