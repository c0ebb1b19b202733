//! One session's life, the same for every kind (browser VNC, serial,
//! spice-html5, native SPICE, native VNC): [`Lifecycle::begin`] at admission
//! registers it and writes its start (metric, audit event, log line);
//! [`Lifecycle::finish`] releases what it holds and writes its end. A
//! refusal anywhere in the session layer is recorded by [`refused`], the one
//! place that maps blame to a log level.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::registry::{ByteCounters, LiveSession, NewSession, SessionRegistry};
use super::{SessionGuards, Sessions, Stop, Traffic};
use crate::console::ConsoleType;
use crate::error::Blame;
use crate::token::{Grant, Refusal};

/// A session from admission to its end. Every path ends with
/// [`Lifecycle::finish`]; one dropped unfinished (a task that panicked) is
/// still deregistered and its guards released, in the background, but
/// writes no end.
#[derive(Debug)]
pub struct Lifecycle {
    registry: Arc<dyn SessionRegistry>,
    live: Arc<LiveSession>,
    started: Instant,
    guards: Vec<SessionGuards>,
    stop: Stop,
    span: tracing::Span,
    finished: bool,
}

impl Lifecycle {
    /// Registers a session for `grant` from `client`, and writes its start.
    /// `key` lets further connections join it (a SPICE ticket's id).
    pub async fn begin(
        sessions: &Sessions,
        grant: &Grant,
        console: ConsoleType,
        client: IpAddr,
        key: Option<String>,
    ) -> Self {
        let new = NewSession {
            console,
            instance: grant.instance.clone(),
            jti: grant.jti.clone(),
            user: grant.user().map(str::to_owned),
            client,
            target: grant.target.to_string(),
            key,
            view_only: grant.view_only(),
            shadow_of: grant.shadow_of().map(str::to_owned),
            recorded: sessions.records(grant),
        };
        // Its own token, not a child of the shutdown token: `Stop` waits
        // on both, and a child is linked and unlinked under the parent's
        // lock, which every open on every worker would take twice.
        let live = sessions
            .registry
            .register(new, tokio_util::sync::CancellationToken::new())
            .await;
        let mut stop = sessions.stop_for(&live);
        if let Some(id) = grant.shadow_of() {
            // Its session's pages may say that it is watched.
            sessions.registry.watched(id, &live.id, 1).await;
            // A shadow ends with the session it watches, on whichever node.
            stop.ended = match sessions.registry.by_id(id).await {
                Some(watched) => watched.ended.clone(),
                None => {
                    let gone = tokio_util::sync::CancellationToken::new();
                    gone.cancel();
                    gone
                }
            };
        }
        let _ = live.ends_at.set(stop.deadline);
        // Every log line of the session carries its id (the audit trail's too).
        let span = tracing::info_span!("session", session = %live.id);
        crate::metrics::session_started(console.as_str());
        crate::audit::session_started(&live.record());
        span.in_scope(|| {
            tracing::info!(
                session = %live.id, %client, jti = %grant.jti, instance = %grant.instance,
                %console, target = %grant.target, "session started"
            );
        });
        Self {
            registry: sessions.registry.clone(),
            live,
            started: Instant::now(),
            guards: Vec::new(),
            stop,
            span,
            finished: false,
        }
    }

    /// The registry entry.
    pub fn live(&self) -> &Arc<LiveSession> {
        &self.live
    }

    /// The session's byte counters (shared by all its connections).
    pub fn counters(&self) -> &ByteCounters {
        &self.live.bytes
    }

    /// How the session is told to stop.
    pub fn stop(&self) -> Stop {
        self.stop.clone()
    }

    /// The span its log lines go in.
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Holds `guards` until the session ends.
    pub fn hold(&mut self, guards: SessionGuards) {
        self.guards.push(guards);
    }

    /// Ends the session for `outcome`: releases what it holds, writes the
    /// end (audit event, metrics, log line) and removes its registry entry.
    /// `traffic` is the bytes of the connection that carried the session.
    pub async fn finish(mut self, outcome: &'static str, traffic: Traffic) {
        self.finished = true;
        // The end is stamped before the token is given back (a takeover's
        // newer session, on any node, waits for that release, so the old
        // session's end is stamped before the new one's start) and written
        // after it (whoever sees the end may use the token, the counts and
        // the console at once).
        let live = &self.live;
        let secs = self.started.elapsed().as_secs_f64();
        let terminated = live.terminated.get();
        let counters = &live.bytes;
        let end = crate::audit::session_ended(
            &live.record(),
            &crate::audit::SessionOutcome {
                outcome,
                secs,
                bytes_up: counters.up.load(std::sync::atomic::Ordering::Relaxed),
                bytes_down: counters.down.load(std::sync::atomic::Ordering::Relaxed),
                terminated: terminated.map(|t| (t.by.as_str(), t.reason.as_str())),
            },
        );
        for g in std::mem::take(&mut self.guards) {
            g.release().await;
        }
        end.emit();
        let console = live.console.as_str();
        crate::metrics::session_ended(console, outcome);
        crate::metrics::bytes_relayed(console, traffic.up, traffic.down);
        self.span.in_scope(|| {
            tracing::info!(
                session = %live.id, client = %live.client, jti = %live.jti, console,
                reason = outcome, bytes_up = traffic.up, bytes_down = traffic.down, secs,
                "session ended"
            );
        });
        self.registry.deregister(live).await;
        if let Some(id) = &live.shadow_of {
            self.registry.watched(id, &live.id, -1).await;
        }
        // What joined it ends with it.
        live.ended.cancel();
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let registry = self.registry.clone();
        let live = self.live.clone();
        let guards = std::mem::take(&mut self.guards);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for g in guards {
                    g.release().await;
                }
                registry.deregister(&live).await;
                if let Some(id) = &live.shadow_of {
                    registry.watched(id, &live.id, -1).await;
                }
                live.ended.cancel();
            });
        }
    }
}

/// A refusal in the session layer, as it is recorded.
pub struct Refused<'a> {
    /// What refused, for the audit trail (`session`, `vnc_handshake`, `spice_link`).
    pub what: &'static str,
    /// The same for a log line (`session`, `vnc handshake`, `spice link`).
    pub label: &'static str,
    /// Its stable reason.
    pub reason: &'static str,
    /// Who is to blame.
    pub blame: Blame,
    /// The client.
    pub client: IpAddr,
    /// The console type, when known.
    pub console: Option<ConsoleType>,
    /// The token's id, when known.
    pub jti: Option<&'a str>,
    /// Detail for the log (never a secret).
    pub detail: &'a dyn std::fmt::Display,
}

/// A handshake whose refusals are counted and recorded alike: native
/// VNC's, and each SPICE channel's link.
#[derive(Debug)]
pub struct Handshake {
    /// Its protocol in the failed-handshake counter (`rfb`, `spice`).
    pub protocol: &'static str,
    /// What refused, for the audit trail (`vnc_handshake`, `spice_link`).
    pub what: &'static str,
    /// The same for a log line (`vnc handshake`, `spice link`).
    pub label: &'static str,
}

impl Handshake {
    /// Counts a refusal of this handshake and records it ([`refused`]):
    /// its stable reason, who is to blame and detail for the log (never a
    /// secret), about `client` and, when known, its console type and token.
    pub fn refused(
        &self,
        reason: &'static str,
        blame: Blame,
        detail: &dyn std::fmt::Display,
        client: IpAddr,
        console: Option<ConsoleType>,
        jti: Option<&str>,
    ) {
        crate::metrics::handshake_failed(self.protocol, reason, blame.as_str());
        refused(&Refused {
            what: self.what,
            label: self.label,
            reason,
            blame,
            client,
            console,
            jti,
            detail,
        });
    }
}

/// Logs and audits a refusal (rate-limited under a flood; counters are the
/// caller's). The one place that maps blame to a log level: a client's
/// mistake is `info`, a hypervisor's or our own is `warn`.
pub fn refused(r: &Refused<'_>) {
    if !crate::audit::refusal_log_allowed() {
        return;
    }
    crate::audit::refused(r.what, r.reason, r.jti, Some(r.client));
    let console = r.console.map_or("-", ConsoleType::as_str);
    let (client, label, reason, detail) = (r.client, r.label, r.reason, r.detail);
    match r.blame {
        Blame::Client => {
            tracing::info!(%client, console = %console, reason, "{label} refused: {detail}")
        }
        Blame::Backend | Blame::Internal => {
            tracing::warn!(%client, console = %console, reason, blame = r.blame.as_str(), "{label} failed: {detail}")
        }
    }
}

/// Counts `e` as a refused session and records it as [`refused`] does:
/// `what` and `label` name what was asked for, `grant` its token's, when
/// it has one.
pub fn open_refused(
    what: &'static str,
    label: &'static str,
    e: &super::OpenError,
    client: IpAddr,
    grant: Option<&Grant>,
) {
    crate::metrics::session_refused(e.as_str());
    refused(&Refused {
        what,
        label,
        reason: e.as_str(),
        blame: e.blame(),
        client,
        console: grant.map(|g| g.console),
        jti: grant.map(|g| g.jti.as_str()),
        detail: e,
    });
}

/// Logs and counts a refused token; every refused token goes through here once.
pub fn token_refused(refusal: &Refusal) {
    crate::metrics::token_refused(refusal.reason.as_str());
    if !crate::audit::refusal_log_allowed() {
        return;
    }
    crate::audit::refused(
        "token",
        refusal.reason.as_str(),
        refusal.jti.as_deref(),
        None,
    );
    tracing::info!(
        reason = refusal.reason.as_str(),
        detail = %refusal.detail,
        jti = refusal.jti.as_deref().unwrap_or("-"),
        "token refused"
    );
}
