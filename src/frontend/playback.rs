//! Playing recordings back in the console pages: `/playback?token=`
//! (asciinema-player for an asciicast, which reads `/playback/file`, or the
//! serial page with `&client=terminal`; the noVNC page for an FBS recording;
//! the spice-html5 page for a SPICE one; each page sees from its path that it
//! plays a recording) and their sockets `/playback/serial` (the recording's
//! output), `/playback/vnc` (an RFB server with no authentication whose
//! ServerInit and updates are the recording's) and `/playback/spice` (each
//! channel linked as a SPICE server would, then its records), at the speed
//! it was recorded. A playback's token (minted by
//! `POST /v1/recordings/{id}/playback`) names a recording and opens no
//! console: a playback never touches a hypervisor.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncBufReadExt as _;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::public::{origin_allowed, serve_page, switching_protocols, websocket_handshake};
use super::respond::open_error_response;
use super::respond::refuse;
use super::state::{ClientAddr, PublicState, TokenQuery};
use crate::recording::{Format, asciicast, fbs};
use crate::session::ws_relay::Closing;
use crate::transport::listener::AfterUpgrade;
use crate::transport::ws_bypass::ReadsUnframed;

/// The recording's file a playback's token names, or the refusal's status
/// and code.
fn recording_of(
    s: &PublicState,
    q: &TokenQuery,
) -> Result<(std::path::PathBuf, Format), (StatusCode, &'static str)> {
    let Some(token) = q.token() else {
        return Err((StatusCode::UNAUTHORIZED, "refused"));
    };
    let id = s.validator.playback_of(token).map_err(|r| {
        crate::session::lifecycle::token_refused(&r);
        (
            StatusCode::from_u16(r.reason.http_status()).unwrap_or(StatusCode::FORBIDDEN),
            r.reason.client_code(),
        )
    })?;
    let settings = s.sessions.recording.as_ref();
    settings
        .and_then(|r| r.path_of(&id))
        .ok_or((StatusCode::NOT_FOUND, "unavailable"))
}

/// `GET /playback?token=`: the page of the recording's console, playing it.
pub async fn page(State(s): State<PublicState>, Query(q): Query<TokenQuery>) -> Response {
    match recording_of(&s, &q) {
        Ok((_, Format::Asciicast)) => serve_page(&s, "serial.html", StatusCode::OK, "").await,
        Ok((_, Format::Fbs)) => serve_page(&s, "vnc.html", StatusCode::OK, "").await,
        Ok((_, Format::Spice)) => serve_page(&s, "spice.html", StatusCode::OK, "").await,
        Err((status, code)) => refuse(status, code),
    }
}

/// `GET /playback/vnc?token=`: an FBS recording to noVNC.
pub async fn vnc(
    State(s): State<PublicState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    request: Request,
) -> Response {
    upgrade_to_play(s, client, headers, q, request, Format::Fbs).await
}

/// `GET /playback/spice?token=`: one channel of a SPICE recording to
/// spice-html5 (a socket per channel, as for a console): Porthole links it
/// as a SPICE server would, then sends what that channel's server side
/// sent, at its recorded times.
pub async fn spice(
    State(s): State<PublicState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    request: Request,
) -> Response {
    upgrade_to_play(s, client, headers, q, request, Format::Spice).await
}

/// `GET /playback/serial?token=`: the recording's output over a WebSocket,
/// event by event at its recorded times; closed (1000) at its end.
pub async fn serial(
    State(s): State<PublicState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    request: Request,
) -> Response {
    upgrade_to_play(s, client, headers, q, request, Format::Asciicast).await
}

/// The playback socket of a recording in `format`.
async fn upgrade_to_play(
    s: PublicState,
    client: std::net::IpAddr,
    headers: HeaderMap,
    q: TokenQuery,
    mut request: Request,
    format: Format,
) -> Response {
    if let Err(why) = origin_allowed(&headers, &s.listen) {
        return refuse(why.reason().1, "refused");
    }
    let path = match recording_of(&s, &q) {
        Ok((p, f)) if f == format => p,
        Ok(_) => return refuse(StatusCode::BAD_REQUEST, "refused"),
        Err((status, code)) => return refuse(status, code),
    };
    let Some(handshake) = websocket_handshake(&headers) else {
        // The page's preflight: it would play.
        return (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "status": "ok" })),
        )
            .into_response();
    };
    let hold = match s.sessions.admit_playback(client) {
        Ok(hold) => hold,
        Err(e) => {
            crate::session::lifecycle::open_refused("playback", "playback", &e, client, None);
            return open_error_response(&e);
        }
    };
    let upgrade = hyper::upgrade::on(&mut request);
    let sessions = s.sessions.clone();
    let playback = s.sessions.tracker.track_future(async move {
        // Held while the socket plays.
        let _hold = hold;
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        // What a client sends a playback is read and left: small frames.
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 * 1024))
            .max_frame_size(Some(64 * 1024));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let pace = Pace::of(&sessions);
        let playing = async {
            match format {
                Format::Asciicast => play(socket, &path, &pace).await,
                Format::Fbs => play_rfb(socket, &path, &pace, sessions.limits.vnc_handshake).await,
                Format::Spice => play_spice(socket, &path, &sessions, &pace).await,
            }
        };
        tokio::select! {
            () = playing => {}
            () = sessions.cancel.cancelled() => {}
        }
    });
    // Played in the connection's own task once its HTTP is over, as a
    // console's session is (see `AfterUpgrade`); a router served without a
    // listener (a unit test's) has no connection task to run it in.
    match request.extensions().get::<AfterUpgrade>() {
        Some(after) => after.set(playback),
        None => drop(tokio::spawn(playback)),
    }
    switching_protocols(&handshake)
}

/// Sends the recording at `path` over `socket`; returns when it is over,
/// or the client left.
async fn play<S>(socket: WebSocketStream<S>, path: &std::path::Path, pace: &Pace)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ReadsUnframed,
{
    let (mut sink, mut stream) = socket.split();
    let Ok(file) = tokio::fs::File::open(path).await else {
        pace.send(&mut sink, close(1011, "recording unreadable"))
            .await;
        return closed(sink, stream).await;
    };
    let mut lines = tokio::io::BufReader::new(file).lines();
    let started = tokio::time::Instant::now();
    let playing = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let Some((at, text)) = asciicast::parse_output(&line) else {
                continue;
            };
            if !pace
                .wait(&mut sink, started + Duration::from_secs_f64(at))
                .await
                || !pace
                    .send(&mut sink, Message::binary(text.into_bytes()))
                    .await
            {
                return;
            }
        }
        pace.send(&mut sink, close(1000, "playback ended")).await;
    };
    until_played(playing, &mut stream, pace).await;
    closed(sink, stream).await;
}

/// Runs `playing` (which ends with its close frame) until it ends or the
/// client leaves; either way the socket is then to be [`closed`] (a client
/// that closed first gets tungstenite's answer to its close flushed there).
async fn until_played<St>(
    playing: impl std::future::Future<Output = ()>,
    stream: &mut St,
    pace: &Pace,
) where
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::select! {
        () = playing => {}
        () = client_left(stream, pace) => {}
    }
}

/// A socket whose close frame has gone (or the client's, or the client took
/// nothing for too long), whole again, [lingers](Closing::linger)
/// before it is dropped, as a console's does: noVNC asks for updates all
/// along, a socket closed over unread bytes is reset, and a reset can
/// overtake the close frame in the browser.
async fn closed<S>(
    sink: SplitSink<WebSocketStream<S>, Message>,
    stream: SplitStream<WebSocketStream<S>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ReadsUnframed,
{
    if let Ok(socket) = stream.reunite(sink) {
        Closing::sent(socket).linger().await;
    }
}

/// Returns when the client closes or its socket fails; what it sends
/// before is not for the recording and is dropped, but it shows the client
/// alive (a pong above all).
async fn client_left<St>(stream: &mut St, pace: &Pace)
where
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(m)) = stream.next().await {
        pace.heard();
        if m.is_close() {
            return;
        }
    }
}

/// Reads until `held` has `n` bytes from the client and takes them;
/// `false` when the client left first.
async fn client_bytes<St>(stream: &mut St, held: &mut Vec<u8>, n: usize) -> bool
where
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while held.len() < n {
        match stream.next().await {
            Some(Ok(Message::Binary(b))) => held.extend_from_slice(&b),
            Some(Ok(Message::Close(_)) | Err(_)) | None => return false,
            Some(Ok(_)) => {}
        }
    }
    held.drain(..n);
    true
}

/// Plays an FBS recording to an RFB client (noVNC): the handshake of a
/// server with no authentication, then the recorded stream (its first
/// bytes are the hypervisor's ServerInit) at its recorded times. What the
/// client asks is read and left: the recording answers nothing.
async fn play_rfb<S>(
    socket: WebSocketStream<S>,
    path: &std::path::Path,
    pace: &Pace,
    handshake: Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ReadsUnframed,
{
    use tokio::io::AsyncReadExt as _;
    let (mut sink, mut stream) = socket.split();
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        pace.send(&mut sink, close(1011, "recording unreadable"))
            .await;
        return closed(sink, stream).await;
    };
    let mut magic = [0u8; 12];
    if file.read_exact(&mut magic).await.is_err() || &magic != fbs::MAGIC {
        pace.send(&mut sink, close(1011, "not an FBS recording"))
            .await;
        return closed(sink, stream).await;
    }
    // RFB 3.8 with no authentication, each step what Porthole sends and
    // how many bytes the client answers: its version, its choice of
    // security type 1 (None) of the one offered, then ClientInit after
    // SecurityResult OK.
    let mut from_client = Vec::new();
    let steps: [(&[u8], usize); 3] = [(b"RFB 003.008\n", 12), (&[1, 1], 1), (&[0; 4], 1)];
    let handshake = tokio::time::timeout(handshake, async {
        for (say, answer) in steps {
            if !pace.send(&mut sink, Message::binary(say.to_vec())).await
                || !client_bytes(&mut stream, &mut from_client, answer).await
            {
                return false;
            }
        }
        true
    });
    if !matches!(handshake.await, Ok(true)) {
        return;
    }
    let started = tokio::time::Instant::now();
    let playing = async {
        let mut blocks = fbs::Blocks::default();
        let mut buf = vec![0u8; 64 * 1024];
        // The greeting blocks (an RFB 3.3 server's version and security
        // type) were this handshake's business.
        let mut greeting = 2;
        loop {
            while let Some((data, ms)) = blocks.next_block() {
                if greeting > 0 {
                    greeting -= 1;
                    continue;
                }
                if !pace
                    .wait(&mut sink, started + Duration::from_millis(u64::from(ms)))
                    .await
                    || !data.is_empty() && !pace.send(&mut sink, Message::binary(data)).await
                {
                    return;
                }
            }
            match file.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => blocks.feed(&buf[..n]),
            }
        }
        // noVNC clears its screen when its socket closes: the last frame
        // stays up while the viewer looks at it (an hour at most).
        if pace
            .wait(&mut sink, tokio::time::Instant::now() + PLAYED_KEPT)
            .await
        {
            pace.send(&mut sink, close(1000, "playback ended")).await;
        }
    };
    until_played(playing, &mut stream, pace).await;
    closed(sink, stream).await;
}

/// Plays one channel of a SPICE recording: the link (the channel the
/// client asks for), then that channel's records from its link on, each
/// at its time after the link; what the client sends (ACKs, pongs, input)
/// is read and left. A channel the recording does not hold stays linked
/// and silent.
async fn play_spice<S>(
    socket: WebSocketStream<S>,
    path: &std::path::Path,
    sessions: &crate::session::Sessions,
    pace: &Pace,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + ReadsUnframed,
{
    use crate::protocol::spice::messages::common_cap;
    use crate::recording::spice::{ChannelOf, ChannelReader};
    let mut client = crate::transport::ws_stream::WsBytes::new(socket);
    let deadline = tokio::time::Instant::now() + sessions.limits.spice_handshake;
    let linked = crate::session::spice::link_playback(sessions, &mut client, deadline).await;
    let (socket, _) = client.into_inner();
    let (mut sink, mut stream) = socket.split();
    let Some(mess) = linked else {
        return;
    };
    let wanted = ChannelOf {
        kind: mess.channel_type,
        id: mess.channel_id,
    };
    let mini_header = mess.caps.has_common(common_cap::MINI_HEADER);
    let mut reader = match ChannelReader::open(path, wanted, mini_header).await {
        Ok(r) => r,
        Err(why) => {
            pace.send(&mut sink, close(1011, why)).await;
            return closed(sink, stream).await;
        }
    };
    let started = tokio::time::Instant::now();
    let playing = async {
        loop {
            match reader.next().await {
                Ok(Some((after, bytes))) => {
                    if !pace.wait(&mut sink, started + after).await
                        || !pace.send(&mut sink, Message::binary(bytes)).await
                    {
                        return;
                    }
                }
                Ok(None) => break,
                Err(why) => {
                    tracing::warn!(recording = %path.display(), "playback stopped: {why}");
                    pace.send(&mut sink, close(1011, why)).await;
                    return;
                }
            }
        }
        // spice-html5 clears its screen when its sockets close: the last
        // frame stays up while the viewer looks at it.
        if pace
            .wait(&mut sink, tokio::time::Instant::now() + PLAYED_KEPT)
            .await
        {
            pace.send(&mut sink, close(1000, "playback ended")).await;
        }
    };
    until_played(playing, &mut stream, pace).await;
    closed(sink, stream).await;
}

/// `GET /playback/vv?token=`: a SPICE recording for a native client
/// (remote-viewer, spicy): a `.vv` (or JSON, `?format=json`) whose ticket,
/// on Porthole's SPICE TLS listener, plays the recording instead of
/// opening a console ([`crate::session::spice::serve_native`]).
pub async fn vv(
    State(s): State<PublicState>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    Query(f): Query<super::spice::FormatQuery>,
) -> Response {
    match recording_of(&s, &q) {
        Ok((_, Format::Spice)) => {}
        Ok(_) => return refuse(StatusCode::BAD_REQUEST, "refused"),
        Err((status, code)) => return refuse(status, code),
    }
    let Some(d) = s.spice.clone().filter(|d| d.tls_port.is_some()) else {
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    };
    let Some(grant) = q.token().and_then(|t| s.validator.playback_grant(t).ok()) else {
        return refuse(StatusCode::UNAUTHORIZED, "refused");
    };
    match s.sessions.playback_ticket(&grant).await {
        Ok((ticket, expires_at)) => super::spice::connection_details(
            &d,
            &headers,
            &f,
            &grant.instance,
            ticket.expose(),
            expires_at,
        ),
        Err(e) => super::respond::open_error_response(&e),
    }
}

/// How long a played RFB recording's last frame stays on the viewer's page.
const PLAYED_KEPT: Duration = Duration::from_secs(3600);

/// How a playback keeps its client honest, as the relays do theirs: a
/// client that takes nothing for three ping intervals (a minute with pings
/// off) is cut, and while the recording has nothing to send (between its
/// events, and the hour its last frame stays up) it is pinged every
/// interval and cut when it has answered nothing for three. A client that
/// stopped reading, or vanished without a word, would otherwise hold its
/// task, socket and slot until the recording's end, and past it.
struct Pace {
    cut: Duration,
    ping: Option<Duration>,
    origin: tokio::time::Instant,
    /// When the client last sent anything, in ns since `origin`.
    heard: AtomicU64,
    /// When the oldest ping it has not answered yet went, in ns since
    /// `origin` (0: none), over every wait of the playback.
    owed: AtomicU64,
}

impl Pace {
    fn of(sessions: &crate::session::Sessions) -> Self {
        Self::with_ping(sessions.browser.ping_interval)
    }

    fn with_ping(ping: Option<Duration>) -> Self {
        Self {
            cut: ping.map_or(Duration::from_secs(60), |p| p * 3),
            ping,
            origin: tokio::time::Instant::now(),
            heard: AtomicU64::new(0),
            owed: AtomicU64::new(0),
        }
    }

    fn since_origin(&self, at: tokio::time::Instant) -> u64 {
        u64::try_from((at - self.origin).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The client sent something.
    fn heard(&self) {
        let ns = self.since_origin(tokio::time::Instant::now());
        self.heard.store(ns, Relaxed);
    }

    fn heard_at(&self) -> tokio::time::Instant {
        self.origin + Duration::from_nanos(self.heard.load(Relaxed))
    }

    /// Sends `m` within the cut; `false` when it did not go.
    async fn send<S>(&self, sink: &mut S, m: Message) -> bool
    where
        S: futures_util::Sink<Message> + Unpin,
    {
        matches!(
            tokio::time::timeout(self.cut, sink.send(m)).await,
            Ok(Ok(()))
        )
    }

    /// Waits until `at`, pinging the client each interval meanwhile;
    /// `false` once it has sent nothing for three intervals since a ping it
    /// owes an answer to, or a ping did not go.
    async fn wait<S>(&self, sink: &mut S, at: tokio::time::Instant) -> bool
    where
        S: futures_util::Sink<Message> + Unpin,
    {
        let Some(ping) = self.ping else {
            tokio::time::sleep_until(at).await;
            return true;
        };
        loop {
            let next = tokio::time::Instant::now() + ping;
            if next >= at {
                tokio::time::sleep_until(at).await;
                return true;
            }
            tokio::time::sleep_until(next).await;
            let now = tokio::time::Instant::now();
            let owed = self.owed.load(Relaxed);
            if owed != 0 {
                let since = self.origin + Duration::from_nanos(owed);
                if self.heard_at() > since {
                    self.owed.store(0, Relaxed);
                } else if now - since > ping * 3 {
                    return false;
                }
            }
            if !self.send(sink, Message::Ping(Default::default())).await {
                return false;
            }
            // Stamped once it went: a send that waited is not the client's
            // silence.
            if self.owed.load(Relaxed) == 0 {
                self.owed
                    .store(self.since_origin(tokio::time::Instant::now()), Relaxed);
            }
        }
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

// ------------------------------------------------ the web player, the file

/// Where `npm ci` in the web root puts asciinema-player's browser bundle
/// (`asciinema-player.min.js`, `asciinema-player.css`), served at
/// `/vendor/asciinema-player`.
pub const PLAYER_DIR: &str = "node_modules/asciinema-player/dist/bundle";

/// `?client=`: which page plays an asciicast.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ClientQuery {
    client: Option<String>,
}

/// `GET /playback?token=[&client=terminal]`: an asciicast plays in
/// asciinema-player (`cast.html`: pause, seek, speed), or with
/// `client=terminal` in the serial page at its recorded speed; any other
/// recording in its console's page ([`page`]).
pub async fn page_or_player(
    State(s): State<PublicState>,
    Query(q): Query<TokenQuery>,
    Query(c): Query<ClientQuery>,
) -> Response {
    match recording_of(&s, &q) {
        Ok((_, Format::Asciicast)) if c.client.as_deref() != Some("terminal") => {
            // asciinema-player's terminal is WebAssembly: compiling it needs
            // 'wasm-unsafe-eval' (which allows no JavaScript eval).
            super::public::serve_page_with_scripts(&s, "cast.html", "'self' 'wasm-unsafe-eval'")
                .await
        }
        Ok(_) => page(State(s), Query(q)).await,
        Err((status, code)) => refuse(status, code),
    }
}

/// `GET /playback/file?token=`: the recording's file as written (what
/// asciinema-player loads), under the same token checks as the other
/// playback routes.
pub async fn file(State(s): State<PublicState>, Query(q): Query<TokenQuery>) -> Response {
    let (path, format) = match recording_of(&s, &q) {
        Ok(r) => r,
        Err((status, code)) => return refuse(status, code),
    };
    match recording_file(&path, format).await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!("recording {} unreadable: {e}", path.display());
            refuse(StatusCode::NOT_FOUND, "unavailable")
        }
    }
}

/// The file at `path` (a recording in `format`, named by its id) as a
/// download: its size when opened (a recording still being written is
/// sent as far as it was then), never cached.
pub(super) async fn recording_file(
    path: &std::path::Path,
    format: Format,
) -> std::io::Result<Response> {
    use axum::http::header;
    use tokio::io::AsyncReadExt as _;
    let file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("recording");
    let kind = if format == Format::Asciicast {
        "application/x-asciicast"
    } else {
        "application/octet-stream"
    };
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file.take(len)));
    Ok((
        [
            (header::CONTENT_TYPE, kind.to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
            // The name is the recording's id (letters, digits, - and _)
            // and its extension: nothing to quote.
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// A client that reads but never answers, between events two ping
    /// intervals apart: its unanswered ping is remembered from one wait to
    /// the next, and it is cut three intervals after the first.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_no_ping_is_cut_across_waits() {
        let pace = Pace::with_ping(Some(Duration::from_secs(1)));
        let mut sink = futures_util::sink::drain();
        let start = Instant::now();
        let mut at = start;
        loop {
            at += Duration::from_secs(2);
            if !pace.wait(&mut sink, at).await {
                break;
            }
            assert!(at - start < Duration::from_secs(10), "never cut");
        }
        // First ping at 1 s, cut at the check after 4 s.
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
    }

    /// A client that answers for ten seconds, then falls silent: kept
    /// while it answers, cut within four intervals of its silence.
    #[tokio::test(start_paused = true)]
    async fn a_client_is_kept_while_it_answers_and_cut_once_it_stops() {
        let pace = Pace::with_ping(Some(Duration::from_secs(1)));
        let mut sink = futures_util::sink::drain();
        let start = Instant::now();
        let silent_from = start + Duration::from_secs(10);
        let answer = async {
            while Instant::now() < silent_from {
                tokio::time::sleep(Duration::from_millis(300)).await;
                pace.heard();
            }
            std::future::pending::<()>().await;
        };
        let waits = async {
            let mut at = start;
            loop {
                at += Duration::from_secs(2);
                if !pace.wait(&mut sink, at).await {
                    return Instant::now();
                }
            }
        };
        let cut_at = tokio::select! {
            at = waits => at,
            () = answer => unreachable!(),
        };
        assert!(cut_at > silent_from, "cut while it answered");
        assert!(
            cut_at <= silent_from + Duration::from_secs(5),
            "{:?}",
            cut_at - start
        );
    }
}
