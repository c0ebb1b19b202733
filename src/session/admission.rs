//! Admission: whether a connection may become a session, and what it holds
//! while it runs.
//!
//! [`Sessions::resolve`] turns a request's token into a [`Grant`] through
//! the pluggable resolver, recording any refusal once. [`Sessions::open_to`]
//! takes a session slot (global cap), counts the connection against the
//! per-client and per-token caps, redeems the token under its console type's
//! reuse policy and holds it for the session's life (or, for a further
//! SPICE channel, checks that it was not revoked since), claims the console where it serves one client at a time (serial), and
//! connects under a deadline. Everything it took is held in [`SessionGuards`]
//! and released when the session ends, however it ends.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Stop;
use super::failed_tickets::FailedTickets;
use super::lifecycle;
use super::link_keys::LinkKeys;
use super::registry::{LiveSession, Selector, SessionRegistry, TAKEOVER};
use crate::config::{TokenConfig, WebSocketConfig};
use crate::console::ConsoleType;
use crate::error::Blame;
use crate::hypervisor::{SpiceUpstreams, VncUpstreams};
use crate::secret::Secret;
use crate::token::nova::{NOVA_ISSUER, Standing, is_nova_token};
use crate::token::redemption::{RedeemError, ReusePolicy};
use crate::token::ticket::{Admitted, ChannelRole, TicketRefusal, TicketStore};
use crate::token::{
    Grant, GrantResolver, Redemption, RedemptionStore, Refusal, RefusalReason, unix_now,
};

/// How long a connection taking over its token's session waits for that
/// session to give the token back (it ends within milliseconds: its relay
/// stops, then it releases what it held).
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// How often it looks meanwhile.
const TAKEOVER_POLL: Duration = Duration::from_millis(20);
use crate::transport::gate::Gate;
use crate::transport::listener::TlsSlot;

/// A session's recording is required and cannot be made: why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unrecordable(pub String);

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The token may not start a session now (replayed, revoked, store full).
    #[error("{0}")]
    Refused(Refusal),
    /// The console serves one client at a time and has one.
    #[error("console busy")]
    Busy,
    /// The global session cap is reached.
    #[error("too many sessions")]
    Overloaded,
    /// This client address, or this token, has its most connections open.
    #[error("too many connections from this {0}")]
    Limited(&'static str),
    /// The hypervisor did not answer in time or refused.
    #[error("hypervisor unreachable: {0}")]
    Unreachable(String),
    /// A store Porthole needs to admit anyone cannot answer now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Porthole is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// A shadow's session has ended (or never ran).
    #[error("the session this shadow watches has ended")]
    ShadowedEnded,
    /// A serial shadow cannot get its session's output here (it runs on
    /// another node and the store cannot carry it now).
    #[error("the serial session's output cannot reach this node now")]
    ShadowUnreachable,
}

impl OpenError {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            OpenError::Refused(_)
            | OpenError::Busy
            | OpenError::Limited(_)
            | OpenError::ShadowedEnded => Blame::Client,
            OpenError::Unreachable(_) => Blame::Backend,
            OpenError::Overloaded
            | OpenError::ShuttingDown
            | OpenError::Unavailable(_)
            | OpenError::ShadowUnreachable => Blame::Internal,
        }
    }

    /// A stable label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            OpenError::Refused(r) => r.reason.as_str(),
            OpenError::Busy => "console_busy",
            OpenError::Overloaded => "overloaded",
            OpenError::Limited("client") => "client_limit",
            OpenError::Limited(_) => "token_limit",
            OpenError::Unreachable(_) => "backend_unreachable",
            OpenError::Unavailable(_) => "unavailable",
            OpenError::ShuttingDown => "shutting_down",
            OpenError::ShadowedEnded => "shadowed_session_ended",
            OpenError::ShadowUnreachable => "shadow_output_unreachable",
        }
    }
}

/// What a running session holds; [`SessionGuards::release`] gives it back.
#[derive(Debug)]
pub struct SessionGuards {
    _permit: OwnedSemaphorePermit,
    _counts: CountGuard,
    redemption: Option<Redemption>,
    _claim: Option<ConsoleClaim>,
}

impl SessionGuards {
    /// Releases the slot, the caps' counts, the token's redemption and the
    /// console claim.
    pub async fn release(self) {
        if let Some(r) = self.redemption {
            r.release().await;
        }
    }
}

/// Connections per client address and per token, with their caps.
#[derive(Debug, Default)]
struct Counts {
    clients: HashMap<IpAddr, usize>,
    tokens: HashMap<String, usize>,
}

/// One connection's place in [`Counts`]; released on drop.
#[derive(Debug)]
struct CountGuard {
    counts: Arc<Mutex<Counts>>,
    /// The address it counts as.
    client: IpAddr,
    /// `None`: counted against its client alone (a playback).
    jti: Option<String>,
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let dec = |n: &mut usize| {
            *n = n.saturating_sub(1);
            *n == 0
        };
        if c.clients.get_mut(&self.client).is_some_and(dec) {
            c.clients.remove(&self.client);
        }
        if let Some(jti) = &self.jti
            && c.tokens.get_mut(jti).is_some_and(dec)
        {
            c.tokens.remove(jti);
        }
    }
}

/// A claim on a console that serves one client at a time.
#[derive(Debug)]
struct ConsoleClaim {
    claims: Arc<Mutex<HashSet<(String, u16)>>>,
    key: (String, u16),
}

impl Drop for ConsoleClaim {
    fn drop(&mut self) {
        self.claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// What a connection is to its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It starts the token's session (a browser session, a native VNC
    /// connection, a SPICE main channel): the token is redeemed now under
    /// its reuse policy and held until the session ends, so one token runs
    /// at most one session at a time across every ingress.
    Opens,
    /// A further channel of a session that holds the token already (SPICE).
    Joins,
}

/// A session ready for its hypervisor handshake.
#[derive(Debug)]
pub struct Opened {
    /// The connected hypervisor console socket.
    pub backend: TcpStream,
    /// Released when the session ends.
    pub guards: SessionGuards,
}

/// Caps, timers and deadlines of every session.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most concurrent sessions.
    pub max_sessions: usize,
    /// Concurrent connections per client address.
    pub per_client: usize,
    /// Concurrent connections per token.
    pub per_token: usize,
    /// Hypervisor connect deadline.
    pub connect_timeout: Duration,
    /// Hypervisor connections are probed after this long without a byte
    /// and given up after as long again
    /// ([`keep_alive`](crate::transport::keepalive::keep_alive)).
    pub hypervisor_keepalive: Option<Duration>,
    /// The same for native clients' connections (SPICE, VNC).
    pub client_keepalive: Option<Duration>,
    /// End every session after this long.
    pub max_age: Option<Duration>,
    /// End native sessions after this long without a byte either way (the
    /// WebSocket relay has its own in [`WebSocketConfig`]).
    pub idle: Option<Duration>,
    /// Deadline for a native SPICE channel's TLS and link handshakes.
    pub spice_handshake: Duration,
    /// Deadline for a native VNC connection's handshakes.
    pub vnc_handshake: Duration,
    /// Time-to-live of a fresh ticket.
    pub ticket_ttl_secs: u64,
    /// A dropped SPICE display channel's drain outlives its session by this much at most.
    pub spice_drain_grace: Duration,
    /// A dropped SPICE display channel is drained this long at most.
    pub spice_drain_max: Duration,
    /// Pages may ask whether a shadow watches their session.
    pub tell_watched: bool,
}

/// What the session layer is built from.
#[derive(Debug)]
pub struct Parts {
    /// Turns tokens into grants.
    pub resolver: Arc<dyn GrantResolver>,
    /// Redeemed and revoked tokens.
    pub redemptions: Arc<dyn RedemptionStore>,
    /// Tickets for native and spice-html5 clients.
    pub tickets: Arc<dyn TicketStore>,
    /// The live sessions.
    pub registry: Arc<dyn SessionRegistry>,
    /// Reuse policies per console type.
    pub tokens: TokenConfig,
    /// Browser sessions' WebSocket limits and timers.
    pub browser: WebSocketConfig,
    /// Caps, timers, deadlines.
    pub limits: Limits,
    /// SPICE credentials by backend network (swapped on reload).
    pub spice_upstreams: Arc<ArcSwap<SpiceUpstreams>>,
    /// VNC credentials by backend network (swapped on reload).
    pub vnc_upstreams: Arc<ArcSwap<VncUpstreams>>,
    /// The native SPICE listener's TLS, when it is on.
    pub spice_tls: Option<TlsSlot>,
    /// The native VNC listener's TLS (VeNCrypt), when it is on.
    pub vnc_tls: Option<TlsSlot>,
    /// Connections not admitted yet, over every public and native listener.
    pub pending: Arc<Gate>,
    /// What is recorded, and where (`[recording]`).
    pub recording: Option<crate::recording::RecordingSettings>,
}

/// Every session of this process: admission, the credentials sessions use
/// on their hypervisor legs, and the shutdown they obey.
#[derive(Debug)]
pub struct Sessions {
    /// Global session cap; a permit rides in each session's guards.
    slots: Arc<Semaphore>,
    /// Playbacks' own slots (as many): they never take a console's.
    playback_slots: Arc<Semaphore>,
    /// Consoles that serve one client at a time and have one (serial).
    exclusive: Arc<Mutex<HashSet<(String, u16)>>>,
    counts: Arc<Mutex<Counts>>,
    resolver: Arc<dyn GrantResolver>,
    redemptions: Arc<dyn RedemptionStore>,
    /// Tickets and their sessions.
    pub tickets: Arc<dyn TicketStore>,
    tokens: TokenConfig,
    /// Browser sessions' WebSocket limits and timers.
    pub browser: WebSocketConfig,
    /// Caps, timers, deadlines.
    pub limits: Limits,
    /// SPICE link keys.
    pub keys: Arc<LinkKeys>,
    /// SPICE credentials by backend network.
    pub spice_upstreams: Arc<ArcSwap<SpiceUpstreams>>,
    /// VNC credentials by backend network.
    pub vnc_upstreams: Arc<ArcSwap<VncUpstreams>>,
    /// The native SPICE listener's TLS.
    pub spice_tls: Option<TlsSlot>,
    /// The native VNC listener's TLS.
    pub vnc_tls: Option<TlsSlot>,
    /// Cancelled at shutdown; every session selects on it.
    pub cancel: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// The live sessions, for the admin API.
    pub registry: Arc<dyn SessionRegistry>,
    /// Connections not admitted yet, over every public and native listener.
    pub pending: Arc<Gate>,
    /// What is recorded, and where.
    pub recording: Option<crate::recording::RecordingSettings>,
    /// Failed ticket attempts per client address.
    failed_tickets: FailedTickets,
    /// Nova tokens Nova did not know, per client address.
    failed_lookups: FailedTickets,
    /// Addresses that brought a Nova token lately (their standing for the
    /// budget of lookups of never-seen tokens).
    nova_askers: FailedTickets,
}

impl Sessions {
    /// Builds the session layer (and its SPICE link keys).
    pub fn new(parts: Parts) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(parts.limits.max_sessions)),
            playback_slots: Arc::new(Semaphore::new(parts.limits.max_sessions)),
            exclusive: Arc::default(),
            counts: Arc::default(),
            resolver: parts.resolver,
            redemptions: parts.redemptions,
            tickets: parts.tickets,
            tokens: parts.tokens,
            browser: parts.browser,
            limits: parts.limits,
            keys: Arc::new(LinkKeys::generate()),
            spice_upstreams: parts.spice_upstreams,
            vnc_upstreams: parts.vnc_upstreams,
            spice_tls: parts.spice_tls,
            vnc_tls: parts.vnc_tls,
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            registry: parts.registry,
            pending: parts.pending,
            recording: parts.recording,
            failed_tickets: FailedTickets::default(),
            failed_lookups: FailedTickets::default(),
            nova_askers: FailedTickets::default(),
        }
    }

    /// How the session `live` (just registered) is told to stop.
    pub fn stop_for(&self, live: &Arc<LiveSession>) -> Stop {
        Stop {
            shutdown: self.cancel.clone(),
            kill: live.cancel.clone(),
            ended: CancellationToken::new(),
            limit: CancellationToken::new(),
            deadline: self.limits.max_age.map(|a| tokio::time::Instant::now() + a),
            idle: self.limits.idle,
            session: Some(live.clone()),
        }
    }

    /// How a connection that joined `live` (a SPICE channel) is told to
    /// stop: with its session, at its session's age.
    pub fn stop_joining(&self, live: &Arc<LiveSession>) -> Stop {
        Stop {
            shutdown: self.cancel.clone(),
            kill: live.cancel.clone(),
            ended: live.ended.clone(),
            limit: CancellationToken::new(),
            deadline: live.ends_at.get().copied().flatten(),
            idle: self.limits.idle,
            session: Some(live.clone()),
        }
    }

    /// The reuse policy of `grant`'s token. Nova's tokens take over: Horizon
    /// opens the same console URL in a second tab ("show only console")
    /// while its iframe's socket may still be open, and Nova's own proxies
    /// let the new tab in. Signed tokens follow `[tokens.reuse]`.
    pub fn reuse_for(&self, grant: &Grant) -> ReusePolicy {
        if grant.shadow_of().is_some() {
            // A shadow's link is for one look (POST /v1/sessions/{id}/shadow).
            ReusePolicy::SingleUse
        } else if grant.issuer == NOVA_ISSUER {
            ReusePolicy::Takeover
        } else {
            self.tokens.reuse_for(grant.console)
        }
    }

    /// Whether the store's answer `e` for `grant` still lets a connection
    /// in: under `takeover`, a token in use is not a refusal (the new
    /// connection will end the running session).
    fn reuse_refuses(&self, grant: &Grant, e: &RedeemError) -> bool {
        !(e.reason == RefusalReason::Replayed && self.reuse_for(grant) == ReusePolicy::Takeover)
    }

    /// Sessions running now.
    pub fn active(&self) -> usize {
        self.tracker.len()
    }

    /// Turns a request's token into a grant for a console of type `expect`
    /// (any, if `None`); a refusal is logged and counted here, once.
    ///
    /// `client` is the public caller's address (`None`: the admin API, never
    /// slowed). Nova's tokens are UUIDs a client could guess, each guess a
    /// lookup in Nova's API: an address whose lookups keep finding nothing
    /// must wait, as one that keeps presenting bad tickets does, and meanwhile
    /// gets `unknown_token` with no lookup (a guesser learns nothing).
    pub async fn resolve(
        &self,
        token: &str,
        expect: Option<ConsoleType>,
        client: Option<IpAddr>,
    ) -> Result<Grant, Refusal> {
        let guarded = client.filter(|_| is_nova_token(token));
        if let Some(addr) = guarded
            && self.failed_lookups.wait_for(addr).is_some()
        {
            crate::metrics::limit_hit("failed_nova_lookups");
            let refusal = Refusal {
                reason: RefusalReason::UnknownToken,
                detail: "too many unknown Nova tokens from this address: not looked up".into(),
                jti: None,
            };
            lifecycle::token_refused(&refusal);
            return Err(refusal);
        }
        // The budget of lookups of never-seen tokens keeps a reserve for
        // addresses that brought no Nova token lately: each address of a
        // flood draws on it once, and a real user's fresh token still finds it.
        let standing = match guarded {
            Some(addr) if !self.nova_askers.failed_lately(addr) => Standing::Clean,
            _ => Standing::Suspect,
        };
        let resolved = self.resolver.resolve_for(token, expect, standing).await;
        if let Some(addr) = guarded {
            // Only an answer counts as a draw: an address refused for want
            // of budget (or with Nova down) keeps its standing.
            if resolved
                .as_ref()
                .map_or_else(|r| r.reason != RefusalReason::Unavailable, |_| true)
            {
                self.nova_askers.failed(addr);
            }
            match &resolved {
                Ok(_) => self.failed_lookups.succeeded(addr),
                Err(r) if r.reason == RefusalReason::UnknownToken => {
                    self.failed_lookups.failed(addr);
                }
                Err(_) => {}
            }
        }
        resolved.inspect_err(lifecycle::token_refused)
    }

    /// Counts a connection from `client` (as the gate does: IPv6 by its
    /// /64) with token `jti`, within the caps.
    fn count(&self, client: IpAddr, jti: Option<&str>) -> Result<CountGuard, OpenError> {
        let client = crate::transport::gate::counted_as(client);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.clients.get(&client).copied().unwrap_or(0) >= self.limits.per_client {
            crate::metrics::limit_hit("per_client");
            return Err(OpenError::Limited("client"));
        }
        if let Some(jti) = jti
            && c.tokens.get(jti).copied().unwrap_or(0) >= self.limits.per_token
        {
            crate::metrics::limit_hit("per_token");
            return Err(OpenError::Limited("token"));
        }
        *c.clients.entry(client).or_default() += 1;
        if let Some(jti) = jti {
            *c.tokens.entry(jti.to_string()).or_default() += 1;
        }
        Ok(CountGuard {
            counts: self.counts.clone(),
            client,
            jti: jti.map(str::to_string),
        })
    }

    /// What a playback's socket holds while it plays: a slot of the
    /// playbacks' own (`max_sessions` of them, apart from the consoles'),
    /// and a place in its client's count, as a session does. It opens no
    /// console, but it is a socket and a task for as long as its recording
    /// plays (and up to an hour past its end), and its link opens any
    /// number of them.
    pub fn admit_playback(&self, client: IpAddr) -> Result<SessionGuards, OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        let permit = self
            .playback_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                crate::metrics::limit_hit("max_playbacks");
                OpenError::Overloaded
            })?;
        let counts = self.count(client, None)?;
        Ok(SessionGuards {
            _permit: permit,
            _counts: counts,
            redemption: None,
            _claim: None,
        })
    }

    /// What [`Sessions::open_to`] would answer now for a token, without
    /// taking anything (a WebSocket preflight).
    pub async fn would_open(&self, grant: &Grant) -> Result<(), OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        if self.slots.available_permits() == 0 {
            return Err(OpenError::Overloaded);
        }
        let policy = self.reuse_for(grant);
        match self
            .redemptions
            .would_redeem(&grant.jti, policy, None)
            .await
        {
            Err(e) if self.reuse_refuses(grant, &e) => {
                return Err(OpenError::Refused(e.refusal(&grant.jti)));
            }
            // The running session it takes over holds the console.
            Err(_) => return Ok(()),
            Ok(()) => {}
        }
        if let Some(id) = grant.shadow_of() {
            // A shadow watches its session: it claims no console.
            return self.shadowed_by(grant, id).await.map(|_| ());
        }
        let key = (grant.target.host.clone(), grant.target.port);
        if grant.console == ConsoleType::Serial
            && self
                .exclusive
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&key)
        {
            return Err(OpenError::Busy);
        }
        Ok(())
    }

    /// What a connection admitted by ticket would get now (for the
    /// WebSocket preflight of spice-html5, whose ticket comes later).
    pub async fn would_admit_ticketed(&self, grant: &Grant) -> Result<(), OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        if self.slots.available_permits() == 0 {
            return Err(OpenError::Overloaded);
        }
        if self
            .redemptions
            .is_revoked(&grant.jti)
            .await
            .map_err(|e| redeem_error(&e.refusal(&grant.jti)))?
        {
            return Err(OpenError::Refused(revoked(&grant.jti)));
        }
        Ok(())
    }

    /// Exchanges a token for a ticket bound to its grant, if its reuse
    /// policy would let it start a session now (a token whose session runs,
    /// or a used single-use one, gets no ticket). The ticket's session
    /// redeems the token when it opens; a later exchange replaces the
    /// token's unused ticket. Returns the ticket and when it expires.
    pub async fn exchange(
        &self,
        grant: &Grant,
        client: IpAddr,
    ) -> Result<(Secret<String>, u64), OpenError> {
        self.issue_ticket(grant).await.inspect_err(|e| {
            lifecycle::open_refused("ticket", "ticket exchange", e, client, Some(grant));
        })
    }

    async fn issue_ticket(&self, grant: &Grant) -> Result<(Secret<String>, u64), OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        let now = unix_now();
        match self
            .redemptions
            .would_redeem(&grant.jti, self.reuse_for(grant), None)
            .await
        {
            Err(e) if self.reuse_refuses(grant, &e) => {
                return Err(redeem_error(&e.refusal(&grant.jti)));
            }
            _ => {}
        }
        let issued = self.ticket_for(grant, now).await?;
        crate::metrics::ticket_issued(grant.console.as_str());
        // Debug: one token may exchange thousands of times (the metric counts
        // them all); the session a ticket opens is logged at info.
        tracing::debug!(jti = %grant.jti, instance = %grant.instance, console = %grant.console, "ticket issued");
        Ok(issued)
    }

    /// A ticket that plays a SPICE recording to a native client (`grant`
    /// is a playback's: [`crate::token::TokenValidator::playback_grant`]);
    /// it opens no session and reaches no hypervisor.
    pub async fn playback_ticket(&self, grant: &Grant) -> Result<(Secret<String>, u64), OpenError> {
        self.ticket_for(grant, unix_now()).await
    }

    /// A ticket for `grant` from the ticket store, and when it expires: the
    /// ticket lifetime, or the grant's end if sooner.
    async fn ticket_for(
        &self,
        grant: &Grant,
        now: u64,
    ) -> Result<(Secret<String>, u64), OpenError> {
        let ttl = self.limits.ticket_ttl_secs;
        let ticket = self
            .tickets
            .issue(grant.clone(), ttl, now)
            .await
            .map_err(|e| OpenError::Unavailable(format!("no ticket issued: {e}")))?;
        Ok((ticket, (now + ttl).min(grant.expires_at)))
    }

    /// Whether `ticket` admits a link from `client` in `role` on an ingress
    /// serving `console` (see [`TicketStore::admit`]). An address that keeps
    /// presenting tickets that admit nothing must wait, longer each time,
    /// before its next one is even looked at.
    pub async fn admit_ticket(
        &self,
        ticket: &[u8],
        console: ConsoleType,
        role: ChannelRole,
        client: IpAddr,
    ) -> Result<Admitted, TicketRefusal> {
        self.counting_failures(client, || {
            self.tickets.admit(ticket, console, role, unix_now())
        })
        .await
    }

    /// Whether token `jti`'s session that the hypervisor named `session_id`
    /// admits a further channel that carries the token instead of a ticket
    /// (see [`TicketStore::admit_bound`]); failures count as failed tickets.
    ///
    /// [`TicketStore::admit_bound`]: crate::token::ticket::TicketStore::admit_bound
    pub async fn admit_bound(
        &self,
        jti: &str,
        console: ConsoleType,
        session_id: u32,
        client: IpAddr,
    ) -> Result<Admitted, TicketRefusal> {
        self.counting_failures(client, || {
            self.tickets.admit_bound(jti, console, session_id)
        })
        .await
    }

    /// Runs a ticket check unless `client` must wait first (the check is
    /// not even started then: a store may act as soon as it is called), and
    /// notes how it went.
    async fn counting_failures<'a>(
        &self,
        client: IpAddr,
        check: impl FnOnce() -> BoxFuture<'a, Result<Admitted, TicketRefusal>>,
    ) -> Result<Admitted, TicketRefusal> {
        if self.failed_tickets.wait_for(client).is_some() {
            crate::metrics::limit_hit("failed_tickets");
            return Err(TicketRefusal::Backoff);
        }
        let admitted = check().await;
        match &admitted {
            Ok(_) => self.failed_tickets.succeeded(client),
            // A real ticket on the wrong listener, or a full store: not a guess.
            Err(
                TicketRefusal::WrongConsoleType | TicketRefusal::Full | TicketRefusal::Unavailable,
            ) => {}
            Err(_) => self.failed_tickets.failed(client),
        }
        admitted
    }

    /// Takes a slot, counts the connection, redeems the token (or checks a
    /// ticketed one), claims the console and connects to `port` of the
    /// grant's host (a browser session, before its upgrade).
    pub async fn open_to(
        &self,
        grant: &Grant,
        admission: Admission,
        port: u16,
        client: IpAddr,
    ) -> Result<Opened, OpenError> {
        let guards = self.admit(grant, admission, client).await?;
        match self.connect(&grant.target.host, port, None).await {
            Ok(backend) => Ok(Opened { backend, guards }),
            Err(e) => {
                guards.release().await;
                Err(e)
            }
        }
    }

    /// Admission without the connect: takes a slot, counts the connection
    /// against the caps, redeems the token under its reuse policy (or checks
    /// that a ticketed token was not revoked since), and claims the console
    /// where it serves one client at a time. Native sessions are registered
    /// once this succeeds, and connect inside their stop.
    pub async fn admit(
        &self,
        grant: &Grant,
        admission: Admission,
        client: IpAddr,
    ) -> Result<SessionGuards, OpenError> {
        if admission == Admission::Opens && self.reuse_for(grant) == ReusePolicy::Takeover {
            self.take_over(grant).await;
        }
        if let Some(id) = grant.shadow_of() {
            self.shadowed_by(grant, id).await?;
        }
        if admission == Admission::Opens
            && grant.console == ConsoleType::Serial
            && !grant.view_only()
        {
            self.make_way_on_serial(grant).await;
        }
        self.admit_once(grant, admission, client).await
    }

    /// A serial console serves one client: a view-only session holding it
    /// gives way to a user who may type (it is ended, `by` "owner"), so
    /// that a watcher never locks the console's user out. (To watch a
    /// running serial session, ask for a shadow: it reads the session's
    /// output and holds nothing.)
    async fn make_way_on_serial(&self, grant: &Grant) {
        let key = (grant.target.host.clone(), grant.target.port);
        let held = || {
            self.exclusive
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&key)
        };
        if !held() {
            return;
        }
        let watchers: Vec<String> = self
            .registry
            .list(&Selector {
                console: Some(ConsoleType::Serial.as_str().to_string()),
                target: Some(grant.target.address()),
                ..Selector::default()
            })
            .await
            .into_iter()
            .filter(|v| v.view_only && v.shadow_of.is_none())
            .filter(|v| v.node == crate::node::name())
            .map(|v| v.id)
            .collect();
        for id in &watchers {
            let one = Selector {
                id: Some(id.clone()),
                ..Selector::default()
            };
            self.registry
                .terminate(&one, "owner", "the console's user connected")
                .await;
            tracing::info!(session = %id, "view-only serial session ended: the console's user connected");
        }
        if watchers.is_empty() {
            return;
        }
        let until = tokio::time::Instant::now() + TAKEOVER_WAIT;
        while held() && tokio::time::Instant::now() < until {
            tokio::time::sleep(TAKEOVER_POLL).await;
        }
    }

    /// The live session `grant`'s shadow watches: one of the same console
    /// type, target and instance (a token's `shadow_of` names a session; it
    /// never reaches another VM's console), and never a SPICE one (a second
    /// SPICE client would disconnect its user).
    pub async fn shadowed_by(
        &self,
        grant: &Grant,
        id: &str,
    ) -> Result<Arc<LiveSession>, OpenError> {
        let watched = self.shadowed(id).await?;
        let same = watched.console == grant.console
            && watched.target == grant.target.to_string()
            && watched.instance == grant.instance
            && !matches!(
                grant.console,
                ConsoleType::SpiceHtml5 | ConsoleType::SpiceDirect
            );
        if same {
            Ok(watched)
        } else {
            tracing::warn!(
                jti = %grant.jti, watched = %id,
                "a shadow's token names a session of another console: refused"
            );
            Err(OpenError::ShadowedEnded)
        }
    }

    /// Whether a shadow watches the session of `token` now, and whether it
    /// is recorded, for its page (an expired token still names its
    /// session): `Ok(None)` when pages are not told (`[sessions]
    /// tell_watched`).
    pub async fn watched(&self, token: &str) -> Result<Option<Told>, WatchedUnknown> {
        let jti = self
            .resolver
            .holder(token)
            .ok_or(WatchedUnknown::NotGenuine)?;
        if !self.limits.tell_watched {
            return Ok(None);
        }
        match self.registry.told_of(&jti).await {
            Ok(o) => Ok(Some(Told {
                watched: o.is_some_and(|o| o.watchers > 0),
                recorded: o.is_some_and(|o| o.recorded),
            })),
            Err(_) => Err(WatchedUnknown::StoreUnanswered),
        }
    }

    /// Whether `grant`'s session is to be recorded (its backend network's
    /// or its token's ask, on a gateway that records), for its page to
    /// say so: a shadow is not recorded again.
    pub fn records(&self, grant: &Grant) -> bool {
        self.recording_asked(grant).is_some()
    }

    /// This gateway's recording settings and whether the recording is
    /// required, when `grant`'s session is to be recorded; the one place
    /// the policy is read, for the page's notice and for the recorder.
    fn recording_asked(
        &self,
        grant: &Grant,
    ) -> Option<(&crate::recording::RecordingSettings, bool)> {
        if grant.shadow_of().is_some() {
            return None;
        }
        let settings = self.recording.as_ref()?;
        Some((settings, settings.wants(&grant.backend, grant.record())?))
    }

    /// The recording of `grant`'s session `live`, if its backend network or
    /// its token asks for one: serial (asciicast) and VNC (FBS) consoles;
    /// a shadow is not recorded again. `Err` when the recording is required
    /// and cannot be made (no `[recording]`, a console type not recorded,
    /// the file not created): the session must not run.
    pub fn recorder_for(
        &self,
        grant: &Grant,
        live: &super::registry::LiveSession,
    ) -> Result<Option<crate::recording::Recorder>, Unrecordable> {
        use crate::recording::Format;
        if grant.shadow_of().is_some() {
            return Ok(None);
        }
        if self.recording.is_none() && grant.record() {
            return Err(Unrecordable(
                "this gateway records nothing (no [recording])".into(),
            ));
        }
        let Some((settings, required)) = self.recording_asked(grant) else {
            return Ok(None);
        };
        let format = match grant.console {
            ConsoleType::Serial => Format::Asciicast,
            ConsoleType::Novnc | ConsoleType::VncDirect => Format::Fbs,
            ConsoleType::SpiceHtml5 | ConsoleType::SpiceDirect => Format::Spice,
        };
        match settings.start(format, &live.record(), required) {
            Ok(recorder) => Ok(Some(recorder)),
            Err(why) if required => Err(Unrecordable(why)),
            Err(_) => Ok(None),
        }
    }

    /// The live session a shadow watches, on whichever node.
    pub async fn shadowed(&self, id: &str) -> Result<Arc<LiveSession>, OpenError> {
        match self.registry.by_id(id).await {
            Some(live) if !live.ended.is_cancelled() => Ok(live),
            _ => Err(OpenError::ShadowedEnded),
        }
    }

    /// Ends the session that `grant`'s token runs, if any (on whichever
    /// node runs it), and waits until it has given the token, its counts
    /// and its console back, within [`TAKEOVER_WAIT`]. Past that, admission
    /// refuses as it would have (`replayed`, `console_busy`): a token never
    /// runs two sessions at once.
    async fn take_over(&self, grant: &Grant) {
        let policy = ReusePolicy::Takeover;
        if self
            .redemptions
            .would_redeem(&grant.jti, policy, None)
            .await
            .is_ok()
        {
            return;
        }
        let sel = Selector {
            jti: Some(grant.jti.clone()),
            ..Selector::default()
        };
        let ended = self
            .registry
            .terminate(&sel, TAKEOVER, "taken over by a newer connection")
            .await;
        if ended.is_empty() {
            return;
        }
        tracing::info!(jti = %grant.jti, sessions = ended.len(), "session taken over by a newer connection");
        let until = tokio::time::Instant::now() + TAKEOVER_WAIT;
        while tokio::time::Instant::now() < until {
            let free = self
                .redemptions
                .would_redeem(&grant.jti, policy, None)
                .await
                .is_ok()
                && !self
                    .counts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .tokens
                    .contains_key(&grant.jti)
                && !(grant.console == ConsoleType::Serial
                    && self
                        .exclusive
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&(grant.target.host.clone(), grant.target.port)));
            if free {
                return;
            }
            tokio::time::sleep(TAKEOVER_POLL).await;
        }
    }

    async fn admit_once(
        &self,
        grant: &Grant,
        admission: Admission,
        client: IpAddr,
    ) -> Result<SessionGuards, OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            crate::metrics::limit_hit("max_sessions");
            OpenError::Overloaded
        })?;
        let counts = self.count(client, Some(&grant.jti))?;
        let redemption = match admission {
            Admission::Opens => Some(
                Redemption::begin(
                    self.redemptions.clone(),
                    &grant.jti,
                    grant.expires_at,
                    self.reuse_for(grant),
                    None,
                    unix_now(),
                )
                .await
                .map_err(|e| redeem_error(&e.refusal(&grant.jti)))?,
            ),
            // Its session holds the token; a revoked token's channels still
            // stop here.
            Admission::Joins => {
                let killed = self
                    .redemptions
                    .is_revoked(&grant.jti)
                    .await
                    .map_err(|e| redeem_error(&e.refusal(&grant.jti)))?;
                if killed {
                    return Err(redeem_error(&revoked(&grant.jti)));
                }
                None
            }
        };
        let guards = |claim| SessionGuards {
            _permit: permit,
            _counts: counts,
            redemption,
            _claim: claim,
        };
        // A serial shadow reads its session's output, not the console.
        if grant.console != ConsoleType::Serial || grant.shadow_of().is_some() {
            return Ok(guards(None));
        }
        let key = (grant.target.host.clone(), grant.target.port);
        let claimed = self
            .exclusive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        if !claimed {
            guards(None).release().await;
            return Err(OpenError::Busy);
        }
        Ok(guards(Some(ConsoleClaim {
            claims: self.exclusive.clone(),
            key,
        })))
    }

    /// Connects to a hypervisor console port within the connect timeout (and
    /// the connection's own deadline, when it has one).
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<TcpStream, OpenError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let connecting = std::time::Instant::now();
        let timeout = self.limits.connect_timeout;
        let mut until = tokio::time::Instant::now() + timeout;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let backend = match tokio::time::timeout_at(until, TcpStream::connect((host, port))).await {
            Ok(Ok(s)) => {
                crate::metrics::connect_took(connecting.elapsed().as_secs_f64());
                s
            }
            Ok(Err(e)) => return Err(OpenError::Unreachable(e.to_string())),
            Err(_) => {
                return Err(OpenError::Unreachable(format!(
                    "no answer within {timeout:?}"
                )));
            }
        };
        // Console traffic is interactive: small writes must not wait for Nagle.
        let _ = backend.set_nodelay(true);
        if let Some(after) = self.limits.hypervisor_keepalive {
            crate::transport::keepalive::keep_alive(&backend, after);
        }
        Ok(backend)
    }
}

/// A token the reuse store refuses, recorded once; a store that cannot
/// answer is our failure (`unavailable`), not the client's.
fn redeem_error(refusal: &Refusal) -> OpenError {
    lifecycle::token_refused(refusal);
    if refusal.reason == RefusalReason::Unavailable {
        OpenError::Unavailable(refusal.detail.clone())
    } else {
        OpenError::Refused(refusal.clone())
    }
}

fn revoked(jti: &str) -> Refusal {
    Refusal {
        reason: RefusalReason::Revoked,
        detail: "token was revoked".into(),
        jti: Some(jti.to_string()),
    }
}

/// What a console's page is told of its session (`GET /watched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Told {
    /// An operator's shadow watches it now.
    pub watched: bool,
    /// It is recorded.
    pub recorded: bool,
}

/// Why a page is not told whether it is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchedUnknown {
    /// The token is not one this gateway issued or trusts.
    NotGenuine,
    /// The shared store did not answer: the page keeps what it showed.
    StoreUnanswered,
}
