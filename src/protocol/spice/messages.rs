//! SPICE link messages: the header, the client's `SpiceLinkMess` and the
//! server's `SpiceLinkReply`, decoded strictly and encoded exactly.
//!
//! Caps are stricter than spice-server's (which allows 1024 capability words
//! and bodies up to its buffer): a link body is at most [`MAX_LINK_BODY`]
//! bytes and each capability list at most [`MAX_CAP_WORDS`] words, checked
//! before anything is buffered or allocated from them (CVE-2016-9578 was a
//! link-header size).

use super::super::{Reader, WireError};

/// `REDQ`, the link header magic.
pub const MAGIC: [u8; 4] = *b"REDQ";
/// The protocol major version spoken by every current client and server.
pub const VERSION_MAJOR: u32 = 2;
/// The protocol minor version.
pub const VERSION_MINOR: u32 = 2;
/// Bytes in a link header.
pub const HEADER_LEN: usize = 16;
/// Largest link body accepted from a peer.
pub const MAX_LINK_BODY: u32 = 4096;
/// Most capability words accepted in either list (real peers send 1).
pub const MAX_CAP_WORDS: u32 = 16;
/// Bytes of the fixed part of `SpiceLinkMess`.
pub const LINK_MESS_FIXED: usize = 18;
/// Bytes of the DER RSA-1024 public key in a link reply.
pub const PUBKEY_LEN: usize = 162;
/// Bytes of the fixed part of `SpiceLinkReply`.
pub const LINK_REPLY_FIXED: usize = 4 + PUBKEY_LEN + 12;

/// Link error codes (`SPICE_LINK_ERR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum LinkError {
    /// Success.
    Ok = 0,
    /// Unspecified failure.
    Error = 1,
    /// The header's magic is not `REDQ`.
    InvalidMagic = 2,
    /// A malformed or out-of-bounds message.
    InvalidData = 3,
    /// Unsupported protocol version.
    VersionMismatch = 4,
    /// This channel must use the TLS port.
    NeedSecured = 5,
    /// This channel must use the plain port.
    NeedUnsecured = 6,
    /// Wrong ticket.
    PermissionDenied = 7,
    /// The connection id names no session.
    BadConnectionId = 8,
    /// The channel does not exist.
    ChannelNotAvailable = 9,
}

/// Channel types (`SPICE_CHANNEL_*`).
pub mod channel {
    /// The main channel: opens a session.
    pub const MAIN: u8 = 1;
    /// Display.
    pub const DISPLAY: u8 = 2;
    /// Keyboard and mouse.
    pub const INPUTS: u8 = 3;
    /// Cursor.
    pub const CURSOR: u8 = 4;
    /// Audio out.
    pub const PLAYBACK: u8 = 5;
    /// Audio in.
    pub const RECORD: u8 = 6;
    /// Smartcard.
    pub const SMARTCARD: u8 = 8;
    /// USB redirection.
    pub const USBREDIR: u8 = 9;
    /// Port (agent and friends).
    pub const PORT: u8 = 10;
    /// WebDAV folder sharing.
    pub const WEBDAV: u8 = 11;

    /// Every type above, in order.
    const KNOWN: [u8; 10] = [
        MAIN, DISPLAY, INPUTS, CURSOR, PLAYBACK, RECORD, SMARTCARD, USBREDIR, PORT, WEBDAV,
    ];

    /// A bounded label for a channel type (`"other"` for any type not above).
    pub fn name(kind: u8) -> &'static str {
        match kind {
            MAIN => "main",
            DISPLAY => "display",
            INPUTS => "inputs",
            CURSOR => "cursor",
            PLAYBACK => "playback",
            RECORD => "record",
            SMARTCARD => "smartcard",
            USBREDIR => "usbredir",
            PORT => "port",
            WEBDAV => "webdav",
            _ => "other",
        }
    }

    /// The type [`name`] labels `label` (`"other"` labels none).
    pub fn by_name(label: &str) -> Option<u8> {
        KNOWN.into_iter().find(|&kind| name(kind) == label)
    }
}

/// Client to server message types (`SPICE_MSGC_*`): common ones, then the
/// display channel's.
pub mod client_msg {
    /// Common: `ACK_SYNC` (generation u32).
    pub const ACK_SYNC: u16 = 1;
    /// Common: `ACK`, no body.
    pub const ACK: u16 = 2;
    /// Common: `PONG` (id u32, timestamp u64).
    pub const PONG: u16 = 3;
    /// Common: `MIGRATE_FLUSH_MARK`, no body.
    pub const MIGRATE_FLUSH_MARK: u16 = 4;
    /// Common: `MIGRATE_DATA`, raw.
    pub const MIGRATE_DATA: u16 = 5;
    /// Common: `DISCONNECTING` (timestamp u64, reason u32).
    pub const DISCONNECTING: u16 = 6;
    /// Display: `DISPLAY_INIT` (14 bytes of cache settings).
    pub const DISPLAY_INIT: u16 = 101;
    /// Display: `STREAM_REPORT` (stream id u32 first, eight 32-bit words).
    pub const STREAM_REPORT: u16 = 102;
    /// Display: `PREFERRED_COMPRESSION` (u8).
    pub const PREFERRED_COMPRESSION: u16 = 103;
    /// Display: `GL_DRAW_DONE`, no body.
    pub const GL_DRAW_DONE: u16 = 104;
    /// Display: `PREFERRED_VIDEO_CODEC_TYPE` (count u8, then that many u8).
    pub const PREFERRED_VIDEO_CODEC_TYPE: u16 = 105;
}

/// Common capability bits.
pub mod common_cap {
    /// The client sends an auth mechanism before its ticket.
    pub const AUTH_SELECTION: u32 = 0;
    /// SPICE ticket authentication.
    pub const AUTH_SPICE: u32 = 1;
    /// SASL authentication (never passed through a proxy).
    pub const AUTH_SASL: u32 = 2;
    /// Short data headers after the link.
    pub const MINI_HEADER: u32 = 3;
}

/// Main channel capability bits.
pub mod main_cap {
    /// Semi-seamless migration (never passed through a proxy).
    pub const SEMI_SEAMLESS_MIGRATE: u32 = 0;
    /// NAME and UUID messages.
    pub const NAME_AND_UUID: u32 = 1;
    /// AGENT_CONNECTED_TOKENS.
    pub const AGENT_CONNECTED_TOKENS: u32 = 2;
    /// Seamless migration (never passed through a proxy).
    pub const SEAMLESS_MIGRATE: u32 = 3;
}

/// Display channel capability bits.
pub mod display_cap {
    /// Sized streams.
    pub const SIZED_STREAM: u32 = 0;
    /// Monitors configuration.
    pub const MONITORS_CONFIG: u32 = 1;
    /// Composite drawing.
    pub const COMPOSITE: u32 = 2;
    /// A8 surfaces.
    pub const A8_SURFACE: u32 = 3;
    /// Stream reports.
    pub const STREAM_REPORT: u32 = 4;
    /// LZ4 compression.
    pub const LZ4_COMPRESSION: u32 = 5;
    /// Preferred compression.
    pub const PREF_COMPRESSION: u32 = 6;
    /// GL scanout over a local unix socket: never through a proxy.
    pub const GL_SCANOUT: u32 = 7;
    /// Several video codecs.
    pub const MULTI_CODEC: u32 = 8;
    /// MJPEG video.
    pub const CODEC_MJPEG: u32 = 9;
    /// Preferred video codec type.
    pub const PREF_VIDEO_CODEC_TYPE: u32 = 12;
}

/// The 16-byte link header that precedes every link message, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkHeader {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Body bytes that follow.
    pub size: u32,
}

impl LinkHeader {
    /// Decodes a header, refusing a bad magic or an oversized body as soon as
    /// the bytes that show it have arrived.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let magic = r.take(r.remaining().min(4))?;
        if !MAGIC.starts_with(magic) {
            return Err(WireError::Invalid("link magic is not REDQ"));
        }
        if magic.len() < 4 {
            return Err(WireError::Incomplete);
        }
        let major = r.u32_le()?;
        let minor = r.u32_le()?;
        let size = r.u32_le()?;
        if size > MAX_LINK_BODY {
            return Err(WireError::TooLarge {
                what: "link body",
                got: size.into(),
                max: MAX_LINK_BODY.into(),
            });
        }
        Ok(Self { major, minor, size })
    }

    /// Appends the header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.major.to_le_bytes());
        out.extend_from_slice(&self.minor.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
    }
}

/// Capability words: common ones, then channel-specific ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    /// Common capability words.
    pub common: Vec<u32>,
    /// Channel capability words.
    pub channel: Vec<u32>,
}

impl Caps {
    /// Whether common capability `bit` is set.
    pub fn has_common(&self, bit: u32) -> bool {
        has(&self.common, bit)
    }

    /// Whether channel capability `bit` is set.
    pub fn has_channel(&self, bit: u32) -> bool {
        has(&self.channel, bit)
    }

    /// Clears common capability `bit`.
    pub fn clear_common(&mut self, bit: u32) {
        clear(&mut self.common, bit);
    }

    /// Clears channel capability `bit`.
    pub fn clear_channel(&mut self, bit: u32) {
        clear(&mut self.channel, bit);
    }

    fn words(&self) -> usize {
        self.common.len() + self.channel.len()
    }

    /// Reads `num_common, num_channel, caps_offset` and the words they name
    /// from `body` (offsets count from the body's start).
    fn decode(body: &[u8], counts_at: usize) -> Result<Caps, WireError> {
        let mut r = Reader::new(body);
        r.take(counts_at)?;
        let num_common = r.u32_le()?;
        let num_channel = r.u32_le()?;
        let offset = r.u32_le()? as usize;
        for n in [num_common, num_channel] {
            if n > MAX_CAP_WORDS {
                return Err(WireError::TooLarge {
                    what: "capability list",
                    got: n.into(),
                    max: MAX_CAP_WORDS.into(),
                });
            }
        }
        let words = (num_common + num_channel) as usize;
        // The caps must follow the fixed part and end inside the body.
        if offset < r.position() || offset + 4 * words > body.len() {
            return Err(WireError::Invalid("capabilities lie outside the message"));
        }
        let mut r = Reader::new(&body[offset..]);
        let mut read = |n: u32| (0..n).map(|_| r.u32_le()).collect::<Result<Vec<_>, _>>();
        Ok(Caps {
            common: read(num_common)?,
            channel: read(num_channel)?,
        })
    }

    /// Appends `num_common, num_channel, caps_offset`, with the words placed
    /// right after a fixed part of `fixed_len` bytes.
    fn encode_counts(&self, fixed_len: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.common.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.channel.len() as u32).to_le_bytes());
        out.extend_from_slice(&(fixed_len as u32).to_le_bytes());
    }

    fn encode_words(&self, out: &mut Vec<u8>) {
        for w in self.common.iter().chain(&self.channel) {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
}

fn has(words: &[u32], bit: u32) -> bool {
    words
        .get((bit / 32) as usize)
        .is_some_and(|w| w & (1 << (bit % 32)) != 0)
}

fn clear(words: &mut [u32], bit: u32) {
    if let Some(w) = words.get_mut((bit / 32) as usize) {
        *w &= !(1 << (bit % 32));
    }
}

/// Inside a complete body, running out of bytes is malformed, not `Incomplete`.
fn short_body(what: &'static str) -> impl Fn(WireError) -> WireError + Copy {
    move |e| match e {
        WireError::Incomplete => WireError::Invalid(what),
        e => e,
    }
}

/// Decodes a header and the body it announces from the front of `buf`:
/// `Incomplete` until all of it is there; returns the header, the body and
/// the bytes consumed.
fn framed(buf: &[u8]) -> Result<(LinkHeader, &[u8], usize), WireError> {
    let mut r = Reader::new(buf);
    let header = LinkHeader::decode(&mut r)?;
    if header.major != VERSION_MAJOR {
        return Err(WireError::Invalid("unsupported SPICE major version"));
    }
    let body = r.take(header.size as usize)?;
    Ok((header, body, r.position()))
}

/// The client's link message (`SpiceLinkMess`) for one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMess {
    /// 0 for a new session's main channel, else the session id.
    pub connection_id: u32,
    /// Channel type ([`channel`]).
    pub channel_type: u8,
    /// Channel instance.
    pub channel_id: u8,
    /// Advertised capabilities.
    pub caps: Caps,
}

impl LinkMess {
    /// Decodes header and body from the front of `buf`; returns the message
    /// and the bytes consumed (anything after them belongs to the next step).
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), WireError> {
        let (_, body, used) = framed(buf)?;
        let mut r = Reader::new(body);
        let fixed = short_body("link message shorter than its fixed part");
        let connection_id = r.u32_le().map_err(fixed)?;
        let channel_type = r.u8().map_err(fixed)?;
        let channel_id = r.u8().map_err(fixed)?;
        let caps = Caps::decode(body, r.position()).map_err(fixed)?;
        Ok((
            Self {
                connection_id,
                channel_type,
                channel_id,
                caps,
            },
            used,
        ))
    }

    /// Header and body, as sent to a server.
    pub fn encode(&self) -> Vec<u8> {
        let size = LINK_MESS_FIXED + 4 * self.caps.words();
        let mut out = Vec::with_capacity(HEADER_LEN + size);
        LinkHeader {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            size: size as u32,
        }
        .encode(&mut out);
        out.extend_from_slice(&self.connection_id.to_le_bytes());
        out.push(self.channel_type);
        out.push(self.channel_id);
        self.caps.encode_counts(LINK_MESS_FIXED, &mut out);
        self.caps.encode_words(&mut out);
        out
    }
}

/// The server's link reply (`SpiceLinkReply`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkReply {
    /// Link error code; 0 is success.
    pub error: u32,
    /// DER SubjectPublicKeyInfo of the RSA-1024 key the ticket is encrypted to.
    pub public_key: [u8; PUBKEY_LEN],
    /// Advertised capabilities.
    pub caps: Caps,
}

impl LinkReply {
    /// The reply that reports `error` (key and caps zero, as spice-server sends it).
    pub fn failure(error: LinkError) -> Self {
        Self {
            error: error as u32,
            public_key: [0; PUBKEY_LEN],
            caps: Caps::default(),
        }
    }

    /// Decodes header and body from the front of `buf`; returns the reply and
    /// the bytes consumed.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), WireError> {
        let (_, body, used) = framed(buf)?;
        let mut r = Reader::new(body);
        let short = short_body("link reply shorter than its fixed part");
        let error = r.u32_le().map_err(short)?;
        let mut public_key = [0u8; PUBKEY_LEN];
        public_key.copy_from_slice(r.take(PUBKEY_LEN).map_err(short)?);
        let caps = if error == 0 {
            Caps::decode(body, r.position()).map_err(short)?
        } else {
            Caps::default()
        };
        Ok((
            Self {
                error,
                public_key,
                caps,
            },
            used,
        ))
    }

    /// Header and body, as sent to a client.
    pub fn encode(&self) -> Vec<u8> {
        let size = LINK_REPLY_FIXED + 4 * self.caps.words();
        let mut out = Vec::with_capacity(HEADER_LEN + size);
        LinkHeader {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            size: size as u32,
        }
        .encode(&mut out);
        out.extend_from_slice(&self.error.to_le_bytes());
        out.extend_from_slice(&self.public_key);
        if self.error == 0 {
            self.caps.encode_counts(LINK_REPLY_FIXED, &mut out);
        } else {
            // The error form: counts and offset zero.
            out.extend_from_slice(&[0; 12]);
        }
        self.caps.encode_words(&mut out);
        out
    }
}

/// Fuzzing entry point: the first byte picks the message, the rest is fed
/// to its decoder. Must never panic, whatever the input.
pub fn fuzz_link(data: &[u8]) {
    match data.split_first() {
        Some((0, rest)) => {
            if let Ok((m, used)) = LinkMess::decode(rest) {
                assert!(used <= rest.len());
                let _ = LinkMess::decode(&m.encode()).expect("own encoding decodes");
            }
        }
        Some((_, rest)) => {
            if let Ok((m, used)) = LinkReply::decode(rest) {
                assert!(used <= rest.len());
                let _ = LinkReply::decode(&m.encode()).expect("own encoding decodes");
            }
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transcript::{hex, in_every_split};

    /// remote-viewer's main channel link message, as spice-gtk sends it.
    const MAIN_LINK: &str = "
        52 45 44 51            # magic REDQ
        02 00 00 00            # major 2
        02 00 00 00            # minor 2
        1a 00 00 00            # body size 26
        00 00 00 00            # connection id 0: a new session
        01                     # channel type: main
        00                     # channel id 0
        01 00 00 00            # 1 common cap word
        01 00 00 00            # 1 channel cap word
        12 00 00 00            # caps at offset 18
        0d 00 00 00            # common: AUTH_SELECTION | AUTH_SASL | MINI_HEADER
        0f 00 00 00            # main: migrate caps, name and uuid, agent tokens
    ";

    #[test]
    fn a_main_channel_link_message_decodes_in_any_split() {
        let bytes = hex(MAIN_LINK);
        let (m, used) = in_every_split(&bytes, LinkMess::decode).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(m.connection_id, 0);
        assert_eq!(m.channel_type, channel::MAIN);
        assert!(m.caps.has_common(common_cap::AUTH_SELECTION));
        assert!(m.caps.has_common(common_cap::AUTH_SASL));
        assert!(!m.caps.has_common(common_cap::AUTH_SPICE));
        assert!(m.caps.has_common(common_cap::MINI_HEADER));
        assert_eq!(m.encode(), bytes, "encodes back to the same bytes");
    }

    #[test]
    fn bytes_after_the_message_are_left_for_the_next_step() {
        let mut bytes = hex(MAIN_LINK);
        bytes.extend_from_slice(&hex("01 00 00 00  # auth mechanism: SPICE ticket"));
        let (_, used) = LinkMess::decode(&bytes).unwrap();
        assert_eq!(&bytes[used..], &[1, 0, 0, 0]);
    }

    #[test]
    fn sasl_can_be_cleared_before_forwarding() {
        let (mut m, _) = LinkMess::decode(&hex(MAIN_LINK)).unwrap();
        m.caps.clear_common(common_cap::AUTH_SASL);
        assert!(!m.caps.has_common(common_cap::AUTH_SASL));
        assert!(m.caps.has_common(common_cap::MINI_HEADER));
        let (again, _) = LinkMess::decode(&m.encode()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn an_oversized_body_is_refused_from_the_header_alone() {
        // CVE-2016-9578 was a link-header size: refuse before waiting for the body.
        let header = hex("52 45 44 51  02 00 00 00  02 00 00 00  00 00 00 40  # size 1 GiB");
        assert_eq!(
            in_every_split(&header, LinkMess::decode),
            Err(WireError::TooLarge {
                what: "link body",
                got: 1 << 30,
                max: MAX_LINK_BODY.into()
            })
        );
    }

    #[test]
    fn a_bad_magic_is_refused_at_its_first_wrong_byte() {
        assert_eq!(
            LinkMess::decode(b"G"),
            Err(WireError::Invalid("link magic is not REDQ"))
        );
        assert_eq!(LinkMess::decode(b"RE"), Err(WireError::Incomplete));
        assert_eq!(
            in_every_split(b"GET / HTTP/1.1\r\n\r\n", LinkMess::decode),
            Err(WireError::Invalid("link magic is not REDQ"))
        );
    }

    #[test]
    fn capability_counts_and_offsets_are_bounded() {
        let too_many = hex("
            52 45 44 51  02 00 00 00  02 00 00 00  1a 00 00 00
            00 00 00 00  01 00
            ff ff ff ff            # 4 billion common cap words
            00 00 00 00  12 00 00 00  00 00 00 00 00 00 00 00
        ");
        assert!(matches!(
            LinkMess::decode(&too_many),
            Err(WireError::TooLarge {
                what: "capability list",
                ..
            })
        ));
        let outside = hex("
            52 45 44 51  02 00 00 00  02 00 00 00  1a 00 00 00
            00 00 00 00  01 00
            02 00 00 00  00 00 00 00
            16 00 00 00            # caps at 22: the second word would end past the body
            00 00 00 00 00 00 00 00
        ");
        assert_eq!(
            LinkMess::decode(&outside),
            Err(WireError::Invalid("capabilities lie outside the message"))
        );
        let short = hex("52 45 44 51  02 00 00 00  02 00 00 00  04 00 00 00  00 00 00 00");
        assert_eq!(
            LinkMess::decode(&short),
            Err(WireError::Invalid(
                "link message shorter than its fixed part"
            ))
        );
        let v1 = hex("52 45 44 51  01 00 00 00  00 00 00 00  00 00 00 00");
        assert_eq!(
            LinkMess::decode(&v1),
            Err(WireError::Invalid("unsupported SPICE major version"))
        );
    }

    #[test]
    fn link_replies_round_trip_and_errors_take_spice_servers_form() {
        let mut key = [0u8; PUBKEY_LEN];
        key.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let ok = LinkReply {
            error: 0,
            public_key: key,
            caps: Caps {
                common: vec![0b1011],
                channel: vec![],
            },
        };
        let bytes = ok.encode();
        assert_eq!(bytes.len(), HEADER_LEN + LINK_REPLY_FIXED + 4);
        assert_eq!(&bytes[12..16], &(LINK_REPLY_FIXED as u32 + 4).to_le_bytes());
        let (back, used) = in_every_split(&bytes, LinkReply::decode).unwrap();
        assert_eq!((back, used), (ok, bytes.len()));

        let denied = LinkReply::failure(LinkError::NeedSecured).encode();
        let mut expected = hex("52 45 44 51  02 00 00 00  02 00 00 00  b2 00 00 00  # body 178");
        expected.extend_from_slice(&5u32.to_le_bytes()); // NEED_SECURED
        expected.extend_from_slice(&[0; PUBKEY_LEN + 12]); // key, counts and offset all zero
        assert_eq!(denied, expected);
        assert_eq!(
            LinkReply::decode(&denied).unwrap().0.error,
            LinkError::NeedSecured as u32
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 1u64;
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 33) as u8
                })
                .collect();
            fuzz_link(&bytes);
            // And with a valid header in front, so the body parsers are reached.
            let mut framed = hex("00 52 45 44 51 02 00 00 00 02 00 00 00");
            framed.extend_from_slice(&(len as u32).to_le_bytes());
            framed.extend_from_slice(&bytes);
            fuzz_link(&framed);
            framed[0] = 1;
            fuzz_link(&framed);
        }
    }
}
