//! Watching a main channel's server-to-client data after the link.
//!
//! A SPICE session's identity is the `session_id` the hypervisor sends in
//! the main channel's INIT; every other channel of the session links with it
//! as its connection id. The proxy needs that id to bind the session's
//! channels to one ticket, and must stop the migration messages that would
//! send the client straight to a hypervisor (Porthole never offers migration
//! upstream, but `MIGRATE_SWITCH_HOST` needs no capability). The watcher walks
//! message headers only and skips bodies by count: nothing is buffered but a
//! header (and INIT's first word), however large the messages are
//! ([`super::framing`]).

use super::framing::{Frame, Frames};
use crate::protocol::WireError;

/// Server-to-client main channel message types that matter here.
pub mod main_msg {
    /// `SPICE_MSG_MAIN_MIGRATE_BEGIN`.
    pub const MIGRATE_BEGIN: u16 = 101;
    /// `SPICE_MSG_MAIN_INIT`: carries the session id.
    pub const INIT: u16 = 103;
    /// `SPICE_MSG_MAIN_MIGRATE_SWITCH_HOST`.
    pub const MIGRATE_SWITCH_HOST: u16 = 111;
    /// `SPICE_MSG_MAIN_MIGRATE_BEGIN_SEAMLESS`.
    pub const MIGRATE_BEGIN_SEAMLESS: u16 = 116;
}

/// What the watcher saw in a chunk of main channel data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MainEvent {
    /// INIT: the session's id.
    Init {
        /// The id other channels link with.
        session_id: u32,
    },
    /// A message that would move the client to another host.
    Migration(u16),
}

/// Follows the server-to-client stream of one main channel.
#[derive(Debug)]
pub struct MainWatch {
    frames: Frames,
    /// Scratch for one chunk's frames, kept between chunks.
    seen: Vec<Frame>,
}

/// Body bytes the watcher reads: INIT's session id.
fn wanted(kind: u16) -> usize {
    if kind == main_msg::INIT { 4 } else { 0 }
}

impl MainWatch {
    /// A watcher for a channel linked with (`mini_header`) or without mini headers.
    pub fn new(mini_header: bool) -> Self {
        Self {
            frames: Frames::new(mini_header, wanted),
            seen: Vec::new(),
        }
    }

    /// Follows `data` (the next bytes from the hypervisor) and reports what
    /// it saw, in order. A chunk with an event must be looked at before it is
    /// forwarded.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<MainEvent>, WireError> {
        self.seen.clear();
        self.frames.feed(data, &mut self.seen)?;
        let mut events = Vec::new();
        for frame in &self.seen {
            match *frame {
                Frame::Header {
                    kind: main_msg::INIT,
                    size,
                    ..
                } if size < 4 => {
                    return Err(WireError::Invalid("main INIT shorter than its session id"));
                }
                Frame::Header {
                    kind:
                        kind @ (main_msg::MIGRATE_BEGIN
                        | main_msg::MIGRATE_SWITCH_HOST
                        | main_msg::MIGRATE_BEGIN_SEAMLESS),
                    ..
                } => events.push(MainEvent::Migration(kind)),
                Frame::Prefix {
                    kind: main_msg::INIT,
                    bytes,
                    ..
                } => events.push(MainEvent::Init {
                    session_id: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                }),
                _ => {}
            }
        }
        Ok(events)
    }
}

/// Fuzzing entry point: arbitrary main channel bytes, in arbitrary chunks.
pub fn fuzz_main_watch(data: &[u8]) {
    let mini = data.first().is_some_and(|b| b & 1 == 1);
    let mut watch = MainWatch::new(mini);
    for chunk in data.chunks(data.first().map_or(1, |&b| 1 + (b as usize >> 1))) {
        if watch.feed(chunk).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transcript::{Noise, chunks, hex, splits};

    /// What spice-server sends first on a main channel (mini headers):
    /// INIT, then a NAME, then the start of a large AGENT_DATA.
    const MAIN_START: &str = "
        67 00  20 00 00 00          # INIT, 32 bytes
        78 56 34 12                 #   session id 0x12345678
        01 00 00 00  03 00 00 00    #   display hint 1, mouse modes server|client
        02 00 00 00  00 00 00 00    #   mouse mode client, no agent
        0a 00 00 00  00 00 00 00    #   agent tokens 10, mm time
        00 00 00 04                 #   ram hint
        71 00  09 00 00 00          # NAME, 9 bytes
        05 00 00 00  76 6d 30 31 00 #   length 5, \"vm01\\0\"
        6d 00  00 00 10 00          # AGENT_DATA, 1 MiB (body not here yet)
        aa bb cc
    ";

    fn watch_in(bytes: &[u8], cuts: &[usize], mini: bool) -> Result<Vec<MainEvent>, WireError> {
        let mut w = MainWatch::new(mini);
        let mut all = Vec::new();
        for chunk in chunks(bytes, cuts) {
            all.extend(w.feed(chunk)?);
        }
        Ok(all)
    }

    #[test]
    fn init_gives_the_session_id_in_any_split() {
        let bytes = hex(MAIN_START);
        for cuts in splits(bytes.len()) {
            assert_eq!(
                watch_in(&bytes, &cuts, true),
                Ok(vec![MainEvent::Init {
                    session_id: 0x1234_5678
                }]),
                "split at {cuts:?}"
            );
        }
    }

    #[test]
    fn full_headers_are_followed_too() {
        let bytes = hex("
            01 00 00 00 00 00 00 00   # serial 1
            67 00  04 00 00 00        # INIT, 4 bytes (a short one)
            00 00 00 00               # no sub list
            ef be ad de               # session id
            02 00 00 00 00 00 00 00  6f 00  06 00 00 00  00 00 00 00   # MIGRATE_SWITCH_HOST
            01 02 03 04 05 06
        ");
        for cuts in splits(bytes.len()) {
            assert_eq!(
                watch_in(&bytes, &cuts, false),
                Ok(vec![
                    MainEvent::Init {
                        session_id: 0xdead_beef
                    },
                    MainEvent::Migration(main_msg::MIGRATE_SWITCH_HOST)
                ])
            );
        }
    }

    #[test]
    fn a_truncated_init_is_malformed() {
        assert!(watch_in(&hex("67 00 02 00 00 00 01 02"), &[], true).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut noise = Noise::new(0xfeed);
        for len in 0..2000 {
            fuzz_main_watch(&noise.bytes(len % 300));
        }
    }
}
