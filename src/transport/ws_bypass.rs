//! Binary data frames around tungstenite's buffers.
//!
//! tungstenite reads into a buffer that grows to the largest frame a client
//! sent and writes from one that grows to the largest burst sent to it, and
//! gives neither back: a console that once carried a screen would hold over
//! 100 KiB for the rest of its life. [`Bypass`] sits between tungstenite and
//! the client's socket and keeps payloads out of both:
//!
//! - **In**, once the relay [started](Bypassed::start) it: each binary data
//!   frame the client sends (masked, no reserved bits, within the frame and
//!   message limits: a binary frame, or a continuation of one) has its
//!   payload read into a buffer of its own, unmasked there and queued for the
//!   relay, and tungstenite is handed a *stand-in* in its place: the same
//!   header with length 0. tungstenite still parses every frame header in
//!   order, answers pings and closes, and fails the connection on whatever it
//!   failed on before (every other frame reaches it byte for byte; one that
//!   would break the message limit becomes a header it refuses the same way,
//!   at once: tungstenite alone would first wait for the frame's payload),
//!   but the binary messages it yields are empty: their payloads are taken
//!   from here ([`Bypassed::take_message`]), whole: a message's pieces join
//!   as they arrive, in place while they lie in one read buffer, so however
//!   a client dribbles a payload it pins no more than its bytes. Before the
//!   start (a console's handshake reads the socket as bytes through
//!   tungstenite) every frame goes through as it is, up to
//!   [`HANDSHAKE_FRAME`]: tungstenite's read buffer keeps the size of the
//!   largest frame it ever held.
//! - **Out**: the relay queues its binary messages here
//!   ([`Bypassed::push_binary`]) as a header and the bytes it read, written
//!   with one vectored write per burst; tungstenite's own frames (pings,
//!   pongs, the close) go out between whole frames.
//!
//! Nothing is held while a client is quiet: the read buffer exists while
//! bytes arrive, the queues empty as the relay takes and the socket
//! accepts, and tungstenite's own buffers stay at their first size.
//!
//! Why the relay's payloads line up with tungstenite's empty messages:
//! tungstenite yields a message as soon as its last frame is complete, before
//! it reads again, and [`Bypass`] looks at the next frame only when
//! tungstenite reads and has nothing left to hand it. So when an empty binary
//! message comes out of tungstenite, every payload queued here belongs to it
//! or to an earlier message: the queue is taken up to the end of one message
//! per message. An empty message that was never a stand-in (a client's
//! empty message before the start) finds the queue empty.

use std::collections::VecDeque;
use std::io::{self, Cursor, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use super::drain_watch::{DrainWatch, Drains};

mod differential;

/// Socket reads while bytes arrive: a buffer of this size first, large
/// enough that a client uploading fast costs few system calls...
const READ_CHUNK: usize = 64 * 1024;

/// ...and twice the last one (up to this) after a read that filled it:
/// a client that keeps the socket full is read in fewer, larger calls (a
/// quarter of the reads at 64 KiB messages; measured in benches/README.md).
/// Back to [`READ_CHUNK`] once the socket is empty.
const READ_CHUNK_MAX: usize = 256 * 1024;

/// A message's run of bytes in an earlier read buffer keeps that buffer
/// from this size; a shorter one is copied out. Only a message's first run
/// can be short (the later ones fill their buffers), so a payload pins at
/// most one buffer beyond its bytes.
const KEEP_RUN: usize = 32 * 1024;

/// A read goes into what is left of the current buffer while at least this
/// much is; a new one is taken below that.
const MIN_READ: usize = 4 * 1024;

/// Most whole frames in one vectored write (two slices each).
const FRAMES_PER_WRITE: usize = 32;

/// Largest frame a client may send before the relay starts: those go through
/// tungstenite, whose read buffer keeps the size of the largest frame it
/// held for the connection's life. A console's handshake messages are tens
/// of bytes (an RFB reply, a SPICE link message and its ticket); a larger
/// one is refused as over the frame limit (1009).
pub const HANDSHAKE_FRAME: u64 = 8 * 1024;

/// The limits tungstenite applies to the client's frames and messages
/// (`max_frame_size`, `max_message_size`): frames beyond them are left to
/// tungstenite, which refuses them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame payload.
    pub frame: usize,
    /// Largest message (the sum of its frames).
    pub message: usize,
    /// Largest frame before the relay starts ([`HANDSHAKE_FRAME`]).
    pub handshake_frame: u64,
}

/// A socket whose binary data frames bypass tungstenite.
pub trait Bypasses: ReadsUnframed {
    /// The queues shared with the relay.
    fn bypassed(&self) -> &Arc<Bypassed>;
}

/// A WebSocket's socket read under its frames.
pub trait ReadsUnframed {
    /// Reads the client's bytes under every frame, as they come: what a
    /// closing socket still receives, to be dropped (tungstenite stops at
    /// the first error, and the bytes behind it are there all the same).
    fn poll_read_unframed(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>>;
}

/// An upgraded connection that tungstenite reads directly (a playback):
/// its bytes are the frames.
impl ReadsUnframed for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {
    fn poll_read_unframed(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }
}

/// What a [`Bypass`] shares with the relay: payloads in, frames out.
#[derive(Debug, Default)]
pub struct Bypassed {
    state: Mutex<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Binary frames are taken out of the client's stream (else passed on).
    started: bool,
    /// The payload of the message being received: its run of bytes in the
    /// current read buffer, pieces joined as they come (without a copy:
    /// they lie side by side), so however a client dribbles a payload, its
    /// pieces pin no more than its bytes.
    receiving: BytesMut,
    /// Its runs in earlier read buffers, in order: kept where they were read
    /// from [`KEEP_RUN`] bytes, else copied out, so a payload straddling two
    /// buffers is not copied to be joined and pins at most one buffer
    /// beyond its bytes.
    received: Vec<Bytes>,
    /// Whole messages whose stand-ins went (or go) to tungstenite, in order.
    inbound: VecDeque<Payload>,
    /// Whole frames to write, in order; the first may be partly written.
    outbound: VecDeque<OutFrame>,
    /// Bytes in `outbound` not yet written.
    outbound_bytes: usize,
}

/// A frame on its way out: its header, and its payload (or bytes written
/// on tungstenite's behalf, with no header of ours).
#[derive(Debug)]
struct OutFrame {
    head: [u8; 10],
    head_len: u8,
    /// Bytes of `head` already written.
    head_sent: u8,
    payload: Bytes,
}

impl OutFrame {
    fn left(&self) -> usize {
        usize::from(self.head_len - self.head_sent) + self.payload.len()
    }
}

impl Bypassed {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From the next frame that starts a message, binary frames are taken
    /// out of the client's stream.
    pub fn start(&self) {
        self.lock().started = true;
    }

    /// The payload of the next message whose stand-in tungstenite yielded
    /// (as an empty binary message), unless it is empty.
    pub fn take_message(&self) -> Option<Payload> {
        let message = self.lock().inbound.pop_front();
        message.filter(|p| !p.is_empty())
    }

    /// The client went quiet: the inbound queue, if the relay took it all,
    /// is given back (kept while bytes arrive: a new one per message was an
    /// allocation each).
    fn quiet(&self) {
        let mut shared = self.lock();
        if shared.inbound.is_empty() {
            shared.inbound = VecDeque::new();
        }
    }

    /// Queues `payload` as one binary message to the client. It is written
    /// when tungstenite next flushes (or writes).
    pub fn push_binary(&self, payload: Bytes) {
        let len = payload.len();
        let mut head = [0u8; 10];
        head[0] = 0x82; // FIN, binary
        let head_len = if len < 126 {
            head[1] = len as u8;
            2
        } else if let Ok(short) = u16::try_from(len) {
            head[1] = 126;
            head[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        let frame = OutFrame {
            head,
            head_len,
            head_sent: 0,
            payload,
        };
        let mut shared = self.lock();
        shared.outbound_bytes += frame.left();
        shared.outbound.push_back(frame);
    }

    /// Bytes queued to the client and not yet written.
    pub fn queued(&self) -> usize {
        self.lock().outbound_bytes
    }

    fn started(&self) -> bool {
        self.lock().started
    }

    /// Adds `piece` to the message being received; `last` ends it.
    fn push_inbound(&self, piece: BytesMut, last: bool) {
        let mut shared = self.lock();
        let shared = &mut *shared;
        let run = &mut shared.receiving;
        if run.is_empty() || run.as_ptr_range().end == piece.as_ptr() {
            // Side by side in one buffer: joined without a copy.
            run.unsplit(piece);
        } else if !piece.is_empty() {
            // A new read buffer: the run in the last one ends.
            let ended = std::mem::replace(run, piece);
            shared.received.push(if ended.len() >= KEEP_RUN {
                ended.freeze()
            } else {
                Bytes::copy_from_slice(&ended)
            });
        }
        if last {
            let run = std::mem::take(&mut shared.receiving).freeze();
            let whole = if shared.received.is_empty() {
                Payload::One(run)
            } else {
                let mut pieces = std::mem::take(&mut shared.received);
                pieces.push(run);
                Payload::Pieces(pieces)
            };
            shared.inbound.push_back(whole);
        }
    }
}

/// A client message's payload, in the pieces it was read in (most are one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Read into one buffer.
    One(Bytes),
    /// Read into several, in order.
    Pieces(Vec<Bytes>),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::One(Bytes::new())
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Payload::One(bytes)
    }
}

impl Payload {
    /// Its pieces, in order.
    pub fn pieces(&self) -> &[Bytes] {
        match self {
            Payload::One(one) => std::slice::from_ref(one),
            Payload::Pieces(pieces) => pieces,
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.pieces().iter().map(Bytes::len).sum()
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.pieces().iter().all(Bytes::is_empty)
    }

    /// Its bytes as one (copied when it came in pieces).
    pub fn to_bytes(&self) -> Bytes {
        match self {
            Payload::One(one) => one.clone(),
            Payload::Pieces(pieces) => Bytes::from(pieces.concat()),
        }
    }
}

impl Shared {
    /// Writes the queued frames to `inner` until they are all out or it waits.
    fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.outbound.is_empty() {
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let mut used = 0;
            for frame in self.outbound.iter().take(FRAMES_PER_WRITE) {
                let head = &frame.head[usize::from(frame.head_sent)..usize::from(frame.head_len)];
                for part in [head, &frame.payload[..]] {
                    if !part.is_empty() {
                        slices[used] = IoSlice::new(part);
                        used += 1;
                    }
                }
            }
            let n = ready!(Pin::new(&mut *inner).poll_write_vectored(cx, &slices[..used]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        // Written: an idle session holds no queue.
        self.outbound = VecDeque::new();
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut n: usize) {
        self.outbound_bytes -= n;
        while n > 0 {
            let front = self
                .outbound
                .front_mut()
                .expect("written bytes were queued");
            let left = front.left();
            if n >= left {
                n -= left;
                self.outbound.pop_front();
                continue;
            }
            let head_left = usize::from(front.head_len - front.head_sent);
            let from_head = n.min(head_left);
            front.head_sent += from_head as u8;
            front.payload.advance(n - from_head);
            n = 0;
        }
    }
}

/// Where the reader is in the client's stream of frames.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// A frame header comes next.
    Header,
    /// `left` more bytes of a frame tungstenite gets as they are.
    Pass { left: u64 },
    /// `left` more payload bytes of a frame taken out (`at` read so far),
    /// then its stand-in.
    Take {
        left: u64,
        at: u64,
        fin: bool,
        continues: bool,
        mask: [u8; 4],
    },
    /// Everything from here goes to tungstenite as it is: it fails the
    /// connection on what came (or the frame limit was passed).
    Through,
}

/// The message whose frames are arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Message {
    None,
    /// Taken out: its frames so far carried this many bytes.
    Taken(u64),
    /// Passed on as it is.
    Passed,
}

/// A client's WebSocket stream with binary payloads kept out of
/// tungstenite's buffers (see the module's documentation).
#[derive(Debug)]
pub struct Bypass<S> {
    inner: S,
    shared: Arc<Bypassed>,
    limits: Limits,
    /// Read from the socket and not yet looked at; allocated while bytes
    /// arrive.
    raw: BytesMut,
    /// The size of the next read buffer (see [`READ_CHUNK_MAX`]).
    chunk: usize,
    /// For tungstenite: a header of ours (a stand-in, or a frame refused
    /// as too long), `head_len` bytes, `head_sent` of them handed over. In
    /// place: a buffer per stand-in was an allocation per message.
    head: [u8; 14],
    head_len: u8,
    head_sent: u8,
    /// For tungstenite, after `head`: bytes of a frame passed on as it is.
    ready: BytesMut,
    reading: Reading,
    message: Message,
    /// The relay [started](Bypassed::start) (seen once, never undone).
    started: bool,
}

impl<S> Bypass<S> {
    /// Wraps the client's socket; tungstenite reads and writes through it
    /// with `limits` as its frame and message limits.
    pub fn new(inner: S, limits: Limits) -> Self {
        Self {
            inner,
            shared: Arc::default(),
            limits,
            raw: BytesMut::new(),
            chunk: READ_CHUNK,
            head: [0; 14],
            head_len: 0,
            head_sent: 0,
            ready: BytesMut::new(),
            reading: Reading::Header,
            message: Message::None,
            started: false,
        }
    }

    fn started(&mut self) -> bool {
        if !self.started {
            self.started = self.shared.started();
        }
        self.started
    }

    /// Looks at what was read until something is ready for tungstenite
    /// (true) or more bytes are needed (false).
    fn parse(&mut self) -> bool {
        loop {
            match self.reading {
                Reading::Through => {
                    if self.raw.is_empty() {
                        return false;
                    }
                    self.ready.extend_from_slice(&self.raw);
                    self.raw.clear();
                    return true;
                }
                Reading::Pass { left } => {
                    let n = self
                        .raw
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    if n == 0 && left > 0 {
                        return false;
                    }
                    self.ready.extend_from_slice(&self.raw[..n]);
                    self.raw.advance(n);
                    let left = left - n as u64;
                    self.reading = if left == 0 {
                        Reading::Header
                    } else {
                        Reading::Pass { left }
                    };
                    if n > 0 {
                        return true;
                    }
                }
                Reading::Take {
                    left,
                    at,
                    fin,
                    continues,
                    mask,
                } => {
                    let n = self
                        .raw
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    // A message's last piece ends it in the same call.
                    let last = fin && left == 0;
                    if n > 0 {
                        let mut piece = self.raw.split_to(n);
                        unmask(&mut piece, mask, at);
                        self.shared.push_inbound(piece, last);
                    } else if last {
                        self.shared.push_inbound(BytesMut::new(), true);
                    }
                    if left > 0 {
                        self.reading = Reading::Take {
                            left,
                            at: at + n as u64,
                            fin,
                            continues,
                            mask,
                        };
                        return false;
                    }
                    let stand_in = FrameHeader {
                        is_final: fin,
                        rsv1: false,
                        rsv2: false,
                        rsv3: false,
                        opcode: OpCode::Data(if continues {
                            Data::Continue
                        } else {
                            Data::Binary
                        }),
                        mask: Some(mask),
                    };
                    self.put_header(&stand_in, 0);
                    self.reading = Reading::Header;
                    return true;
                }
                Reading::Header => {
                    let mut cursor = Cursor::new(&self.raw[..]);
                    match FrameHeader::parse(&mut cursor) {
                        Ok(None) => return false,
                        // tungstenite refuses the same bytes.
                        Err(_) => self.reading = Reading::Through,
                        Ok(Some((header, len))) => {
                            let header_len = cursor.position() as usize;
                            if self.frame(&header, len, header_len) {
                                return true;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Decides what becomes of a frame whose header (`header_len` bytes of
    /// `raw`) was just read; true when something is ready for tungstenite.
    fn frame(&mut self, header: &FrameHeader, len: u64, header_len: usize) -> bool {
        let fin = header.is_final;
        let clean = !(header.rsv1 || header.rsv2 || header.rsv3)
            && header.mask.is_some()
            && len <= self.limits.frame as u64;
        let data = match header.opcode {
            OpCode::Control(_) => return self.pass(header_len, len),
            OpCode::Data(data) => data,
        };
        match (data, self.message) {
            (Data::Binary, Message::None) | (Data::Continue, Message::Taken(_))
                if clean && self.started() =>
            {
                let before = match self.message {
                    Message::Taken(n) => n,
                    _ => 0,
                };
                let mask = header.mask.expect("clean frames are masked");
                self.raw.advance(header_len);
                if before + len > self.limits.message as u64 {
                    // tungstenite would have refused the message as too
                    // long; a frame over its frame limit is refused the same
                    // way (a capacity error: 1009).
                    let too_long = FrameHeader {
                        is_final: fin,
                        rsv1: false,
                        rsv2: false,
                        rsv3: false,
                        opcode: OpCode::Data(Data::Continue),
                        mask: Some(mask),
                    };
                    self.put_header(&too_long, self.limits.frame as u64 + 1);
                    self.reading = Reading::Through;
                    return true;
                }
                self.message = if fin {
                    Message::None
                } else {
                    Message::Taken(before + len)
                };
                self.reading = Reading::Take {
                    left: len,
                    at: 0,
                    fin,
                    continues: data == Data::Continue,
                    mask,
                };
                false
            }
            // Before the start, a frame no handshake sends: refused as over
            // the frame limit, as tungstenite refuses one (1009).
            (Data::Binary | Data::Text, Message::None) | (Data::Continue, Message::Passed)
                if clean && !self.started() && len > self.limits.handshake_frame =>
            {
                let mut too_long = header.clone();
                too_long.is_final = fin;
                self.raw.advance(header_len);
                self.put_header(&too_long, self.limits.frame as u64 + 1);
                self.reading = Reading::Through;
                true
            }
            // Frames tungstenite takes as they are: before the start, or
            // text (which ends the session).
            (Data::Binary | Data::Text, Message::None) | (Data::Continue, Message::Passed)
                if clean =>
            {
                self.message = if fin { Message::None } else { Message::Passed };
                self.pass(header_len, len)
            }
            // tungstenite fails the connection on this frame.
            _ => {
                self.reading = Reading::Through;
                false
            }
        }
    }

    /// Hands tungstenite a frame as it is: its header now, its `len` bytes
    /// of payload as they come.
    fn pass(&mut self, header_len: usize, len: u64) -> bool {
        self.ready.extend_from_slice(&self.raw[..header_len]);
        self.raw.advance(header_len);
        self.reading = Reading::Pass { left: len };
        true
    }

    /// Hands tungstenite a header of ours: nothing else is ready when one
    /// is made, so it goes before what `ready` gets next.
    fn put_header(&mut self, header: &FrameHeader, len: u64) {
        // At most 14 bytes: 2, an extended length of 8, a mask of 4.
        let left = {
            let mut rest = &mut self.head[..];
            header
                .format(len, &mut rest)
                .expect("a header fits in 14 bytes");
            rest.len()
        };
        self.head_len = (self.head.len() - left) as u8;
        self.head_sent = 0;
    }
}

/// Unmasks `piece`, which starts `at` bytes into its frame's payload.
/// (Public for the load tool's floor relay, which must unmask as Porthole
/// does.)
pub fn unmask(piece: &mut [u8], mask: [u8; 4], at: u64) {
    let k = (at % 4) as usize;
    let m = [
        mask[k],
        mask[(k + 1) % 4],
        mask[(k + 2) % 4],
        mask[(k + 3) % 4],
    ];
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut words = piece.chunks_exact_mut(8);
    for word in &mut words {
        let bytes: [u8; 8] = (&*word).try_into().expect("8 bytes");
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Fuzzing entry point: four bytes of settings (when the relay starts,
/// the frame and message limits, how the bytes are cut), then a client's
/// byte stream, which tungstenite must read the same alone and through a
/// [`Bypass`]: the same messages, the same end. Panics on any difference.
pub fn fuzz_bypass(data: &[u8]) {
    differential::check(data);
}

impl<S: AsyncRead + Unpin> Bypasses for Bypass<S> {
    fn bypassed(&self) -> &Arc<Bypassed> {
        &self.shared
    }
}

impl<S: AsyncRead + Unpin> ReadsUnframed for Bypass<S> {
    fn poll_read_unframed(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Drains> Drains for Bypass<S> {
    fn drain_watch(&self) -> &Arc<DrainWatch> {
        self.inner.drain_watch()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bypass<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // What is ready goes out alone: the next frame is looked at only
            // once tungstenite has this one (see the module's documentation).
            if this.head_sent < this.head_len {
                let head = &this.head[usize::from(this.head_sent)..usize::from(this.head_len)];
                let n = head.len().min(out.remaining());
                out.put_slice(&head[..n]);
                this.head_sent += n as u8;
                return Poll::Ready(Ok(()));
            }
            if !this.ready.is_empty() {
                let n = this.ready.len().min(out.remaining());
                out.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                if this.ready.is_empty() {
                    this.ready = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.parse() {
                continue;
            }
            if this.raw.capacity() - this.raw.len() < MIN_READ {
                if this.raw.is_empty() {
                    // The last buffer stays with the payloads cut from it.
                    this.raw = BytesMut::with_capacity(this.chunk);
                } else {
                    this.raw.reserve(this.chunk);
                }
            }
            let room = this.raw.capacity() - this.raw.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.raw) {
                Poll::Pending => {
                    this.chunk = READ_CHUNK;
                    this.shared.quiet();
                    // Quiet: give the buffer back (a partial header moves
                    // to one of its size), unless a payload is coming into
                    // it: the pieces already taken share it, and the next
                    // ones join them without a copy.
                    let taking = matches!(this.reading, Reading::Take { .. });
                    if taking {
                        // (kept)
                    } else if this.raw.is_empty() {
                        this.raw = BytesMut::new();
                    } else if this.raw.capacity() > 1024 && this.raw.len() <= 1024 {
                        this.raw = BytesMut::from(&this.raw[..]);
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The end: tungstenite sees it as it would have.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(n)) => {
                    if n == room {
                        this.chunk = (this.chunk * 2).min(READ_CHUNK_MAX);
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bypass<S> {
    /// tungstenite's own bytes (control frames, and a handshake's
    /// messages) go out only between our whole frames: once those are out,
    /// straight to the socket, and what it does not take is queued first in
    /// line (so the write counts as done and nothing can come between).
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock();
        ready!(shared.poll_write_out(&mut this.inner, cx))?;
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if n > 0 && n < buf.len() {
            let rest = Bytes::copy_from_slice(&buf[n..]);
            shared.outbound_bytes += rest.len();
            shared.outbound.push_back(OutFrame {
                head: [0; 10],
                head_len: 0,
                head_sent: 0,
                payload: rest,
            });
            return Poll::Ready(Ok(buf.len()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.shared.lock().poll_write_out(&mut this.inner, cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.shared.lock().poll_write_out(&mut this.inner, cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::differential::{Cuts, read_through};
    use super::*;
    use futures_util::{SinkExt as _, StreamExt as _};
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
    use tokio::io::AsyncWriteExt as _;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
    use tokio_tungstenite::tungstenite::{self, Message};

    /// No handshake limit of its own: the differential test compares
    /// with tungstenite alone before the start too.
    const LIMITS: Limits = Limits {
        frame: 100_000,
        message: 150_000,
        handshake_frame: u64::MAX,
    };

    fn config() -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_frame_size(Some(LIMITS.frame))
            .max_message_size(Some(LIMITS.message))
    }

    /// One client frame as bytes: `first` is FIN, RSV and opcode; masked
    /// with a fixed key unless `unmasked`.
    fn frame(first: u8, payload: &[u8], unmasked: bool) -> Vec<u8> {
        let mut out = vec![first];
        let mask_bit = if unmasked { 0 } else { 0x80 };
        let len = payload.len();
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len <= 0xffff {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let key = [0x37, 0xfa, 0x21, 0x3d];
        if unmasked {
            out.extend_from_slice(payload);
        } else {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        out
    }

    fn payload(rng: &mut StdRng) -> Vec<u8> {
        let len = match rng.gen_range(0..8) {
            0 => 0,
            1 => rng.gen_range(1..126),
            2 => rng.gen_range(126..4096),
            3 => rng.gen_range(4096..70_000),
            4 => 65_535 + rng.gen_range(0..3),
            5 => rng.gen_range(70_000..=LIMITS.frame),
            _ => rng.gen_range(1..2000),
        };
        (0..len).map(|_| rng.r#gen()).collect()
    }

    /// A random client stream: binary messages whole and fragmented, pings
    /// and pongs between fragments, and now and then what tungstenite
    /// refuses or a text message.
    fn client_stream(rng: &mut StdRng, clean: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rng.gen_range(1..40) {
            match rng.gen_range(0..20) {
                0..=7 => out.extend(frame(0x82, &payload(rng), false)),
                8..=11 => {
                    let pieces = rng.gen_range(2..5);
                    for i in 0..pieces {
                        let fin = if i == pieces - 1 { 0x80 } else { 0 };
                        let op = if i == 0 { 2 } else { 0 };
                        out.extend(frame(fin | op, &payload(rng), false));
                        if rng.gen_bool(0.3) {
                            out.extend(frame(0x89, b"ping", false));
                        }
                        if !clean && rng.gen_bool(0.05) {
                            // A new message before this one ended.
                            out.extend(frame(0x82, b"interloper", false));
                        }
                    }
                }
                12 => out.extend(frame(0x89, &[7; 8], false)),
                13 => out.extend(frame(0x8a, &[9; 8], false)),
                14 if !clean => out.extend(frame(0x81, b"hello", false)),
                15 if !clean => out.extend(frame(0xc2, b"rsv1", false)),
                16 if !clean => out.extend(frame(0x82, b"unmasked", true)),
                17 if !clean => out.extend(frame(0x80, b"lost continuation", false)),
                18 if !clean => out.extend(frame(0x83, b"reserved opcode", false)),
                19 if !clean => {
                    // A message over the message limit, in two fragments.
                    out.extend(frame(0x02, &vec![1; 90_000], false));
                    out.extend(frame(0x80, &vec![2; 90_000], false));
                }
                _ => out.extend(frame(0x82, b"plain", false)),
            }
        }
        if rng.gen_bool(0.5) {
            out.extend(frame(0x88, &[0x03, 0xe8], false));
        }
        out
    }

    // The seeds on every core: one after another they take 13 s of a
    // debug build's test run.
    #[tokio::test(flavor = "multi_thread")]
    async fn tungstenite_reads_the_same_messages_and_fails_the_same_way() {
        let seeds: Vec<_> = (0..300u64)
            .map(|seed| {
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let stream = client_stream(&mut rng, seed % 3 != 0);
                    // Pieces of up to 9,000 bytes, the socket dry after
                    // one in three.
                    let cuts = Cuts {
                        seed,
                        largest: 9000,
                        stall_one_in: 3,
                    };
                    let plain = read_through(&stream, None, LIMITS, cuts).await;
                    // Bypassed from the start, and started after a few
                    // messages (a handshake read as bytes first).
                    for start_after in [0, 3] {
                        let bypassed = read_through(&stream, Some(start_after), LIMITS, cuts).await;
                        assert_eq!(plain, bypassed, "seed {seed}, started after {start_after}");
                    }
                })
            })
            .collect();
        for seed in seeds {
            seed.await.unwrap();
        }
    }

    /// The fuzz target's first find (its settings and stream, spelled out):
    /// a stream that ends inside a frame breaking the message limit.
    #[tokio::test]
    async fn a_frame_over_the_message_limit_is_refused_at_its_header() {
        let limits = Limits {
            frame: 56,
            message: 60,
            handshake_frame: u64::MAX,
        };
        let mut stream = frame(0x02, &[1; 30], false); // 30 bytes, more to come
        let mut over = frame(0x00, &[2; 51], false); // 81 in all, over 60
        over.truncate(over.len() - 12); // and the client is gone
        stream.extend(over);
        let cuts = Cuts {
            seed: 0x82,
            largest: 2,
            stall_one_in: 3,
        };
        let end = |seen: Vec<_>| format!("{:?}", seen.last().unwrap());
        let alone = read_through(&stream, None, limits, cuts).await;
        assert_eq!(
            end(alone),
            r#"End("protocol: ResetWithoutClosingHandshake")"#
        );
        let bypassed = read_through(&stream, Some(0), limits, cuts).await;
        assert_eq!(end(bypassed), r#"End("capacity")"#);
        // The difference the fuzz target allows, and no other.
        let settings = [0, (56 - 16) / 4, (60 - 16) / 4, 0x82];
        tokio::task::spawn_blocking(move || fuzz_bypass(&[&settings[..], &stream].concat()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn over_the_limits_is_a_capacity_error_as_before() {
        // One frame over the message limit (within the frame limit), a
        // fragmented message over it, and a frame over the frame limit.
        for stream in [
            frame(0x82, &vec![0; LIMITS.frame], false),
            [
                frame(0x02, &vec![0; 80_000], false),
                frame(0x00, &vec![0; 60_000], false),
                frame(0x80, &vec![0; 20_000], false),
            ]
            .concat(),
            frame(0x82, &vec![0; LIMITS.frame + 1], false),
        ] {
            let limits = Limits {
                message: 90_000,
                ..LIMITS
            };
            let (mut client, server) = tokio::io::duplex(1 << 20);
            client.write_all(&stream).await.unwrap();
            let io = Bypass::new(server, limits);
            io.bypassed().start();
            let config = config().max_message_size(Some(limits.message));
            let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            match ws.next().await {
                Some(Err(tungstenite::Error::Capacity(_))) => {}
                other => panic!("expected a capacity error, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_client_reads_every_message_and_control_frame_in_order() {
        // A small pipe: writes are partial and wait for the reader.
        let (client, server) = tokio::io::duplex(1000);
        let io = Bypass::new(server, LIMITS);
        let shared = io.bypassed().clone();
        let server = WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let mut rng = StdRng::seed_from_u64(7);
        let mut sent = Vec::new();
        for i in 0..200 {
            if i % 17 == 5 {
                sent.push(Message::Ping(Bytes::from(vec![i as u8; 4])));
            } else {
                sent.push(Message::Binary(Bytes::from(payload(&mut rng))));
            }
        }
        sent.push(Message::Close(None));
        let expected = sent.clone();
        let (mut sink, _stream) = server.split();
        let writer = tokio::spawn(async move {
            for m in sent {
                match m {
                    Message::Binary(b) => {
                        shared.push_binary(b);
                        if shared.queued() > 20_000 {
                            sink.flush().await.unwrap();
                        }
                    }
                    other => sink.send(other).await.unwrap(),
                }
            }
            sink.flush().await.unwrap();
            assert_eq!(shared.queued(), 0);
        });
        let mut got = Vec::new();
        while let Some(Ok(m)) = client.next().await {
            let close = matches!(m, Message::Close(_));
            got.push(m);
            if close {
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(got, expected);
    }

    /// A server socket through a bypass over a pipe: the client's end,
    /// tungstenite's side, and the queues the relay shares (started, as
    /// the relay starts them, when `started`).
    async fn server(
        limits: Limits,
        started: bool,
    ) -> (
        tokio::io::DuplexStream,
        WebSocketStream<Bypass<tokio::io::DuplexStream>>,
        Arc<Bypassed>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let io = Bypass::new(server, limits);
        let shared = io.bypassed().clone();
        if started {
            shared.start();
        }
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
        (client, ws, shared)
    }

    #[tokio::test]
    async fn nothing_is_held_once_the_bytes_have_gone() {
        let (mut client, mut ws, shared) = server(LIMITS, true).await;
        client
            .write_all(&frame(0x82, &vec![5; 90_000], false))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::new())
        );
        assert_eq!(shared.take_message().map(|p| p.len()), Some(90_000));
        assert_eq!(shared.lock().received.capacity(), 0);
        // Quiet: a read finds nothing and gives its buffer back.
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(20), ws.next()).await;
        assert!(quiet.is_err());
        let io = ws.get_ref();
        assert_eq!((io.raw.capacity(), io.ready.capacity()), (0, 0));
        assert_eq!(shared.lock().inbound.capacity(), 0);
    }

    #[tokio::test]
    async fn a_dribbled_payload_pins_no_more_than_its_bytes() {
        // One byte per read, the socket empty between them: every piece
        // joins the last in the one read buffer, and the message comes out
        // whole (before: each byte kept a 64 KiB buffer of its own alive).
        let (mut client, mut ws, shared) = server(LIMITS, true).await;
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let whole = frame(0x82, &payload, false);
        for (i, b) in whole.iter().enumerate() {
            client.write_all(&[*b]).await.unwrap();
            if i + 1 == whole.len() {
                break;
            }
            assert!(futures_util::FutureExt::now_or_never(ws.next()).is_none());
            let received = shared.lock().receiving.len();
            if received > 0 {
                let io = ws.get_ref();
                let end = shared.lock().receiving.as_ptr_range().end;
                assert_eq!(
                    end,
                    io.raw.as_ptr(),
                    "byte {i}: the payload and the read buffer are one"
                );
                assert!(io.raw.capacity() + received <= READ_CHUNK);
            }
        }
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::new())
        );
        assert_eq!(shared.take_message(), Some(Payload::One(payload.into())));
    }

    #[tokio::test]
    async fn a_payload_across_read_buffers_is_kept_where_it_was_read() {
        // One write, read 64 KiB at a time: the first message's payload
        // (65,000 bytes after an 8-byte header) fills the first buffer but
        // for the second's header and its first 520 bytes; the rest of the
        // second (9,480) is in the next buffer.
        let (mut client, mut ws, shared) = server(LIMITS, true).await;
        let first: Vec<u8> = (0..65_000u32).map(|i| (i % 253) as u8).collect();
        let second: Vec<u8> = (0..10_000u32).map(|i| (i % 241) as u8).collect();
        let mut wire = frame(0x82, &first, false);
        wire.extend(frame(0x82, &second, false));
        client.write_all(&wire).await.unwrap();
        for _ in 0..2 {
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                Message::Binary(Bytes::new())
            );
        }
        // The first read filled its buffer: the next one was twice the size.
        assert_eq!(ws.get_ref().chunk, 2 * READ_CHUNK);
        let a = shared.take_message().unwrap();
        let b = shared.take_message().unwrap();
        assert_eq!(a, Payload::One(first.into()));
        assert_eq!(b.to_bytes(), Bytes::from(second));
        let pieces = b.pieces();
        assert_eq!(
            pieces.iter().map(Bytes::len).collect::<Vec<_>>(),
            [520, 9_480]
        );
        // Under KEEP_RUN: copied out, so it pins no 64 KiB buffer.
        let buffer = a.pieces()[0].as_ptr_range().start..;
        let one = buffer.start.wrapping_add(READ_CHUNK);
        assert!(!(buffer.start..one).contains(&pieces[0].as_ptr()));

        // The socket ran dry: reads start again at READ_CHUNK. A payload
        // filling most of a buffer keeps it: no copy to join.
        assert!(futures_util::FutureExt::now_or_never(ws.next()).is_none());
        assert_eq!(ws.get_ref().chunk, READ_CHUNK);
        let big: Vec<u8> = (0..90_000u32).map(|i| (i % 239) as u8).collect();
        client.write_all(&frame(0x82, &big, false)).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::new())
        );
        let c = shared.take_message().unwrap();
        assert_eq!(c.to_bytes(), Bytes::from(big));
        assert!(c.pieces().len() >= 2);
        assert!(c.pieces()[0].len() >= KEEP_RUN);
    }

    #[tokio::test]
    async fn before_the_start_a_frame_no_handshake_sends_is_refused() {
        let limits = Limits {
            handshake_frame: HANDSHAKE_FRAME,
            ..LIMITS
        };
        let (mut client, mut ws, _) = server(limits, false).await;
        let handshake = vec![7; HANDSHAKE_FRAME as usize];
        client
            .write_all(&frame(0x82, &handshake, false))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(handshake.into())
        );
        client
            .write_all(&frame(0x82, &vec![7; HANDSHAKE_FRAME as usize + 1], false))
            .await
            .unwrap();
        match ws.next().await {
            Some(Err(tungstenite::Error::Capacity(_))) => {}
            other => panic!("a capacity error, not {other:?}"),
        }
    }

    #[test]
    fn unmasking_at_any_offset_matches_byte_by_byte() {
        let mask = [0x6d, 0xb6, 0xb2, 0x80];
        let data: Vec<u8> = (0..100u8).collect();
        for at in 0..8u64 {
            for len in 0..40 {
                let mut fast = data[..len].to_vec();
                unmask(&mut fast, mask, at);
                let slow: Vec<u8> = data[..len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[(i + at as usize) % 4])
                    .collect();
                assert_eq!(fast, slow, "at {at}, len {len}");
            }
        }
    }
}
