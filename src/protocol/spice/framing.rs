//! Following a SPICE channel's data messages after the link, one direction
//! at a time: headers are collected, bodies skipped by count. Only a header
//! (and, for the few messages a watcher asks for, the first bytes of the
//! body) is ever buffered, however large the messages are.
//!
//! Framing is per channel, fixed at the link: the 6-byte mini header (type
//! u16, size u32) when both ends set `MINI_HEADER`, else the 18-byte full
//! header (serial u64, type u16, size u32, sub_list u32).

use crate::protocol::WireError;

/// Mini header length.
pub const MINI_HEADER_LEN: usize = 6;
/// Full header length.
pub const FULL_HEADER_LEN: usize = 18;
/// The most body bytes a watcher may ask to see (SET_ACK's two words).
const MAX_PREFIX: usize = 8;

/// What the follower saw, in wire order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole header: the message's body (`size` bytes) follows.
    Header {
        /// The sender's serial (0 with mini headers, which carry none).
        serial: u64,
        /// Message type.
        kind: u16,
        /// Body length.
        size: u32,
    },
    /// The first bytes of a body the watcher asked for (only when the body
    /// is at least that long).
    Prefix {
        /// Message type.
        kind: u16,
        /// The bytes; `len` of them are meaningful.
        bytes: [u8; MAX_PREFIX],
        /// How many.
        len: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a header.
    Header,
    /// Collecting `want` body bytes of a `kind` message; `rest` follow them.
    Prefix { kind: u16, want: usize, rest: u64 },
    /// Skipping this many body bytes.
    Skip(u64),
}

/// Follows one direction of one channel.
#[derive(Debug, Clone)]
pub struct Frames {
    mini_header: bool,
    /// Body bytes wanted per message type (0: none); at most [`MAX_PREFIX`].
    prefix: fn(u16) -> usize,
    /// Largest body accepted, if capped.
    max_size: Option<u32>,
    state: State,
    partial: Vec<u8>,
}

impl Frames {
    /// A follower of a channel linked with (`mini_header`) or without mini
    /// headers that wants `prefix(kind)` body bytes of each message.
    pub fn new(mini_header: bool, prefix: fn(u16) -> usize) -> Self {
        Self {
            mini_header,
            prefix,
            max_size: None,
            state: State::Header,
            partial: Vec::with_capacity(FULL_HEADER_LEN),
        }
    }

    /// Refuses bodies larger than `max` from here on.
    pub fn capped(mut self, max: u32) -> Self {
        self.max_size = Some(max);
        self
    }

    /// Whether this channel uses mini headers.
    pub fn mini_header(&self) -> bool {
        self.mini_header
    }

    /// This channel's header length.
    pub fn header_len(&self) -> usize {
        if self.mini_header {
            MINI_HEADER_LEN
        } else {
            FULL_HEADER_LEN
        }
    }

    /// Where the stream stands: `Some(n)` when `n` body bytes complete the
    /// current message (0: between messages); `None` inside a header, where
    /// nothing can complete it without knowing what it says.
    pub fn body_left(&self) -> Option<u64> {
        match self.state {
            State::Header if self.partial.is_empty() => Some(0),
            State::Header => None,
            State::Prefix { want, rest, .. } => Some((want - self.partial.len()) as u64 + rest),
            State::Skip(n) => Some(n),
        }
    }

    /// Follows `data`, the next bytes of this direction, appending what it
    /// saw to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<Frame>) -> Result<(), WireError> {
        while !data.is_empty() {
            let took = self.feed_to_frame(data, out)?;
            data = &data[took..];
        }
        Ok(())
    }

    /// Follows `data` up to and including the first frame that completes in
    /// it (appended to `out`), or all of it; returns how many bytes it took.
    /// A checker that must stop a stream at a message boundary learns where
    /// each message it sees ends.
    pub fn feed_to_frame(&mut self, data: &[u8], out: &mut Vec<Frame>) -> Result<usize, WireError> {
        let mut rest = data;
        while !rest.is_empty() {
            match self.state {
                State::Skip(n) => {
                    let take = n.min(rest.len() as u64);
                    rest = &rest[take as usize..];
                    self.state = skip(n - take);
                }
                State::Header | State::Prefix { .. } => {
                    let want = match self.state {
                        State::Prefix { want, .. } => want,
                        _ => self.header_len(),
                    };
                    let take = (want - self.partial.len()).min(rest.len());
                    self.partial.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if self.partial.len() < want {
                        break;
                    }
                    let got = std::mem::take(&mut self.partial);
                    self.state = self.next_state(&got, out)?;
                    break;
                }
            }
        }
        Ok(data.len() - rest.len())
    }

    /// Bytes at the end of what was fed that belong to a message not yet
    /// confirmed: an unfinished header, or a header and the body prefix
    /// asked for when that prefix is unfinished.
    pub fn unconfirmed(&self) -> usize {
        match self.state {
            State::Header => self.partial.len(),
            State::Prefix { .. } => self.header_len() + self.partial.len(),
            State::Skip(_) => 0,
        }
    }

    fn next_state(&self, got: &[u8], out: &mut Vec<Frame>) -> Result<State, WireError> {
        if let State::Prefix { kind, want, rest } = self.state {
            let mut bytes = [0u8; MAX_PREFIX];
            bytes[..want].copy_from_slice(got);
            out.push(Frame::Prefix {
                kind,
                bytes,
                len: want,
            });
            return Ok(skip(rest));
        }
        let (serial, at) = if self.mini_header {
            (0, 0)
        } else {
            (u64::from_le_bytes(got[..8].try_into().expect("8 bytes")), 8)
        };
        let kind = u16::from_le_bytes([got[at], got[at + 1]]);
        let size = u32::from_le_bytes([got[at + 2], got[at + 3], got[at + 4], got[at + 5]]);
        if let Some(max) = self.max_size.filter(|&m| size > m) {
            return Err(WireError::TooLarge {
                what: "spice message",
                got: size.into(),
                max: max.into(),
            });
        }
        out.push(Frame::Header { serial, kind, size });
        let want = (self.prefix)(kind).min(MAX_PREFIX);
        Ok(if want > 0 && size as usize >= want {
            State::Prefix {
                kind,
                want,
                rest: u64::from(size) - want as u64,
            }
        } else {
            skip(size.into())
        })
    }
}

fn skip(n: u64) -> State {
    if n == 0 {
        State::Header
    } else {
        State::Skip(n)
    }
}

/// Where one direction's messages end, for a relay that writes each
/// message on its own: headers are collected, bodies counted, nothing else
/// is kept.
#[derive(Debug, Clone)]
pub struct MessageEnds {
    mini_header: bool,
    /// The header being collected, `held` bytes of it.
    header: [u8; FULL_HEADER_LEN],
    held: usize,
    /// Body bytes of the current message still to come.
    body_left: u64,
}

impl MessageEnds {
    /// A follower of a channel linked with (`mini_header`) or without mini
    /// headers, standing between two messages.
    pub fn new(mini_header: bool) -> Self {
        Self {
            mini_header,
            header: [0; FULL_HEADER_LEN],
            held: 0,
            body_left: 0,
        }
    }

    fn header_len(&self) -> usize {
        if self.mini_header {
            MINI_HEADER_LEN
        } else {
            FULL_HEADER_LEN
        }
    }

    /// Follows `data`, the next bytes of this direction, appending to
    /// `ends` each offset in `data` at which a message ends (ascending).
    pub fn feed(&mut self, data: &[u8], ends: &mut Vec<usize>) {
        let mut at = 0;
        while at < data.len() {
            if self.body_left > 0 {
                let take = self.body_left.min((data.len() - at) as u64);
                at += take as usize;
                self.body_left -= take;
                if self.body_left == 0 {
                    ends.push(at);
                }
                continue;
            }
            let len = self.header_len();
            let take = (len - self.held).min(data.len() - at);
            self.header[self.held..self.held + take].copy_from_slice(&data[at..at + take]);
            self.held += take;
            at += take;
            if self.held < len {
                continue;
            }
            self.held = 0;
            // The size follows the type: after the serial in a full header.
            let size_at = if self.mini_header { 2 } else { 10 };
            let h = &self.header;
            let size =
                u32::from_le_bytes([h[size_at], h[size_at + 1], h[size_at + 2], h[size_at + 3]]);
            if size == 0 {
                ends.push(at);
            } else {
                self.body_left = size.into();
            }
        }
    }
}

/// A header for a message of `kind` with a `size`-byte body, in the
/// channel's framing (`serial` is used by full headers only).
pub fn header(mini_header: bool, serial: u64, kind: u16, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(FULL_HEADER_LEN);
    if !mini_header {
        h.extend_from_slice(&serial.to_le_bytes());
    }
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    if !mini_header {
        h.extend_from_slice(&0u32.to_le_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transcript::{chunks, hex, splits};

    fn set_ack_prefix(kind: u16) -> usize {
        if kind == 3 { 8 } else { 0 }
    }

    fn follow(bytes: &[u8], cuts: &[usize], mini: bool) -> Vec<Frame> {
        let mut f = Frames::new(mini, set_ack_prefix);
        let mut out = Vec::new();
        for chunk in chunks(bytes, cuts) {
            f.feed(chunk, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn headers_and_asked_prefixes_in_any_split() {
        let bytes = hex("
            03 00  08 00 00 00  01 00 00 00  14 00 00 00   # SET_ACK gen 1 window 20
            6c 00  03 00 00 00  aa bb cc                   # a 3-byte message
            03 00  02 00 00 00  01 02                      # a SET_ACK too short to read
        ");
        for cuts in splits(bytes.len()) {
            let got = follow(&bytes, &cuts, true);
            assert_eq!(got.len(), 4, "{cuts:?}");
            assert_eq!(
                got[0],
                Frame::Header {
                    serial: 0,
                    kind: 3,
                    size: 8
                }
            );
            let Frame::Prefix {
                kind: 3,
                bytes,
                len: 8,
            } = got[1]
            else {
                panic!("{got:?}")
            };
            assert_eq!(bytes, [1, 0, 0, 0, 20, 0, 0, 0]);
            assert_eq!(
                got[2],
                Frame::Header {
                    serial: 0,
                    kind: 108,
                    size: 3
                }
            );
            assert_eq!(
                got[3],
                Frame::Header {
                    serial: 0,
                    kind: 3,
                    size: 2
                }
            );
        }
    }

    #[test]
    fn full_headers_carry_serials() {
        let mut bytes = header(false, 7, 2, 0);
        bytes.extend(header(false, 8, 1, 4));
        bytes.extend([9, 0, 0, 0]);
        let got = follow(&bytes, &[], false);
        assert_eq!(
            got,
            vec![
                Frame::Header {
                    serial: 7,
                    kind: 2,
                    size: 0
                },
                Frame::Header {
                    serial: 8,
                    kind: 1,
                    size: 4
                },
            ]
        );
    }

    #[test]
    fn body_left_says_what_completes_the_message() {
        let mut f = Frames::new(true, set_ack_prefix);
        let mut out = Vec::new();
        assert_eq!(f.body_left(), Some(0));
        f.feed(&hex("6c 00 10"), &mut out).unwrap();
        assert_eq!(f.body_left(), None, "inside a header");
        f.feed(&hex("00 00 00 aa bb"), &mut out).unwrap();
        assert_eq!(f.body_left(), Some(14));
        let mut g = Frames::new(true, set_ack_prefix);
        g.feed(&hex("03 00 08 00 00 00 01 00"), &mut out).unwrap();
        assert_eq!(g.body_left(), Some(6), "inside an asked prefix");
    }

    #[test]
    fn message_ends_in_any_split() {
        for mini in [true, false] {
            // A 3-byte message, an empty one, a 40000-byte one, a 1-byte one.
            let mut bytes = Vec::new();
            let mut whole = Vec::new();
            for (kind, size) in [(108u16, 3u32), (102, 0), (304, 40_000), (4, 1)] {
                bytes.extend(header(mini, 1, kind, size));
                bytes.extend(std::iter::repeat_n(0xee, size as usize));
                whole.push(bytes.len());
            }
            for cuts in splits(bytes.len()) {
                let mut m = MessageEnds::new(mini);
                let (mut ends, mut offset) = (Vec::new(), 0);
                for chunk in chunks(&bytes, &cuts) {
                    let mut here = Vec::new();
                    m.feed(chunk, &mut here);
                    assert!(here.iter().all(|&e| e > 0 && e <= chunk.len()), "{cuts:?}");
                    ends.extend(here.iter().map(|e| e + offset));
                    offset += chunk.len();
                }
                assert_eq!(ends, whole, "mini {mini}, {cuts:?}");
            }
        }
    }

    #[test]
    fn a_cap_refuses_larger_bodies() {
        let mut f = Frames::new(true, set_ack_prefix).capped(100);
        let mut out = Vec::new();
        let err = f.feed(&header(true, 0, 304, 101), &mut out).unwrap_err();
        assert!(matches!(
            err,
            WireError::TooLarge {
                got: 101,
                max: 100,
                ..
            }
        ));
    }
}
