//! Keeping a display channel's hypervisor side alive after its client left.
//!
//! QEMU 7.2's spice-server (0.15.1) crashes its worker thread when a display
//! channel is disconnected before the channel has settled: a client that
//! links a display channel, reads nothing and closes it, sends nothing and
//! closes, or sends `DISPLAY_INIT` and closes at once, all kill the VM
//! (SIGSEGV). Measured with real QEMU: the display channel sends nothing at
//! all until the client's `DISPLAY_INIT`; after it the server sends
//! `SET_ACK` and the screen, and once the client has answered and read,
//! closing is safe, and so is the server's own close of the channel when the
//! session's main channel ends.
//!
//! So when a client drops a display channel, the proxy finishes its side of
//! the conversation instead of closing: [`DisplayTrack`] follows both
//! directions while the channel is relayed (headers only); [`DisplayTrack::into_drain`]
//! gives the bytes that complete the client's last message, catch up on its
//! ACKs and send the `DISPLAY_INIT` it never sent; [`Drain`] then reads and
//! discards the hypervisor's messages, answering `SET_ACK` with `ACK_SYNC`
//! and every `window` messages with an `ACK`, so the server never stalls.
//! How long that goes on is the session layer's business.

use super::client_check::ClientCheck;
use super::framing::{Frame, Frames, header};
use crate::protocol::WireError;
use crate::protocol::client_filter::Checked;

/// Message types the drain speaks.
pub mod msg {
    /// Server to client (common): `SET_ACK` (generation u32, window u32).
    pub const SET_ACK: u16 = 3;
    pub use crate::protocol::spice::messages::client_msg::{ACK, ACK_SYNC, DISPLAY_INIT};
}

/// `DISPLAY_INIT`'s body as the drain sends it: pixmap cache 1 of size 0,
/// GLZ dictionary 0 with a window of 0. Nothing is cached for a client that
/// is gone (measured: spice-server accepts it and sends the screen).
const DISPLAY_INIT_BODY: [u8; 14] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// ACKs sent for a client that left owing them, at most. spice-server
/// stops sending once two windows go unacknowledged, so an honest one is
/// owed two; a server that ignores flow control is owed no more than this
/// (one ACK per message it sent would be a buffer of its choosing).
const MAX_OWED_ACKS: u64 = 4;

/// Body bytes read from the hypervisor's messages: `SET_ACK`'s two words.
fn wanted(kind: u16) -> usize {
    if kind == msg::SET_ACK { 8 } else { 0 }
}

/// Why a dropped display channel cannot be drained (it is closed instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoDrain {
    /// The hypervisor's stream could not be followed during the relay.
    #[error("the hypervisor's messages could not be followed: {0}")]
    Lost(WireError),
    /// The client stopped inside a message header: nothing can finish it.
    #[error("the client stopped inside a message header")]
    MidHeader,
    /// The client stopped inside a message with more left than we pad.
    #[error("the client stopped {left} bytes short of a message's end (padding cap {max})")]
    TooLong {
        /// Body bytes missing.
        left: u64,
        /// The padding cap.
        max: u64,
    },
}

/// The limits a drain runs under.
#[derive(Debug, Clone, Copy)]
pub struct DrainLimits {
    /// Largest hypervisor message body accepted while draining.
    pub max_message: u32,
    /// Most zero bytes sent to finish the client's last message.
    pub max_padding: u64,
}

/// Both directions of one display channel, followed while it is relayed.
#[derive(Debug)]
pub struct DisplayTrack {
    down: Frames,
    /// The client's messages, checked before they go.
    up: ClientCheck,
    seen: Vec<Frame>,
    /// The hypervisor's stream could not be followed (no drain then).
    lost: Option<WireError>,
    /// The last `SET_ACK`: generation and window.
    set_ack: Option<(u32, u32)>,
    /// Hypervisor messages since that `SET_ACK`.
    since_set_ack: u64,
    /// The generation the client last synced to.
    client_synced: Option<u32>,
    /// Client ACKs since its last `ACK_SYNC`.
    client_acks: u64,
    /// The client's last serial (full headers).
    client_serial: u64,
    /// The client sent its `DISPLAY_INIT`.
    client_inited: bool,
}

impl DisplayTrack {
    /// A tracker for a display channel linked with (`mini_header`) or without mini headers.
    pub fn new(mini_header: bool) -> Self {
        Self {
            down: Frames::new(mini_header, wanted),
            up: ClientCheck::new(mini_header, super::messages::channel::DISPLAY),
            seen: Vec::new(),
            lost: None,
            set_ack: None,
            since_set_ack: 0,
            client_synced: None,
            client_acks: 0,
            client_serial: 0,
            client_inited: false,
        }
    }

    /// Whether the channel uses mini headers.
    pub fn mini_header(&self) -> bool {
        self.down.mini_header()
    }

    /// Follows bytes the hypervisor sent. Never fails the relay: a stream
    /// it cannot follow only rules out a drain.
    pub fn from_server(&mut self, data: &[u8]) {
        if self.lost.is_some() {
            return;
        }
        self.seen.clear();
        if let Err(e) = self.down.feed(data, &mut self.seen) {
            self.lost = Some(e);
            return;
        }
        for frame in &self.seen {
            match *frame {
                Frame::Header {
                    kind: msg::SET_ACK, ..
                } => {}
                Frame::Header { .. } => self.since_set_ack += 1,
                Frame::Prefix { bytes, .. } => {
                    self.set_ack = Some(set_ack(&bytes));
                    self.since_set_ack = 0;
                }
            }
        }
    }

    /// Follows bytes the client sent, before they reach the hypervisor:
    /// what may go now (see [`ClientCheck`]: a message spice-server could
    /// not take never goes, and the client's side ends before it).
    pub fn from_client(&mut self, data: &[u8]) -> Checked {
        let mut went = Vec::new();
        let checked = self.up.check(data, &mut went);
        for (serial, kind) in went {
            self.client_said(serial, kind);
        }
        checked
    }

    /// Notes a client message that goes through.
    fn client_said(&mut self, serial: u64, kind: u16) {
        self.client_serial = serial;
        match kind {
            msg::ACK_SYNC => {
                self.client_synced = self.set_ack.map(|(generation, _)| generation);
                self.client_acks = 0;
            }
            msg::ACK => self.client_acks += 1,
            msg::DISPLAY_INIT => self.client_inited = true,
            _ => {}
        }
    }

    /// The drain that takes over from the client, and the bytes to send the
    /// hypervisor first: the rest of the client's last message (zeros), the
    /// `ACK_SYNC` and ACKs the client owed, and `DISPLAY_INIT` if it never
    /// sent one.
    pub fn into_drain(self, limits: DrainLimits) -> Result<(Drain, Vec<u8>), NoDrain> {
        if let Some(e) = self.lost {
            return Err(NoDrain::Lost(e));
        }
        let left = self.up.body_left().ok_or(NoDrain::MidHeader)?;
        if left > limits.max_padding {
            return Err(NoDrain::TooLong {
                left,
                max: limits.max_padding,
            });
        }
        let mini = self.down.mini_header();
        let mut drain = Drain {
            down: self.down.capped(limits.max_message),
            seen: Vec::new(),
            mini_header: mini,
            next_serial: self.client_serial + 1,
            window: 0,
            unacked: 0,
        };
        let mut first = vec![0u8; left as usize];
        if let Some((generation, window)) = self.set_ack {
            let mut acks = self.client_acks;
            if self.client_synced != Some(generation) {
                drain.message(&mut first, msg::ACK_SYNC, &generation.to_le_bytes());
                acks = 0;
            }
            drain.window = window;
            drain.unacked = self
                .since_set_ack
                .saturating_sub(acks.saturating_mul(window.into()));
            if window > 0 {
                let owed = (drain.unacked / u64::from(window)).min(MAX_OWED_ACKS);
                for _ in 0..owed {
                    drain.message(&mut first, msg::ACK, &[]);
                }
                drain.unacked %= u64::from(window);
            }
        }
        if !self.client_inited {
            drain.message(&mut first, msg::DISPLAY_INIT, &DISPLAY_INIT_BODY);
        }
        Ok((drain, first))
    }
}

fn set_ack(bytes: &[u8; 8]) -> (u32, u32) {
    (
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
    )
}

/// A display channel's hypervisor side with no client: reads and discards,
/// answering the flow control as a client would.
#[derive(Debug)]
pub struct Drain {
    down: Frames,
    seen: Vec<Frame>,
    mini_header: bool,
    next_serial: u64,
    /// The `SET_ACK` window (0: no ACKs asked for).
    window: u32,
    /// Messages since the last ACK we sent (or owed).
    unacked: u64,
}

impl Drain {
    /// Follows `data` from the hypervisor; returns what to send back (often nothing).
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<u8>, WireError> {
        self.seen.clear();
        self.down.feed(data, &mut self.seen)?;
        let mut reply = Vec::new();
        for i in 0..self.seen.len() {
            match self.seen[i] {
                Frame::Header {
                    kind: msg::SET_ACK,
                    size,
                    ..
                } if size < 8 => return Err(WireError::Invalid("SET_ACK shorter than its words")),
                Frame::Header {
                    kind: msg::SET_ACK, ..
                } => {}
                Frame::Header { .. } => {
                    self.unacked += 1;
                    if self.window > 0 && self.unacked >= u64::from(self.window) {
                        self.message(&mut reply, msg::ACK, &[]);
                        self.unacked = 0;
                    }
                }
                Frame::Prefix { bytes, .. } => {
                    let (generation, window) = set_ack(&bytes);
                    self.message(&mut reply, msg::ACK_SYNC, &generation.to_le_bytes());
                    self.window = window;
                    self.unacked = 0;
                }
            }
        }
        Ok(reply)
    }

    /// Appends one client message (next serial, for full headers).
    fn message(&mut self, out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend(header(
            self.mini_header,
            self.next_serial,
            kind,
            body.len() as u32,
        ));
        out.extend_from_slice(body);
        self.next_serial += 1;
    }
}

/// Fuzzing entry point: a relay's worth of both directions, then a drain.
pub fn fuzz_display_drain(data: &[u8]) {
    let mini = data.first().is_some_and(|b| b & 1 == 1);
    let (client, server) = data.split_at(data.len() / 3);
    let mut track = DisplayTrack::new(mini);
    let _ = track.from_client(client);
    let (server_relay, server_drain) = server.split_at(server.len() / 2);
    track.from_server(server_relay);
    let limits = DrainLimits {
        max_message: 1 << 20,
        max_padding: 1 << 16,
    };
    if let Ok((mut drain, _)) = track.into_drain(limits) {
        for chunk in server_drain.chunks(7) {
            if drain.feed(chunk).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transcript::{Noise, chunks, hex, splits};

    const LIMITS: DrainLimits = DrainLimits {
        max_message: 1 << 20,
        max_padding: 1 << 16,
    };

    fn mini(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = header(true, 0, kind, body.len() as u32);
        m.extend_from_slice(body);
        m
    }

    fn set_ack_msg(generation: u32, window: u32) -> Vec<u8> {
        let mut body = generation.to_le_bytes().to_vec();
        body.extend(window.to_le_bytes());
        mini(msg::SET_ACK, &body)
    }

    #[test]
    fn a_client_that_sent_nothing_gets_its_display_init_sent() {
        let track = DisplayTrack::new(true);
        let (_, first) = track.into_drain(LIMITS).unwrap();
        assert_eq!(
            first,
            hex("65 00  0e 00 00 00  01 00 00 00 00 00 00 00 00 00 00 00 00 00")
        );
    }

    #[test]
    fn the_drain_syncs_and_acks_every_window_in_any_split() {
        let mut server = set_ack_msg(1, 3);
        for _ in 0..7 {
            server.extend(mini(304, &[0xaa; 5]));
        }
        for cuts in splits(server.len()) {
            let (mut drain, _) = DisplayTrack::new(true).into_drain(LIMITS).unwrap();
            let mut sent = Vec::new();
            for chunk in chunks(&server, &cuts) {
                sent.extend(drain.feed(chunk).unwrap());
            }
            // ACK_SYNC(1), then an ACK after messages 3 and 6.
            assert_eq!(
                sent,
                hex("01 00 04 00 00 00 01 00 00 00  02 00 00 00 00 00  02 00 00 00 00 00"),
                "{cuts:?}"
            );
        }
    }

    #[test]
    fn the_drain_continues_where_the_client_stopped() {
        let mut track = DisplayTrack::new(true);
        track.from_client(&mini(msg::DISPLAY_INIT, &DISPLAY_INIT_BODY));
        let mut server = set_ack_msg(4, 2);
        for _ in 0..5 {
            server.extend(mini(304, &[1, 2]));
        }
        track.from_server(&server);
        track.from_client(&mini(msg::ACK_SYNC, &4u32.to_le_bytes()));
        track.from_client(&mini(msg::ACK, &[]));
        // Ten bytes of a 12-byte DISCONNECTING: two zeros finish it.
        let part = hex("06 00 0c 00 00 00  01 02 03 04 05 06 07 08 09 0a");
        assert_eq!(
            track.from_client(&part).forward,
            part,
            "its header checked, the body goes"
        );
        let (mut drain, first) = track.into_drain(LIMITS).unwrap();
        // Five messages, one ACK from the client: one more ACK owed, one message over.
        assert_eq!(first, hex("00 00  02 00 00 00 00 00"));
        assert_eq!(
            drain.feed(&mini(304, &[])).unwrap(),
            hex("02 00 00 00 00 00")
        );
    }

    #[test]
    fn a_server_that_ignores_flow_control_is_owed_a_few_acks_not_one_per_message() {
        let mut track = DisplayTrack::new(true);
        track.from_client(&mini(msg::DISPLAY_INIT, &DISPLAY_INIT_BODY));
        // SET_ACK with a window of 1, then 100,000 messages the client
        // never ACKs (it only syncs).
        let mut server = set_ack_msg(1, 1);
        for _ in 0..100_000 {
            server.extend(mini(304, &[]));
        }
        track.from_server(&server);
        track.from_client(&mini(msg::ACK_SYNC, &1u32.to_le_bytes()));
        let (mut drain, first) = track.into_drain(LIMITS).unwrap();
        assert_eq!(first, hex("02 00 00 00 00 00").repeat(4));
        // The window goes on as before: an ACK for each message.
        assert_eq!(
            drain.feed(&mini(304, &[])).unwrap(),
            hex("02 00 00 00 00 00")
        );
    }

    #[test]
    fn full_headers_continue_the_client_serials() {
        let mut track = DisplayTrack::new(false);
        track.from_client(&header(false, 41, msg::ACK, 0));
        let (_, first) = track.into_drain(LIMITS).unwrap();
        assert_eq!(first[..8], 42u64.to_le_bytes());
        assert_eq!(first.len(), 18 + 14);
    }

    #[test]
    fn unfinishable_client_messages_and_lost_streams_are_not_drained() {
        let mut track = DisplayTrack::new(true);
        track.from_client(&header(
            true,
            0,
            crate::protocol::spice::messages::client_msg::DISCONNECTING,
            12,
        ));
        let short = DrainLimits {
            max_padding: 8,
            ..LIMITS
        };
        assert!(matches!(
            track.into_drain(short),
            Err(NoDrain::TooLong { left: 12, .. })
        ));
        let (mut drain, _) = DisplayTrack::new(true).into_drain(LIMITS).unwrap();
        assert!(drain.feed(&header(true, 0, 304, (1 << 20) + 1)).is_err());
    }

    #[test]
    fn an_unfinished_header_waits_and_never_goes_if_the_client_leaves() {
        let mut track = DisplayTrack::new(true);
        // STREAM_REPORT's header, cut after three bytes: nothing goes yet.
        assert_eq!(track.from_client(&hex("66 00 20")), Checked::default());
        // The client leaves: the hypervisor saw none of it, and gets the
        // DISPLAY_INIT the client never sent, no padding.
        let (_, first) = track.into_drain(LIMITS).unwrap();
        assert_eq!(first, mini(msg::DISPLAY_INIT, &DISPLAY_INIT_BODY));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut noise = Noise::new(0xd1a9);
        for len in 0..2000 {
            fuzz_display_drain(&noise.bytes(len % 400));
        }
    }
}
