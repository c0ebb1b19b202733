//! Nova's console tokens: an opaque UUID in, a [`Grant`] out.
//!
//! Nova hands users a random UUID in a URL and keeps, in its database, the
//! token's SHA-256 with the console it opens. Porthole asks Nova's admin API
//! (`GET /v2.1/os-console-auth-tokens/{token}`, microversion 2.99) as a
//! Keystone service user. The answer names the instance, host, port,
//! `internal_access_path` and, for spice-direct tokens only, the key
//! `tls_port`; it names **no console type and no expiry**. So:
//!
//! - the type comes from the ingress that received the token; only
//!   spice-direct is recognisable (its `tls_port` key), so a spice-direct
//!   token is refused on a browser route and any other token on the
//!   spice-direct route, before anything connects;
//! - the expiry is when Porthole first saw the token plus
//!   `[nova] token_ttl_secs` (Nova's `[consoleauth] token_ttl`);
//! - the token's id (`jti`, for reuse, revocation, caps and audit) is
//!   Nova's own `token_hash` (SHA-256 hex), so an operator can find it in
//!   Nova's database; the token itself is never logged or stored.
//!
//! Lookups are single-flight per token, capped in flight and bounded by a
//! deadline. A found token is remembered for a few seconds (a SPICE
//! session's channels, a page's preflight and socket), a 404 a little
//! longer (a UUID Nova does not know never becomes valid). Keystone or Nova
//! not answering, or a policy that refuses the service user, is
//! `unavailable`: Porthole fails closed.

mod check;
mod keystone;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

pub use check::CheckStep;
pub use keystone::Credential;
use keystone::{Keystone, KeystoneSettings};

use super::claims::{Audience, ConsoleClaim, ConsoleClaims};
use super::{ConsoleType, Grant, GrantResolver, Refusal, RefusalReason, TokenValidator, unix_now};
use crate::hypervisor::{AllowList, ConsoleTarget};

/// The Nova policy that guards the lookup, named in logs when it refuses.
pub const LOOKUP_POLICY: &str = "os_compute_api:os-console-auth-tokens";

/// The `iss` of a Nova grant (for `token inspect` and the audit trail).
pub const NOVA_ISSUER: &str = "nova";

/// `[nova]`, validated.
#[derive(Debug, Clone)]
pub struct NovaSettings {
    /// Keystone v3, e.g. `https://keystone.example.com:5000/v3`.
    pub auth_url: String,
    /// How Porthole authenticates.
    pub credential: Credential,
    /// Catalog region of the compute endpoint (any, if `None`).
    pub region: Option<String>,
    /// Catalog interface of the compute endpoint (`internal`).
    pub interface: String,
    /// The compute endpoint, instead of the catalog's (`…/v2.1`).
    pub compute_url: Option<String>,
    /// CA bundle (PEM) Keystone's and Nova's certificates chain to, instead
    /// of the system's.
    pub ca_file: Option<PathBuf>,
    /// The longest a client waits for a lookup: the queue, Keystone, Nova
    /// and a retry after a 401, together.
    pub timeout: Duration,
    /// Nova's `[consoleauth] token_ttl`: a token's life from first sight.
    pub token_ttl_secs: u64,
    /// How long a found token is remembered.
    pub cache_secs: u64,
    /// How long a token Nova does not know is remembered.
    pub negative_cache_secs: u64,
    /// Lookups in flight at most; up to [`QUEUED_PER_SLOT`] times as many
    /// wait (within the deadline), more are refused at once.
    pub max_in_flight: usize,
    /// Lookups per second of tokens this node has never seen (the rate a
    /// flood of made-up UUIDs could cost Nova), for the whole node.
    pub unseen_per_sec: u32,
    /// How many such lookups may go at once before the rate applies.
    pub unseen_burst: u32,
    /// Tokens remembered (first sight, caches) at most.
    pub capacity: usize,
    /// `OpenStack-API-Version: compute <this>`.
    pub microversion: String,
}

/// Why a Nova resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NovaError {
    /// The CA bundle could not be read or parsed.
    #[error("[nova] ca_file {file}: {error}")]
    Ca {
        /// The file.
        file: PathBuf,
        /// Why.
        error: String,
    },
    /// The HTTP client would not build.
    #[error("[nova] HTTP client: {0}")]
    Client(String),
}

/// Why a lookup gave no answer: every one is `unavailable` to the client,
/// and names the service to blame in the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// Keystone could not be reached, refused the credentials, or its
    /// catalog has no compute endpoint.
    #[error("Keystone: {0}")]
    Keystone(String),
    /// Nova could not be reached or answered something unexpected.
    #[error("Nova: {0}")]
    Nova(String),
    /// Nova's policy refuses Porthole's service user.
    #[error(
        "Nova answered 403: its policy `{LOOKUP_POLICY}` refuses Porthole's service user; grant it the role the policy names (e.g. `\"{LOOKUP_POLICY}\": \"rule:context_is_admin or role:console_auth\"` and the console_auth role)"
    )]
    Policy,
    /// Nova does not serve the microversion asked for.
    #[error(
        "Nova answered {0} to microversion {1}: set [nova] microversion to one it serves (2.31 or later; 2.99 for spice-direct)"
    )]
    Microversion(u16, String),
    /// No answer within the lookup's deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// `max_in_flight` lookups in flight and the queue behind them full.
    #[error("{0} lookups in flight and as many as may wait already waiting")]
    Busy(usize),
    /// The budget for tokens never seen is spent for now.
    #[error("the budget for lookups of never-seen tokens ([nova] unseen_lookups_per_sec) is spent")]
    Budget,
}

impl LookupError {
    fn label(&self) -> &'static str {
        match self {
            LookupError::Keystone(_) => "keystone_failed",
            LookupError::Nova(_) => "nova_failed",
            LookupError::Policy => "policy",
            LookupError::Microversion(..) => "microversion",
            LookupError::Timeout(_) => "timeout",
            LookupError::Busy(_) => "busy",
            LookupError::Budget => "budget_spent",
        }
    }

    /// Whether it says Keystone or Nova cannot be used (for `porthole_nova_up`);
    /// `Busy` and `Budget` are Porthole's own limits.
    fn says_down(&self) -> bool {
        !matches!(self, LookupError::Busy(_) | LookupError::Budget)
    }
}

/// Lookups that may wait per lookup in flight before more are refused.
pub const QUEUED_PER_SLOT: usize = 4;

/// Where a lookup's caller stands, for the budget of never-seen tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Its address has brought no unknown Nova token lately: it may use
    /// the whole budget, the reserve included.
    Clean,
    /// Its address brought unknown tokens lately (or is not known): it
    /// may not touch the reserve kept for clean addresses.
    Suspect,
}

/// A token bucket for lookups of never-seen tokens. Half the burst is a
/// reserve that only [`Standing::Clean`] callers may take, so a flood of
/// made-up tokens from addresses that already failed cannot keep a real
/// user's fresh token from being looked up.
#[derive(Debug)]
struct Budget {
    per_sec: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Budget {
    fn new(per_sec: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_sec: f64::from(per_sec),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    fn take(&self, standing: Standing) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = &mut *state;
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        let floor = match standing {
            Standing::Clean => 0.0,
            Standing::Suspect => self.burst / 2.0,
        };
        if *tokens - 1.0 >= floor {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// An instance id (a UUID) or a host name (at most 253) in Nova's answer.
const MAX_NOVA_FIELD: usize = 255;

/// Nova's answer to a lookup is a few hundred bytes.
const MAX_LOOKUP_BODY: usize = 64 * 1024;

/// `response`'s body read as JSON, refused past `max` bytes: a body is held
/// whole before it is parsed, and its server is a peer.
pub(crate) async fn json_within<T: serde::de::DeserializeOwned>(
    mut response: reqwest::Response,
    max: usize,
) -> Result<T, String> {
    let over = || format!("an answer over {max} bytes");
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(over());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > max {
            return Err(over());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("unreadable answer: {e}"))
}

/// A reqwest error, without the URL (the lookup's URL holds the token).
pub(crate) fn describe(e: reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut text = format!("{what}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// What Nova says about a console token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NovaConsole {
    /// The instance.
    pub instance_uuid: String,
    /// The compute host's console address.
    pub host: String,
    /// The console port.
    pub port: Option<u16>,
    /// A path to send as `CONNECT` (VMware, Hyper-V); null for libvirt.
    #[serde(default)]
    pub internal_access_path: Option<String>,
    /// `Some` when the key is there (a spice-direct token), whatever its value.
    #[serde(default, deserialize_with = "key_present")]
    pub tls_port: Option<Option<u16>>,
}

fn key_present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u16>>, D::Error> {
    Option::<u16>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct LookupBody {
    console: NovaConsole,
}

/// Nova's answer.
#[derive(Debug, Clone)]
enum Lookup {
    Found(NovaConsole),
    NotFound,
}

/// Whether `token` is a canonical (lowercase, hyphenated) UUID, as Nova
/// mints them. Nothing else is ever sent to Nova.
pub fn is_nova_token(token: &str) -> bool {
    token.len() == 36
        && token.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// Nova's `token_hash`: the SHA-256 of the token, in hex.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What the resolver remembers about tokens, by hash; bounded.
#[derive(Debug, Default)]
struct Memory {
    /// When each token was first seen (its `iat`).
    seen: HashMap<String, u64>,
    /// Found tokens, until the instant they are asked again.
    found: HashMap<String, (Instant, NovaConsole)>,
    /// Tokens Nova does not know, until the instant they are asked again.
    missing: HashMap<String, Instant>,
}

type Flight = Arc<OnceCell<Result<Lookup, LookupError>>>;

/// A lookup waiting for a place in flight; it leaves the count when dropped.
struct QueuePlace<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Resolves Nova console tokens.
#[derive(Debug)]
pub struct NovaResolver {
    settings: NovaSettings,
    http: reqwest::Client,
    keystone: Keystone,
    memory: Mutex<Memory>,
    flights: Mutex<HashMap<String, Flight>>,
    in_flight: Semaphore,
    /// Lookups waiting for a place in flight.
    queued: std::sync::atomic::AtomicUsize,
    /// Whether the last lookup that asked got Keystone's and Nova's answer:
    /// 0 none asked yet, 1 yes, 2 no.
    reachable: std::sync::atomic::AtomicU8,
    unseen: Budget,
}

impl NovaResolver {
    /// Builds the resolver (its HTTP client and CA bundle); nothing is asked yet.
    pub fn new(settings: NovaSettings) -> Result<Self, NovaError> {
        let mut http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("porthole/", env!("CARGO_PKG_VERSION")));
        if let Some(file) = &settings.ca_file {
            let ca_error = |error: String| NovaError::Ca {
                file: file.clone(),
                error,
            };
            let pem = std::fs::read(file).map_err(|e| ca_error(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no certificate in it".into()));
            }
            http = http.tls_built_in_root_certs(false);
            for c in certs {
                http = http.add_root_certificate(c);
            }
        }
        let http = http.build().map_err(|e| NovaError::Client(e.to_string()))?;
        let keystone = Keystone::new(KeystoneSettings {
            auth_url: settings.auth_url.clone(),
            credential: settings.credential.clone(),
            region: settings.region.clone(),
            interface: settings.interface.clone(),
            compute_url: settings.compute_url.clone(),
        });
        Ok(Self {
            in_flight: Semaphore::new(settings.max_in_flight.max(1)),
            queued: std::sync::atomic::AtomicUsize::new(0),
            reachable: std::sync::atomic::AtomicU8::new(0),
            unseen: Budget::new(settings.unseen_per_sec, settings.unseen_burst),
            settings,
            http,
            keystone,
            memory: Mutex::default(),
            flights: Mutex::default(),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &NovaSettings {
        &self.settings
    }

    /// Whether the last lookup that asked reached Keystone and Nova (`None`
    /// before the first).
    pub fn reachable(&self) -> Option<bool> {
        match self.reachable.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    fn note_reachable(&self, up: bool) {
        crate::metrics::nova_up(up);
        self.reachable
            .store(if up { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves a Nova token for a console of type `expect` whose target
    /// must pass `allow`, for a caller in good standing (the whole budget
    /// of lookups of never-seen tokens). Revocations are the caller's next step.
    pub async fn resolve(
        &self,
        token: &str,
        expect: Option<ConsoleType>,
        allow: &AllowList,
    ) -> Result<Grant, Refusal> {
        self.resolve_for(token, expect, allow, Standing::Clean)
            .await
    }

    /// [`NovaResolver::resolve`] for a caller of `standing`.
    pub async fn resolve_for(
        &self,
        token: &str,
        expect: Option<ConsoleType>,
        allow: &AllowList,
        standing: Standing,
    ) -> Result<Grant, Refusal> {
        let hash = token_hash(token);
        let refuse = |reason, detail: String| Refusal {
            reason,
            detail,
            jti: Some(hash.clone()),
        };
        let now = unix_now();
        let seen = self.first_seen(&hash);
        if let Some(first) = seen
            && now >= first + self.settings.token_ttl_secs
        {
            return Err(refuse(
                RefusalReason::Expired,
                format!(
                    "first seen {} s ago; [nova] token_ttl_secs is {}",
                    now - first,
                    self.settings.token_ttl_secs
                ),
            ));
        }
        let lookup = self
            .lookup(token, &hash, seen.is_none().then_some(standing))
            .await
            .map_err(|e| refuse(RefusalReason::Unavailable, e.to_string()))?;
        let console = match lookup {
            Lookup::Found(c) => c,
            Lookup::NotFound if seen.is_some() => {
                return Err(refuse(
                    RefusalReason::Expired,
                    "Nova no longer knows it (expired or deleted)".into(),
                ));
            }
            Lookup::NotFound => {
                return Err(refuse(
                    RefusalReason::UnknownToken,
                    "Nova does not know it (never issued, expired or deleted)".into(),
                ));
            }
        };
        let iat = self.remember_seen(&hash, now).ok_or_else(|| {
            refuse(
                RefusalReason::Unavailable,
                "the Nova token memory is full".into(),
            )
        })?;
        self.grant(hash.clone(), console, expect, iat, allow)
    }

    fn first_seen(&self, hash: &str) -> Option<u64> {
        let memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        memory.seen.get(hash).copied()
    }

    /// Records the first sight of `hash` at `now` unless seen before; the
    /// first sight, or `None` when full of tokens still alive.
    fn remember_seen(&self, hash: &str, now: u64) -> Option<u64> {
        let ttl = self.settings.token_ttl_secs;
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = m.seen.get(hash) {
            return Some(*first);
        }
        if m.seen.len() >= self.settings.capacity {
            // A minute past its life, Nova refuses a token too.
            m.seen.retain(|_, first| *first + ttl + 60 > now);
            if m.seen.len() >= self.settings.capacity {
                return None;
            }
        }
        m.seen.insert(hash.to_string(), now);
        Some(now)
    }

    /// Nova's answer for `token`: from memory, from a lookup already in
    /// flight for it, or asked now: within one deadline from here (the
    /// queue for a place in flight, Keystone, Nova), refused at once when
    /// the queue is full, and for a token never seen (`unseen` says by
    /// whom) only within the budget for those.
    async fn lookup(
        &self,
        token: &str,
        hash: &str,
        unseen: Option<Standing>,
    ) -> Result<Lookup, LookupError> {
        if let Some(known) = self.remembered(hash) {
            crate::metrics::nova_lookup("cached", None);
            return Ok(known);
        }
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            match flights.get(hash) {
                // Joining a lookup already asked costs Nova nothing.
                Some(f) => f.clone(),
                None => {
                    if let Some(standing) = unseen
                        && !self.unseen.take(standing)
                    {
                        crate::metrics::nova_lookup(LookupError::Budget.label(), None);
                        return Err(LookupError::Budget);
                    }
                    flights.entry(hash.to_string()).or_default().clone()
                }
            }
        };
        let deadline = self.settings.timeout;
        let answer = flight
            .get_or_init(|| async {
                let started = Instant::now();
                let asked = match self.queue() {
                    Err(busy) => Err(busy),
                    Ok(queued) => tokio::time::timeout(deadline, async {
                        let _permit = self.in_flight.acquire().await;
                        drop(queued);
                        self.ask(token).await
                    })
                    .await
                    .unwrap_or(Err(LookupError::Timeout(deadline))),
                };
                let label = match &asked {
                    Ok(Lookup::Found(_)) => "found",
                    Ok(Lookup::NotFound) => "not_found",
                    Err(e) => e.label(),
                };
                crate::metrics::nova_lookup(label, Some(started.elapsed().as_secs_f64()));
                match &asked {
                    Ok(found) => {
                        self.note_reachable(true);
                        self.remember(hash, found);
                    }
                    Err(e) => {
                        if e.says_down() {
                            self.note_reachable(false);
                        }
                        tracing::warn!(
                            token_hash = &hash[..12],
                            "Nova token lookup failed, refused as unavailable: {e}"
                        );
                    }
                }
                asked
            })
            .await
            .clone();
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.get(hash).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            flights.remove(hash);
        }
        answer
    }

    /// A place in the queue for a place in flight, or `Busy` when the
    /// queue is full (waiting longer would only use up the deadline).
    fn queue(&self) -> Result<QueuePlace<'_>, LookupError> {
        use std::sync::atomic::Ordering;
        let most = self.settings.max_in_flight.max(1) * QUEUED_PER_SLOT;
        let waiting = self.queued.fetch_add(1, Ordering::AcqRel);
        let place = QueuePlace(&self.queued);
        if waiting >= most && self.in_flight.available_permits() == 0 {
            return Err(LookupError::Busy(self.settings.max_in_flight));
        }
        Ok(place)
    }

    fn remembered(&self, hash: &str) -> Option<Lookup> {
        let now = Instant::now();
        let m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((until, c)) = m.found.get(hash)
            && now < *until
        {
            return Some(Lookup::Found(c.clone()));
        }
        m.missing
            .get(hash)
            .filter(|until| now < **until)
            .map(|_| Lookup::NotFound)
    }

    fn remember(&self, hash: &str, lookup: &Lookup) {
        let now = Instant::now();
        let s = &self.settings;
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        let cap = s.capacity;
        match lookup {
            Lookup::Found(c) if s.cache_secs > 0 => {
                if m.found.len() >= cap {
                    m.found.retain(|_, (until, _)| *until > now);
                }
                if m.found.len() < cap {
                    let until = now + Duration::from_secs(s.cache_secs);
                    m.found.insert(hash.to_string(), (until, c.clone()));
                }
            }
            Lookup::NotFound if s.negative_cache_secs > 0 => {
                if m.missing.len() >= cap {
                    m.missing.retain(|_, until| *until > now);
                }
                if m.missing.len() < cap {
                    let until = now + Duration::from_secs(s.negative_cache_secs);
                    m.missing.insert(hash.to_string(), until);
                }
            }
            _ => {}
        }
    }

    /// One lookup: a Keystone token, then Nova; a 401 renews the Keystone
    /// token once (Nova's token cache may hold a revoked one).
    async fn ask(&self, token: &str) -> Result<Lookup, LookupError> {
        let mv = &self.settings.microversion;
        for attempt in 0..2 {
            let session = self.keystone.session(&self.http).await?;
            let url = format!("{}/os-console-auth-tokens/{token}", session.compute);
            let response = self
                .http
                .get(url)
                .header("X-Auth-Token", session.token.expose())
                .header("OpenStack-API-Version", format!("compute {mv}"))
                .header("Accept", "application/json")
                .send()
                .await
                .map_err(|e| LookupError::Nova(describe(e)))?;
            match response.status().as_u16() {
                200 => {
                    let body: LookupBody = json_within(response, MAX_LOOKUP_BODY)
                        .await
                        .map_err(LookupError::Nova)?;
                    return Ok(Lookup::Found(body.console));
                }
                404 => return Ok(Lookup::NotFound),
                401 if attempt == 0 => self.keystone.invalidate(&session).await,
                401 => {
                    return Err(LookupError::Keystone(
                        "Nova refused a fresh Keystone token (401)".into(),
                    ));
                }
                403 => return Err(LookupError::Policy),
                s @ (400 | 406) => return Err(LookupError::Microversion(s, mv.clone())),
                s => return Err(LookupError::Nova(format!("HTTP {s}"))),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The grant for Nova's answer on an ingress serving `expect`.
    fn grant(
        &self,
        jti: String,
        c: NovaConsole,
        expect: Option<ConsoleType>,
        iat: u64,
        allow: &AllowList,
    ) -> Result<Grant, Refusal> {
        let refuse = |reason, detail: String| Refusal {
            reason,
            detail,
            jti: Some(jti.clone()),
        };
        let direct = c.tls_port.is_some();
        let kind = match (expect, direct) {
            (Some(ConsoleType::SpiceDirect), true) | (None, true) => ConsoleType::SpiceDirect,
            (
                Some(k @ (ConsoleType::Novnc | ConsoleType::Serial | ConsoleType::SpiceHtml5)),
                false,
            ) => k,
            (Some(k), true) => {
                return Err(refuse(
                    RefusalReason::WrongConsoleType,
                    format!("a Nova spice-direct token, on the {k} route"),
                ));
            }
            (Some(k), false) => {
                return Err(refuse(
                    RefusalReason::WrongConsoleType,
                    format!("a Nova browser-console token, on the {k} route"),
                ));
            }
            (None, false) => {
                let routes: Vec<_> = ConsoleType::ALL
                    .iter()
                    .filter_map(|k| k.page_route())
                    .collect();
                return Err(refuse(
                    RefusalReason::WrongConsoleType,
                    format!(
                        "a Nova token names no console type: it works only on a route of its type ({})",
                        routes.join(", ")
                    ),
                ));
            }
        };
        if c.instance_uuid.chars().any(char::is_control) || c.host.chars().any(char::is_control) {
            return Err(refuse(
                RefusalReason::Malformed,
                "Nova's answer holds control characters".into(),
            ));
        }
        // They go into logs, the audit trail and the store.
        if c.instance_uuid.len() > MAX_NOVA_FIELD || c.host.len() > MAX_NOVA_FIELD {
            return Err(refuse(
                RefusalReason::Malformed,
                format!("Nova's answer has an instance or host over {MAX_NOVA_FIELD} bytes"),
            ));
        }
        if c.internal_access_path
            .as_deref()
            .is_some_and(|p| !p.is_empty())
        {
            return Err(refuse(
                RefusalReason::TargetNotAllowed,
                "the console has an internal_access_path (a CONNECT preface, VMware/Hyper-V), which Porthole does not send".into(),
            ));
        }
        let tls_port = c.tls_port.flatten();
        let Some(port) = c.port.or(tls_port) else {
            return Err(refuse(
                RefusalReason::TargetNotAllowed,
                "Nova's answer has no port".into(),
            ));
        };
        let target = ConsoleTarget {
            host: c.host.clone(),
            port,
            tls_port,
        };
        let backend = allow
            .check(&target, kind)
            .map_err(|e| refuse(RefusalReason::TargetNotAllowed, e.to_string()))?
            .name
            .clone();
        let exp = iat + self.settings.token_ttl_secs;
        let claims = ConsoleClaims {
            iss: NOVA_ISSUER.into(),
            aud: Audience::One(NOVA_ISSUER.into()),
            sub: c.instance_uuid.clone(),
            // Nova's console tokens name no user.
            user: None,
            exp,
            nbf: None,
            iat,
            jti: jti.clone(),
            ver: None,
            console: ConsoleClaim {
                kind,
                host: c.host,
                port,
                tls_port,
                // Nova has no view-only consoles.
                view_only: false,
                record: false,
            },
            shadow_of: None,
            playback: None,
        };
        Ok(Grant {
            jti,
            instance: c.instance_uuid,
            console: kind,
            target,
            backend,
            expires_at: exp,
            issuer: NOVA_ISSUER.into(),
            kid: None,
            claims,
        })
    }
}

/// Signed JWTs and, when `[nova]` is configured, Nova's tokens, on one
/// gateway: a canonical UUID goes to Nova, anything else to the JWT
/// validator (where a stray UUID is `malformed`). Both check the same
/// revocation store and allow-list.
#[derive(Debug)]
pub struct Resolvers {
    jwt: Arc<TokenValidator>,
    nova: Option<Arc<NovaResolver>>,
}

impl Resolvers {
    /// The composite over `jwt` and, if any, `nova`.
    pub fn new(jwt: Arc<TokenValidator>, nova: Option<Arc<NovaResolver>>) -> Self {
        Self { jwt, nova }
    }
}

impl GrantResolver for Resolvers {
    fn resolve<'a>(
        &'a self,
        token: &'a str,
        expect: Option<ConsoleType>,
    ) -> futures_util::future::BoxFuture<'a, Result<Grant, Refusal>> {
        self.resolve_for(token, expect, Standing::Suspect)
    }

    fn resolve_for<'a>(
        &'a self,
        token: &'a str,
        expect: Option<ConsoleType>,
        standing: Standing,
    ) -> futures_util::future::BoxFuture<'a, Result<Grant, Refusal>> {
        match &self.nova {
            Some(nova) if is_nova_token(token) => Box::pin(async move {
                let allow = self.jwt.allow_list();
                let grant = nova.resolve_for(token, expect, &allow, standing).await?;
                super::check_revoked(self.jwt.revocations(), grant).await
            }),
            _ => self.jwt.resolve(token, expect),
        }
    }

    /// A Nova token's id is its hash: holding the token is the proof.
    fn holder(&self, token: &str) -> Option<String> {
        match &self.nova {
            Some(_) if is_nova_token(token) => Some(token_hash(token)),
            _ => self.jwt.holder_of(token),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_uuids_are_nova_tokens() {
        assert!(is_nova_token("0b4c2a1e-9f3d-4e2a-8b1c-5d6e7f8a9b0c"));
        for bad in [
            "0B4C2A1E-9F3D-4E2A-8B1C-5D6E7F8A9B0C",
            "0b4c2a1e9f3d4e2a8b1c5d6e7f8a9b0c",
            "{0b4c2a1e-9f3d-4e2a-8b1c-5d6e7f8a9b0c}",
            "0b4c2a1e-9f3d-4e2a-8b1c-5d6e7f8a9b0g",
            "0b4c2a1e-9f3d-4e2a-8b1c-5d6e7f8a9b0c ",
            "eyJhbGciOiJFZERTQSJ9.e30.sig",
        ] {
            assert!(!is_nova_token(bad), "{bad}");
        }
    }

    #[test]
    fn the_token_hash_is_novas() {
        // Nova's `hashlib.sha256(token.encode()).hexdigest()`, for "abc".
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_tls_port_key_marks_spice_direct_even_when_null() {
        let c: LookupBody = serde_json::from_str(
            r#"{"console":{"instance_uuid":"i","host":"h","port":5900,"internal_access_path":null,"tls_port":null}}"#,
        )
        .unwrap();
        assert_eq!(c.console.tls_port, Some(None));
        let c: LookupBody = serde_json::from_str(
            r#"{"console":{"instance_uuid":"i","host":"h","port":5900,"internal_access_path":null}}"#,
        )
        .unwrap();
        assert_eq!(c.console.tls_port, None);
    }
}
