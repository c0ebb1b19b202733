//! tungstenite alone against tungstenite through a [`Bypass`]: the same
//! client bytes, handed over in the same pieces, must give the same
//! messages and end the same way. The unit tests run it on random streams;
//! the fuzz target `ws_bypass` ([`super::fuzz_bypass`]) on whatever
//! libFuzzer finds.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use super::{Bypass, Bypassed, Bypasses as _, Limits};

/// What a reader of the server's socket saw: messages (binary payloads
/// whole, bypassed ones taken from the queue), then how it ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Seen {
    Binary(Vec<u8>),
    Text(String),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>),
    /// The stream ended, or failed: "capacity", a protocol error, ...
    End(String),
}

/// How the client's bytes reach the server: pieces of 1 to `largest`
/// bytes, and after a piece, one time in `stall_one_in`, a socket that ran
/// dry (`Pending`) before the next (a small xorshift, so that a seed
/// replays the same cuts on both sides).
#[derive(Debug, Clone, Copy)]
pub(super) struct Cuts {
    pub(super) seed: u64,
    pub(super) largest: usize,
    pub(super) stall_one_in: u64,
}

impl Cuts {
    fn next(&mut self) -> u64 {
        // xorshift64 (a zero state would stay zero).
        let mut x = self.seed | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed = x;
        x
    }
}

/// The client's end as the server reads it: `bytes` in the pieces `cuts`
/// names, then the end of the stream. What the server writes (pongs, a
/// close reply) is taken and dropped.
struct Scripted<'a> {
    bytes: &'a [u8],
    cuts: Cuts,
    stalled: bool,
}

impl AsyncRead for Scripted<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stalled {
            // Dry for a moment: the next poll finds the next piece.
            this.stalled = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let piece = match this.cuts.largest {
            usize::MAX => usize::MAX,
            largest => 1 + (this.cuts.next() % largest.max(1) as u64) as usize,
        };
        let n = piece.min(this.bytes.len()).min(buf.remaining());
        buf.put_slice(&this.bytes[..n]);
        this.bytes = &this.bytes[n..];
        this.stalled = n > 0
            && this
                .cuts
                .next()
                .is_multiple_of(this.cuts.stall_one_in.max(1));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// tungstenite's limits as the relay sets them, with `limits`.
fn config(limits: Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_frame_size(Some(limits.frame))
        .max_message_size(Some(limits.message))
}

fn ended(e: &tungstenite::Error) -> String {
    match e {
        // The limit a frame or a message broke is one close code (1009).
        tungstenite::Error::Capacity(_) => "capacity".into(),
        tungstenite::Error::Protocol(p) => format!("protocol: {p:?}"),
        tungstenite::Error::Utf8(_) => "utf8".into(),
        e => format!("other: {e}"),
    }
}

fn seen(m: Message, shared: Option<&Bypassed>) -> Seen {
    match (m, shared) {
        (Message::Binary(b), Some(shared)) if b.is_empty() => {
            let whole = shared.take_message().unwrap_or_default();
            Seen::Binary(whole.to_bytes().to_vec())
        }
        (Message::Binary(b), _) => Seen::Binary(b.to_vec()),
        (Message::Text(t), _) => Seen::Text(t.to_string()),
        (Message::Ping(p), _) => Seen::Ping(p.to_vec()),
        (Message::Pong(p), _) => Seen::Pong(p.to_vec()),
        (Message::Close(c), _) => Seen::Close(c.map(|c| c.code.into())),
        (Message::Frame(_), _) => unreachable!("a server reads no raw frames"),
    }
}

/// What a server WebSocket reads of `stream`, cut by `cuts`: through a
/// [`Bypass`] started after `start_after` messages when given, else
/// tungstenite alone. `limits.handshake_frame` must be `u64::MAX` for the
/// two to compare (tungstenite alone has no such limit).
pub(super) async fn read_through(
    stream: &[u8],
    bypass: Option<usize>,
    limits: Limits,
    cuts: Cuts,
) -> Vec<Seen> {
    let socket = Scripted {
        bytes: stream,
        cuts,
        stalled: false,
    };
    let mut out = Vec::new();
    let Some(start_after) = bypass else {
        let mut ws =
            WebSocketStream::from_raw_socket(socket, Role::Server, Some(config(limits))).await;
        loop {
            match ws.next().await {
                None => break out.push(Seen::End("end".into())),
                Some(Err(e)) => break out.push(Seen::End(ended(&e))),
                Some(Ok(m)) => out.push(seen(m, None)),
            }
        }
        return out;
    };
    let io = Bypass::new(socket, limits);
    let shared = io.bypassed().clone();
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config(limits))).await;
    let mut messages = 0;
    loop {
        if messages == start_after {
            shared.start();
        }
        match ws.next().await {
            None => break out.push(Seen::End("end".into())),
            Some(Err(e)) => break out.push(Seen::End(ended(&e))),
            Some(Ok(m)) => {
                messages += 1;
                out.push(seen(m, Some(&shared)));
            }
        }
    }
    // Every payload taken out went to a message.
    assert!(
        shared.take_message().is_none(),
        "a payload queued for no message"
    );
    out
}

/// The fuzz target's input: four bytes of settings, then the client's
/// stream.
pub(super) fn check(data: &[u8]) {
    let Some((&[start_after, frame, message, cut], stream)) = data.split_first_chunk::<4>() else {
        return;
    };
    // Limits small enough for a fuzzer's inputs to cross them; the message
    // limit may be below the frame limit (nothing in the config forbids it).
    let limits = Limits {
        frame: 16 + usize::from(frame) * 4,
        message: 16 + usize::from(message) * 4,
        handshake_frame: u64::MAX,
    };
    let cuts = Cuts {
        seed: u64::from(cut),
        // 0: the whole stream in one read, where the reader has room.
        largest: match cut % 64 {
            0 => usize::MAX,
            n => usize::from(n),
        },
        stall_one_in: 1 + u64::from(cut >> 6),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime without I/O or timers builds");
    runtime.block_on(async {
        let plain = read_through(stream, None, limits, cuts).await;
        let bypassed = read_through(stream, Some(usize::from(start_after % 4)), limits, cuts).await;
        if plain == bypassed {
            return;
        }
        // The one difference allowed: the bypass refuses a message over
        // its limit at the header of the frame that breaks it, tungstenite
        // once that frame is whole; a stream that ends in between ends
        // "reset" alone and "capacity" through the bypass. Had the frame
        // been whole (a frame limit's worth more bytes), tungstenite would
        // have seen what the bypass saw.
        let whole = read_through(&[stream, &vec![0; limits.frame]].concat(), None, limits, cuts).await;
        let refused = matches!(bypassed.last(), Some(Seen::End(e)) if e == "capacity");
        let reset = matches!(plain.last(), Some(Seen::End(e)) if e.contains("ResetWithoutClosingHandshake"));
        let same_before = plain[..plain.len() - 1] == bypassed[..bypassed.len() - 1];
        assert!(
            refused && reset && same_before && whole == bypassed,
            "tungstenite alone and through the bypass\n  alone: {plain:?}\n  bypassed: {bypassed:?}\n  alone, the frame whole: {whole:?}"
        );
    });
}
