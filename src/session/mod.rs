//! One console connection, start to finish.
//!
//! [`Sessions::open`] turns a [`Grant`] into a connected hypervisor socket:
//! it takes a session slot (global cap), redeems the token under its console
//! type's reuse policy, claims the console where it serves one client at a
//! time (serial), and connects under a deadline. Everything it took is held
//! in [`SessionGuards`] and released when the session ends, however it ends.
//! Front ends then splice bytes; they never talk to hypervisors directly.

pub mod link_keys;
pub mod registry;
pub mod spice;
pub mod splice;
pub mod vnc;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TokenConfig;
use crate::error::Blame;
use crate::token::{ConsoleType, Grant, Redemption, RedemptionStore, Refusal, unix_now};

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
    /// Porthole is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl OpenError {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            OpenError::Refused(_) | OpenError::Busy | OpenError::Limited(_) => Blame::Client,
            OpenError::Unreachable(_) => Blame::Backend,
            OpenError::Overloaded | OpenError::ShuttingDown => Blame::Internal,
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
            OpenError::ShuttingDown => "shutting_down",
        }
    }
}

/// How a session ended; front ends turn it into a close code a page can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed or went away.
    ClientLeft,
    /// The client answered no ping for several intervals.
    ClientUnresponsive,
    /// The hypervisor closed the console connection.
    BackendClosed,
    /// Reading from or writing to the hypervisor failed.
    BackendError,
    /// The token expired and sessions end with it.
    TokenExpired,
    /// Nothing moved either way for the idle timeout.
    IdleTimeout,
    /// The client broke a limit (message too large, slow reader past the buffer cap).
    LimitHit,
    /// The client broke the protocol (e.g. a text frame on a binary console).
    ProtocolError,
    /// Porthole is shutting down.
    Shutdown,
    /// An operator ended the session (admin API or CLI).
    Terminated,
    /// The session reached `max_session_age_secs`.
    MaxAge,
}

impl CloseReason {
    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientLeft => "client_left",
            CloseReason::ClientUnresponsive => "client_unresponsive",
            CloseReason::BackendClosed => "backend_closed",
            CloseReason::BackendError => "backend_error",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::LimitHit => "limit_hit",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Terminated => "terminated",
            CloseReason::MaxAge => "max_age",
        }
    }
}

/// How a session is told to stop: Porthole's shutdown, or an operator
/// ending this one session (its registry entry's token, a child of shutdown).
#[derive(Debug, Clone)]
pub struct Stop {
    /// Porthole is shutting down.
    pub shutdown: CancellationToken,
    /// This session was terminated.
    pub kill: CancellationToken,
    /// The session's maximum age runs out then, if one is configured.
    pub deadline: Option<tokio::time::Instant>,
    /// End after this long with no byte either way (native sessions; the
    /// WebSocket bridge has its own).
    pub idle: Option<Duration>,
}

impl Stop {
    /// Waits for either; says which (shutdown wins when both fired).
    pub async fn stopped(&self) -> CloseReason {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => CloseReason::Shutdown,
            _ = self.kill.cancelled() => {
                if self.shutdown.is_cancelled() {
                    CloseReason::Shutdown
                } else {
                    CloseReason::Terminated
                }
            }
            _ = async {
                match self.deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => CloseReason::MaxAge,
        }
    }
}

/// What a running session holds; dropping it releases everything.
#[derive(Debug)]
pub struct SessionGuards {
    _permit: OwnedSemaphorePermit,
    _counts: CountGuard,
    _redemption: Option<Redemption>,
    _claim: Option<ConsoleClaim>,
}

/// Connections per client address and per token, with their caps.
#[derive(Debug, Default)]
struct Counts {
    clients: HashMap<std::net::IpAddr, usize>,
    tokens: HashMap<String, usize>,
}

/// One connection's place in [`Counts`]; released on drop.
#[derive(Debug)]
struct CountGuard {
    counts: Arc<Mutex<Counts>>,
    client: std::net::IpAddr,
    jti: String,
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
        if c.tokens.get_mut(&self.jti).is_some_and(dec) {
            c.tokens.remove(&self.jti);
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

/// What let a connection in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Its console token, redeemed now under the type's reuse policy.
    Token,
    /// A ticket exchanged for the token earlier (SPICE channels, native VNC).
    Ticket,
}

/// A session ready to splice.
#[derive(Debug)]
pub struct Opened {
    /// The connected hypervisor console socket.
    pub backend: TcpStream,
    /// Released when the session ends.
    pub guards: SessionGuards,
}

/// Every session of this process: caps, claims, and the shutdown they obey.
#[derive(Debug)]
pub struct Sessions {
    /// Global session cap; a permit rides in each session's guards.
    slots: Arc<Semaphore>,
    /// Consoles that serve one client at a time and have one (serial).
    exclusive: Arc<Mutex<HashSet<(String, u16)>>>,
    redemptions: Arc<dyn RedemptionStore>,
    tokens: TokenConfig,
    connect_timeout: Duration,
    /// Cancelled at shutdown; every session selects on it.
    pub cancel: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// The live sessions, for the admin API.
    pub registry: Arc<registry::Registry>,
    counts: Arc<Mutex<Counts>>,
    per_client: usize,
    per_token: usize,
    max_age: Option<Duration>,
    idle: Option<Duration>,
}

impl Sessions {
    /// Builds the registry.
    pub fn new(
        max_sessions: usize,
        redemptions: Arc<dyn RedemptionStore>,
        tokens: TokenConfig,
        connect_timeout: Duration,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_sessions)),
            exclusive: Arc::default(),
            redemptions,
            tokens,
            connect_timeout,
            cancel,
            tracker: TaskTracker::new(),
            registry: Arc::default(),
            counts: Arc::default(),
            per_client: usize::MAX,
            per_token: usize::MAX,
            max_age: None,
            idle: None,
        }
    }

    /// Ends sessions after `max_age`, and native ones after `idle` without traffic.
    pub fn with_timers(mut self, max_age: Option<Duration>, idle: Option<Duration>) -> Self {
        self.max_age = max_age;
        self.idle = idle;
        self
    }

    /// How a session that `kill` ends (its registry entry's token) is told to stop.
    pub fn stop_for(&self, kill: CancellationToken) -> Stop {
        Stop {
            shutdown: self.cancel.clone(),
            kill,
            deadline: self.max_age.map(|a| tokio::time::Instant::now() + a),
            idle: self.idle,
        }
    }

    /// Caps connections per client address and per token.
    pub fn with_limits(mut self, per_client: usize, per_token: usize) -> Self {
        self.per_client = per_client;
        self.per_token = per_token;
        self
    }

    /// Counts a connection from `client` with token `jti`, within the caps.
    fn count(&self, client: std::net::IpAddr, jti: &str) -> Result<CountGuard, OpenError> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.clients.get(&client).copied().unwrap_or(0) >= self.per_client {
            crate::metrics::limit_hit("per_client");
            return Err(OpenError::Limited("client"));
        }
        if c.tokens.get(jti).copied().unwrap_or(0) >= self.per_token {
            crate::metrics::limit_hit("per_token");
            return Err(OpenError::Limited("token"));
        }
        *c.clients.entry(client).or_default() += 1;
        *c.tokens.entry(jti.to_string()).or_default() += 1;
        Ok(CountGuard {
            counts: self.counts.clone(),
            client,
            jti: jti.to_string(),
        })
    }

    /// Sessions running now.
    pub fn active(&self) -> usize {
        self.tracker.len()
    }

    /// What [`Sessions::open`] would answer now, without taking anything.
    pub fn would_open(&self, grant: &Grant) -> Result<(), OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        if self.slots.available_permits() == 0 {
            return Err(OpenError::Overloaded);
        }
        self.redemptions
            .would_redeem(&grant.jti, self.tokens.reuse_for(grant.console), None)
            .map_err(|e| OpenError::Refused(e.refusal(&grant.jti)))?;
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

    /// Redeems the token for a ticket exchange: under `reconnect` it may be
    /// exchanged again later, under `single-use` never. The ticket then
    /// admits its session's connections ([`Admission::Ticket`]).
    pub fn redeem_for_ticket(&self, grant: &Grant) -> Result<(), OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        Redemption::begin(
            self.redemptions.clone(),
            &grant.jti,
            grant.expires_at,
            self.tokens.reuse_for(grant.console),
            None,
            unix_now(),
        )
        .map(drop)
        .map_err(|e| {
            let refusal = e.refusal(&grant.jti);
            crate::token::record_refusal(&refusal);
            OpenError::Refused(refusal)
        })
    }

    /// What a connection admitted by ticket would get now (for the
    /// WebSocket preflight of spice-html5, whose ticket comes later).
    pub fn would_admit_ticketed(&self, grant: &Grant) -> Result<(), OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        if self.slots.available_permits() == 0 {
            return Err(OpenError::Overloaded);
        }
        if self.redemptions.is_revoked(&grant.jti) {
            return Err(OpenError::Refused(Refusal {
                reason: crate::token::RefusalReason::Revoked,
                detail: "token was revoked".into(),
                jti: Some(grant.jti.clone()),
            }));
        }
        Ok(())
    }

    /// Takes a slot, redeems the token, claims the console and connects to
    /// its port.
    pub async fn open(&self, grant: &Grant, client: std::net::IpAddr) -> Result<Opened, OpenError> {
        self.open_to(grant, Admission::Token, grant.target.port, client)
            .await
    }

    /// As [`Sessions::open`], for a connection admitted as `admission`, to
    /// `port` of the grant's host (a SPICE TLS port).
    pub async fn open_to(
        &self,
        grant: &Grant,
        admission: Admission,
        port: u16,
        client: std::net::IpAddr,
    ) -> Result<Opened, OpenError> {
        if self.cancel.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            crate::metrics::limit_hit("max_sessions");
            OpenError::Overloaded
        })?;
        let counts = self.count(client, &grant.jti)?;
        let redemption = match admission {
            Admission::Token => Some(
                Redemption::begin(
                    self.redemptions.clone(),
                    &grant.jti,
                    grant.expires_at,
                    self.tokens.reuse_for(grant.console),
                    None,
                    unix_now(),
                )
                .map_err(|e| {
                    let refusal = e.refusal(&grant.jti);
                    crate::token::record_refusal(&refusal);
                    OpenError::Refused(refusal)
                })?,
            ),
            // The token was redeemed when the ticket was issued; a revoked
            // token's tickets still stop here.
            Admission::Ticket if self.redemptions.is_revoked(&grant.jti) => {
                let refusal = Refusal {
                    reason: crate::token::RefusalReason::Revoked,
                    detail: "token was revoked".into(),
                    jti: Some(grant.jti.clone()),
                };
                crate::token::record_refusal(&refusal);
                return Err(OpenError::Refused(refusal));
            }
            Admission::Ticket => None,
        };
        let claim = if grant.console == ConsoleType::Serial {
            let key = (grant.target.host.clone(), grant.target.port);
            let mut claims = self.exclusive.lock().unwrap_or_else(|p| p.into_inner());
            if !claims.insert(key.clone()) {
                return Err(OpenError::Busy);
            }
            Some(ConsoleClaim {
                claims: self.exclusive.clone(),
                key,
            })
        } else {
            None
        };
        let host = grant
            .target
            .host
            .trim_start_matches('[')
            .trim_end_matches(']');
        let connecting = std::time::Instant::now();
        let backend = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((host, port)),
        )
        .await
        {
            Ok(Ok(s)) => {
                crate::metrics::connect_took(connecting.elapsed().as_secs_f64());
                s
            }
            Ok(Err(e)) => return Err(OpenError::Unreachable(e.to_string())),
            Err(_) => {
                return Err(OpenError::Unreachable(format!(
                    "no answer within {:?}",
                    self.connect_timeout
                )));
            }
        };
        // Console traffic is interactive: small writes must not wait for Nagle.
        let _ = backend.set_nodelay(true);
        Ok(Opened {
            backend,
            guards: SessionGuards {
                _permit: permit,
                _counts: counts,
                _redemption: redemption,
                _claim: claim,
            },
        })
    }
}
