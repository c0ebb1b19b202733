//! One SPICE channel connection through Porthole, start to finish.
//!
//! On every channel (SPICE opens one connection per channel) Porthole plays
//! the server to the client and the client to the hypervisor:
//!
//! 1. reads the client's link message and answers with a link key from the
//!    ring and the capabilities it offers;
//! 2. decrypts the client's ticket and asks the ticket store whether it
//!    admits this channel: the main channel (connection id 0) opens the
//!    ticket's one session (a registry entry from here on), others must name
//!    that session's id and join it;
//! 3. connects to the hypervisor (TLS port when a CA is configured for its
//!    network, else the plain port, escalating on NEED_SECURED), links with
//!    the client's capabilities minus what a proxy must not pass, and
//!    authenticates with the hypervisor's ticket from the backend config,
//!    raced against the session's stop until the ticket goes (a channel
//!    spice-server may have linked is never just dropped: see
//!    `Linked::Orphaned`);
//! 4. relays the link result, then relays the channel (the byte splice for
//!    native clients, the WebSocket relay for spice-html5), early bytes first.
//!
//! Everything before the relay (TLS for native clients included) runs
//! under one deadline. On the main channel the hypervisor's INIT names the
//! session; the ticket is bound to it in the store before INIT reaches the
//! client, and migration messages end the session instead of reaching the
//! client. Every refusal gets a SPICE link error code, a log line with its
//! reason and blame, and a counter.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant as StdInstant;

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;

use super::admission::Unrecordable;
use super::display_drain::{DrainOf, DrainTimes, drain};
use super::driver::{DriveError, drive, send};
use super::lifecycle::{Handshake, Lifecycle};
use super::registry::LiveSession;
use super::splice::{REFUSAL_DEADLINE, splice};
use super::ws_relay::{self, relay};
use super::{
    Admission, ClientTap, CloseReason, Early, Inspect, Kept, OpenError, SessionGuards, Sessions,
    Stop,
};
use crate::console::ConsoleType;
use crate::error::Blame;
use crate::protocol::client_filter::Checked;
use crate::protocol::spice::client_check::ClientCheck;
use crate::protocol::spice::crypto::{decrypt_ticket, encrypt_ticket};
use crate::protocol::spice::display_drain::DisplayTrack;
use crate::protocol::spice::framing::MessageEnds;
use crate::protocol::spice::link::{
    ClientLink, ClientStep, LinkFailure, ServerLink, ServerStep, framing_agrees, upstream_caps,
};
use crate::protocol::spice::main_watch::{MainEvent, MainWatch};
use crate::protocol::spice::messages::{LinkError, LinkMess, LinkReply, channel, common_cap};
use crate::recording::Recorder;
use crate::token::ticket::{Admitted, ChannelRole, TicketId, TicketRefusal, TicketStore};
use crate::transport::conn::{Conn, Io};
use crate::transport::gate::Pass;
use crate::transport::ws_stream::WsBytes;

/// Where a channel connection came from.
#[derive(Debug, Clone)]
pub enum ClientLeg {
    /// Porthole's SPICE TLS listener: `spice-direct` tickets.
    Native,
    /// A spice-html5 WebSocket opened with a `spice-html5` token.
    Browser {
        /// What the token granted; a ticket must have been issued for it,
        /// and an empty ticket means the token itself (spice_auto.html).
        grant: Box<crate::token::Grant>,
    },
}

impl ClientLeg {
    /// The console type tickets on this leg must be for.
    fn console(&self) -> ConsoleType {
        match self {
            ClientLeg::Native => ConsoleType::SpiceDirect,
            ClientLeg::Browser { .. } => ConsoleType::SpiceHtml5,
        }
    }

    /// The leg, for a log line (its grant is not for one).
    fn label(&self) -> &'static str {
        match self {
            ClientLeg::Native => "native",
            ClientLeg::Browser { .. } => "browser",
        }
    }
}

/// A spice-html5 socket's place at the gate went to another address's
/// before its ticket was in.
const EVICTED_AT_GATE: &str = "evicted_at_gate";

/// A channel's link, as its refusals are counted and recorded.
const SPICE_LINK: Handshake = Handshake {
    protocol: "spice",
    what: "spice_link",
    label: "spice link",
};

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

    /// A ticket (or a token standing for one) that admits nothing.
    fn ticket(r: TicketRefusal) -> Self {
        Self::client(ticket_code(r), r.as_str(), r.to_string())
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

    /// Its place at the gate went to another address's before its ticket
    /// was in (a spice-html5 socket).
    fn evicted() -> Self {
        Self {
            code: None,
            reason: EVICTED_AT_GATE,
            blame: Blame::Client,
            detail: "its address held the most places of a full gate".into(),
        }
    }

    fn timed_out() -> Self {
        Self {
            detail: "no complete handshake in time".into(),
            ..Self::gone("handshake_timeout", Blame::Client)
        }
    }

    /// A failure of the client leg.
    fn from_client(e: DriveError<LinkFailure>) -> Self {
        match e {
            DriveError::Refused(f) => Self::wire(f, Blame::Client),
            DriveError::TimedOut => Self::timed_out(),
            DriveError::Closed | DriveError::Read(_) | DriveError::Write(_) => {
                Self::gone("client_left", Blame::Client)
            }
        }
    }

    /// A failure of the hypervisor leg.
    fn from_upstream(e: DriveError<LinkFailure>) -> Self {
        match e {
            DriveError::Refused(f) => Self::wire(f, Blame::Backend),
            DriveError::TimedOut => Self::backend(
                LinkError::Error,
                "hypervisor_timeout",
                "the hypervisor did not finish the link in time",
            ),
            DriveError::Closed => Self::backend(
                LinkError::Error,
                "hypervisor_closed",
                "closed during the link",
            ),
            DriveError::Read(e) | DriveError::Write(e) => {
                Self::backend(LinkError::Error, "hypervisor_io", e.to_string())
            }
        }
    }

    /// The close code a browser sees after the link error: the console
    /// failed, whoever is to blame (the page's preflight says more).
    fn close_reason(&self) -> CloseReason {
        if self.reason == EVICTED_AT_GATE {
            CloseReason::EvictedAtGate
        } else {
            CloseReason::BackendError
        }
    }

    /// Logs and counts it (before the client hears of it).
    fn record(&self, peer: IpAddr, console: Option<ConsoleType>, jti: Option<&str>) {
        crate::metrics::spice_link_refused(self.reason, self.blame.as_str());
        SPICE_LINK.refused(self.reason, self.blame, &self.detail, peer, console, jti);
    }
}

/// Answers a link on the plain listener with NEED_SECURED, so that no
/// ticket ever travels in clear: clients retry on the TLS port.
pub async fn need_secured<S: Io>(mut client: S, deadline: Instant) {
    let mut link = ClientLink::new();
    let got = drive(&mut link, &mut client, deadline).await;
    // Counted before the client hears of it.
    let (outcome, reply) = match got {
        Ok(ClientStep::Linked(_)) => ("need_secured", Some(LinkError::NeedSecured)),
        Ok(ClientStep::Ticket(_)) => ("need_secured", None),
        Err(e) => {
            let r = ChannelRefusal::from_client(e);
            (r.reason, r.code)
        }
    };
    crate::metrics::spice_link_refused(outcome, Blame::Client.as_str());
    if let Some(code) = reply {
        let _ = write_within(&mut client, &link.refuse(code), true).await;
    }
}

/// Runs one native channel connection (TLS, then SPICE) from `peer` to its
/// end; `deadline` (from accept, see `frontend::serve_native`) covers the
/// TLS handshake and the link.
pub async fn serve_native(
    sessions: Arc<Sessions>,
    tcp: TcpStream,
    peer: IpAddr,
    deadline: Instant,
) {
    let Some(tls) = sessions.spice_tls.as_ref().map(|slot| slot.load_full()) else {
        return;
    };
    // A balancer's TCP health check connects and closes (HAProxy with a
    // reset) without a byte: not a failed handshake worth a log line at
    // INFO every few seconds.
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout_at(deadline, tcp.peek(&mut first)) => r,
        _ = sessions.cancel.cancelled() => return,
    };
    let silent = match peeked {
        Ok(Ok(n)) => n == 0,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Err(_) => false,
    };
    if silent {
        crate::metrics::spice_link_refused("closed_silently", "client");
        tracing::debug!(client = %peer, "spice connection closed before TLS (a health check?)");
        return;
    }
    // The certificate in force now: a reload takes effect for the next client.
    let accepting = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
    let accepted = tokio::select! {
        r = tokio::time::timeout_at(deadline, accepting) => r,
        _ = sessions.cancel.cancelled() => return,
    };
    let mut client = match accepted {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            crate::metrics::spice_link_refused("tls_handshake", "client");
            if crate::audit::refusal_log_allowed() {
                tracing::info!(client = %peer, "spice tls handshake failed: {e}");
            }
            return;
        }
        Err(_) => {
            crate::metrics::spice_link_refused("handshake_timeout", "client");
            return;
        }
    };
    // Boxed: the link's buffers are gone once it is done (see browser.rs).
    let linking = Box::pin(link_channel(
        &sessions,
        &mut client,
        peer,
        &ClientLeg::Native,
        deadline,
        None,
    ));
    let Channel {
        upstream,
        early,
        inspect,
        end,
        recorder,
    } = match linking.await {
        Ok(Linked::Console(channel)) => channel,
        Ok(Linked::Playback(mess, admitted, _hold)) => {
            play_native(&sessions, client, &mess, &admitted).await;
            return;
        }
        Ok(Linked::Orphaned(channel, reason)) => {
            drop(client);
            channel.orphaned(&sessions, reason).await;
            return;
        }
        Err(_) => return,
    };
    let counters = end.counters();
    let track = inspect.display_track();
    let inspect = Recorded {
        inner: EachMessage::new(inspect),
        recorder,
    };
    let (reason, traffic, kept) =
        splice(client, upstream, early, inspect, end.stop(), &counters).await;
    end.finish_or_drain(&sessions, reason, traffic, kept, track)
        .await;
}

/// Runs one spice-html5 channel (a WebSocket opened with the `spice-html5`
/// token of `grant`) to its end: the link over the socket seen as bytes,
/// then the WebSocket relay, with its pings and close codes.
pub async fn serve_browser<S>(
    sessions: Arc<Sessions>,
    socket: WebSocketStream<S>,
    peer: IpAddr,
    grant: crate::token::Grant,
    place: Option<Pass>,
) where
    S: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + Unpin
        + Send
        + crate::transport::drain_watch::Drains
        + crate::transport::ws_bypass::Bypasses,
{
    let deadline = Instant::now() + sessions.limits.spice_handshake;
    let mut client = WsBytes::new(socket);
    let leg = ClientLeg::Browser {
        grant: Box::new(grant.clone()),
    };
    let linked = Box::pin(link_channel(
        &sessions,
        &mut client,
        peer,
        &leg,
        deadline,
        place,
    ))
    .await;
    let (socket, pending) = client.into_inner();
    let Channel {
        upstream,
        mut early,
        inspect,
        end,
        recorder,
    } = match linked {
        Ok(Linked::Console(channel)) => channel,
        // (Only the native leg plays recordings.)
        Ok(Linked::Playback(..)) => {
            let closing = ws_relay::close(socket, CloseReason::ProtocolError).await;
            closing.linger().await;
            return;
        }
        Ok(Linked::Orphaned(channel, reason)) => {
            let closing = ws_relay::close(socket, reason).await;
            tokio::join!(closing.linger(), channel.orphaned(&sessions, reason));
            return;
        }
        Err(reason) => {
            let closing = ws_relay::close(socket, reason).await;
            closing.linger().await;
            return;
        }
    };
    early.up = super::after_handshake(early.up, &pending);
    let counters = end.counters();
    let opts = sessions.relay_options(Some(&grant));
    let track = inspect.display_track();
    let inspect = Recorded {
        inner: inspect,
        recorder,
    };
    let ended = relay(
        socket,
        upstream,
        early,
        inspect,
        opts,
        end.stop(),
        &counters,
    )
    .await;
    tokio::join!(
        ended.client.linger(),
        end.finish_or_drain(&sessions, ended.reason, ended.traffic, ended.kept, track)
    );
}

/// The client leg of one channel of a recording's playback: the link
/// message, Porthole's key, the ticket (read and left: the playback's token
/// admitted the page), then OK. Returns the client's link message (its
/// channel and framing), or nothing when the client failed or left.
pub async fn link_playback<S: Io>(
    sessions: &Sessions,
    client: &mut S,
    deadline: Instant,
) -> Option<LinkMess> {
    let mut link = ClientLink::new();
    let Ok(ClientStep::Linked(mess)) = drive(&mut link, client, deadline).await else {
        return None;
    };
    let key = sessions.keys.pick();
    send(client, &link.accept(&key.der, &mess), deadline)
        .await
        .ok()?;
    let Ok(ClientStep::Ticket(_)) = drive(&mut link, client, deadline).await else {
        return None;
    };
    send(client, &link.result(LinkError::Ok), deadline)
        .await
        .ok()?;
    Some(mess)
}

/// Plays one channel of a SPICE recording to a native client that linked
/// with a playback's ticket: that channel's recorded messages at their
/// times after its link, each in a write of its own (one TLS record each,
/// as spice-gtk needs: see [`EachMessage`]); what the client sends is read
/// and left. On the main channel the recorded INIT's session id is bound
/// to the ticket before INIT goes, so that the other channels can join.
/// The last frame stays up until the client leaves (an hour at most).
async fn play_native<S: Io>(sessions: &Sessions, client: S, mess: &LinkMess, admitted: &Admitted) {
    use crate::recording::spice::{ChannelOf, ChannelReader};
    use tokio::io::AsyncWriteExt as _;
    let main = mess.channel_type == channel::MAIN;
    let path = admitted
        .grant
        .playback()
        .and_then(|id| sessions.recording.as_ref()?.path_of(id))
        .filter(|(_, format)| *format == crate::recording::Format::Spice)
        .map(|(path, _)| path);
    let mini_header = mess.caps.has_common(common_cap::MINI_HEADER);
    let wanted = ChannelOf {
        kind: mess.channel_type,
        id: mess.channel_id,
    };
    let reader = match path {
        Some(path) => ChannelReader::open(&path, wanted, mini_header).await,
        None => Err("no such recording on this node"),
    };
    let mut reader = match reader {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(
                channel = channel_name(mess.channel_type),
                "spice playback refused: {why}"
            );
            return;
        }
    };
    tracing::info!(
        jti = %admitted.grant.jti, recording = admitted.grant.playback().unwrap_or("-"),
        channel = channel_name(mess.channel_type), "spice playback channel linked"
    );
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let started = tokio::time::Instant::now();
    let playing = async {
        let mut watch = MainWatch::new(mini_header);
        let mut ends = MessageEnds::new(mini_header);
        let mut at = Vec::new();
        loop {
            let (after, bytes) = match reader.next().await {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(why) => {
                    tracing::warn!("spice playback stopped: {why}");
                    return;
                }
            };
            tokio::time::sleep_until(started + after).await;
            if main {
                for event in watch.feed(&bytes).unwrap_or_default() {
                    if let MainEvent::Init { session_id } = event {
                        sessions.tickets.bind(&admitted.id, session_id).await;
                    }
                }
            }
            at.clear();
            ends.feed(&bytes, &mut at);
            if at.last() != Some(&bytes.len()) {
                // A message goes on in the next record: what is here goes now.
                at.push(bytes.len());
            }
            let mut from = 0;
            for &end in &at {
                if end > from
                    && (to_client.write_all(&bytes[from..end]).await.is_err()
                        || to_client.flush().await.is_err())
                {
                    return;
                }
                from = end;
            }
        }
        tokio::time::sleep(PLAYED_KEPT).await;
    };
    let client_left = async {
        let _ = tokio::io::copy(&mut from_client, &mut tokio::io::sink()).await;
    };
    tokio::select! {
        () = playing => {}
        () = client_left => {}
        () = sessions.cancel.cancelled() => {}
    }
    if main {
        sessions.tickets.end(&admitted.id).await;
    }
}

/// How long a played recording's last frame stays on a native client.
const PLAYED_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

/// A channel linked on both legs, ready to relay.
struct Channel {
    upstream: Conn,
    early: Early,
    inspect: ChannelInspect,
    end: ChannelEnd,
    /// Its recording, if its session is recorded.
    recorder: Option<Recorder>,
}

/// A channel's inspector that also records what the hypervisor sends
/// (after the inspector passed it): a required recording that stopped
/// ends the channel before its client sees what was not recorded.
struct Recorded<I> {
    inner: I,
    recorder: Option<Recorder>,
}

impl<I: Inspect> Inspect for Recorded<I> {
    async fn inspect(&mut self, chunk: &[u8]) -> Result<(), CloseReason> {
        self.inner.inspect(chunk).await?;
        match &mut self.recorder {
            Some(r) => r.record(chunk).map_err(|_| CloseReason::RecordingStopped),
            None => Ok(()),
        }
    }

    fn client_tap(&self) -> Option<ClientTap> {
        self.inner.client_tap()
    }

    fn keeps_upstream(&self, reason: CloseReason) -> bool {
        self.inner.keeps_upstream(reason)
    }

    fn message_ends(&mut self, chunk: &[u8], ends: &mut Vec<usize>) {
        self.inner.message_ends(chunk, ends);
    }
}

/// The recorder of one channel: the main channel starts its session's
/// recording (kept in the session's entry for the other channels), each
/// channel records under its own type and id. `Err` when the recording is
/// required and this channel cannot be recorded.
fn channel_recorder(
    sessions: &Sessions,
    session: &ChannelSession,
    grant: &crate::token::Grant,
    mess: &LinkMess,
) -> Result<Option<Recorder>, Unrecordable> {
    let mini_header = mess.caps.has_common(common_cap::MINI_HEADER);
    let of = |template: &Recorder| match template.channel(
        mess.channel_type,
        mess.channel_id,
        mini_header,
    ) {
        Some(r) => Ok(Some(r)),
        None if template.required() => Err(Unrecordable("its recording has stopped".into())),
        None => Ok(None),
    };
    match session {
        ChannelSession::Owns(life) => {
            let Some(template) = sessions.recorder_for(grant, life.live())? else {
                return Ok(None);
            };
            let channel = of(&template);
            *recording_of(life.live()) = Some(template);
            channel
        }
        ChannelSession::Joins { live, .. } => match recording_of(live).as_ref() {
            Some(template) => of(template),
            // Recorded on another node (its main channel's), or not at all.
            None if sessions
                .recording
                .as_ref()
                .and_then(|r| r.wants(&grant.backend, grant.record()))
                .unwrap_or(grant.record()) =>
            {
                Err(Unrecordable(
                    "its session is recorded on another node: keep a client's channels on one node"
                        .into(),
                ))
            }
            None => Ok(None),
        },
    }
}

fn recording_of(live: &LiveSession) -> std::sync::MutexGuard<'_, Option<Recorder>> {
    live.recording.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a channel belongs to.
enum ChannelSession {
    /// The main channel: the session itself.
    Owns(Lifecycle),
    /// Another channel: it joins its session's entry (stop, counters) and
    /// holds its own slot.
    Joins {
        live: Arc<LiveSession>,
        stop: Stop,
        guards: SessionGuards,
    },
}

/// How a channel ends.
struct ChannelEnd {
    session: ChannelSession,
    ticket: TicketId,
    jti: String,
    console: ConsoleType,
    channel: &'static str,
    peer: IpAddr,
    started: StdInstant,
}

impl ChannelEnd {
    fn stop(&self) -> Stop {
        match &self.session {
            ChannelSession::Owns(life) => life.stop(),
            ChannelSession::Joins { stop, .. } => stop.clone(),
        }
    }

    fn counters(&self) -> Arc<super::registry::ByteCounters> {
        match &self.session {
            ChannelSession::Owns(life) => life.live().bytes.clone(),
            ChannelSession::Joins { live, .. } => live.bytes.clone(),
        }
    }

    /// Ends the channel; a display channel's hypervisor side, if the relay
    /// kept it, is then drained (this task lives on until the drain ends).
    async fn finish_or_drain(
        self,
        sessions: &Sessions,
        reason: CloseReason,
        traffic: super::Traffic,
        kept: Option<Kept<Conn>>,
        track: Option<Arc<Mutex<DisplayTrack>>>,
    ) {
        let stop = self.stop();
        let (peer, jti) = (self.peer, self.jti.clone());
        let settled = self.started + PORT_SETTLE;
        self.finish(sessions, reason, traffic).await;
        let Some(track) = track else {
            // A port channel (spice-server attaches it to its character
            // device just after the link): closed only once that is done.
            if let Some(kept) = kept {
                tokio::time::sleep_until(tokio::time::Instant::from_std(settled)).await;
                drop(kept);
            }
            return;
        };
        let Some(kept) = kept else {
            return;
        };
        let track = std::mem::replace(
            &mut *track.lock().unwrap_or_else(|p| p.into_inner()),
            DisplayTrack::new(true),
        );
        let times = DrainTimes {
            grace: sessions.limits.spice_drain_grace,
            max: sessions.limits.spice_drain_max,
        };
        let of = DrainOf {
            client: peer,
            jti: &jti,
        };
        drain(kept, track, stop, times, of).await;
    }

    async fn finish(self, sessions: &Sessions, reason: CloseReason, traffic: super::Traffic) {
        tracing::info!(
            client = %self.peer, jti = %self.jti, channel = self.channel,
            reason = reason.as_str(), bytes_up = traffic.up, bytes_down = traffic.down,
            secs = self.started.elapsed().as_secs_f64(), "spice channel ended"
        );
        match self.session {
            ChannelSession::Owns(life) => {
                // The session is over: its ticket is dead, late channels are
                // refused, its recording is finished once they are gone.
                sessions.tickets.end(&self.ticket).await;
                recording_of(life.live()).take();
                life.finish(reason.as_str(), traffic).await;
            }
            ChannelSession::Joins { guards, .. } => {
                guards.release().await;
                crate::metrics::bytes_relayed(self.console.as_str(), traffic.up, traffic.down);
            }
        }
    }
}

/// How long after its link a port or webdav channel must stay open on the
/// hypervisor's side: spice-server 0.15.1 attaches it to its character
/// device after the link, and a channel closed before that crashes QEMU 7.2
/// (SIGSEGV, "have already been removed from char dev": 26 in 60 tries
/// when closed at once over TLS, none in 96 from 10 ms on).
const PORT_SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// On the main channel, INIT's session id binds the ticket (a store call)
/// before INIT reaches the client; a migration message ends the session.
/// A display channel is followed both ways, so that it can be drained
/// rather than closed when its client leaves.
enum ChannelInspect {
    Main {
        watch: MainWatch,
        tickets: Arc<dyn TicketStore>,
        ticket: TicketId,
        mini_header: bool,
        /// Agent messages and mouse-mode requests are dropped.
        view_only: bool,
    },
    Display(Arc<Mutex<DisplayTrack>>),
    Other {
        channel_type: u8,
        mini_header: bool,
    },
}

impl ChannelInspect {
    fn display_track(&self) -> Option<Arc<Mutex<DisplayTrack>>> {
        match self {
            ChannelInspect::Display(track) => Some(track.clone()),
            _ => None,
        }
    }

    fn mini_header(&self) -> bool {
        match self {
            ChannelInspect::Main { mini_header, .. }
            | ChannelInspect::Other { mini_header, .. } => *mini_header,
            ChannelInspect::Display(track) => locked(track).mini_header(),
        }
    }
}

/// A native client's channel: each hypervisor message goes to the client
/// in writes of its own, so no TLS record holds the end of one message and
/// the start of the next. spice-gtk 0.42 (spicy, remote-viewer) otherwise
/// stalls: measured, with a burst of display updates in one record its
/// screen froze at the first burst (the display channel then owed the
/// server its ACKs, so the server stopped as well), and a relay that packed
/// several of QEMU's own messages in one record froze it without Porthole;
/// one record per message, as QEMU writes them, cured both. It reads a
/// message, then waits for the socket, not for what its TLS layer already
/// holds.
struct EachMessage {
    inner: ChannelInspect,
    ends: MessageEnds,
}

impl EachMessage {
    fn new(inner: ChannelInspect) -> Self {
        let ends = MessageEnds::new(inner.mini_header());
        Self { inner, ends }
    }
}

impl Inspect for EachMessage {
    async fn inspect(&mut self, chunk: &[u8]) -> Result<(), CloseReason> {
        self.inner.inspect(chunk).await
    }

    fn client_tap(&self) -> Option<ClientTap> {
        self.inner.client_tap()
    }

    fn keeps_upstream(&self, reason: CloseReason) -> bool {
        self.inner.keeps_upstream(reason)
    }

    fn message_ends(&mut self, chunk: &[u8], ends: &mut Vec<usize>) {
        self.ends.feed(chunk, ends);
    }
}

/// One channel's check of its client's bytes.
type CheckFn = Box<dyn FnMut(&[u8]) -> Checked + Send>;

/// The check of a channel other than display (whose tracker checks).
fn other_check(mini_header: bool, channel_type: u8) -> CheckFn {
    let mut check = ClientCheck::new(mini_header, channel_type);
    Box::new(move |chunk| check.check(chunk, &mut Vec::new()))
}

fn locked(track: &Mutex<DisplayTrack>) -> std::sync::MutexGuard<'_, DisplayTrack> {
    track.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inspect for ChannelInspect {
    /// Every channel's client messages are checked before they go (see
    /// `protocol::spice::client_check`: some crash QEMU 7.2); the display
    /// channel's tracker does it for its own.
    fn client_tap(&self) -> Option<ClientTap> {
        let (name, check): (&'static str, CheckFn) = match self {
            ChannelInspect::Display(track) => {
                let track = track.clone();
                (
                    "display",
                    Box::new(move |chunk| locked(&track).from_client(chunk)),
                )
            }
            ChannelInspect::Main {
                mini_header,
                view_only: true,
                ..
            } => {
                let mut check = ClientCheck::view_only(*mini_header, channel::MAIN);
                (
                    "main",
                    Box::new(move |chunk| check.check(chunk, &mut Vec::new())),
                )
            }
            ChannelInspect::Main { mini_header, .. } => {
                ("main", other_check(*mini_header, channel::MAIN))
            }
            ChannelInspect::Other {
                channel_type,
                mini_header,
            } => (
                channel_name(*channel_type),
                other_check(*mini_header, *channel_type),
            ),
        };
        let check = Mutex::new(check);
        Some(Arc::new(move |chunk: &[u8]| {
            let checked = (check.lock().unwrap_or_else(|p| p.into_inner()))(chunk);
            for run in checked.dropped.chunk_by(|a, b| a == b) {
                crate::metrics::view_only_dropped("spice", run[0], run.len() as u64);
            }
            if let Some(refused) = &checked.refused {
                crate::metrics::spice_message_refused(refused.why);
                tracing::warn!(
                    blame = "client",
                    channel = name,
                    "spice channel ended: {refused}; not passed on (QEMU 7.2 crashes on it)"
                );
            }
            checked
        }))
    }

    /// A display channel is kept (to be drained), and a port channel
    /// (held until it has settled), unless the hypervisor side is what
    /// failed.
    fn keeps_upstream(&self, reason: CloseReason) -> bool {
        let keeps = match self {
            ChannelInspect::Display(_) => true,
            ChannelInspect::Other { channel_type, .. } => {
                matches!(*channel_type, channel::PORT | channel::WEBDAV)
            }
            ChannelInspect::Main { .. } => false,
        };
        keeps
            && !matches!(
                reason,
                CloseReason::BackendClosed | CloseReason::BackendError
            )
    }

    async fn inspect(&mut self, chunk: &[u8]) -> Result<(), CloseReason> {
        let ChannelInspect::Main {
            watch,
            tickets,
            ticket,
            ..
        } = self
        else {
            if let ChannelInspect::Display(track) = self {
                locked(track).from_server(chunk);
            }
            return Ok(());
        };
        let events = watch.feed(chunk).map_err(|e| {
            tracing::warn!("malformed main channel data from the hypervisor: {e}");
            CloseReason::BackendError
        })?;
        for e in events {
            match e {
                MainEvent::Init { session_id } => tickets.bind(ticket, session_id).await,
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
}

/// Links one channel on both legs, or refuses it (recorded, and the client
/// told with a link error where it can still hear). A refusal or a stop
/// answers the close code a browser should see.
async fn link_channel<S: Io>(
    sessions: &Arc<Sessions>,
    client: &mut S,
    peer: IpAddr,
    leg: &ClientLeg,
    deadline: Instant,
    place: Option<Pass>,
) -> Result<Linked, CloseReason> {
    let started = StdInstant::now();
    let mut link = ClientLink::new();
    let native = matches!(leg, ClientLeg::Native);
    // Until a ticket admits it, the channel is no session: only a shutdown
    // (or, before its ticket is in, the gate) stops it.
    let admitted = tokio::select! {
        r = admit_channel(sessions, client, &mut link, leg, peer, deadline, place) => r,
        _ = sessions.cancel.cancelled() => Err(ChannelRefusal::gone("shutting_down", Blame::Internal)),
    };
    let (mess, admitted, session) = match admitted {
        Ok(AdmittedChannel::Console(admitted)) => *admitted,
        Ok(AdmittedChannel::Playback(playback)) => {
            let (mess, admitted, hold) = *playback;
            if send(client, &link.result(LinkError::Ok), deadline)
                .await
                .is_err()
            {
                return Err(CloseReason::ClientLeft);
            }
            return Ok(Linked::Playback(mess, admitted, hold));
        }
        Err(r) => {
            r.record(peer, None, None);
            if let Some(code) = r.code {
                let _ = write_within(client, &link.refuse(code), native).await;
            }
            return Err(r.close_reason());
        }
    };
    let stop = match &session {
        ChannelSession::Owns(life) => life.stop(),
        ChannelSession::Joins { stop, .. } => stop.clone(),
    };
    let recorder = match channel_recorder(sessions, &session, &admitted.grant, &mess) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(
                jti = %admitted.grant.jti, channel = channel_name(mess.channel_type),
                "spice channel refused: its recording is required and {why}"
            );
            let _ = write_within(client, &link.refuse(LinkError::Error), native).await;
            match session {
                ChannelSession::Owns(life) => {
                    sessions.tickets.end(&admitted.id).await;
                    recording_of(life.live()).take();
                    life.finish("recording_unavailable", super::Traffic::default())
                        .await;
                }
                ChannelSession::Joins { guards, .. } => guards.release().await,
            }
            return Err(CloseReason::RecordingStopped);
        }
    };
    let linking = link_upstream(
        sessions, client, &mut link, &mess, &admitted, &stop, deadline,
    );
    let (outcome, reply, close) = match linking.await {
        Ok((upstream, up_early, upstream_tls)) => {
            crate::metrics::spice_linked(channel_name(mess.channel_type));
            crate::metrics::handshake_took("spice", started.elapsed().as_secs_f64());
            let grant = &admitted.grant;
            tracing::info!(
                client = %peer, jti = %grant.jti, instance = %grant.instance, console = %grant.console,
                target = %grant.target, ticket_ref = %admitted.id, channel = channel_name(mess.channel_type),
                channel_id = mess.channel_id,
                upstream = if upstream_tls { "tls" } else { "plain" }, "spice channel linked"
            );
            let early = Early {
                up: link.into_leftover(),
                down: up_early,
            };
            let mut linked =
                Channel::new(sessions, upstream, early, &mess, admitted, session, peer);
            linked.recorder = recorder;
            return Ok(Linked::Console(linked));
        }
        Err(LinkFailed {
            cut,
            linked: Some(kept),
        }) => {
            // The hypervisor linked the channel; its client will not relay it.
            let (reason, reply) = match cut {
                LinkCut::Refused(r) => {
                    r.record(
                        peer,
                        Some(admitted.grant.console),
                        Some(&admitted.grant.jti),
                    );
                    (r.close_reason(), r.code)
                }
                LinkCut::Stopped(reason) => (reason, Some(LinkError::Error)),
                LinkCut::ClientLeft => {
                    ChannelRefusal::gone("client_left", Blame::Client).record(
                        peer,
                        Some(admitted.grant.console),
                        Some(&admitted.grant.jti),
                    );
                    (CloseReason::ClientLeft, None)
                }
            };
            if let Some(code) = reply {
                let _ = write_within(client, &link.refuse(code), native).await;
            }
            tracing::info!(
                client = %peer, jti = %admitted.grant.jti, channel = channel_name(mess.channel_type),
                reason = reason.as_str(), "spice channel linked on the hypervisor's side only"
            );
            let early = Early {
                up: Vec::new(),
                down: kept.unread,
            };
            let orphan = Channel::new(
                sessions,
                kept.upstream,
                early,
                &mess,
                admitted,
                session,
                peer,
            );
            return Ok(Linked::Orphaned(orphan, reason));
        }
        Err(LinkFailed { cut, linked: None }) => match cut {
            LinkCut::Refused(r) => {
                r.record(
                    peer,
                    Some(admitted.grant.console),
                    Some(&admitted.grant.jti),
                );
                ("handshake_failed", r.code, r.close_reason())
            }
            LinkCut::Stopped(reason) => (reason.as_str(), Some(LinkError::Error), reason),
            LinkCut::ClientLeft => ("client_left", None, CloseReason::ClientLeft),
        },
    };
    // Refused or stopped before the relay.
    if let Some(code) = reply {
        let _ = write_within(client, &link.refuse(code), native).await;
    }
    drop(recorder);
    match session {
        ChannelSession::Owns(life) => {
            // The session never started: nothing may join it.
            sessions.tickets.end(&admitted.id).await;
            recording_of(life.live()).take();
            life.finish(outcome, super::Traffic::default()).await;
        }
        ChannelSession::Joins { guards, .. } => guards.release().await,
    }
    Err(close)
}

impl Channel {
    /// Ends a channel the hypervisor linked and its client never relayed:
    /// its hypervisor side is drained (display) or held until it settled
    /// (port), like a relay's whose client left, else closed.
    async fn orphaned(self, sessions: &Sessions, reason: CloseReason) {
        let track = self.inspect.display_track();
        let kept = self.inspect.keeps_upstream(reason).then_some(Kept {
            upstream: self.upstream,
            unread: self.early.down,
        });
        self.end
            .finish_or_drain(sessions, reason, super::Traffic::default(), kept, track)
            .await;
    }

    /// A linked channel of `session`, with the inspector its type needs.
    fn new(
        sessions: &Sessions,
        upstream: Conn,
        early: Early,
        mess: &LinkMess,
        admitted: Admitted,
        session: ChannelSession,
        peer: IpAddr,
    ) -> Self {
        // Both legs agreed on this framing at the link (framing_agrees).
        let mini_header = mess.caps.has_common(common_cap::MINI_HEADER);
        let inspect = match mess.channel_type {
            channel::MAIN => ChannelInspect::Main {
                watch: MainWatch::new(mini_header),
                tickets: sessions.tickets.clone(),
                ticket: admitted.id.clone(),
                mini_header,
                view_only: admitted.grant.view_only(),
            },
            channel::DISPLAY => {
                ChannelInspect::Display(Arc::new(Mutex::new(DisplayTrack::new(mini_header))))
            }
            channel_type => ChannelInspect::Other {
                channel_type,
                mini_header,
            },
        };
        Channel {
            upstream,
            early,
            inspect,
            end: ChannelEnd {
                session,
                ticket: admitted.id,
                jti: admitted.grant.jti,
                console: admitted.grant.console,
                channel: channel_name(mess.channel_type),
                peer,
                started: StdInstant::now(),
            },
            recorder: None,
        }
    }
}

/// The client leg up to an admitted ticket (link message, link key,
/// ticket), then admission: the main channel opens the session (in the
/// registry from here on), the others join it.
async fn admit_channel<S: Io>(
    sessions: &Sessions,
    client: &mut S,
    link: &mut ClientLink,
    leg: &ClientLeg,
    peer: IpAddr,
    deadline: Instant,
    place: Option<Pass>,
) -> Result<AdmittedChannel, ChannelRefusal> {
    let key = sessions.keys.pick();
    let to_ticket = async {
        let ClientStep::Linked(mess) = drive(link, client, deadline)
            .await
            .map_err(ChannelRefusal::from_client)?
        else {
            unreachable!("the first step is the link message")
        };
        send(client, &link.accept(&key.der, &mess), deadline)
            .await
            .map_err(|_| ChannelRefusal::gone("client_left", Blame::Client))?;
        let ClientStep::Ticket(ciphertext) = drive(link, client, deadline)
            .await
            .map_err(ChannelRefusal::from_client)?
        else {
            unreachable!("the second step is the ticket")
        };
        Ok((mess, ciphertext))
    };
    // A spice-html5 socket holds its connection's place at the gate until
    // its ticket is in, and may lose it to another address's as an HTTP
    // connection may (nothing is admitted yet: it just ends).
    let evicted = place.as_ref().map(Pass::evicted);
    let (mess, ciphertext) = tokio::select! {
        r = to_ticket => r?,
        () = async {
            match &evicted {
                Some(e) => e.cancelled().await,
                None => std::future::pending().await,
            }
        } => {
            return Err(ChannelRefusal::evicted());
        }
    };
    // The ticket is in: the session's caps bound the channel from here.
    drop(place);
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
    let admitted = match leg {
        ClientLeg::Browser { grant } if password.is_empty() => {
            admit_by_token(sessions, grant, role, peer).await?
        }
        _ => sessions
            .admit_ticket(&password, leg.console(), role, peer)
            .await
            .map_err(ChannelRefusal::ticket)?,
    };
    if matches!(leg, ClientLeg::Native) && admitted.grant.playback().is_some() {
        // A playback's ticket (`GET /playback/vv`): no session, no
        // hypervisor, but a channel that plays as long as its recording.
        let hold = sessions.admit_playback(peer).map_err(open_refusal)?;
        return Ok(AdmittedChannel::Playback(Box::new((mess, admitted, hold))));
    }
    let grant = &admitted.grant;
    let type_ok = match leg {
        ClientLeg::Native => grant.console == ConsoleType::SpiceDirect,
        ClientLeg::Browser { grant: carried } => {
            grant.console == ConsoleType::SpiceHtml5 && grant.jti == carried.jti
        }
    };
    if !type_ok {
        if role == ChannelRole::Opens {
            // The session never started: nothing may join it.
            sessions.tickets.end(&admitted.id).await;
        }
        return Err(ChannelRefusal::client(
            LinkError::PermissionDenied,
            "wrong_console_type",
            format!(
                "a {} ticket on the {} SPICE leg",
                grant.console,
                leg.label()
            ),
        ));
    }
    if grant.view_only() && carries_input(mess.channel_type) {
        return Err(ChannelRefusal::client(
            LinkError::ChannelNotAvailable,
            "view_only_channel",
            format!(
                "a view-only console has no {} channel",
                channel_name(mess.channel_type)
            ),
        ));
    }
    if !sessions
        .spice_upstreams
        .load()
        .permits(&grant.backend, mess.channel_type)
    {
        // The operator's policy for this backend network (no USB devices,
        // no shared folders...): the client keeps the channels it may have.
        return Err(ChannelRefusal::client(
            LinkError::ChannelNotAvailable,
            "channel_not_permitted",
            format!(
                "backend network {} permits no {} channel",
                grant.backend,
                channel_name(mess.channel_type)
            ),
        ));
    }
    if role == ChannelRole::Opens && grant.view_only() && spice_in_use(sessions, grant).await {
        sessions.tickets.end(&admitted.id).await;
        return Err(ChannelRefusal::client(
            LinkError::Error,
            "view_only_console_in_use",
            "spice-server serves one client: a view-only client would disconnect the console's user",
        ));
    }
    let admission = match role {
        ChannelRole::Opens => Admission::Opens,
        ChannelRole::Joins { .. } => Admission::Joins,
    };
    let guards = match sessions.admit(grant, admission, peer).await {
        Ok(g) => g,
        Err(e) => {
            if role == ChannelRole::Opens {
                sessions.tickets.end(&admitted.id).await;
            }
            return Err(open_refusal(e));
        }
    };
    let session = if role == ChannelRole::Opens {
        let key = Some(admitted.id.reference());
        let mut life = Lifecycle::begin(sessions, grant, grant.console, peer, key).await;
        life.hold(guards);
        ChannelSession::Owns(life)
    } else {
        match sessions.registry.by_key(&admitted.id.reference()).await {
            Some(live) => ChannelSession::Joins {
                stop: sessions.stop_joining(&live),
                live,
                guards,
            },
            None => {
                guards.release().await;
                return Err(ChannelRefusal::client(
                    LinkError::BadConnectionId,
                    "no_session",
                    "its session has ended",
                ));
            }
        }
    };
    Ok(AdmittedChannel::Console(Box::new((
        mess, admitted, session,
    ))))
}

/// A channel whose ticket admitted it.
enum AdmittedChannel {
    /// A console's channel, of its session (boxed: the larger by far).
    Console(Box<(LinkMess, Admitted, ChannelSession)>),
    /// A channel of a recording's playback to a native client.
    Playback(Box<(LinkMess, Admitted, SessionGuards)>),
}

/// A channel linked with its client.
enum Linked {
    /// To its hypervisor as well, ready to relay.
    Console(Channel),
    /// To a recording, ready to play; what it holds while it plays.
    Playback(LinkMess, Admitted, SessionGuards),
    /// To its hypervisor only: the client left, or the session stopped,
    /// after spice-server accepted the ticket. Its client is closed with
    /// the reason, then the channel ends as a relay that lost its client
    /// does ([`Channel::orphaned`]).
    Orphaned(Channel, CloseReason),
}

/// Whether a SPICE session runs on `grant`'s console now (on any node).
async fn spice_in_use(sessions: &Sessions, grant: &crate::token::Grant) -> bool {
    let on_it = crate::session::registry::Selector {
        target: Some(grant.target.address()),
        ..Default::default()
    };
    sessions.registry.list(&on_it).await.iter().any(|v| {
        [ConsoleType::SpiceHtml5, ConsoleType::SpiceDirect]
            .iter()
            .any(|c| c.as_str() == v.console)
    })
}

/// Whether a channel of this type may move input or data into the VM: a
/// view-only console gets only the channels that show it (main, display,
/// cursor, playback), never keys and pointer, a microphone, a smartcard,
/// USB devices, a shared folder, a guest port, a tunnel, or a type added
/// later.
fn carries_input(channel_type: u8) -> bool {
    !matches!(
        channel_type,
        channel::MAIN | channel::DISPLAY | channel::CURSOR | channel::PLAYBACK
    )
}

/// A browser channel that carries its token, not a ticket: Debian's
/// spice_auto.html (what Nova's spice-html5 URLs open) sends an empty SPICE
/// password, the WebSocket having carried the token. The main channel
/// exchanges the token for a ticket under its reuse policy and opens with
/// it, exactly as Porthole's own page does in two steps; a further channel
/// joins the session of that token the hypervisor named by its connection
/// id. The ticket store keeps that binding, so it holds on every node.
async fn admit_by_token(
    sessions: &Sessions,
    grant: &crate::token::Grant,
    role: ChannelRole,
    peer: IpAddr,
) -> Result<Admitted, ChannelRefusal> {
    match role {
        ChannelRole::Opens => {
            let (ticket, _) = sessions.exchange(grant, peer).await.map_err(open_refusal)?;
            sessions
                .admit_ticket(
                    ticket.expose().as_bytes(),
                    ConsoleType::SpiceHtml5,
                    role,
                    peer,
                )
                .await
                .map_err(ChannelRefusal::ticket)
        }
        ChannelRole::Joins { session_id } => sessions
            .admit_bound(&grant.jti, ConsoleType::SpiceHtml5, session_id, peer)
            .await
            .map_err(ChannelRefusal::ticket),
    }
}

/// Why the hypervisor leg did not end in a relay.
enum LinkCut {
    /// Refused, or failed, on either leg.
    Refused(ChannelRefusal),
    /// The session stopped first.
    Stopped(CloseReason),
    /// The client was gone when its link result was due.
    ClientLeft,
}

/// A hypervisor leg that did not end in a relay. `linked`: spice-server had
/// accepted the ticket, so its side of the channel exists and must not just
/// be closed (a display channel closed before it settled crashes QEMU 7.2,
/// see `protocol::spice::display_drain`; a port channel likewise,
/// [`PORT_SETTLE`]): the caller drains or holds it.
struct LinkFailed {
    cut: LinkCut,
    linked: Option<Kept<Conn>>,
}

impl From<ChannelRefusal> for LinkFailed {
    fn from(r: ChannelRefusal) -> Self {
        LinkFailed {
            cut: LinkCut::Refused(r),
            linked: None,
        }
    }
}

/// The hypervisor leg: connect (TLS or plain, escalating on NEED_SECURED),
/// link, authenticate; then the OK to the client. Returns the hypervisor
/// stream, its early bytes, and whether it is TLS.
///
/// `stop` cancels the leg only until the ticket goes: from then on
/// spice-server may link the channel, and one it linked is handed back in
/// [`LinkFailed::linked`] whatever ends the link (the client gone before
/// its OK, the session stopped), never dropped.
async fn link_upstream<S: Io>(
    sessions: &Sessions,
    client: &mut S,
    link: &mut ClientLink,
    mess: &LinkMess,
    admitted: &Admitted,
    stop: &Stop,
    deadline: Instant,
) -> Result<(Conn, Vec<u8>, bool), LinkFailed> {
    let grant = &admitted.grant;
    let upstream = sessions.spice_upstreams.load().get(&grant.backend);
    let tls_port = grant.target.tls_port.filter(|_| upstream.tls.is_some());
    let mut use_tls = tls_port.is_some() && !upstream.prefer_plain;
    loop {
        let port = match (use_tls, tls_port) {
            (true, Some(p)) => p,
            _ => grant.target.port,
        };
        let escalate = !use_tls && tls_port.is_some();
        let reaching = async {
            let tcp = sessions
                .connect(&grant.target.host, port, Some(deadline))
                .await
                .map_err(open_refusal)?;
            let tls = use_tls.then_some(&upstream);
            let mut stream = connect_upstream(tcp, tls, &grant.target.host, deadline).await?;
            let replied = hypervisor_reply(&mut stream, mess, escalate, deadline).await?;
            Ok::<_, ChannelRefusal>(replied.map(|(server, reply)| (stream, server, reply)))
        };
        let (mut stream, server, reply) = match stop.unless_stopped(reaching).await {
            Ok(Ok(Some(replied))) => replied,
            // NEED_SECURED on the plain port: again, on the TLS port.
            Ok(Ok(None)) => {
                use_tls = true;
                continue;
            }
            Ok(Err(r)) => return Err(r.into()),
            Err(reason) => {
                return Err(LinkFailed {
                    cut: LinkCut::Stopped(reason),
                    linked: None,
                });
            }
        };
        let up_early = hypervisor_ticket(&mut stream, server, &reply, &upstream, deadline).await?;
        // A stop that fired while the ticket was checked: the client is
        // not told OK for a channel that will not relay.
        let stopped = tokio::select! {
            biased;
            reason = stop.stopped() => Some(reason),
            () = std::future::ready(()) => None,
        };
        let cut = match stopped {
            Some(reason) => LinkCut::Stopped(reason),
            // Not raced against the stop: a result cut short and a refusal
            // after it would garble the client's stream. A stop from here
            // on is the relay's, which keeps the channel to drain it.
            None => match send(client, &link.result(LinkError::Ok), deadline).await {
                Ok(()) => return Ok((stream, up_early, use_tls)),
                Err(_) => LinkCut::ClientLeft,
            },
        };
        return Err(LinkFailed {
            cut,
            linked: Some(Kept {
                upstream: stream,
                unread: up_early,
            }),
        });
    }
}

/// The hypervisor connection as the link runs on it: TLS with the backend
/// network's CA when `tls` is given, else the plain socket.
async fn connect_upstream(
    tcp: TcpStream,
    tls: Option<&crate::hypervisor::SpiceUpstream>,
    host: &str,
    deadline: Instant,
) -> Result<Conn, ChannelRefusal> {
    let Some(upstream) = tls else {
        return Ok(Conn::Tcp(tcp));
    };
    let (Some(config), Some(name)) = (upstream.tls.clone(), upstream.server_name(host)) else {
        return Err(ChannelRefusal::backend(
            LinkError::Error,
            "hypervisor_tls",
            "no usable TLS name",
        ));
    };
    let connecting = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(tls)) => Ok(Conn::boxed(tls)),
        Ok(Err(e)) => Err(ChannelRefusal::backend(
            LinkError::Error,
            "hypervisor_tls",
            e.to_string(),
        )),
        Err(_) => Err(ChannelRefusal::from_upstream(DriveError::TimedOut)),
    }
}

/// Starts one channel's link to the hypervisor with the client's link
/// message (capabilities a proxy must not pass removed), up to the
/// hypervisor's reply. `Ok(None)`: the hypervisor wants TLS and `escalate`
/// allows it.
async fn hypervisor_reply(
    stream: &mut Conn,
    mess: &LinkMess,
    escalate: bool,
    deadline: Instant,
) -> Result<Option<(ServerLink, LinkReply)>, ChannelRefusal> {
    let up = LinkMess {
        caps: upstream_caps(mess),
        ..mess.clone()
    };
    let (mut server, hello) = ServerLink::start(up);
    send(stream, &hello, deadline)
        .await
        .map_err(hypervisor_io)?;
    let reply = match drive(&mut server, stream, deadline)
        .await
        .map_err(ChannelRefusal::from_upstream)?
    {
        ServerStep::Refused(code) if code == LinkError::NeedSecured as u32 && escalate => {
            return Ok(None);
        }
        ServerStep::Refused(code) => {
            // The client learns only that the console failed; the log says why.
            return Err(ChannelRefusal::backend(
                LinkError::Error,
                "hypervisor_refused_link",
                format!("link error {code}"),
            ));
        }
        ServerStep::Replied(reply) => *reply,
        ServerStep::Result(_) => unreachable!("a result comes after the ticket"),
    };
    if !framing_agrees(mess, server.sent(), &reply) {
        return Err(ChannelRefusal::backend(
            LinkError::Error,
            "framing_mismatch",
            "the hypervisor does not use mini headers",
        ));
    }
    Ok(Some((server, reply)))
}

/// Ends one channel's link to the hypervisor: the backend's ticket, then
/// the link result. Returns what the hypervisor sent past the result.
async fn hypervisor_ticket(
    stream: &mut Conn,
    mut server: ServerLink,
    reply: &LinkReply,
    upstream: &crate::hypervisor::SpiceUpstream,
    deadline: Instant,
) -> Result<Vec<u8>, ChannelRefusal> {
    let ciphertext = encrypt_ticket(
        &mut rand::rngs::OsRng,
        &reply.public_key,
        upstream.password.expose(),
    )
    .map_err(|e| ChannelRefusal::backend(LinkError::Error, "hypervisor_key", e.to_string()))?;
    send(stream, &server.ticket(&ciphertext), deadline)
        .await
        .map_err(hypervisor_io)?;
    // The ticket went: spice-server may link the channel, and one it
    // linked must be drained, not dropped. Its result is awaited past a
    // handshake deadline the client spent (a client can time its ticket to
    // that deadline's last moment), so that a linked channel is known.
    let result_by = deadline.max(Instant::now() + TICKET_RESULT_WAIT);
    match drive(&mut server, stream, result_by)
        .await
        .map_err(ChannelRefusal::from_upstream)?
    {
        ServerStep::Result(0) => Ok(server.into_leftover()),
        ServerStep::Result(code) => Err(ChannelRefusal::backend(
            LinkError::Error,
            "hypervisor_refused_ticket",
            format!("link result {code}: check the backend's spice password"),
        )),
        other => Err(ChannelRefusal::backend(
            LinkError::Error,
            "malformed_link_result",
            format!("{other:?}"),
        )),
    }
}

/// How long a hypervisor's link result is awaited once the ticket went,
/// whatever is left of the handshake deadline (spice-server answers in
/// milliseconds).
const TICKET_RESULT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn hypervisor_io(e: std::io::Error) -> ChannelRefusal {
    ChannelRefusal::backend(LinkError::Error, "hypervisor_io", e.to_string())
}

/// Writes a last word to a refused client. A native stream is then shut
/// (TLS close_notify); a browser's socket is left for the close frame that
/// carries the code its page shows.
async fn write_within<S: Io + ?Sized>(
    client: &mut S,
    bytes: &[u8],
    shut: bool,
) -> std::io::Result<()> {
    tokio::time::timeout(REFUSAL_DEADLINE, async {
        client.write_all(bytes).await?;
        client.flush().await?;
        if shut {
            client.shutdown().await?;
        }
        Ok(())
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
        TicketRefusal::Full | TicketRefusal::Unavailable => LinkError::Error,
        TicketRefusal::WrongConsoleType | TicketRefusal::Backoff => LinkError::PermissionDenied,
    }
}

/// A bounded label for a channel type.
pub fn channel_name(kind: u8) -> &'static str {
    channel::name(kind)
}
