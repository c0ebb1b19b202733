//! Browser console sessions: noVNC, serial and spice-html5, from the
//! WebSocket upgrade to their end.
//!
//! A front end admits a request ([`Sessions::admit_browser`]: the token's
//! grant, the caps, the reuse policy, the hypervisor connect for noVNC and
//! serial), answers 101, and hands the upgrade over with
//! [`BrowserAdmission::start`]. From there the session is a task of the
//! session layer: the WebSocket, the registry entry, the hypervisor
//! handshake (the VNC security proxy; the SPICE link inside the socket),
//! the relay, the end.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument as _;

use super::lifecycle::{Lifecycle, open_refused};
use super::oversight::{ClientInput, FanOut};
use super::ws_relay::{self, RelayOptions, relay};
use super::{Admission, CloseReason, Early, OpenError, Opened, SessionGuards, Sessions, Traffic};
use crate::console::ConsoleType;
use crate::token::Grant;
use crate::transport::conn::Conn;
use crate::transport::drain_watch::{Drains, Watched};
use crate::transport::gate::Pass;
use crate::transport::listener::AfterUpgrade;
use crate::transport::ws_bypass::{self, Bypass, Bypasses, Limits};
use crate::transport::ws_stream::WsBytes;

/// A browser request the session layer has admitted; it starts once the
/// connection is upgraded.
#[derive(Debug)]
pub struct BrowserAdmission {
    sessions: Arc<Sessions>,
    grant: Grant,
    client: IpAddr,
    upstream: Upstream,
}

/// Where a browser session's console bytes come from.
#[derive(Debug)]
enum Upstream {
    /// noVNC and serial: the connected hypervisor.
    Connected(Opened),
    /// spice-html5: nothing yet (the SPICE link inside the socket, and its
    /// ticket, decide).
    Linked,
    /// A serial shadow: its session's output, on this node.
    Watching {
        guards: SessionGuards,
        output: tokio::sync::broadcast::Receiver<bytes::Bytes>,
    },
}

impl Sessions {
    /// Admits a browser console request for `grant` from `client`; refusals
    /// are logged, audited and counted here.
    pub async fn admit_browser(
        self: &Arc<Self>,
        grant: Grant,
        client: IpAddr,
    ) -> Result<BrowserAdmission, OpenError> {
        let record = |e: &OpenError| open_refused("session", "session", e, client, Some(&grant));
        let upstream = match (grant.console, grant.shadow_of()) {
            // The SPICE link inside the socket, and its ticket, decide the rest.
            (ConsoleType::SpiceHtml5, _) => {
                self.would_admit_ticketed(&grant)
                    .await
                    .inspect_err(record)?;
                Upstream::Linked
            }
            // A serial console serves one client: its shadows read what
            // its session reads (through the store from another node).
            (ConsoleType::Serial, Some(id)) => {
                let guards = self
                    .admit(&grant, Admission::Opens, client)
                    .await
                    .inspect_err(record)?;
                let Some(output) = self.registry.output_of(id).await else {
                    guards.release().await;
                    let e = OpenError::ShadowUnreachable;
                    record(&e);
                    return Err(e);
                };
                Upstream::Watching { guards, output }
            }
            _ => Upstream::Connected(
                self.open_to(&grant, Admission::Opens, grant.target.port, client)
                    .await
                    .inspect_err(record)?,
            ),
        };
        Ok(BrowserAdmission {
            sessions: self.clone(),
            grant,
            client,
            upstream,
        })
    }

    /// What a browser request would get now, without starting anything
    /// (the preflight a page uses to explain a failed socket).
    pub async fn would_admit_browser(&self, grant: &Grant) -> Result<(), OpenError> {
        if let Some(id) = grant.shadow_of() {
            // As `admit_browser` and `admit` do: the watched session first.
            // A shadow's page asks once its socket closed, when its token
            // has been used: that session's end is the answer, not the use.
            self.shadowed_by(grant, id).await?;
        }
        match grant.console {
            ConsoleType::SpiceHtml5 => self.would_admit_ticketed(grant).await,
            _ => self.would_open(grant).await,
        }
    }

    /// The WebSocket relay's timers for a session of `grant` (token expiry
    /// ends it, when configured; a shadow ends with its session instead).
    pub(super) fn relay_options(&self, grant: Option<&Grant>) -> RelayOptions {
        let grant = grant.filter(|g| g.shadow_of().is_none());
        let ws = &self.browser;
        RelayOptions {
            ping_interval: ws.ping_interval,
            idle_timeout: ws.idle_timeout,
            hard_end: grant.filter(|_| ws.end_at_token_expiry).map(|g| {
                let left = g.expires_at.saturating_sub(crate::token::unix_now());
                Instant::now() + std::time::Duration::from_secs(left)
            }),
            chunk_bytes: 256 * 1024,
            write_buffer_bytes: ws.write_buffer_bytes,
        }
    }

    /// tungstenite's limits and buffers for a console WebSocket.
    pub fn tungstenite_config(&self) -> WebSocketConfig {
        let ws = &self.browser;
        WebSocketConfig::default()
            .read_buffer_size(ws.read_buffer_bytes)
            .write_buffer_size(ws.write_buffer_bytes)
            .max_write_buffer_size(ws.max_write_buffer_bytes)
            .max_message_size(Some(ws.max_message_bytes))
            .max_frame_size(Some(ws.max_frame_bytes))
    }
}

impl BrowserAdmission {
    /// Runs the session, tracked, once `upgrade` completes, in the
    /// connection's own task after its HTTP is over (`after`).
    pub fn start(self, upgrade: hyper::upgrade::OnUpgrade, after: &AfterUpgrade) {
        let tracker = self.sessions.tracker.clone();
        // A spice-html5 socket is admitted by its SPICE link, inside it: its
        // connection keeps its place at the gate until then (it holds no
        // slot and no count before).
        let place = match self.upstream {
            Upstream::Linked => after.keep_place(),
            _ => None,
        };
        let session = tracker.track_future(async move {
            let upgraded = match upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(client = %self.client, "websocket upgrade failed: {e}");
                    match self.upstream {
                        Upstream::Connected(o) => o.guards.release().await,
                        Upstream::Watching { guards, .. } => guards.release().await,
                        Upstream::Linked => {}
                    }
                    return;
                }
            };
            // Binary payloads around tungstenite's buffers, read in large
            // chunks while they flow; no buffer while idle.
            let ws = &self.sessions.browser;
            let limits = Limits {
                frame: ws.max_frame_bytes,
                message: ws.max_message_bytes,
                handshake_frame: ws_bypass::HANDSHAKE_FRAME,
            };
            let io = Bypass::new(Watched::new(TokioIo::new(upgraded)), limits);
            let config = self.sessions.tungstenite_config();
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            self.run(socket, place).await;
        });
        after.set(session);
    }

    async fn run<S>(self, socket: WebSocketStream<S>, place: Option<Pass>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Drains + Bypasses,
    {
        let BrowserAdmission {
            sessions,
            grant,
            client,
            upstream,
        } = self;
        if let Upstream::Linked = upstream {
            // spice-html5: one socket per channel; the link decides the session.
            super::spice::serve_browser(sessions, socket, client, grant, place).await;
            return;
        }
        let mut life = Lifecycle::begin(&sessions, &grant, grant.console, client, None).await;
        let (guards, backend) = match upstream {
            Upstream::Connected(opened) => (opened.guards, Conn::Tcp(opened.backend)),
            // A shadow cut for falling behind ends as `LimitHit` (1009).
            Upstream::Watching { guards, output } => {
                (guards, super::oversight::watch(output, life.stop().limit))
            }
            Upstream::Linked => unreachable!("served above"),
        };
        let span = life.span();
        async move {
            life.hold(guards);
            let mut client_io = WsBytes::new(socket);
            let linked = match (grant.console, backend) {
                (ConsoleType::Novnc, Conn::Tcp(tcp)) => {
                    // The security proxy: Porthole authenticates to the hypervisor,
                    // the browser is offered None.
                    let started = StdInstant::now();
                    let deadline = Instant::now() + sessions.browser.upgrade_timeout;
                    let up = sessions.vnc_upstreams.load().get(&grant.backend);
                    // Boxed: the handshake's buffers live on the heap while it
                    // runs and are gone after it, instead of sizing the task
                    // that then holds an idle session for hours.
                    let handshake = Box::pin(super::vnc::browser_handshake(
                        &mut client_io,
                        tcp,
                        &up,
                        &grant.target.host,
                        grant.view_only(),
                        deadline,
                    ));
                    match life.stop().unless_stopped(handshake).await {
                        Ok(Ok(linked)) => {
                            crate::metrics::handshake_took("rfb", started.elapsed().as_secs_f64());
                            Ok(linked)
                        }
                        Ok(Err(refusal)) => {
                            refusal.record(client, grant.console, Some(&grant.jti));
                            Err(("handshake_failed", CloseReason::BackendError))
                        }
                        Err(reason) => Err((reason.as_str(), reason)),
                    }
                }
                (_, backend) => Ok((backend, Early::default())),
            };
            let (socket, pending) = client_io.into_inner();
            let (backend, mut early) = match linked {
                Ok(l) => l,
                Err((outcome, reason)) => {
                    let closing = ws_relay::close(socket, reason).await;
                    tokio::join!(closing.linger(), life.finish(outcome, Traffic::default()));
                    return;
                }
            };
            early.up = super::after_handshake(early.up, &pending);
            let recorder = match sessions.recorder_for(&grant, life.live()) {
                Ok(r) => r,
                Err(why) => {
                    tracing::warn!("session refused: its recording is required and {why}");
                    let closing = ws_relay::close(socket, CloseReason::RecordingStopped).await;
                    tokio::join!(
                        closing.linger(),
                        life.finish("recording_unavailable", Traffic::default())
                    );
                    return;
                }
            };
            let opts = sessions.relay_options(Some(&grant));
            let counters = life.live().bytes.clone();
            let ended = relay(
                socket,
                backend,
                early,
                FanOut {
                    input: ClientInput::of(&grant),
                    shadows: life.live().fan_out.clone(),
                    recorder,
                },
                opts,
                life.stop(),
                &counters,
            )
            .await;
            tokio::join!(
                ended.client.linger(),
                life.finish(ended.reason.as_str(), ended.traffic)
            );
        }
        .instrument(span)
        .await;
    }
}
