//! VNC sessions through Porthole's security proxy.
//!
//! Every VNC session, browser or native, goes through the RFB machines in
//! [`crate::protocol::rfb`]: Porthole authenticates to the hypervisor itself
//! (VeNCrypt x509 with the backend's CA and optional client certificate, VNC
//! password, or None, in the backend's preference order), relays the
//! hypervisor's SecurityResult to the client, sends ClientInit upstream with
//! the shared flag set (so a gtk-vnc client asking for exclusive access does
//! not disconnect the other viewers), then splices. Clients never see a
//! hypervisor credential and never learn why the hypervisor refused (the log
//! and a counter do).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::splice::{Io, REFUSAL_DEADLINE};
use super::{Admission, Sessions};
use crate::error::Blame;
use crate::hypervisor::{VncUpstream, VncUpstreams};
use crate::protocol::rfb::RfbFailure;
use crate::protocol::rfb::client::{ClientLeg, ClientOffer, ClientStep};
use crate::protocol::rfb::upstream::{Upstream, UpstreamAuth, UpstreamStep};
use crate::token::ticket::{ChannelRole, TicketStore};
use crate::token::{ConsoleType, unix_now};
use crate::transport::ws_bridge::Backend;

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

    /// Logs and counts the refusal.
    pub fn record(&self, client: IpAddr, console: ConsoleType) {
        crate::metrics::handshake_failed("rfb", self.reason, self.blame.as_str());
        if !crate::audit::refusal_log_allowed() {
            return;
        }
        crate::audit::refused("vnc_handshake", self.reason, None, Some(client));
        match self.blame {
            Blame::Client => {
                tracing::info!(%client, console = %console, reason = self.reason, "vnc handshake refused: {}", self.detail)
            }
            _ => {
                tracing::warn!(%client, console = %console, reason = self.reason, blame = self.blame.as_str(), "vnc handshake failed: {}", self.detail)
            }
        }
    }
}

/// The hypervisor stream while its handshake runs: TCP, then maybe TLS.
enum Link {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Link {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf).await,
            Link::Tls(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.write_all(data).await,
            Link::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    fn into_backend(self) -> Backend {
        match self {
            Link::Tcp(s) => Backend::Tcp(s),
            Link::Tls(s) => Backend::Stream(s),
        }
    }
}

/// A hypervisor that accepted Porthole.
pub struct Authenticated {
    /// The stream to relay (TLS-unwrapped by its reader).
    pub backend: Backend,
    /// What the hypervisor sent past its SecurityResult.
    pub early: Vec<u8>,
    /// The scheme used.
    pub auth: UpstreamAuth,
}

/// Runs the hypervisor leg on `tcp` up to an OK SecurityResult.
pub async fn authenticate_upstream(
    tcp: TcpStream,
    up: &VncUpstream,
    host: &str,
) -> Result<Authenticated, VncRefusal> {
    let backend_err =
        |reason, e: std::io::Error| VncRefusal::new(reason, Blame::Backend, e.to_string());
    let mut machine = Upstream::new(up.auth.clone(), up.password.expose());
    let mut link = Link::Tcp(tcp);
    let mut buf = [0u8; 4096];
    loop {
        let step = machine
            .poll()
            .map_err(|f| VncRefusal::rfb(f, Blame::Backend))?;
        let out = machine.take_output();
        if !out.is_empty() {
            link.write_all(&out)
                .await
                .map_err(|e| backend_err("hypervisor_io", e))?;
        }
        match step {
            Some(UpstreamStep::StartTls) => {
                let Link::Tcp(tcp) = link else {
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
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| backend_err("hypervisor_tls", e))?;
                link = Link::Tls(Box::new(tls));
                machine.tls_started();
                continue;
            }
            Some(UpstreamStep::Authenticated(auth)) => {
                return Ok(Authenticated {
                    backend: link.into_backend(),
                    early: machine.into_leftover(),
                    auth,
                });
            }
            None => {}
        }
        let n = link
            .read(&mut buf)
            .await
            .map_err(|e| backend_err("hypervisor_io", e))?;
        if n == 0 {
            return Err(VncRefusal::new(
                "hypervisor_closed",
                Blame::Backend,
                "closed during the handshake",
            ));
        }
        machine.feed(&buf[..n]);
    }
}

/// The ClientInit Porthole sends upstream.
fn client_init(up: &VncUpstream, client_shared: bool) -> [u8; 1] {
    [u8::from(up.force_shared || client_shared)]
}

/// A browser (noVNC) session's handshake over its WebSocket: the hypervisor
/// leg on `tcp`, then the client leg offering only None. Returns the
/// hypervisor stream and the hypervisor's early bytes (to send to the client
/// first); the client's early bytes have gone upstream already.
pub async fn browser_handshake<S>(
    socket: &mut WebSocketStream<S>,
    tcp: TcpStream,
    up: &VncUpstream,
    host: &str,
    timeout: Duration,
) -> Result<(Backend, Vec<u8>), VncRefusal>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut leg = ClientLeg::new(ClientOffer::None);
    // Who ran out the clock: the hypervisor (still authenticating) or the client.
    let upstream_done = std::sync::atomic::AtomicBool::new(false);
    let result = tokio::time::timeout(timeout, async {
        let mut authed = authenticate_upstream(tcp, up, host).await?;
        upstream_done.store(true, std::sync::atomic::Ordering::Relaxed);
        loop {
            let step = leg.poll().map_err(|f| VncRefusal::rfb(f, Blame::Client))?;
            if step == Some(ClientStep::SecurityChosen) {
                // The hypervisor's OK, relayed.
                leg.security_result(true);
            }
            let send = leg.take_output();
            if !send.is_empty() {
                socket
                    .send(Message::Binary(send.into()))
                    .await
                    .map_err(|e| VncRefusal::new("client_left", Blame::Client, e.to_string()))?;
            }
            match step {
                Some(ClientStep::SecurityChosen) => continue,
                Some(ClientStep::ClientInit { shared }) => {
                    let mut upstream_bytes = client_init(up, shared).to_vec();
                    upstream_bytes.extend(
                        std::mem::replace(&mut leg, ClientLeg::new(ClientOffer::None))
                            .into_leftover(),
                    );
                    write_backend(&mut authed.backend, &upstream_bytes).await?;
                    return Ok((authed.backend, authed.early));
                }
                Some(_) => unreachable!("None offer: no TLS, no credentials"),
                None => {}
            }
            match socket.next().await {
                Some(Ok(Message::Binary(data))) => leg.feed(&data),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Err(VncRefusal::new(
                        "protocol_error",
                        Blame::Client,
                        "text message",
                    ));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    return Err(VncRefusal::new(
                        "client_left",
                        Blame::Client,
                        "during the handshake",
                    ));
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(
            if upstream_done.load(std::sync::atomic::Ordering::Relaxed) {
                VncRefusal::new(
                    "handshake_timeout",
                    Blame::Client,
                    format!("no handshake within {timeout:?}"),
                )
            } else {
                VncRefusal::new(
                    "hypervisor_timeout",
                    Blame::Backend,
                    format!("the hypervisor did not finish its handshake within {timeout:?}"),
                )
            },
        )
    });
    if result.is_err() {
        // The client learns nothing but "console unavailable".
        leg.fail();
        let out = leg.take_output();
        if !out.is_empty() {
            let _ =
                tokio::time::timeout(REFUSAL_DEADLINE, socket.send(Message::Binary(out.into())))
                    .await;
        }
    }
    result
}

async fn write_backend(backend: &mut Backend, data: &[u8]) -> Result<(), VncRefusal> {
    let r = match backend {
        Backend::Tcp(t) => t.write_all(data).await,
        Backend::Stream(s) => match s.write_all(data).await {
            Ok(()) => s.flush().await,
            Err(e) => Err(e),
        },
    };
    r.map_err(|e| VncRefusal::new("hypervisor_io", Blame::Backend, e.to_string()))
}

/// A native connection linked on both legs; the guards (slot, claims) live
/// as long as it does.
struct Linked {
    client: Box<dyn Io>,
    authed: Authenticated,
    grant: crate::token::Grant,
    ticket: crate::token::ticket::TicketId,
    _guards: super::SessionGuards,
}

/// The native VNC listener's sessions (vnc-direct).
#[derive(Debug)]
pub struct VncProxy {
    /// Slots, revocation, connecting, shutdown.
    pub sessions: Arc<Sessions>,
    /// Tickets (shared with SPICE's exchange).
    pub tickets: Arc<dyn TicketStore>,
    /// Hypervisor credentials by backend network.
    pub upstreams: Arc<arc_swap::ArcSwap<VncUpstreams>>,
    /// TLS for native clients.
    pub tls: Option<crate::transport::listener::TlsSlot>,
    /// Deadline for one connection's handshakes.
    pub handshake_timeout: Duration,
}

impl VncProxy {
    /// Runs one native client connection to its end.
    pub async fn serve(&self, tcp: TcpStream, peer: IpAddr) {
        let Some(tls) = self.tls.as_ref().map(|slot| slot.load_full()) else {
            return;
        };
        let mut leg = ClientLeg::new(ClientOffer::X509Plain);
        let started = Instant::now();
        let linked = tokio::time::timeout(
            self.handshake_timeout,
            self.handshake(tcp, &mut leg, tls, peer),
        )
        .await
        .unwrap_or_else(|_| {
            Err((
                None,
                VncRefusal::new(
                    "handshake_timeout",
                    Blame::Client,
                    format!("no handshake within {:?}", self.handshake_timeout),
                ),
            ))
        });
        let Linked {
            client,
            authed,
            grant,
            ticket: ticket_id,
            _guards,
        } = match linked {
            Ok(l) => l,
            Err((stream, refusal)) => {
                refusal.record(peer, ConsoleType::VncDirect);
                leg.fail();
                let out = leg.take_output();
                if let Some(mut s) = stream {
                    let _ = tokio::time::timeout(REFUSAL_DEADLINE, async {
                        s.write_all(&out).await?;
                        s.shutdown().await
                    })
                    .await;
                }
                return;
            }
        };
        let registered = self.sessions.registry.register(
            crate::session::registry::NewSession {
                console: ConsoleType::VncDirect,
                instance: grant.instance.clone(),
                jti: grant.jti.clone(),
                client: peer,
                target: grant.target.to_string(),
                key: None,
            },
            &self.sessions.cancel,
        );
        let session = registered.live.id.clone();
        let stop = self.sessions.stop_for(registered.live.cancel.clone());
        crate::metrics::session_started(ConsoleType::VncDirect.as_str());
        crate::metrics::handshake_took("rfb", started.elapsed().as_secs_f64());
        crate::audit::session_started(&registered.live);
        tracing::info!(
            %session, client = %peer, jti = %grant.jti, instance = %grant.instance, console = "vnc-direct",
            target = %grant.target, auth = ?authed.auth, "session started"
        );
        let upstream: Box<dyn Io> = match authed.backend {
            Backend::Tcp(t) => Box::new(t),
            Backend::Stream(s) => Box::new(s),
        };
        let (reason, traffic) = super::splice::splice(
            client,
            upstream,
            leg.into_leftover(),
            authed.early,
            |_| Ok(()),
            stop,
            &registered.live.bytes,
        )
        .await;
        crate::audit::session_ended(
            &registered.live,
            reason.as_str(),
            started.elapsed().as_secs_f64(),
        );
        crate::metrics::bytes_relayed(ConsoleType::VncDirect.as_str(), traffic.up, traffic.down);
        drop(registered);
        self.tickets.end(&ticket_id);
        crate::metrics::session_ended(ConsoleType::VncDirect.as_str(), reason.as_str());
        tracing::info!(
            %session, client = %peer, jti = %grant.jti, console = "vnc-direct", reason = reason.as_str(),
            bytes_up = traffic.up, bytes_down = traffic.down,
            secs = started.elapsed().as_secs_f64(), "session ended"
        );
    }

    /// The client leg up to ClientInit, with the hypervisor authenticated
    /// in between; on failure, the client stream (if still usable) to tell.
    async fn handshake(
        &self,
        tcp: TcpStream,
        leg: &mut ClientLeg,
        tls: Arc<rustls::ServerConfig>,
        peer: IpAddr,
    ) -> Result<Linked, (Option<Box<dyn Io>>, VncRefusal)> {
        let mut stream: Box<dyn Io> = Box::new(tcp);
        let mut tls_acceptor = Some(tokio_rustls::TlsAcceptor::from(tls));
        let mut buf = [0u8; 4096];
        let mut admitted = None;
        let mut authed = None;
        macro_rules! bail {
            ($e:expr) => {
                return Err((Some(stream), $e))
            };
        }
        loop {
            let step = match leg.poll() {
                Ok(s) => s,
                Err(f) => bail!(VncRefusal::rfb(f, Blame::Client)),
            };
            let out = leg.take_output();
            if !out.is_empty()
                && (stream.write_all(&out).await.is_err() || stream.flush().await.is_err())
            {
                bail!(VncRefusal::new(
                    "client_left",
                    Blame::Client,
                    "during the handshake"
                ));
            }
            match step {
                Some(ClientStep::StartTls) => {
                    let Some(acceptor) = tls_acceptor.take() else {
                        bail!(VncRefusal::new(
                            "malformed_handshake",
                            Blame::Client,
                            "TLS twice"
                        ));
                    };
                    // Only a TcpStream is boxed before TLS starts.
                    let accepted = acceptor.accept(stream).await;
                    match accepted {
                        Ok(s) => stream = Box::new(s),
                        Err(e) => {
                            return Err((
                                None,
                                VncRefusal::new("tls_handshake", Blame::Client, e.to_string()),
                            ));
                        }
                    }
                    leg.tls_started();
                    continue;
                }
                Some(ClientStep::Credentials { password, .. }) => {
                    let a =
                        match self
                            .tickets
                            .admit(password.expose(), ChannelRole::Opens, unix_now())
                        {
                            Ok(a) => a,
                            Err(r) => {
                                bail!(VncRefusal::new(r.as_str(), Blame::Client, r.to_string()))
                            }
                        };
                    if a.grant.console != ConsoleType::VncDirect {
                        self.tickets.end(&a.id);
                        bail!(VncRefusal::new(
                            "wrong_console_type",
                            Blame::Client,
                            format!("a {} ticket on the native VNC listener", a.grant.console)
                        ));
                    }
                    let opened = match self
                        .sessions
                        .open_to(&a.grant, Admission::Ticket, a.grant.target.port, peer)
                        .await
                    {
                        Ok(o) => o,
                        Err(e) => {
                            self.tickets.end(&a.id);
                            bail!(VncRefusal::new(e.as_str(), e.blame(), e.to_string()));
                        }
                    };
                    let up = self.upstreams.load().get(&a.grant.backend);
                    match authenticate_upstream(opened.backend, &up, &a.grant.target.host).await {
                        Ok(auth) => {
                            authed = Some((auth, opened.guards, up));
                            admitted = Some(a);
                            leg.security_result(true);
                            let out = leg.take_output();
                            if stream.write_all(&out).await.is_err()
                                || stream.flush().await.is_err()
                            {
                                bail!(VncRefusal::new(
                                    "client_left",
                                    Blame::Client,
                                    "during the handshake"
                                ));
                            }
                        }
                        Err(r) => {
                            self.tickets.end(&a.id);
                            bail!(r);
                        }
                    }
                    continue;
                }
                Some(ClientStep::ClientInit { shared }) => {
                    let (Some((mut auth, guards, up)), Some(a)) = (authed.take(), admitted.take())
                    else {
                        bail!(VncRefusal::new(
                            "malformed_handshake",
                            Blame::Internal,
                            "ClientInit before authentication"
                        ));
                    };
                    if let Err(r) =
                        write_backend(&mut auth.backend, &client_init(&up, shared)).await
                    {
                        self.tickets.end(&a.id);
                        bail!(r);
                    }
                    return Ok(Linked {
                        client: stream,
                        authed: auth,
                        grant: a.grant,
                        ticket: a.id,
                        _guards: guards,
                    });
                }
                Some(ClientStep::SecurityChosen) => {
                    bail!(VncRefusal::new(
                        "malformed_handshake",
                        Blame::Internal,
                        "None on the native leg"
                    ))
                }
                None => {}
            }
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => bail!(VncRefusal::new(
                    "client_left",
                    Blame::Client,
                    "during the handshake"
                )),
                Ok(n) => n,
            };
            leg.feed(&buf[..n]);
        }
    }
}
