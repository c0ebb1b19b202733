//! Tickets: short credentials exchanged for a console token.
//!
//! Native protocols cannot carry a JWT: SPICE's password field holds 60 bytes
//! and gtk-vnc reads 99. A client exchanges its token for a ticket (random, 32
//! characters) bound to the token's grant. A ticket opens **one** session:
//! SPICE's main channel claims it, the hypervisor's INIT names the session,
//! and from then on only channel links that carry that session id may use it.
//! Unused tickets die after a short time-to-live; a used one dies with its
//! session. Tickets are kept by their SHA-256, never in clear.
//!
//! The store is a trait, so a shared store can replace the in-memory one for
//! several Porthole nodes behind one name.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use futures_util::future::BoxFuture;

use super::{Grant, signing::random_token};
use crate::console::ConsoleType;
use crate::secret::Secret;

/// Random bytes in a ticket (32 characters of base64url).
pub const TICKET_BYTES: usize = 24;

/// Which channel of a session a link is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelRole {
    /// The link that opens the session (SPICE main channel with connection id
    /// 0; a native VNC connection).
    Opens,
    /// A further channel of the session the hypervisor named `session_id`.
    Joins {
        /// The connection id the client presented.
        session_id: u32,
    },
}

/// Why a ticket did not admit a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketRefusal {
    /// No such ticket (never issued, or forgotten after it died).
    #[error("unknown ticket")]
    Unknown,
    /// Not used within its time-to-live.
    #[error("ticket expired")]
    Expired,
    /// Its session was opened already; a ticket opens one session.
    #[error("ticket already used")]
    Used,
    /// A channel named a session that is not this ticket's.
    #[error("channel names another session")]
    ForeignSession,
    /// A channel came before the hypervisor named the session, or after it ended.
    #[error("no session for this ticket")]
    NoSession,
    /// The store is full of live tickets.
    #[error("ticket store full")]
    Full,
    /// A ticket for another console type (another listener's): refused
    /// before it is used, so it still works where it belongs.
    #[error("a ticket for another console type")]
    WrongConsoleType,
    /// The client's address failed too often lately and must wait; the
    /// ticket was not looked at.
    #[error("too many failed tickets from this address: retry later")]
    Backoff,
    /// A shared store did not answer: refused, never admitted.
    #[error("ticket store unavailable")]
    Unavailable,
}

impl TicketRefusal {
    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TicketRefusal::Unknown => "ticket_unknown",
            TicketRefusal::Expired => "ticket_expired",
            TicketRefusal::Used => "ticket_used",
            TicketRefusal::ForeignSession => "foreign_session",
            TicketRefusal::NoSession => "no_session",
            TicketRefusal::Full => "ticket_store_full",
            TicketRefusal::WrongConsoleType => "wrong_console_type",
            TicketRefusal::Backoff => "ticket_backoff",
            TicketRefusal::Unavailable => "unavailable",
        }
    }
}

/// A ticket that admitted a link.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// What the ticket's token granted.
    pub grant: Grant,
    /// Names the ticket in logs and in the store (a hash prefix, not the ticket).
    pub id: TicketId,
}

/// A ticket's name: the hex SHA-256 of it, a store's key. Logs never show
/// it, nor any part of it: [`Display`] gives [`TicketId::reference`].
///
/// [`Display`]: std::fmt::Display
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TicketId(String);

impl std::fmt::Debug for TicketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TicketId({self})")
    }
}

impl TicketId {
    /// The id of `ticket`.
    pub fn of(ticket: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(ticket)))
    }

    /// A ticket's name as a store gives it back; `None` unless it is one
    /// (64 lowercase hex digits).
    pub fn from_hex(hex: String) -> Option<Self> {
        let digits = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        (hex.len() == 64 && hex.chars().all(digits)).then_some(Self(hex))
    }

    /// The whole hex digest (a store's key; never logged).
    pub fn as_hex(&self) -> &str {
        &self.0
    }

    /// What logs and the session registry call this ticket: the same on
    /// every node (a log line on one node names the ticket another node's
    /// line names; a channel on another node finds its session by it), and
    /// nothing of the ticket or of the store's key for it (a hash of that
    /// key under its own label; tickets are 192 random bits, so no
    /// guessing from it either).
    pub fn reference(&self) -> String {
        let reference = Sha256::new()
            .chain_update(b"porthole ticket reference\0")
            .chain_update(self.0.as_bytes())
            .finalize();
        hex::encode(&reference[..12])
    }
}

impl std::fmt::Display for TicketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reference())
    }
}

/// Storage for tickets. Async, so that a networked store (tickets issued on
/// one node, redeemed on another) can implement it; implementations answer
/// within their own deadline and fail closed.
pub trait TicketStore: Send + Sync + std::fmt::Debug {
    /// Issues a ticket for `grant`, usable for `ttl_secs` from `now`. It
    /// replaces the token's unused ticket, if it has one: a token holds at
    /// most one.
    fn issue(
        &self,
        grant: Grant,
        ttl_secs: u64,
        now: u64,
    ) -> BoxFuture<'_, Result<Secret<String>, TicketRefusal>>;

    /// Whether `ticket` admits a link in `role` now on an ingress serving
    /// `console`; an `Opens` link claims it. A ticket of another type is
    /// refused untouched.
    fn admit<'a>(
        &'a self,
        ticket: &'a [u8],
        console: ConsoleType,
        role: ChannelRole,
        now: u64,
    ) -> BoxFuture<'a, Result<Admitted, TicketRefusal>>;

    /// The session of token `jti` that the hypervisor named `session_id`,
    /// for a further channel that carries the token itself instead of a
    /// ticket (spice_auto.html sends an empty SPICE password on a WebSocket
    /// that carried the token): the open ticket of that token bound to that
    /// session admits it, as if the channel had presented it.
    fn admit_bound<'a>(
        &'a self,
        jti: &'a str,
        console: ConsoleType,
        session_id: u32,
    ) -> BoxFuture<'a, Result<Admitted, TicketRefusal>>;

    /// The hypervisor named the session that `id` opened; called before the
    /// message that names it reaches the client, so channels that name it
    /// can join.
    fn bind<'a>(&'a self, id: &'a TicketId, session_id: u32) -> BoxFuture<'a, ()>;

    /// The session opened with `id` ended: its ticket is dead.
    fn end<'a>(&'a self, id: &'a TicketId) -> BoxFuture<'a, ()>;

    /// Kills every ticket of token `jti` (revocation).
    fn revoke_jti<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, ()>;
}

#[derive(Debug)]
enum State {
    /// Issued, not used; dies at `expires_at`.
    Fresh { expires_at: u64 },
    /// Its session runs; `None` until the hypervisor named it.
    Open { session_id: Option<u32> },
}

#[derive(Debug)]
struct Entry {
    grant: Grant,
    state: State,
}

/// The tickets, with the two indexes that spare every operation a scan.
#[derive(Debug, Default)]
struct Tickets {
    entries: HashMap<TicketId, Entry>,
    /// Each token's tickets: at most one fresh, plus those of its sessions.
    by_jti: HashMap<String, HashSet<TicketId>>,
    /// Fresh tickets by when they die, soonest first.
    expiry: BTreeSet<(u64, TicketId)>,
}

impl Tickets {
    fn remove(&mut self, id: &TicketId) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        if let State::Fresh { expires_at } = entry.state {
            self.expiry.remove(&(expires_at, id.clone()));
        }
        if let Some(ids) = self.by_jti.get_mut(&entry.grant.jti) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_jti.remove(&entry.grant.jti);
            }
        }
        Some(entry)
    }

    /// Forgets fresh tickets that died before `now`, soonest first: each
    /// expired ticket is visited once, by whichever call comes after it died.
    fn purge_expired(&mut self, now: u64) {
        while let Some((expires_at, id)) = self.expiry.first().cloned() {
            if expires_at >= now {
                break;
            }
            self.remove(&id);
        }
    }

    /// The unused ticket of token `jti`, if it has one.
    fn fresh_of(&self, jti: &str) -> Option<TicketId> {
        self.by_jti.get(jti)?.iter().find_map(|id| {
            matches!(self.entries.get(id)?.state, State::Fresh { .. }).then(|| id.clone())
        })
    }
}

/// The default store: in memory, bounded, one unused ticket per token.
#[derive(Debug)]
pub struct MemoryTickets {
    capacity: usize,
    tickets: Mutex<Tickets>,
}

impl MemoryTickets {
    /// A store of at most `capacity` live tickets.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tickets: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tickets> {
        // Every update completes under the lock: a poisoned store is consistent.
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tickets held now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no ticket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MemoryTickets {
    /// See [`TicketStore::issue`].
    pub fn issue(
        &self,
        grant: Grant,
        ttl_secs: u64,
        now: u64,
    ) -> Result<Secret<String>, TicketRefusal> {
        let mut tickets = self.lock();
        tickets.purge_expired(now);
        // A new exchange replaces the token's unused ticket: one token can
        // never hold more than one, however often it is exchanged.
        if let Some(old) = tickets.fresh_of(&grant.jti) {
            tickets.remove(&old);
        }
        if tickets.entries.len() >= self.capacity {
            return Err(TicketRefusal::Full);
        }
        let ticket = random_token(TICKET_BYTES);
        let id = TicketId::of(ticket.as_bytes());
        let expires_at = now.saturating_add(ttl_secs).min(grant.expires_at.max(now));
        tickets.expiry.insert((expires_at, id.clone()));
        tickets
            .by_jti
            .entry(grant.jti.clone())
            .or_default()
            .insert(id.clone());
        tickets.entries.insert(
            id,
            Entry {
                grant,
                state: State::Fresh { expires_at },
            },
        );
        Ok(Secret::new(ticket))
    }

    /// See [`TicketStore::admit`] (any console type).
    pub fn admit(
        &self,
        ticket: &[u8],
        role: ChannelRole,
        now: u64,
    ) -> Result<Admitted, TicketRefusal> {
        self.admit_for(ticket, None, role, now)
    }

    /// See [`TicketStore::admit`]: a ticket of another console type than
    /// `console` is refused untouched.
    pub fn admit_for(
        &self,
        ticket: &[u8],
        console: Option<ConsoleType>,
        role: ChannelRole,
        now: u64,
    ) -> Result<Admitted, TicketRefusal> {
        let id = TicketId::of(ticket);
        let mut tickets = self.lock();
        let entry = tickets.entries.get_mut(&id).ok_or(TicketRefusal::Unknown)?;
        if console.is_some_and(|c| c != entry.grant.console) {
            return Err(TicketRefusal::WrongConsoleType);
        }
        match (&entry.state, role) {
            (State::Fresh { expires_at }, ChannelRole::Opens) => {
                let expires_at = *expires_at;
                if now > expires_at {
                    tickets.remove(&id);
                    return Err(TicketRefusal::Expired);
                }
                entry.state = State::Open { session_id: None };
                tickets.expiry.remove(&(expires_at, id.clone()));
            }
            (State::Fresh { .. }, ChannelRole::Joins { .. }) => {
                return Err(TicketRefusal::NoSession);
            }
            (State::Open { .. }, ChannelRole::Opens) => return Err(TicketRefusal::Used),
            (State::Open { session_id: None }, ChannelRole::Joins { .. }) => {
                return Err(TicketRefusal::NoSession);
            }
            (
                State::Open {
                    session_id: Some(ours),
                },
                ChannelRole::Joins { session_id },
            ) => {
                if *ours != session_id {
                    return Err(TicketRefusal::ForeignSession);
                }
            }
        }
        let grant = tickets.entries[&id].grant.clone();
        Ok(Admitted { grant, id })
    }

    /// See [`TicketStore::admit_bound`].
    pub fn admit_bound(
        &self,
        jti: &str,
        console: ConsoleType,
        session_id: u32,
    ) -> Result<Admitted, TicketRefusal> {
        let tickets = self.lock();
        let ids = tickets.by_jti.get(jti).ok_or(TicketRefusal::NoSession)?;
        ids.iter()
            .find_map(|id| {
                let entry = tickets.entries.get(id)?;
                let bound =
                    matches!(entry.state, State::Open { session_id: Some(s) } if s == session_id);
                (bound && entry.grant.console == console).then(|| Admitted {
                    grant: entry.grant.clone(),
                    id: id.clone(),
                })
            })
            .ok_or(TicketRefusal::NoSession)
    }

    /// See [`TicketStore::bind`].
    pub fn bind(&self, id: &TicketId, session_id: u32) {
        if let Some(entry) = self.lock().entries.get_mut(id)
            && matches!(entry.state, State::Open { .. })
        {
            entry.state = State::Open {
                session_id: Some(session_id),
            };
        }
    }

    /// See [`TicketStore::end`].
    pub fn end(&self, id: &TicketId) {
        self.lock().remove(id);
    }

    /// See [`TicketStore::revoke_jti`].
    pub fn revoke_jti(&self, jti: &str) {
        let mut tickets = self.lock();
        for id in tickets.by_jti.get(jti).cloned().unwrap_or_default() {
            tickets.remove(&id);
        }
    }
}

impl TicketStore for MemoryTickets {
    fn issue(
        &self,
        grant: Grant,
        ttl_secs: u64,
        now: u64,
    ) -> BoxFuture<'_, Result<Secret<String>, TicketRefusal>> {
        Box::pin(std::future::ready(MemoryTickets::issue(
            self, grant, ttl_secs, now,
        )))
    }

    fn admit<'a>(
        &'a self,
        ticket: &'a [u8],
        console: ConsoleType,
        role: ChannelRole,
        now: u64,
    ) -> BoxFuture<'a, Result<Admitted, TicketRefusal>> {
        Box::pin(std::future::ready(MemoryTickets::admit_for(
            self,
            ticket,
            Some(console),
            role,
            now,
        )))
    }

    fn admit_bound<'a>(
        &'a self,
        jti: &'a str,
        console: ConsoleType,
        session_id: u32,
    ) -> BoxFuture<'a, Result<Admitted, TicketRefusal>> {
        Box::pin(std::future::ready(MemoryTickets::admit_bound(
            self, jti, console, session_id,
        )))
    }

    fn bind<'a>(&'a self, id: &'a TicketId, session_id: u32) -> BoxFuture<'a, ()> {
        MemoryTickets::bind(self, id, session_id);
        Box::pin(std::future::ready(()))
    }

    fn end<'a>(&'a self, id: &'a TicketId) -> BoxFuture<'a, ()> {
        MemoryTickets::end(self, id);
        Box::pin(std::future::ready(()))
    }

    fn revoke_jti<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, ()> {
        MemoryTickets::revoke_jti(self, jti);
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tickets_reference_is_stable_and_holds_nothing_of_it_or_its_store_key() {
        let ticket = b"Zq3xT9-0aB1cD2eF3gH4iJ5kL6mN7oP8";
        let id = TicketId::of(ticket);
        assert_eq!(
            id.reference(),
            TicketId::of(ticket).reference(),
            "the same on every node"
        );
        assert_eq!(id.to_string(), id.reference());
        assert_eq!(format!("{id:?}"), format!("TicketId({})", id.reference()));
        let text = String::from_utf8_lossy(ticket);
        for w in id.reference().as_bytes().windows(6) {
            let w = std::str::from_utf8(w).unwrap();
            assert!(!id.as_hex().contains(w), "part of the store key: {w}");
            assert!(!text.contains(w), "part of the ticket: {w}");
        }
        assert_ne!(id.reference(), TicketId::of(b"another").reference());
    }
    use crate::hypervisor::ConsoleTarget;
    use crate::token::claims::{Audience, ConsoleClaim};
    use crate::token::{ConsoleClaims, ConsoleType};

    fn grant(jti: &str) -> Grant {
        let target = ConsoleTarget {
            host: "127.0.0.1".into(),
            port: 5930,
            tls_port: Some(5931),
        };
        Grant {
            jti: jti.into(),
            instance: "vm".into(),
            console: ConsoleType::SpiceDirect,
            target: target.clone(),
            backend: "lab".into(),
            expires_at: 1_000_600,
            issuer: "api".into(),
            kid: None,
            claims: ConsoleClaims {
                iss: "api".into(),
                aud: Audience::One("porthole".into()),
                sub: "vm".into(),
                user: None,
                exp: 1_000_600,
                nbf: None,
                iat: NOW,
                jti: jti.into(),
                ver: None,
                console: ConsoleClaim {
                    kind: ConsoleType::SpiceDirect,
                    host: target.host,
                    port: target.port,
                    tls_port: target.tls_port,
                    view_only: false,
                    record: false,
                },
                shadow_of: None,
                playback: None,
            },
        }
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn a_ticket_opens_one_session_and_its_channels_join_it() {
        let store = MemoryTickets::new(10);
        let t = store.issue(grant("a"), 60, NOW).unwrap();
        let t = t.expose().as_bytes();
        assert!(t.len() < 60, "fits SPICE's password field");
        // Channels cannot come before the session exists.
        assert_eq!(
            store
                .admit(t, ChannelRole::Joins { session_id: 7 }, NOW)
                .unwrap_err(),
            TicketRefusal::NoSession
        );
        let main = store.admit(t, ChannelRole::Opens, NOW).unwrap();
        assert_eq!(main.grant.jti, "a");
        assert_eq!(
            store.admit(t, ChannelRole::Opens, NOW).unwrap_err(),
            TicketRefusal::Used,
            "a second session with the same ticket"
        );
        assert_eq!(
            store
                .admit(t, ChannelRole::Joins { session_id: 7 }, NOW)
                .unwrap_err(),
            TicketRefusal::NoSession,
            "before INIT named the session"
        );
        store.bind(&main.id, 7);
        // Late channels (usbredir on plug) join long after the ticket's TTL.
        store
            .admit(t, ChannelRole::Joins { session_id: 7 }, NOW + 3600)
            .unwrap();
        assert_eq!(
            store
                .admit(t, ChannelRole::Joins { session_id: 8 }, NOW)
                .unwrap_err(),
            TicketRefusal::ForeignSession
        );
        store.end(&main.id);
        assert_eq!(
            store
                .admit(t, ChannelRole::Joins { session_id: 7 }, NOW)
                .unwrap_err(),
            TicketRefusal::Unknown,
            "dead with its session"
        );
    }

    #[test]
    fn unused_tickets_expire_and_unknown_ones_are_refused() {
        let store = MemoryTickets::new(10);
        let t = store.issue(grant("a"), 60, NOW).unwrap();
        assert_eq!(
            store
                .admit(t.expose().as_bytes(), ChannelRole::Opens, NOW + 61)
                .unwrap_err(),
            TicketRefusal::Expired
        );
        assert_eq!(
            store
                .admit(b"made-up", ChannelRole::Opens, NOW)
                .unwrap_err(),
            TicketRefusal::Unknown
        );
        // A ticket never outlives its token.
        let t = store.issue(grant("b"), 10_000, NOW).unwrap();
        assert_eq!(
            store
                .admit(t.expose().as_bytes(), ChannelRole::Opens, NOW + 601)
                .unwrap_err(),
            TicketRefusal::Expired
        );
    }

    #[test]
    fn a_token_holds_one_unused_ticket_and_a_new_exchange_replaces_it() {
        let store = MemoryTickets::new(3);
        let first = store.issue(grant("a"), 60, NOW).unwrap();
        // One token exchanged over and over never fills the store.
        let mut last = store.issue(grant("a"), 60, NOW).unwrap();
        for _ in 0..100 {
            last = store.issue(grant("a"), 60, NOW).unwrap();
        }
        assert_eq!(store.len(), 1);
        assert_eq!(
            store
                .admit(first.expose().as_bytes(), ChannelRole::Opens, NOW)
                .unwrap_err(),
            TicketRefusal::Unknown,
            "replaced"
        );
        let opened = store
            .admit(last.expose().as_bytes(), ChannelRole::Opens, NOW)
            .unwrap();
        // A used ticket is its session's, not the token's unused one: a
        // further exchange adds a fresh ticket beside it and keeps it.
        let next = store.issue(grant("a"), 60, NOW).unwrap();
        assert_eq!(store.len(), 2);
        store.bind(&opened.id, 7);
        store
            .admit(
                last.expose().as_bytes(),
                ChannelRole::Joins { session_id: 7 },
                NOW,
            )
            .unwrap();
        // Revocation kills both: the session's and the unused one.
        store.revoke_jti("a");
        assert!(store.is_empty());
        assert_eq!(
            store
                .admit(next.expose().as_bytes(), ChannelRole::Opens, NOW)
                .unwrap_err(),
            TicketRefusal::Unknown
        );
    }

    #[test]
    fn the_store_is_bounded_and_revocation_kills_a_tokens_tickets() {
        let store = MemoryTickets::new(2);
        let a = store.issue(grant("a"), 60, NOW).unwrap();
        store.issue(grant("b"), 60, NOW).unwrap();
        assert_eq!(
            store.issue(grant("c"), 60, NOW).unwrap_err(),
            TicketRefusal::Full
        );
        // Expired fresh tickets make room.
        store.issue(grant("c"), 60, NOW + 61).unwrap();
        store.revoke_jti("c");
        assert_eq!(store.len(), 0);
        assert_eq!(
            store
                .admit(a.expose().as_bytes(), ChannelRole::Opens, NOW)
                .unwrap_err(),
            TicketRefusal::Unknown
        );
    }

    #[test]
    fn a_channel_carrying_its_token_joins_the_session_its_ticket_opened() {
        let store = MemoryTickets::new(10);
        let t = store.issue(grant("a"), 60, NOW).unwrap();
        let bound = |sid| store.admit_bound("a", ConsoleType::SpiceDirect, sid);
        assert_eq!(bound(7).unwrap_err(), TicketRefusal::NoSession, "unused");
        let main = store
            .admit(t.expose().as_bytes(), ChannelRole::Opens, NOW)
            .unwrap();
        assert_eq!(bound(7).unwrap_err(), TicketRefusal::NoSession, "unnamed");
        store.bind(&main.id, 7);
        assert_eq!(bound(7).unwrap().id, main.id);
        assert_eq!(
            bound(8).unwrap_err(),
            TicketRefusal::NoSession,
            "another session"
        );
        assert_eq!(
            store
                .admit_bound("b", ConsoleType::SpiceDirect, 7)
                .unwrap_err(),
            TicketRefusal::NoSession,
            "another token"
        );
        assert_eq!(
            store
                .admit_bound("a", ConsoleType::SpiceHtml5, 7)
                .unwrap_err(),
            TicketRefusal::NoSession,
            "another console type"
        );
        store.end(&main.id);
        assert_eq!(bound(7).unwrap_err(), TicketRefusal::NoSession, "ended");
    }

    #[test]
    fn a_ticket_of_another_console_type_is_refused_untouched() {
        let store = MemoryTickets::new(10);
        let t = store.issue(grant("a"), 60, NOW).unwrap();
        let t = t.expose().as_bytes();
        // grant() is a spice-direct grant; on a vnc-direct ingress it is refused...
        assert_eq!(
            store
                .admit_for(t, Some(ConsoleType::VncDirect), ChannelRole::Opens, NOW)
                .unwrap_err(),
            TicketRefusal::WrongConsoleType
        );
        // ...and still opens its session where it belongs.
        let opened = store
            .admit_for(t, Some(ConsoleType::SpiceDirect), ChannelRole::Opens, NOW)
            .unwrap();
        assert_eq!(opened.grant.jti, "a");
    }
}
