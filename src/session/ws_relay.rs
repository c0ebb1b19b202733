//! The WebSocket relay: every browser console (noVNC, serial, spice-html5)
//! after its handshake. Binary messages one way, bytes the other.
//!
//! Backpressure both ways: bytes are read from the hypervisor only after the
//! previous burst was handed to the WebSocket (at most `write_buffer_bytes`
//! plus one chunk queued before the relay waits for the client), and client
//! messages are written to the hypervisor before the next one is read. So a
//! session's memory stays bounded whatever either peer does, and a
//! hypervisor flooding a slow client is slowed to the client's pace.
//!
//! Binary payloads bypass tungstenite both ways
//! ([`crate::transport::ws_bypass`]): a burst from the hypervisor is framed
//! here and written from the buffers it was read into, and a client's
//! payloads come unmasked in the buffer they were read into, while
//! tungstenite keeps the protocol (headers, pings, closes). So an idle
//! session holds no buffer, whatever it carried before: a hypervisor read
//! buffer is taken only when its socket is readable and freed once written,
//! and tungstenite's buffers never grow.
//!
//! A client is alive while it drains what it is sent: a write that had to
//! wait going through again, or a pong that answers our latest ping (its
//! payload is random), shows it. A client that owes us a read (a write
//! waiting for it, or a ping unanswered) and shows no life for three ping
//! intervals is cut (`client_unresponsive`), however many frames it sends:
//! a slow reader that keeps draining is never cut, however late its pongs.
//!
//! The relay ends on the first of: the client leaving, the hypervisor closing,
//! an I/O error, the inspector's verdict, the idle timeout, an unresponsive
//! client, the token's expiry (if asked), or the session's stop
//! (terminate, shutdown, maximum age). It then sends a close frame whose code
//! and reason the console page shows (under a short deadline: a client that
//! does not read cannot hold the task) and half-closes the hypervisor socket.
//! The client's socket then [lingers](Closing::linger) while the session
//! ends: a socket closed over bytes the client sent and Porthole never read
//! is reset, and a reset can overtake the close frame in the client (a
//! browser then reports 1006, "Disconnected.", not why the console closed).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use super::registry::ByteCounters;
use super::{ClientTap, CloseReason, Early, Inspect, Kept, Stop, Traffic};
use crate::transport::conn::{Conn, ConnReader, ConnWriter, PIECES_PER_WRITE};
use crate::transport::drain_watch::{DrainWatch, Drains};
use crate::transport::ws_bypass::{Bypassed, Bypasses, Payload, ReadsUnframed};

/// Timers and limits of one WebSocket relay.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// Send a WebSocket ping this often, so intermediaries keep quiet
    /// sessions; a client that owes a read and shows no life for three
    /// intervals is cut.
    pub ping_interval: Option<Duration>,
    /// End the session after this long with no byte either way.
    pub idle_timeout: Option<Duration>,
    /// End the session at this instant (token expiry), if set.
    pub hard_end: Option<Instant>,
    /// Largest chunk read from the hypervisor into one message (reads
    /// start smaller and grow while the hypervisor keeps its socket full).
    pub chunk_bytes: usize,
    /// Bytes queued toward the client before the relay waits for them to
    /// be written.
    pub write_buffer_bytes: usize,
}

/// How long a close frame may take to go out.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// How long a client has to answer our close frame (with its own, or by
/// closing its side) before the connection goes anyway. A browser answers
/// within a round trip.
const LINGER: Duration = Duration::from_secs(2);

/// Most bytes read from the hypervisor in one burst before the relay looks
/// at its timers again: enough to batch the messages one burst of console
/// output makes, small enough to keep latency low.
const FLUSH_AFTER: usize = 256 * 1024;

/// A burst's first hypervisor buffer; the next is twice as large after a
/// read that filled one, up to [`RelayOptions::chunk_bytes`].
const FIRST_READ: usize = 64 * 1024;

/// A hypervisor read goes into what is left of the burst's buffer while at
/// least this much is (its messages share the buffer); a new one is taken
/// below that.
const MIN_READ: usize = 16 * 1024;

/// What one relay has moved and heard, beside the session's counters.
struct Meter<'a> {
    /// The session's (all its connections').
    session: &'a ByteCounters,
    /// This connection's.
    up: AtomicU64,
    down: AtomicU64,
    origin: Instant,
    /// The payload of our unanswered ping (zero: none).
    ping: AtomicU64,
    /// Milliseconds after `origin` that ping went out.
    ping_sent: AtomicU64,
    /// Milliseconds after `origin` (plus one; zero: never) a pong answered it.
    answered: AtomicU64,
}

impl Meter<'_> {
    fn moved_up(&self, n: usize) {
        self.up.fetch_add(n as u64, Relaxed);
        self.session.up.fetch_add(n as u64, Relaxed);
        self.session.touch();
    }

    fn moved_down(&self, n: usize) {
        self.down.fetch_add(n as u64, Relaxed);
        self.session.down.fetch_add(n as u64, Relaxed);
        self.session.touch();
    }

    fn millis(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// A ping's payload if none is unanswered: one owed pong at a time.
    fn next_ping(&self) -> Option<u64> {
        if self.ping.load(Relaxed) != 0 {
            return None;
        }
        let payload = rand::random::<u64>() | 1;
        self.ping_sent.store(self.millis(), Relaxed);
        self.ping.store(payload, Relaxed);
        Some(payload)
    }

    /// A pong arrived: it shows life only if it answers our ping.
    fn pong(&self, data: &[u8]) {
        let ours = self.ping.load(Relaxed);
        if ours != 0 && data == ours.to_be_bytes() {
            self.ping.store(0, Relaxed);
            self.answered.store(self.millis() + 1, Relaxed);
        }
    }

    /// Since when our ping has been unanswered.
    fn ping_owed_since(&self) -> Option<Instant> {
        (self.ping.load(Relaxed) != 0)
            .then(|| self.origin + Duration::from_millis(self.ping_sent.load(Relaxed)))
    }

    fn answered_at(&self) -> Option<Instant> {
        let at = self.answered.load(Relaxed);
        (at != 0).then(|| self.origin + Duration::from_millis(at - 1))
    }
}

/// Returns once the client owes us a read (a write waits for it, or our
/// ping is unanswered) and has shown no life (drained a waiting write,
/// answered our ping) for `limit` since it began to owe.
async fn unresponsive(meter: &Meter<'_>, watch: &DrainWatch, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let owed = [watch.stalled_since(), meter.ping_owed_since()]
            .into_iter()
            .flatten()
            .min();
        let life = [watch.drained_at(), meter.answered_at()]
            .into_iter()
            .flatten()
            .max();
        let next = match owed {
            // Nothing owed: look again when the next ping may have gone out.
            None => Instant::now() + limit / 3,
            Some(owed) => {
                let cut_at = life.map_or(owed, |l| l.max(owed)) + limit;
                if Instant::now() >= cut_at {
                    return;
                }
                cut_at
            }
        };
        tokio::time::sleep_until(next).await;
    }
}

/// How a relay ended.
pub struct Relayed<S> {
    /// Why.
    pub reason: CloseReason,
    /// This connection's bytes.
    pub traffic: Traffic,
    /// The hypervisor connection, open, when the inspector keeps it for
    /// the end reason.
    pub kept: Option<Kept<Conn>>,
    /// The client's socket, its close frame sent (or the client's answered).
    pub client: Closing<S>,
}

/// A client's socket whose close frame has gone: to be [lingered
/// on](Closing::linger) while the session ends, then dropped.
#[must_use = "a socket dropped without its linger is reset over unread bytes"]
pub struct Closing<S> {
    socket: WebSocketStream<S>,
}

impl<S> Closing<S>
where
    S: AsyncRead + AsyncWrite + Unpin + ReadsUnframed,
{
    /// `socket`, whose owner has sent its close frame (a playback's end).
    pub fn sent(socket: WebSocketStream<S>) -> Self {
        Closing { socket }
    }

    /// Lets the client answer the close frame before the connection goes
    /// (RFC 6455 §7.1.1: the client's close, then the server closes TCP).
    /// The close frame is followed by our FIN, and whatever the client still
    /// sends (noVNC's update requests, the rest of a paste that broke a
    /// limit, its close) is read under the frames and dropped until its FIN
    /// (a browser closes once it has our close and our FIN) or `LINGER`.
    /// Without this the socket would be closed over unread bytes, and a
    /// reset sent in place of a FIN. Nothing is written from here on (no
    /// pong), and what is read costs one small buffer for these 2 s.
    pub async fn linger(self) {
        let Closing { mut socket } = self;
        let _ = tokio::time::timeout(LINGER, async {
            // Errors are the client's leaving: the reads below see it too.
            let _ = socket.flush().await;
            let _ = tokio::io::AsyncWriteExt::shutdown(socket.get_mut()).await;
            let mut dropped = vec![0u8; 4096];
            loop {
                let mut buf = tokio::io::ReadBuf::new(&mut dropped);
                let read =
                    std::future::poll_fn(|cx| socket.get_mut().poll_read_unframed(cx, &mut buf))
                        .await;
                if read.is_err() || buf.filled().is_empty() {
                    return;
                }
            }
        })
        .await;
    }
}

/// Relays until one side ends; returns why, this connection's bytes and
/// the client's socket, closing. The early bytes go first (`early.up` to
/// the hypervisor, `early.down`, inspected, to the client); `inspect` sees
/// every chunk from the hypervisor before the client does (and its client
/// tap every client chunk). Bytes are added to `counters` (the session's)
/// as they move. The hypervisor connection comes back, open, when the
/// inspector keeps it for the end reason.
pub async fn relay<S, I>(
    socket: WebSocketStream<S>,
    backend: Conn,
    early: Early,
    mut inspect: I,
    opts: RelayOptions,
    stop: Stop,
    counters: &ByteCounters,
) -> Relayed<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Drains + Bypasses,
    I: Inspect,
{
    let watch = socket.get_ref().drain_watch().clone();
    let bypassed = socket.get_ref().bypassed().clone();
    bypassed.start();
    let (mut sink, mut stream) = socket.split();
    let (mut from_backend, mut to_backend) = backend.split();
    let tap = inspect.client_tap();
    // Shared by the futures below, which run in this one task; atomics only
    // because the task must be Send.
    let meter = Meter {
        session: counters,
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        origin: Instant::now(),
        ping: AtomicU64::new(0),
        ping_sent: AtomicU64::new(0),
        answered: AtomicU64::new(0),
    };
    let reason = {
        let up = client_to_backend(
            &mut stream,
            &bypassed,
            &mut to_backend,
            early.up,
            tap,
            &meter,
        );
        let down = backend_to_client(
            &mut sink,
            &bypassed,
            &mut from_backend,
            early.down,
            &mut inspect,
            &opts,
            &meter,
        );
        // Idle is the session's: a spice-html5 channel that is quiet while
        // its display moves is not idle.
        let idle = async {
            counters.silent_for(opts.idle_timeout).await;
            CloseReason::IdleTimeout
        };
        // A client that stopped draining is gone (a dead NAT entry, a
        // suspended laptop, or a client holding the console): end the
        // session rather than hold it.
        let unresponsive = async {
            unresponsive(&meter, &watch, opts.ping_interval.map(|p| p * 3)).await;
            CloseReason::ClientUnresponsive
        };
        let expiry = async {
            match opts.hard_end {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = up => r,
            r = down => r,
            r = idle => r,
            r = unresponsive => r,
            _ = expiry => CloseReason::TokenExpired,
            r = stop.stopped() => r,
        }
    };
    if reason != CloseReason::ClientLeft {
        let _ = tokio::time::timeout(CLOSE_DEADLINE, sink.send(close_message(reason))).await;
    } else {
        // A client's close frame is answered (RFC 6455 §5.5.1): tungstenite
        // queued the echo, or 1002 for a code no endpoint may send, when
        // it read the frame; only a flush puts it on the wire.
        let _ = tokio::time::timeout(CLOSE_DEADLINE, sink.flush()).await;
    }
    let kept = if inspect.keeps_upstream(reason) {
        from_backend
            .reunite(to_backend)
            .map(|(upstream, unread)| Kept { upstream, unread })
    } else {
        let _ = tokio::time::timeout(CLOSE_DEADLINE, to_backend.shutdown()).await;
        None
    };
    let traffic = Traffic {
        up: meter.up.into_inner(),
        down: meter.down.into_inner(),
    };
    let socket = sink.reunite(stream).expect("the two halves of one socket");
    Relayed {
        reason,
        traffic,
        kept,
        client: Closing { socket },
    }
}

/// Client messages to the hypervisor, the early bytes first. Messages that
/// are already decoded when one arrives go in the same write: one system
/// call per burst, not per message; the batch exists only during the burst,
/// and a burst of one message is written from its own bytes, uncopied.
/// A binary message's payload comes from `bypassed` (tungstenite yields it
/// empty) unless it came before the bypass started.
async fn client_to_backend<St>(
    mut stream: St,
    bypassed: &Bypassed,
    to_backend: &mut ConnWriter,
    early: Vec<u8>,
    tap: Option<ClientTap>,
    meter: &Meter<'_>,
) -> CloseReason
where
    St: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    if !early.is_empty() {
        let len = early.len();
        if let Err(reason) = pass_on(to_backend, tap.as_ref(), &[early.into()]).await {
            return reason;
        }
        meter.moved_up(len);
    }
    let mut batch = Batch::default();
    while let Some(msg) = stream.next().await {
        let mut next = Some(msg);
        while let Some(msg) = next.take() {
            match msg {
                Ok(Message::Binary(data)) if data.is_empty() => {
                    if let Some(payload) = bypassed.take_message() {
                        meter.moved_up(payload.len());
                        batch.push(payload);
                    }
                }
                Ok(Message::Binary(data)) => {
                    meter.moved_up(data.len());
                    batch.push(data.into());
                }
                // Keepalive frames are not console activity: they do not
                // hold off the idle timeout. Only a pong to our ping shows
                // the client reads.
                Ok(Message::Pong(data)) => meter.pong(&data),
                Ok(Message::Ping(_) | Message::Frame(_)) => {}
                Ok(Message::Text(_)) => return CloseReason::ProtocolError,
                Ok(Message::Close(Some(frame))) if !frame.code.is_allowed() => {
                    return CloseReason::WebSocketProtocol;
                }
                Ok(Message::Close(_)) => return CloseReason::ClientLeft,
                Err(e) => return read_error(&e),
            }
            if !batch.full() {
                next = stream.next().now_or_never().flatten();
            }
        }
        let going = std::mem::take(&mut batch).into_pieces();
        if !going.is_empty()
            && let Err(reason) = pass_on(to_backend, tap.as_ref(), &going).await
        {
            return reason;
        }
    }
    CloseReason::ClientLeft
}

/// Payloads shorter than this are copied together in a burst; longer ones
/// are written from the buffers they were read into.
const COPY_BELOW: usize = 2 * 1024;

/// A burst of client messages, written with one vectored write: payloads
/// from the buffers they were read into, short ones copied together.
#[derive(Default)]
struct Batch {
    /// In order.
    pieces: Vec<Bytes>,
    /// Short payloads since the last piece, to go after it.
    short: BytesMut,
    len: usize,
}

impl Batch {
    fn push(&mut self, payload: Payload) {
        match payload {
            Payload::One(one) => self.push_piece(one),
            Payload::Pieces(pieces) => pieces.into_iter().for_each(|p| self.push_piece(p)),
        }
    }

    fn push_piece(&mut self, piece: Bytes) {
        self.len += piece.len();
        if piece.len() < COPY_BELOW {
            self.short.extend_from_slice(&piece);
        } else {
            self.end_short();
            self.pieces.push(piece);
        }
    }

    fn end_short(&mut self) {
        if !self.short.is_empty() {
            self.pieces.push(self.short.split().freeze());
        }
    }

    /// Enough for one write.
    fn full(&self) -> bool {
        self.len >= FLUSH_AFTER || self.pieces.len() + 1 >= PIECES_PER_WRITE
    }

    fn into_pieces(mut self) -> Vec<Bytes> {
        self.end_short();
        self.pieces
    }
}

/// Writes client bytes (`pieces`, in order) to the hypervisor, or what the
/// tap lets through of them; a refused message after those ends the
/// client's side.
async fn pass_on(
    to_backend: &mut ConnWriter,
    tap: Option<&ClientTap>,
    pieces: &[Bytes],
) -> Result<(), CloseReason> {
    let Some(tap) = tap else {
        return to_backend
            .write_all_pieces(pieces)
            .await
            .map_err(|_| CloseReason::BackendError);
    };
    // The tap reads a burst as one run of bytes.
    let joined;
    let bytes = match pieces {
        [one] => &one[..],
        _ => {
            joined = pieces.concat();
            &joined[..]
        }
    };
    let checked = tap(bytes);
    if to_backend.write_all(&checked.forward).await.is_err() {
        return Err(CloseReason::BackendError);
    }
    match checked.refused {
        Some(_) => Err(CloseReason::ProtocolError),
        None => Ok(()),
    }
}

/// Hypervisor bytes to the client as binary messages (queued on
/// `bypassed`, written by the sink's flush), the early bytes first, every
/// chunk inspected before it goes; pings on a timer.
async fn backend_to_client<Si, I>(
    sink: &mut Si,
    bypassed: &Bypassed,
    from_backend: &mut ConnReader,
    early: Vec<u8>,
    inspect: &mut I,
    opts: &RelayOptions,
    meter: &Meter<'_>,
) -> CloseReason
where
    Si: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
    I: Inspect,
{
    if !early.is_empty() {
        if let Err(reason) = inspect.inspect(&early).await {
            return reason;
        }
        let n = early.len();
        bypassed.push_binary(Bytes::from(early));
        if let Err(e) = sink.flush().await {
            return send_error(&e);
        }
        meter.moved_down(n);
    }
    let mut ping = opts
        .ping_interval
        .map(|p| tokio::time::interval_at(Instant::now() + p, p));
    loop {
        tokio::select! {
            ready = from_backend.ready() => {
                if ready.is_err() {
                    return CloseReason::BackendError;
                }
                if let Err(reason) = drain(sink, bypassed, from_backend, inspect, opts, meter).await {
                    return reason;
                }
            }
            _ = tick(&mut ping) => {
                let Some(payload) = meter.next_ping() else { continue };
                let ping = Message::Ping(Bytes::copy_from_slice(&payload.to_be_bytes()));
                if sink.send(ping).await.is_err() {
                    return CloseReason::ClientLeft;
                }
            }
        }
    }
}

/// Drains what the hypervisor has ready into messages, then flushes once:
/// one burst of output, few system calls. The burst's messages are cut from
/// shared buffers and written from them; each buffer is freed once its
/// messages are out, so nothing outlives the burst.
async fn drain<Si, I>(
    sink: &mut Si,
    bypassed: &Bypassed,
    from_backend: &mut ConnReader,
    inspect: &mut I,
    opts: &RelayOptions,
    meter: &Meter<'_>,
) -> Result<(), CloseReason>
where
    Si: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
    I: Inspect,
{
    let mut queued = 0;
    let mut buf = BytesMut::new();
    let mut size = FIRST_READ.min(opts.chunk_bytes);
    let emptied = from_backend.short_read_empties();
    loop {
        if buf.capacity() < MIN_READ.min(size) {
            buf = BytesMut::with_capacity(size);
        }
        let room = buf.capacity() - buf.len();
        match from_backend.try_read_buf(&mut buf) {
            Ok(0) => {
                let _ = sink.flush().await;
                return Err(CloseReason::BackendClosed);
            }
            Ok(n) => {
                if n == room {
                    // More is waiting: fewer, larger reads (and messages).
                    size = (size * 2).min(opts.chunk_bytes);
                }
                let chunk = buf.split().freeze();
                inspect.inspect(&chunk).await?;
                meter.moved_down(n);
                queued += n;
                bypassed.push_binary(chunk);
                // The socket takes what it can; the relay waits for the
                // client past the write buffer.
                if bypassed.queued() > opts.write_buffer_bytes {
                    sink.flush().await.map_err(|e| send_error(&e))?;
                }
                // A read short of its room emptied a plain socket: the
                // burst goes out now, and the next read (after the flush,
                // when more may have come) finds out whether it is still
                // empty, not one made at once, which would only say so.
                if queued >= FLUSH_AFTER || (n < room && emptied) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return Err(CloseReason::BackendError),
        }
    }
    sink.flush().await.map_err(|e| send_error(&e))
}

/// Sends the close frame for `reason` to a socket that never reached the
/// relay (a failed or stopped handshake), under the close deadline; the
/// socket is then to be lingered on.
pub async fn close<S>(mut socket: WebSocketStream<S>, reason: CloseReason) -> Closing<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_DEADLINE, socket.send(close_message(reason))).await;
    Closing { socket }
}

fn close_message(reason: CloseReason) -> Message {
    let (code, text) = close_frame(reason);
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: text.into(),
    }))
}

async fn tick(ping: &mut Option<tokio::time::Interval>) {
    match ping {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The close code and reason a page shows. 4000-4999 are ours (RFC 6455 §7.4.2).
pub fn close_frame(reason: CloseReason) -> (u16, &'static str) {
    match reason {
        CloseReason::ClientLeft => (1000, "client left"),
        CloseReason::BackendClosed => (4000, "console closed by the hypervisor"),
        CloseReason::BackendError => (1011, "console connection failed"),
        CloseReason::TokenExpired => (4001, "console token expired"),
        CloseReason::IdleTimeout => (4002, "idle timeout"),
        CloseReason::LimitHit => (1009, "message too large or client too slow"),
        CloseReason::ProtocolError => (
            1003,
            "protocol error: binary frames of the console's protocol only",
        ),
        CloseReason::Shutdown => (1001, "gateway shutting down"),
        CloseReason::Terminated => (4003, "session terminated by an operator"),
        CloseReason::MaxAge => (4004, "maximum session age reached"),
        CloseReason::ClientUnresponsive => (4005, "client unresponsive"),
        CloseReason::TakenOver => (4006, "taken over by a newer connection"),
        CloseReason::RecordingStopped => (4007, "the console must be recorded and cannot be"),
        CloseReason::SessionEnded => (1000, "session ended"),
        CloseReason::WebSocketProtocol => (1002, "websocket protocol error"),
        CloseReason::InvalidUtf8 => (1007, "invalid utf-8"),
        CloseReason::EvictedAtGate => (1013, "too many connections from your address: try again"),
    }
}

/// Why reading the client's socket failed: a limit, a protocol violation
/// (the client is told with 1002/1007 and it is counted as the client's
/// fault), or the client gone.
fn read_error(e: &tungstenite::Error) -> CloseReason {
    match e {
        e if is_capacity_error(e) => CloseReason::LimitHit,
        tungstenite::Error::Protocol(_) => CloseReason::WebSocketProtocol,
        tungstenite::Error::Utf8(_) => CloseReason::InvalidUtf8,
        _ => CloseReason::ClientLeft,
    }
}

fn send_error(e: &tungstenite::Error) -> CloseReason {
    if is_capacity_error(e) {
        CloseReason::LimitHit
    } else {
        CloseReason::ClientLeft
    }
}

/// Whether a WebSocket error is a size limit (message, frame or write buffer).
fn is_capacity_error(e: &tungstenite::Error) -> bool {
    matches!(
        e,
        tungstenite::Error::Capacity(_) | tungstenite::Error::WriteBufferFull(_)
    )
}
