//! Checking a SPICE client's messages before the hypervisor sees them.
//!
//! QEMU 7.2's spice-server takes some client messages badly (measured
//! against it, each through a real channel):
//!
//! - `MIGRATE_FLUSH_MARK` outside a migration, on any channel, is an
//!   assertion: QEMU aborts (SIGTRAP). So, surely, is `MIGRATE_DATA`.
//! - On the display channel, any message it cannot use makes it drop the
//!   channel, and a dropped display channel crashes QEMU (SIGSEGV, see
//!   [`super::display_drain`]): an unknown type, a body shorter than its
//!   fields or over 1024 bytes (its receive buffer), a second
//!   `DISPLAY_INIT` (SIGABRT), `GL_DRAW_DONE` with no GL draw pending, a
//!   `STREAM_REPORT` for a stream id past its 50 streams.
//!
//! Porthole does not migrate sessions, and no remote client draws with GL,
//! so those are refused everywhere; the display channel is held to the
//! messages it accepts. Each header (with the body bytes a check needs)
//! is held until it is complete and checked, so a refused message never
//! reaches the hypervisor, not even in part: the bytes before it go, the
//! client's side ends there, and the hypervisor's stream stands at a
//! message boundary.

use super::framing::{Frame, Frames};
use super::messages::client_msg as msg;

/// The largest client display message body spice-server takes (its
/// channel receive buffer).
const MAX_DISPLAY_BODY: u32 = 1024;

/// Streams a display channel has (spice-server's `NUM_STREAMS`).
const STREAMS: u32 = 50;

/// Which rules a channel's client messages follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    /// The display channel: only what it accepts.
    Display,
    /// Every other channel: anything but migration.
    Other,
}

/// A client message the hypervisor must not see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client message of type {kind} with a {size}-byte body: {why}")]
pub struct Refused {
    /// Its type.
    pub kind: u16,
    /// Its body length.
    pub size: u32,
    /// What is wrong with it.
    pub why: &'static str,
}

/// What of the client's bytes may reach the hypervisor now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Whole messages and bodies of checked ones; a header waits until it
    /// is complete and checked.
    pub forward: Vec<u8>,
    /// A message that must not go came after `forward`: the client's side
    /// ends here.
    pub refused: Option<Refused>,
}

/// One channel's client messages, checked in order.
#[derive(Debug)]
pub struct ClientCheck {
    rules: Rules,
    up: Frames,
    seen: Vec<Frame>,
    /// Bytes followed but not yet forwarded: an unchecked header.
    held: Vec<u8>,
    /// A message whose header passed and whose body prefix is awaited.
    pending: Option<(u64, u32)>,
    /// The display channel's `DISPLAY_INIT` went through.
    inited: bool,
}

/// Body bytes a display check reads: a report's stream id, a codec count.
fn display_wanted(kind: u16) -> usize {
    match kind {
        msg::STREAM_REPORT => 4,
        msg::PREFERRED_VIDEO_CODEC_TYPE => 1,
        _ => 0,
    }
}

fn nothing_wanted(_: u16) -> usize {
    0
}

impl ClientCheck {
    /// A check for a channel linked with (`mini_header`) or without mini headers.
    pub fn new(mini_header: bool, rules: Rules) -> Self {
        Self {
            rules,
            up: Self::follower(mini_header, rules),
            seen: Vec::new(),
            held: Vec::new(),
            pending: None,
            inited: false,
        }
    }

    fn follower(mini_header: bool, rules: Rules) -> Frames {
        match rules {
            Rules::Display => Frames::new(mini_header, display_wanted),
            Rules::Other => Frames::new(mini_header, nothing_wanted),
        }
    }

    /// Whether the channel uses mini headers.
    pub fn mini_header(&self) -> bool {
        self.up.mini_header()
    }

    /// Body bytes that finish what has gone to the hypervisor (0: it stands
    /// between messages); `None` cannot happen while headers are held, and
    /// is kept for a stream followed some other way.
    pub fn body_left(&self) -> Option<u64> {
        if self.held.is_empty() {
            self.up.body_left()
        } else {
            Some(0)
        }
    }

    /// The client's next bytes: what may go now; each message that goes
    /// is appended to `went` as (serial, type).
    pub fn check(&mut self, data: &[u8], went: &mut Vec<(u64, u16)>) -> Checked {
        let mut out = std::mem::take(&mut self.held);
        let mut at = out.len();
        out.extend_from_slice(data);
        while at < out.len() {
            self.seen.clear();
            // No cap, and small prefixes: following a client cannot fail.
            at += self
                .up
                .feed_to_frame(&out[at..], &mut self.seen)
                .unwrap_or(out.len() - at);
            let Some(&frame) = self.seen.first() else {
                continue;
            };
            if let Err(refused) = self.frame(frame, went) {
                // Where the refused message began: every byte of it is
                // still here, and from there a fresh follower is right.
                let ours = self.up.header_len()
                    + match frame {
                        Frame::Prefix { len, .. } => len,
                        Frame::Header { .. } => 0,
                    };
                out.truncate(at - ours);
                self.up = Self::follower(self.up.mini_header(), self.rules);
                self.pending = None;
                return Checked {
                    forward: out,
                    refused: Some(refused),
                };
            }
        }
        let unconfirmed = self.up.unconfirmed();
        self.held = out.split_off(out.len() - unconfirmed);
        Checked {
            forward: out,
            refused: None,
        }
    }

    fn frame(&mut self, frame: Frame, went: &mut Vec<(u64, u16)>) -> Result<(), Refused> {
        match frame {
            Frame::Header { serial, kind, size } => {
                let refuse = |why| Refused { kind, size, why };
                self.header(kind, size).map_err(refuse)?;
                if self.rules == Rules::Display && display_wanted(kind) > 0 && size > 0 {
                    // Its first body bytes come next: checked then.
                    self.pending = Some((serial, size));
                } else {
                    went.push((serial, kind));
                }
                Ok(())
            }
            Frame::Prefix { kind, bytes, .. } => {
                let (serial, size) = self.pending.take().unwrap_or_default();
                let refuse = |why| Refused { kind, size, why };
                match kind {
                    msg::STREAM_REPORT => {
                        let id = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                        if id >= STREAMS {
                            return Err(refuse("a stream the display channel cannot have"));
                        }
                    }
                    _ if u32::from(bytes[0]) >= size => {
                        return Err(refuse("lists more codecs than it holds"));
                    }
                    _ => {}
                }
                went.push((serial, kind));
                Ok(())
            }
        }
    }

    /// Whether a message of `kind` with a `size`-byte body may go (its
    /// header alone decides).
    fn header(&mut self, kind: u16, size: u32) -> Result<(), &'static str> {
        if matches!(kind, msg::MIGRATE_FLUSH_MARK | msg::MIGRATE_DATA) {
            return Err("migration (Porthole does not migrate sessions)");
        }
        if self.rules == Rules::Other {
            return Ok(());
        }
        let least = match kind {
            msg::ACK => 0,
            msg::ACK_SYNC => 4,
            msg::PONG | msg::DISCONNECTING => 12,
            msg::DISPLAY_INIT if self.inited => return Err("a second DISPLAY_INIT"),
            msg::DISPLAY_INIT => 14,
            msg::STREAM_REPORT => 32,
            msg::PREFERRED_COMPRESSION | msg::PREFERRED_VIDEO_CODEC_TYPE => 1,
            msg::GL_DRAW_DONE => return Err("GL drawing is for local clients only"),
            _ => return Err("not a display channel message"),
        };
        if size < least {
            return Err("shorter than its fields");
        }
        if size > MAX_DISPLAY_BODY {
            return Err("longer than the display channel takes");
        }
        if kind == msg::DISPLAY_INIT {
            self.inited = true;
        }
        Ok(())
    }
}

/// Fuzzing entry point: a client's stream on either kind of channel.
pub fn fuzz_client_check(data: &[u8]) {
    let rules = if data.first().is_some_and(|b| b & 2 == 2) {
        Rules::Display
    } else {
        Rules::Other
    };
    let mut check = ClientCheck::new(data.first().is_some_and(|b| b & 1 == 1), rules);
    let mut went = Vec::new();
    for chunk in data.chunks(5) {
        if check.check(chunk, &mut went).refused.is_some() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::spice::framing::header;
    use crate::protocol::transcript::{Noise, chunks, hex, splits};

    fn mini(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = header(true, 0, kind, body.len() as u32);
        m.extend_from_slice(body);
        m
    }

    /// Feeds `stream` in the chunks `cuts` makes; what went, and the refusal.
    fn relay(
        rules: Rules,
        stream: &[u8],
        cuts: &[usize],
    ) -> (Vec<u8>, Option<Refused>, ClientCheck) {
        let mut check = ClientCheck::new(true, rules);
        let (mut sent, mut went) = (Vec::new(), Vec::new());
        for chunk in chunks(stream, cuts) {
            let checked = check.check(chunk, &mut went);
            sent.extend(checked.forward);
            if checked.refused.is_some() {
                return (sent, checked.refused, check);
            }
        }
        (sent, None, check)
    }

    #[test]
    fn display_messages_spice_server_cannot_take_never_reach_it_in_any_split() {
        let init = mini(
            msg::DISPLAY_INIT,
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        // A report for stream 3, a codec list of two (MJPEG, VP8), an ACK.
        let report = mini(
            msg::STREAM_REPORT,
            &[[3, 0, 0, 0], [0; 4]].concat().repeat(4),
        );
        let codecs = hex("69 00  03 00 00 00  02  01 03");
        let good = [init.clone(), report, codecs, mini(msg::ACK, &[])].concat();
        for (bad, why) in [
            (
                hex("e7 03  04 00 00 00  00 00 00 00"),
                "not a display channel message",
            ),
            (hex("67 00  00 00 00 00"), "shorter than its fields"),
            (
                hex("69 00  02 00 00 00  02  01"),
                "lists more codecs than it holds",
            ),
            (
                hex("04 00  00 00 00 00"),
                "migration (Porthole does not migrate sessions)",
            ),
            (
                hex("66 00  01 04 00 00"),
                "longer than the display channel takes",
            ),
            (init.clone(), "a second DISPLAY_INIT"),
            (
                hex("68 00  00 00 00 00"),
                "GL drawing is for local clients only",
            ),
            (
                mini(
                    msg::STREAM_REPORT,
                    &[[50, 0, 0, 0], [0; 4]].concat().repeat(4),
                ),
                "a stream the display channel cannot have",
            ),
        ] {
            let stream = [good.clone(), bad, mini(msg::ACK, &[])].concat();
            for cuts in splits(stream.len()) {
                let (sent, refused, check) = relay(Rules::Display, &stream, &cuts);
                assert_eq!(sent, good, "{why} {cuts:?}");
                assert_eq!(refused.map(|r| r.why), Some(why), "{cuts:?}");
                assert_eq!(check.body_left(), Some(0), "a boundary: {why} {cuts:?}");
            }
        }
        for cuts in splits(good.len()) {
            assert_eq!(relay(Rules::Display, &good, &cuts).0, good, "{cuts:?}");
        }
    }

    #[test]
    fn other_channels_pass_anything_but_migration() {
        // main: an agent message of 2 KiB (type 107 there), then a flush mark.
        let agent = mini(107, &[7; 2048]);
        let stream = [
            agent.clone(),
            hex("04 00  00 00 00 00"),
            mini(msg::ACK, &[]),
        ]
        .concat();
        for cuts in splits(stream.len()) {
            let (sent, refused, _) = relay(Rules::Other, &stream, &cuts);
            assert_eq!(sent, agent, "{cuts:?}");
            assert_eq!(refused.unwrap().kind, msg::MIGRATE_FLUSH_MARK);
        }
    }

    #[test]
    fn an_unfinished_header_waits_and_is_not_part_of_what_went() {
        let mut check = ClientCheck::new(true, Rules::Display);
        let mut went = Vec::new();
        assert_eq!(check.check(&hex("66 00 20"), &mut went), Checked::default());
        assert_eq!(check.body_left(), Some(0));
        assert!(went.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut noise = Noise::new(0xc1e7);
        for len in 0..2000 {
            fuzz_client_check(&noise.bytes(len % 300));
        }
    }
}
