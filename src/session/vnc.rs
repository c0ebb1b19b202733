//! VNC sessions through Porthole's security proxy.
//!
//! Every VNC session, browser or native, goes through the RFB machines in
//! [`crate::protocol::rfb`]: Porthole authenticates to the hypervisor itself
//! (VeNCrypt x509 with the backend's CA and optional client certificate, VNC
//! password, or None, in the backend's preference order), relays the
//! hypervisor's SecurityResult to the client, sends ClientInit upstream with
//! the shared flag set (so a gtk-vnc client asking for exclusive access does
//! not disconnect the other viewers), then relays. Clients never see a
//! hypervisor credential and never learn why the hypervisor refused (the log
//! and a counter do).
//!
//! A native connection (vnc-direct) has one deadline for everything before
//! its relay (TLS, both legs). It is a session, in the registry, from the
//! moment its ticket admits it: a terminate or a shutdown reaches it while
//! Porthole still waits for the hypervisor.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::driver::{DriveError, drive, send};
use super::lifecycle::{Handshake, Lifecycle};
use super::oversight::{ClientInput, FanOut};
use super::splice::{REFUSAL_DEADLINE, splice};
use super::{Admission, Early, Sessions, Traffic};
use crate::console::ConsoleType;
use crate::error::Blame;
use crate::hypervisor::VncUpstream;
use crate::protocol::rfb::RfbFailure;
use crate::protocol::rfb::client::{ClientLeg, ClientOffer, ClientStep};
use crate::protocol::rfb::upstream::{Upstream, UpstreamAuth, UpstreamStep};
use crate::token::ticket::ChannelRole;
use crate::transport::conn::{Conn, Io};

/// A VNC handshake, as its refusals are counted and recorded.
const VNC_HANDSHAKE: Handshake = Handshake {
    protocol: "rfb",
    what: "vnc_handshake",
    label: "vnc handshake",
};

/// Why a VNC handshake failed.
#[derive(Debug, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct VncRefusal {
    /// A stable label for logs and metrics.
    pub reason: &'static str,
    /// Who is at fault.
    pub blame: Blame,
    /// Detail for the log (never a password or ticket).
    pub detail: String,
}

impl VncRefusal {
    fn new(reason: &'static str, blame: Blame, detail: impl Into<String>) -> Self {
        Self {
            reason,
            blame,
            detail: detail.into(),
        }
    }

    fn rfb(f: RfbFailure, blame: Blame) -> Self {
        Self::new(f.reason, blame, f.detail)
    }

    /// A failure of the hypervisor leg.
    fn upstream(e: DriveError<RfbFailure>) -> Self {
        match e {
            DriveError::Refused(f) => Self::rfb(f, Blame::Backend),
            DriveError::Closed => Self::new(
                "hypervisor_closed",
                Blame::Backend,
                "closed during the handshake",
            ),
            DriveError::Read(e) | DriveError::Write(e) => {
                Self::new("hypervisor_io", Blame::Backend, e.to_string())
            }
            DriveError::TimedOut => Self::new(
                "hypervisor_timeout",
                Blame::Backend,
                "the hypervisor did not finish its handshake in time",
            ),
        }
    }

    /// A failure of the client leg.
    fn client(e: DriveError<RfbFailure>) -> Self {
        match e {
            DriveError::Refused(f) => Self::rfb(f, Blame::Client),
            DriveError::Read(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Self::new("protocol_error", Blame::Client, e.to_string())
            }
            DriveError::Closed | DriveError::Read(_) | DriveError::Write(_) => {
                Self::new("client_left", Blame::Client, "during the handshake")
            }
            DriveError::TimedOut => Self::new(
                "handshake_timeout",
                Blame::Client,
                "no complete handshake in time",
            ),
        }
    }

    /// Logs and counts the refusal.
    pub fn record(&self, client: IpAddr, console: ConsoleType, jti: Option<&str>) {
        VNC_HANDSHAKE.refused(
            self.reason,
            self.blame,
            &self.detail,
            client,
            Some(console),
            jti,
        );
    }
}

/// A hypervisor that accepted Porthole.
#[derive(Debug)]
pub struct Authenticated {
    /// The stream to relay (TLS-unwrapped by its reader).
    pub backend: Conn,
    /// What the hypervisor sent past its SecurityResult.
    pub early: Vec<u8>,
    /// The scheme used.
    pub auth: UpstreamAuth,
}

/// Runs the hypervisor leg on `tcp` up to an OK SecurityResult, before `deadline`.
pub async fn authenticate_upstream(
    tcp: TcpStream,
    up: &VncUpstream,
    host: &str,
    deadline: Instant,
) -> Result<Authenticated, VncRefusal> {
    let mut machine = Upstream::new(up.auth.clone(), up.password.expose());
    let mut conn = Conn::Tcp(tcp);
    loop {
        match drive(&mut machine, &mut conn, deadline)
            .await
            .map_err(VncRefusal::upstream)?
        {
            UpstreamStep::StartTls => {
                let Conn::Tcp(tcp) = conn else {
                    return Err(VncRefusal::new(
                        "malformed_handshake",
                        Blame::Backend,
                        "TLS twice",
                    ));
                };
                let (Some(config), Some(name)) = (up.tls.clone(), up.server_name(host)) else {
                    return Err(VncRefusal::new(
                        "hypervisor_tls",
                        Blame::Internal,
                        "no TLS configuration or name",
                    ));
                };
                let connecting = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
                let tls = match tokio::time::timeout_at(deadline, connecting).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        return Err(VncRefusal::new(
                            "hypervisor_tls",
                            Blame::Backend,
                            e.to_string(),
                        ));
                    }
                    Err(_) => return Err(VncRefusal::upstream(DriveError::TimedOut)),
                };
                conn = Conn::boxed(tls);
                machine.tls_started();
            }
            UpstreamStep::Authenticated(auth) => {
                return Ok(Authenticated {
                    backend: conn,
                    early: machine.into_leftover(),
                    auth,
                });
            }
        }
    }
}

/// The ClientInit Porthole sends upstream.
fn client_init(up: &VncUpstream, client_shared: bool) -> [u8; 1] {
    [u8::from(up.force_shared || client_shared)]
}

/// Sends ClientInit (and the client's early bytes) upstream.
async fn send_client_init(
    backend: &mut Conn,
    up: &VncUpstream,
    shared: bool,
    deadline: Instant,
) -> Result<(), VncRefusal> {
    send(backend, &client_init(up, shared), deadline)
        .await
        .map_err(|e| VncRefusal::new("hypervisor_io", Blame::Backend, e.to_string()))
}

/// Tells a refused client "console unavailable" and nothing more.
async fn refuse_client<S: Io + ?Sized>(client: &mut S, leg: &mut ClientLeg) {
    leg.fail();
    let out = leg.take_output();
    if !out.is_empty() {
        let _ = tokio::time::timeout(REFUSAL_DEADLINE, async {
            client.write_all(&out).await?;
            client.flush().await
        })
        .await;
    }
}

/// A browser (noVNC) session's handshake over its WebSocket, seen as bytes:
/// the hypervisor leg on `tcp`, then the client leg offering only None, all
/// before `deadline`. Returns the hypervisor stream and the early bytes.
/// A `view_only` client shares the display whatever it asks: it must not
/// disconnect the viewers it watches.
pub async fn browser_handshake<S: Io + ?Sized>(
    client: &mut S,
    tcp: TcpStream,
    up: &VncUpstream,
    host: &str,
    view_only: bool,
    deadline: Instant,
) -> Result<(Conn, Early), VncRefusal> {
    let mut leg = ClientLeg::new(ClientOffer::None);
    let result = async {
        let mut authed = authenticate_upstream(tcp, up, host, deadline).await?;
        loop {
            match drive(&mut leg, client, deadline)
                .await
                .map_err(VncRefusal::client)?
            {
                // The hypervisor's OK, relayed.
                ClientStep::SecurityChosen => leg.security_result(true),
                ClientStep::ClientInit { shared } => {
                    send_client_init(&mut authed.backend, up, shared || view_only, deadline)
                        .await?;
                    let up_early = std::mem::replace(&mut leg, ClientLeg::new(ClientOffer::None))
                        .into_leftover();
                    return Ok((
                        authed.backend,
                        Early {
                            up: up_early,
                            down: authed.early,
                        },
                    ));
                }
                other => {
                    return Err(VncRefusal::new(
                        "malformed_handshake",
                        Blame::Internal,
                        format!("{other:?} on a None offer"),
                    ));
                }
            }
        }
    }
    .await;
    if result.is_err() {
        refuse_client(client, &mut leg).await;
    }
    result
}

/// Runs one native VNC client connection (vnc-direct) from `peer` to its
/// end; `deadline` (from accept) covers every handshake.
pub async fn serve_native(
    sessions: Arc<Sessions>,
    tcp: TcpStream,
    peer: IpAddr,
    deadline: Instant,
) {
    let Some(tls) = sessions.vnc_tls.as_ref().map(|slot| slot.load_full()) else {
        return;
    };
    let started = StdInstant::now();
    let mut leg = ClientLeg::new(ClientOffer::X509Plain);
    // Until a ticket admits it, the connection is no session: only a
    // shutdown stops it.
    let admitted = tokio::select! {
        r = Box::pin(admit_native(&sessions, Conn::Tcp(tcp), peer, &mut leg, tls, deadline)) => r,
        _ = sessions.cancel.cancelled() => {
            Err((None, VncRefusal::new("shutting_down", Blame::Internal, "shutting down")))
        }
    };
    let (mut client, admitted) = match admitted {
        Ok(a) => a,
        Err((client, refusal)) => {
            refusal.record(peer, ConsoleType::VncDirect, None);
            if let Some(mut client) = client {
                refuse_client(&mut client, &mut leg).await;
            }
            return;
        }
    };
    let grant = admitted.grant.clone();
    let guards = match sessions.admit(&grant, Admission::Opens, peer).await {
        Ok(g) => g,
        Err(e) => {
            let refusal = VncRefusal::new(e.as_str(), e.blame(), e.to_string());
            refusal.record(peer, ConsoleType::VncDirect, Some(&grant.jti));
            refuse_client(&mut client, &mut leg).await;
            sessions.tickets.end(&admitted.id).await;
            return;
        }
    };
    // A session from here on: in the registry, ended by a terminate or a
    // shutdown even while Porthole still waits for the hypervisor.
    let mut life = Lifecycle::begin(&sessions, &grant, ConsoleType::VncDirect, peer, None).await;
    life.hold(guards);
    let stop = life.stop();
    let linked = stop
        .unless_stopped(Box::pin(async {
            let tcp = sessions
                .connect(&grant.target.host, grant.target.port, Some(deadline))
                .await
                .map_err(|e| VncRefusal::new(e.as_str(), e.blame(), e.to_string()))?;
            let up = sessions.vnc_upstreams.load().get(&grant.backend);
            let mut authed = authenticate_upstream(tcp, &up, &grant.target.host, deadline).await?;
            leg.security_result(true);
            match drive(&mut leg, &mut client, deadline)
                .await
                .map_err(VncRefusal::client)?
            {
                ClientStep::ClientInit { shared } => {
                    let shared = shared || grant.view_only();
                    send_client_init(&mut authed.backend, &up, shared, deadline).await?;
                    Ok(authed)
                }
                other => Err(VncRefusal::new(
                    "malformed_handshake",
                    Blame::Internal,
                    format!("{other:?} after authentication"),
                )),
            }
        }))
        .await;
    let authed = match linked {
        Ok(Ok(a)) => a,
        Ok(Err(refusal)) => {
            refusal.record(peer, ConsoleType::VncDirect, Some(&grant.jti));
            refuse_client(&mut client, &mut leg).await;
            sessions.tickets.end(&admitted.id).await;
            life.finish("handshake_failed", Traffic::default()).await;
            return;
        }
        Err(reason) => {
            let _ = tokio::time::timeout(REFUSAL_DEADLINE, client.shutdown()).await;
            sessions.tickets.end(&admitted.id).await;
            life.finish(reason.as_str(), Traffic::default()).await;
            return;
        }
    };
    crate::metrics::handshake_took("rfb", started.elapsed().as_secs_f64());
    life.span().in_scope(|| {
        tracing::info!(client = %peer, jti = %grant.jti, auth = ?authed.auth, "vnc-direct linked")
    });
    let early = Early {
        up: leg.into_leftover(),
        down: authed.early,
    };
    let recorder = match sessions.recorder_for(&grant, life.live()) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!("session refused: its recording is required and {why}");
            sessions.tickets.end(&admitted.id).await;
            life.finish("recording_unavailable", Traffic::default())
                .await;
            return;
        }
    };
    let (reason, traffic, _) = splice(
        client,
        authed.backend,
        early,
        FanOut {
            input: ClientInput::of(&grant),
            shadows: None,
            recorder,
        },
        life.stop(),
        life.counters(),
    )
    .await;
    sessions.tickets.end(&admitted.id).await;
    life.finish(reason.as_str(), traffic).await;
}

/// The client leg up to its credentials, with TLS in between; the ticket
/// they carry must admit a vnc-direct session. A refusal comes with the
/// client stream, while it can still be told.
async fn admit_native(
    sessions: &Sessions,
    mut client: Conn,
    peer: IpAddr,
    leg: &mut ClientLeg,
    tls: Arc<rustls::ServerConfig>,
    deadline: Instant,
) -> Result<(Conn, crate::token::ticket::Admitted), (Option<Conn>, VncRefusal)> {
    loop {
        let step = match drive(leg, &mut client, deadline).await {
            Ok(step) => step,
            // Out of time: a bare close, no last word for a client that
            // took too long.
            Err(DriveError::TimedOut) => {
                return Err((None, VncRefusal::client(DriveError::TimedOut)));
            }
            Err(e) => return Err((Some(client), VncRefusal::client(e))),
        };
        match step {
            ClientStep::StartTls => {
                let Conn::Tcp(tcp) = client else {
                    let refusal =
                        VncRefusal::new("malformed_handshake", Blame::Client, "TLS twice");
                    return Err((Some(client), refusal));
                };
                let accepting = tokio_rustls::TlsAcceptor::from(tls.clone()).accept(tcp);
                client = match tokio::time::timeout_at(deadline, accepting).await {
                    Ok(Ok(s)) => Conn::boxed(s),
                    Ok(Err(e)) => {
                        let refusal =
                            VncRefusal::new("tls_handshake", Blame::Client, e.to_string());
                        return Err((None, refusal));
                    }
                    Err(_) => return Err((None, VncRefusal::client(DriveError::TimedOut))),
                };
                leg.tls_started();
            }
            ClientStep::Credentials { password, .. } => {
                let a = match sessions
                    .admit_ticket(
                        password.expose(),
                        ConsoleType::VncDirect,
                        ChannelRole::Opens,
                        peer,
                    )
                    .await
                {
                    Ok(a) => a,
                    Err(r) => {
                        let refusal = VncRefusal::new(r.as_str(), Blame::Client, r.to_string());
                        return Err((Some(client), refusal));
                    }
                };
                if a.grant.console != ConsoleType::VncDirect {
                    sessions.tickets.end(&a.id).await;
                    let refusal = VncRefusal::new(
                        "wrong_console_type",
                        Blame::Client,
                        format!("a {} ticket on the native VNC listener", a.grant.console),
                    );
                    return Err((Some(client), refusal));
                }
                return Ok((client, a));
            }
            other => {
                let refusal = VncRefusal::new(
                    "malformed_handshake",
                    Blame::Internal,
                    format!("{other:?} before credentials"),
                );
                return Err((Some(client), refusal));
            }
        }
    }
}
