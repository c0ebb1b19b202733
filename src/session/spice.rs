//! One SPICE channel connection through Porthole, start to finish.
//!
//! On every channel (SPICE opens one connection per channel) Porthole plays
//! the server to the client and the client to the hypervisor:
//!
//! 1. reads the client's link message and answers with a link key from the
//!    ring and the capabilities it offers;
//! 2. decrypts the client's ticket and asks the ticket store whether it
//!    admits this channel: the main channel (connection id 0) opens the
//!    ticket's one session, others must name that session's id;
//! 3. connects to the hypervisor (TLS port when a CA is configured for its
//!    network, else the plain port, escalating on NEED_SECURED), links with
//!    the client's capabilities minus what a proxy must not pass, and
//!    authenticates with the hypervisor's ticket from the backend config;
//! 4. relays the link result, then splices, with the bytes that came early.
//!
//! On the main channel the hypervisor's INIT names the session; the ticket
//! is bound to it, and migration messages end the session instead of
//! reaching the client. Every refusal gets a SPICE link error code, a log
//! line with its reason and blame, and a counter.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{Admission, CloseReason, OpenError, Sessions};
use crate::error::Blame;
use crate::hypervisor::SpiceUpstreams;
use crate::protocol::spice::crypto::{decrypt_ticket, encrypt_ticket};
use crate::protocol::spice::link::{
    ClientLink, ClientStep, LinkFailure, ServerLink, ServerStep, framing_agrees, upstream_caps,
};
use crate::protocol::spice::main_watch::{MainEvent, MainWatch};
use crate::protocol::spice::messages::{LinkError, LinkMess, channel, common_cap};
use crate::session::link_keys::LinkKeys;
use crate::token::ticket::{Admitted, ChannelRole, TicketRefusal, TicketStore};
use crate::token::{ConsoleType, unix_now};

pub use super::splice::Io;
use super::splice::REFUSAL_DEADLINE;

/// Where a channel connection came from.
#[derive(Debug, Clone)]
pub enum ClientLeg {
    /// Porthole's SPICE TLS listener: `spice-direct` tickets.
    Native,
    /// A spice-html5 WebSocket opened with the `spice-html5` token `jti`.
    Browser {
        /// The token's id; the ticket must have been issued for it.
        jti: String,
    },
}

/// Why a channel link was refused.
#[derive(Debug, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct ChannelRefusal {
    /// What the client is told (nothing, when it is gone or too slow).
    pub code: Option<LinkError>,
    /// A stable label for logs and metrics.
    pub reason: &'static str,
    /// Who is at fault.
    pub blame: Blame,
    /// Detail for the log (never a ticket or password).
    pub detail: String,
}

impl ChannelRefusal {
    fn client(code: LinkError, reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            reason,
            blame: Blame::Client,
            detail: detail.into(),
        }
    }

    fn backend(code: LinkError, reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            reason,
            blame: Blame::Backend,
            detail: detail.into(),
        }
    }

    fn wire(f: LinkFailure, blame: Blame) -> Self {
        Self {
            code: Some(if blame == Blame::Client {
                f.code
            } else {
                LinkError::Error
            }),
            reason: f.reason,
            blame,
            detail: f
                .wire
                .as_ref()
                .map_or_else(|| f.to_string(), ToString::to_string),
        }
    }

    fn gone(reason: &'static str, blame: Blame) -> Self {
        Self {
            code: None,
            reason,
            blame,
            detail: String::new(),
        }
    }
}

/// What the SPICE proxy needs, shared by every channel.
#[derive(Debug)]
pub struct SpiceProxy {
    /// Slots, revocation checks, connecting, shutdown.
    pub sessions: Arc<Sessions>,
    /// Tickets and their sessions.
    pub tickets: Arc<dyn TicketStore>,
    /// Link keys.
    pub keys: Arc<LinkKeys>,
    /// What to present to each backend network's SPICE servers.
    pub upstreams: Arc<arc_swap::ArcSwap<SpiceUpstreams>>,
    /// Deadline for the whole handshake of one channel (both legs).
    pub handshake_timeout: Duration,
}

/// A channel linked on both legs, ready to splice.
struct Linked {
    upstream: Box<dyn Io>,
    client_early: Vec<u8>,
    upstream_early: Vec<u8>,
    admitted: Admitted,
    mess: LinkMess,
    mini_header: bool,
    upstream_tls: bool,
    _guards: super::SessionGuards,
}

impl SpiceProxy {
    /// Answers a link on the plain listener with NEED_SECURED, so that no
    /// ticket ever travels in clear: clients retry on the TLS port.
    pub async fn need_secured<S: Io>(mut client: S, timeout: Duration) {
        let mut link = ClientLink::new();
        let got = tokio::time::timeout(timeout, read_client_step(&mut client, &mut link)).await;
        // Counted before the client hears of it.
        let (outcome, reply) = match got {
            Ok(Ok(ClientStep::Linked(_))) => ("need_secured", Some(LinkError::NeedSecured)),
            Ok(Ok(ClientStep::Ticket(_))) => ("need_secured", None),
            Ok(Err(r)) => (r.reason, r.code),
            Err(_) => ("handshake_timeout", None),
        };
        crate::metrics::spice_link_refused(outcome, Blame::Client.as_str());
        if let Some(code) = reply {
            let _ = write_within(&mut client, &link.refuse(code)).await;
        }
    }

    /// Runs one channel connection to its end.
    pub async fn serve<S: Io>(&self, mut client: S, peer: IpAddr, leg: ClientLeg) {
        let mut link = ClientLink::new();
        let handshake_started = Instant::now();
        let handshake = tokio::time::timeout(
            self.handshake_timeout,
            self.handshake(&mut client, &mut link, &leg, peer),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ChannelRefusal {
                detail: format!("no complete handshake within {:?}", self.handshake_timeout),
                ..ChannelRefusal::gone("handshake_timeout", Blame::Client)
            })
        });
        let linked = match handshake {
            Ok(l) => l,
            Err(r) => {
                // Counted and logged before the client hears of it.
                crate::metrics::spice_link_refused(r.reason, r.blame.as_str());
                crate::metrics::handshake_failed("spice", r.reason, r.blame.as_str());
                if crate::audit::refusal_log_allowed() {
                    crate::audit::refused("spice_link", r.reason, None, Some(peer));
                    match r.blame {
                        Blame::Client => {
                            tracing::info!(client = %peer, reason = r.reason, "spice link refused: {}", r.detail)
                        }
                        _ => {
                            tracing::warn!(client = %peer, reason = r.reason, blame = r.blame.as_str(), "spice link failed: {}", r.detail)
                        }
                    }
                }
                if let Some(code) = r.code {
                    let _ = write_within(&mut client, &link.refuse(code)).await;
                }
                return;
            }
        };
        let linked_in = handshake_started.elapsed();
        let grant = &linked.admitted.grant;
        let channel_name = channel_name(linked.mess.channel_type);
        let is_main = linked.mess.channel_type == channel::MAIN;
        let console = grant.console;
        crate::metrics::spice_linked(channel_name);
        crate::metrics::handshake_took("spice", linked_in.as_secs_f64());
        if is_main {
            crate::metrics::session_started(console.as_str());
        }
        tracing::info!(
            client = %peer, jti = %grant.jti, instance = %grant.instance, console = %console,
            target = %grant.target, ticket = %linked.admitted.id, channel = channel_name,
            channel_id = linked.mess.channel_id,
            upstream = if linked.upstream_tls { "tls" } else { "plain" }, "spice channel linked"
        );
        let started = Instant::now();
        let ticket_id = linked.admitted.id.clone();
        // The main channel is the session; the others join its registry entry.
        let registered = is_main.then(|| {
            self.sessions.registry.register(
                crate::session::registry::NewSession {
                    console,
                    instance: grant.instance.clone(),
                    jti: grant.jti.clone(),
                    client: peer,
                    target: grant.target.to_string(),
                    key: Some(ticket_id.to_string()),
                },
                &self.sessions.cancel,
            )
        });
        let live = match &registered {
            Some(r) => Some(r.live.clone()),
            None => self.sessions.registry.by_key(&ticket_id.to_string()),
        };
        let stop = self.sessions.stop_for(
            live.as_ref()
                .map_or_else(|| self.sessions.cancel.clone(), |l| l.cancel.clone()),
        );
        let counters = live.as_ref().map(|l| l.bytes.clone()).unwrap_or_default();
        let session = live.as_ref().map_or("-".to_string(), |l| l.id.clone());
        if let Some(r) = &registered {
            crate::audit::session_started(&r.live);
        }
        let tickets = self.tickets.clone();
        let mut watch = is_main.then(|| MainWatch::new(linked.mini_header));
        // On the main channel, INIT's session id binds the ticket before INIT
        // reaches the client; a migration message ends the session.
        let inspect = |chunk: &[u8]| {
            let Some(w) = watch.as_mut() else {
                return Ok(());
            };
            match w.feed(chunk) {
                Ok(events) => {
                    for e in events {
                        match e {
                            MainEvent::Init { session_id } => tickets.bind(&ticket_id, session_id),
                            MainEvent::Migration(kind) => {
                                tracing::warn!(
                                    message = kind,
                                    "hypervisor asked the client to migrate; not through Porthole: session ended"
                                );
                                return Err(CloseReason::ProtocolError);
                            }
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!("malformed main channel data from the hypervisor: {e}");
                    Err(CloseReason::BackendError)
                }
            }
        };
        let (reason, traffic) = super::splice::splice(
            client,
            linked.upstream,
            linked.client_early,
            linked.upstream_early,
            inspect,
            stop,
            &counters,
        )
        .await;
        if let Some(r) = &registered {
            crate::audit::session_ended(&r.live, reason.as_str(), started.elapsed().as_secs_f64());
        }
        drop(registered);
        if is_main {
            // The session is over: its ticket is dead, late channels are refused.
            self.tickets.end(&linked.admitted.id);
            crate::metrics::session_ended(console.as_str(), reason.as_str());
        }
        crate::metrics::bytes_relayed(console.as_str(), traffic.up, traffic.down);
        tracing::info!(
            %session, client = %peer, jti = %linked.admitted.grant.jti, channel = channel_name,
            reason = reason.as_str(), bytes_up = traffic.up, bytes_down = traffic.down,
            secs = started.elapsed().as_secs_f64(), "spice channel ended"
        );
    }

    async fn handshake<S: Io>(
        &self,
        client: &mut S,
        link: &mut ClientLink,
        leg: &ClientLeg,
        peer: IpAddr,
    ) -> Result<Linked, ChannelRefusal> {
        let ClientStep::Linked(mess) = read_client_step(client, link).await? else {
            unreachable!("the first step is the link message")
        };
        let key = self.keys.pick();
        write_client(client, &link.accept(&key.der, &mess)).await?;
        let ClientStep::Ticket(ciphertext) = read_client_step(client, link).await? else {
            unreachable!("the second step is the ticket")
        };
        // ~0.2 ms: cheaper inline than a hop to the blocking pool.
        let password = decrypt_ticket(&key.private, &ciphertext).map_err(|e| {
            ChannelRefusal::client(
                LinkError::PermissionDenied,
                "ticket_undecryptable",
                e.to_string(),
            )
        })?;
        let role = match (mess.channel_type, mess.connection_id) {
            (channel::MAIN, 0) => ChannelRole::Opens,
            (channel::MAIN, _) => {
                return Err(ChannelRefusal::client(
                    LinkError::BadConnectionId,
                    "migration_target_refused",
                    "a main channel naming a session (a migration target)",
                ));
            }
            (_, session_id) => ChannelRole::Joins { session_id },
        };
        let admitted = self
            .tickets
            .admit(&password, role, unix_now())
            .map_err(|r| ChannelRefusal::client(ticket_code(r), r.as_str(), r.to_string()))?;
        let opens = role == ChannelRole::Opens;
        let result = self
            .link_upstream(client, link, &mess, &admitted, leg, peer)
            .await;
        if result.is_err() && opens {
            // The session never started: nothing may join it.
            self.tickets.end(&admitted.id);
        }
        result
    }

    async fn link_upstream<S: Io>(
        &self,
        client: &mut S,
        link: &mut ClientLink,
        mess: &LinkMess,
        admitted: &Admitted,
        leg: &ClientLeg,
        peer: IpAddr,
    ) -> Result<Linked, ChannelRefusal> {
        let grant = &admitted.grant;
        let type_ok = match leg {
            ClientLeg::Native => grant.console == ConsoleType::SpiceDirect,
            ClientLeg::Browser { jti } => {
                grant.console == ConsoleType::SpiceHtml5 && &grant.jti == jti
            }
        };
        if !type_ok {
            return Err(ChannelRefusal::client(
                LinkError::PermissionDenied,
                "wrong_console_type",
                format!("a {} ticket on the {leg:?} SPICE leg", grant.console),
            ));
        }
        let upstream = self.upstreams.load().get(&grant.backend);
        let tls_port = grant.target.tls_port.filter(|_| upstream.tls.is_some());
        let mut use_tls = tls_port.is_some() && !upstream.prefer_plain;
        loop {
            let port = if use_tls {
                tls_port.unwrap_or(grant.target.port)
            } else {
                grant.target.port
            };
            let opened = self
                .sessions
                .open_to(grant, Admission::Ticket, port, peer)
                .await
                .map_err(open_refusal)?;
            let mut stream: Box<dyn Io> = if use_tls {
                let (Some(config), Some(name)) = (
                    upstream.tls.clone(),
                    upstream.server_name(&grant.target.host),
                ) else {
                    return Err(ChannelRefusal::backend(
                        LinkError::Error,
                        "hypervisor_tls",
                        "no usable TLS name",
                    ));
                };
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, opened.backend)
                    .await
                    .map_err(|e| {
                        ChannelRefusal::backend(LinkError::Error, "hypervisor_tls", e.to_string())
                    })?;
                Box::new(tls)
            } else {
                Box::new(opened.backend)
            };
            let up = LinkMess {
                caps: upstream_caps(mess),
                ..mess.clone()
            };
            let (mut server, hello) = ServerLink::start(up);
            write_upstream(&mut stream, &hello).await?;
            let reply = match read_server_step(&mut stream, &mut server).await? {
                ServerStep::Refused(code)
                    if code == LinkError::NeedSecured as u32 && !use_tls && tls_port.is_some() =>
                {
                    use_tls = true;
                    continue;
                }
                ServerStep::Refused(code) => {
                    return Err(ChannelRefusal::backend(
                        link_error(code),
                        "hypervisor_refused_link",
                        format!("link error {code}"),
                    ));
                }
                ServerStep::Replied(reply) => reply,
                ServerStep::Result(_) => unreachable!("a result comes after the ticket"),
            };
            if !framing_agrees(mess, server.sent(), &reply) {
                return Err(ChannelRefusal::backend(
                    LinkError::Error,
                    "framing_mismatch",
                    "the hypervisor does not use mini headers",
                ));
            }
            let ciphertext = encrypt_ticket(
                &mut rand::rngs::OsRng,
                &reply.public_key,
                upstream.password.expose(),
            )
            .map_err(|e| {
                ChannelRefusal::backend(LinkError::Error, "hypervisor_key", e.to_string())
            })?;
            write_upstream(&mut stream, &server.ticket(&ciphertext)).await?;
            match read_server_step(&mut stream, &mut server).await? {
                ServerStep::Result(0) => {}
                ServerStep::Result(code) => {
                    return Err(ChannelRefusal::backend(
                        link_error(code),
                        "hypervisor_refused_ticket",
                        format!("link result {code}: check the backend's spice password"),
                    ));
                }
                other => {
                    return Err(ChannelRefusal::backend(
                        LinkError::Error,
                        "malformed_link_result",
                        format!("{other:?}"),
                    ));
                }
            }
            write_client(client, &link.result(LinkError::Ok)).await?;
            let mini_header = mess.caps.has_common(common_cap::MINI_HEADER);
            let client_early = std::mem::take(link).into_leftover();
            return Ok(Linked {
                upstream: stream,
                client_early,
                upstream_early: server.into_leftover(),
                admitted: admitted.clone(),
                mess: mess.clone(),
                mini_header,
                upstream_tls: use_tls,
                _guards: opened.guards,
            });
        }
    }
}

async fn read_client_step<S: Io>(
    client: &mut S,
    link: &mut ClientLink,
) -> Result<ClientStep, ChannelRefusal> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(step) = link
            .poll()
            .map_err(|f| ChannelRefusal::wire(f, Blame::Client))?
        {
            return Ok(step);
        }
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return Err(ChannelRefusal::gone("client_left", Blame::Client)),
            Ok(n) => link.feed(&buf[..n]),
        }
    }
}

async fn read_server_step(
    upstream: &mut Box<dyn Io>,
    link: &mut ServerLink,
) -> Result<ServerStep, ChannelRefusal> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(step) = link
            .poll()
            .map_err(|f| ChannelRefusal::wire(f, Blame::Backend))?
        {
            return Ok(step);
        }
        match upstream.read(&mut buf).await {
            Ok(0) => {
                return Err(ChannelRefusal::backend(
                    LinkError::Error,
                    "hypervisor_closed",
                    "closed during the link",
                ));
            }
            Err(e) => {
                return Err(ChannelRefusal::backend(
                    LinkError::Error,
                    "hypervisor_io",
                    e.to_string(),
                ));
            }
            Ok(n) => link.feed(&buf[..n]),
        }
    }
}

async fn write_client<S: Io>(client: &mut S, bytes: &[u8]) -> Result<(), ChannelRefusal> {
    client
        .write_all(bytes)
        .await
        .map_err(|_| ChannelRefusal::gone("client_left", Blame::Client))?;
    client
        .flush()
        .await
        .map_err(|_| ChannelRefusal::gone("client_left", Blame::Client))
}

async fn write_upstream(upstream: &mut Box<dyn Io>, bytes: &[u8]) -> Result<(), ChannelRefusal> {
    let io = |e: std::io::Error| {
        ChannelRefusal::backend(LinkError::Error, "hypervisor_io", e.to_string())
    };
    upstream.write_all(bytes).await.map_err(io)?;
    upstream.flush().await.map_err(io)
}

async fn write_within<S: Io>(client: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(REFUSAL_DEADLINE, async {
        client.write_all(bytes).await?;
        client.flush().await?;
        client.shutdown().await
    })
    .await
    .unwrap_or(Ok(()))
}

fn open_refusal(e: OpenError) -> ChannelRefusal {
    let blame = e.blame();
    let code = match &e {
        OpenError::Refused(_) => LinkError::PermissionDenied,
        _ => LinkError::Error,
    };
    ChannelRefusal {
        code: Some(code),
        reason: e.as_str(),
        blame,
        detail: e.to_string(),
    }
}

fn ticket_code(r: TicketRefusal) -> LinkError {
    match r {
        TicketRefusal::Unknown | TicketRefusal::Expired | TicketRefusal::Used => {
            LinkError::PermissionDenied
        }
        TicketRefusal::ForeignSession | TicketRefusal::NoSession => LinkError::BadConnectionId,
        TicketRefusal::Full => LinkError::Error,
    }
}

/// A hypervisor's link error code as Porthole relays it.
fn link_error(code: u32) -> LinkError {
    match code {
        2 => LinkError::InvalidMagic,
        3 => LinkError::InvalidData,
        4 => LinkError::VersionMismatch,
        5 => LinkError::NeedSecured,
        6 => LinkError::NeedUnsecured,
        7 => LinkError::PermissionDenied,
        8 => LinkError::BadConnectionId,
        9 => LinkError::ChannelNotAvailable,
        _ => LinkError::Error,
    }
}

/// A bounded label for a channel type.
pub fn channel_name(kind: u8) -> &'static str {
    match kind {
        channel::MAIN => "main",
        channel::DISPLAY => "display",
        channel::INPUTS => "inputs",
        channel::CURSOR => "cursor",
        channel::PLAYBACK => "playback",
        channel::RECORD => "record",
        channel::SMARTCARD => "smartcard",
        channel::USBREDIR => "usbredir",
        channel::PORT => "port",
        channel::WEBDAV => "webdav",
        _ => "other",
    }
}
