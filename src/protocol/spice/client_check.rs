//! Checking a SPICE client's messages before the hypervisor sees them.
//!
//! QEMU 7.2's spice-server takes some client messages badly (each measured
//! against it through a real channel; `/work` notes and the e2e fuzz in
//! `tests/e2e/test_spice_fuzz.py` keep the evidence):
//!
//! - `MIGRATE_FLUSH_MARK` on any channel is an assertion: QEMU aborts
//!   (SIGTRAP); the main channel's migration messages
//!   (`MIGRATE_DST_DO_SEAMLESS` with a body of 1 among them) abort it too.
//! - A message spice-server cannot parse (an unknown type, a body shorter
//!   than its fields, over the channel's receive buffer) makes it drop the
//!   channel, or the whole client for the main channel; a dropped display
//!   channel crashes QEMU (SIGSEGV, see [`super::display_drain`]).
//! - Field values it trusts: a `DISPLAY_INIT` whose GLZ window or pixmap
//!   cache is out of range (0x7FFFFFFF, -1) makes it allocate or fail;
//!   a second `DISPLAY_INIT`, `GL_DRAW_DONE` with no GL draw pending, a
//!   `STREAM_REPORT` for a stream past its 50.
//!
//! So each channel passes only the messages a real client sends on it
//! (spicy, remote-viewer and spice-html5 were measured), each within the
//! sizes and field values spice-server accepts. A message with fields to
//! check is held whole until checked (those are small); a data message
//! (agent data, USB redirection, audio, smartcard) is checked by its header
//! and then streamed. Nothing of a refused message reaches the hypervisor:
//! the bytes before it go, the client's side ends there, and the
//! hypervisor's stream stands at a message boundary.

use super::framing::{FULL_HEADER_LEN, MINI_HEADER_LEN};
use super::messages::channel;
use super::messages::client_msg as msg;

use crate::protocol::client_filter::{Checked, Refused};

/// Checks a message's fields: the body bytes its rule asked for, and the
/// body's whole size.
type FieldCheck = fn(&[u8], u32) -> Result<(), &'static str>;

/// What a channel's client may send with one message type.
#[derive(Debug, Clone, Copy)]
struct Rule {
    /// Fewest body bytes (its fields).
    min: u32,
    /// Most body bytes.
    max: u32,
    /// Checks the first `.0` bytes of the body (all of it when shorter),
    /// which are held until they are there; the rest streams. `None`: the
    /// whole body streams.
    fields: Option<(u32, FieldCheck)>,
}

/// A message of at least `len` body bytes (spice-server reads its fields
/// and ignores the rest), up to the channel's receive buffer.
const fn fields(len: u32) -> Rule {
    Rule {
        min: len,
        max: u32::MAX,
        fields: None,
    }
}

const fn sized(min: u32, max: u32) -> Rule {
    Rule {
        min,
        max,
        fields: None,
    }
}

/// A message whose whole body is checked (held until whole).
const fn checked(min: u32, max: u32, fields: FieldCheck) -> Rule {
    Rule {
        min,
        max,
        fields: Some((max, fields)),
    }
}

/// A message whose first `need` body bytes are checked, the rest streamed.
const fn led(min: u32, max: u32, need: u32, fields: FieldCheck) -> Rule {
    Rule {
        min,
        max,
        fields: Some((need, fields)),
    }
}

/// Types per channel (`SPICE_MSGC_*`).
mod kind {
    pub(super) const MAIN_CLIENT_INFO: u16 = 101;
    pub(super) const MAIN_MIGRATE_CONNECTED: u16 = 102;
    pub(super) const MAIN_MIGRATE_CONNECT_ERROR: u16 = 103;
    pub(super) const MAIN_ATTACH_CHANNELS: u16 = 104;
    pub(super) const MAIN_MOUSE_MODE_REQUEST: u16 = 105;
    pub(super) const MAIN_AGENT_START: u16 = 106;
    pub(super) const MAIN_AGENT_DATA: u16 = 107;
    pub(super) const MAIN_AGENT_TOKEN: u16 = 108;
    pub(super) const MAIN_MIGRATE_END: u16 = 109;
    pub(super) const MAIN_MIGRATE_DST_DO_SEAMLESS: u16 = 110;
    pub(super) const MAIN_MIGRATE_CONNECTED_SEAMLESS: u16 = 111;
    pub(super) const INPUTS_KEY_DOWN: u16 = 101;
    pub(super) const INPUTS_KEY_UP: u16 = 102;
    pub(super) const INPUTS_KEY_MODIFIERS: u16 = 103;
    pub(super) const INPUTS_KEY_SCANCODE: u16 = 104;
    pub(super) const INPUTS_MOUSE_MOTION: u16 = 111;
    pub(super) const INPUTS_MOUSE_POSITION: u16 = 112;
    pub(super) const INPUTS_MOUSE_PRESS: u16 = 113;
    pub(super) const INPUTS_MOUSE_RELEASE: u16 = 114;
    pub(super) const RECORD_DATA: u16 = 101;
    pub(super) const RECORD_MODE: u16 = 102;
    pub(super) const RECORD_START_MARK: u16 = 103;
    pub(super) const SMARTCARD_DATA: u16 = 101;
    pub(super) const SPICEVMC_DATA: u16 = 101;
    pub(super) const SPICEVMC_COMPRESSED_DATA: u16 = 102;
    pub(super) const PORT_EVENT: u16 = 201;
}

/// The largest message body each channel's spice-server side takes (its
/// receive buffer; past it the channel is closed, or worse: it allocates
/// what a header declares).
fn channel_cap(channel_type: u8) -> u32 {
    match channel_type {
        channel::MAIN => 26_624,
        channel::DISPLAY | channel::CURSOR => 1024,
        channel::INPUTS => 2048,
        channel::PLAYBACK | channel::RECORD => 32_768,
        channel::SMARTCARD => 65_536,
        _ => MAX_DEVICE_DATA,
    }
}
/// Streams a display channel has (spice-server's `NUM_STREAMS`).
const STREAMS: u32 = 50;
/// An agent message chunk: spice-gtk and spice-html5 send at most
/// `VD_AGENT_MAX_DATA_SIZE` (2048) bytes of agent data per message.
const MAX_AGENT_CHUNK: u32 = 2048;
/// Data messages of USB redirection and ports. spice-server allocates what
/// the header declares before reading it (0x80000000 and more abort or
/// crash QEMU); clients send a USB transfer or a port's buffer at a time,
/// far under this.
const MAX_DEVICE_DATA: u32 = 16 * 1024 * 1024;
/// What a `COMPRESSED_DATA` may inflate to: spice-server allocates it
/// first (0xfffffff0 aborts QEMU); spice-gtk compresses one such buffer.
const MAX_INFLATED: u32 = MAX_DEVICE_DATA;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(v)
}

/// `DISPLAY_INIT`: pixmap_cache_id u8, pixmap_cache_size i64,
/// glz_dictionary_id u8, glz_dictionary_window_size i32. spice-server
/// sizes caches and the GLZ dictionary from these; real clients ask for
/// tens of MiB at most.
fn display_init(b: &[u8], _size: u32) -> Result<(), &'static str> {
    let pixmap_cache = i64_at(b, 1);
    let glz_window = u32_at(b, 10) as i32;
    if !(0..=MAX_PIXMAP_CACHE).contains(&pixmap_cache) {
        return Err("a pixmap cache size no client asks for");
    }
    if !(0..=MAX_GLZ_WINDOW).contains(&glz_window) {
        return Err("a GLZ window size no client asks for");
    }
    Ok(())
}

/// The largest pixmap cache a client may ask for, in pixels: what spice-gtk
/// can express (`G_MAXINT / 4`; it asks for 20971520, spice-html5 for
/// 10485760). Any value is memory-safe in spice-server; this bounds what
/// a client could make it keep.
const MAX_PIXMAP_CACHE: i64 = (i32::MAX / 4) as i64;
/// The largest GLZ dictionary window, in pixels: spice-gtk asks for
/// 16 MiB / 4; above 2^25 (or below 0) spice-server 0.15.1 fails to make
/// the dictionary and QEMU 7.2 aborts (measured: 2^25 passes, 2^25 + 1 kills).
const MAX_GLZ_WINDOW: i32 = 1 << 25;

/// `STREAM_REPORT`: stream_id u32 first.
fn stream_report(b: &[u8], _size: u32) -> Result<(), &'static str> {
    if u32_at(b, 0) >= STREAMS {
        return Err("a stream the display channel cannot have");
    }
    Ok(())
}

/// `PREFERRED_COMPRESSION`: one of `SPICE_IMAGE_COMPRESSION_*` (1..=7).
fn preferred_compression(b: &[u8], _size: u32) -> Result<(), &'static str> {
    if !(1..=7).contains(&b[0]) {
        return Err("an image compression that does not exist");
    }
    Ok(())
}

/// `PREFERRED_VIDEO_CODEC_TYPE`: a count, then that many codec types
/// (`SPICE_VIDEO_CODEC_TYPE_*`, 1..=5).
fn preferred_video_codecs(b: &[u8], _size: u32) -> Result<(), &'static str> {
    let count = usize::from(b[0]);
    if count == 0 || count + 1 > b.len() {
        return Err("lists more codecs than it holds");
    }
    if b[1..=count].iter().any(|c| !(1..=5).contains(c)) {
        return Err("a video codec that does not exist");
    }
    Ok(())
}

/// `COMPRESSED_DATA` of a device channel: type u8 (`SPICE_DATA_COMPRESSION_TYPE_LZ4`,
/// 1), uncompressed size u32, then the data.
fn compressed_data(b: &[u8], _size: u32) -> Result<(), &'static str> {
    if b[0] != 1 {
        return Err("a compression that does not exist");
    }
    if u32_at(b, 1) > MAX_INFLATED {
        return Err("inflates beyond what a client sends");
    }
    Ok(())
}

/// Record `MODE`: time u32, mode u16 (raw 1 or Opus 3; others close the channel).
fn record_mode(b: &[u8], _size: u32) -> Result<(), &'static str> {
    match u16::from_le_bytes([b[4], b[5]]) {
        1 | 3 => Ok(()),
        _ => Err("an audio mode that does not exist"),
    }
}

/// Smartcard `DATA`: a `VSCMsgHeader` (type u32, reader_id u32, length
/// u32), then `length` bytes. One reader (0) exists; types 1..=7 (Init,
/// Error, ReaderAdd, ReaderRemove, ATR, CardRemove, APDU); an ATR is at
/// most 40 bytes.
fn smartcard_data(b: &[u8], size: u32) -> Result<(), &'static str> {
    let (kind, reader, length) = (u32_at(b, 0), u32_at(b, 4), u32_at(b, 8));
    if !(1..=7).contains(&kind) {
        return Err("a smartcard message type that does not exist");
    }
    if reader != 0 {
        return Err("a smartcard reader that does not exist");
    }
    if u64::from(length) + 12 > u64::from(size) {
        return Err("a smartcard message longer than its body");
    }
    if kind == 5 && length > 40 {
        return Err("an ATR longer than 40 bytes");
    }
    Ok(())
}

/// `MOUSE_MODE_REQUEST`: server (1) or client (2).
fn mouse_mode(b: &[u8], _size: u32) -> Result<(), &'static str> {
    match u16::from_le_bytes([b[0], b[1]]) {
        1 | 2 => Ok(()),
        _ => Err("a mouse mode that does not exist"),
    }
}

/// What the client of a channel of `channel_type` may send as `kind`
/// (common types are every channel's).
fn rule(channel_type: u8, kind: u16) -> Result<Rule, &'static str> {
    match kind {
        msg::ACK_SYNC => return Ok(fields(4)),
        msg::ACK => return Ok(fields(0)),
        msg::PONG | msg::DISCONNECTING => return Ok(fields(12)),
        msg::MIGRATE_FLUSH_MARK | msg::MIGRATE_DATA => {
            return Err("migration (Porthole does not migrate sessions)");
        }
        _ => {}
    }
    use kind::*;
    let rule = match (channel_type, kind) {
        (channel::MAIN, MAIN_ATTACH_CHANNELS) => fields(0),
        (channel::MAIN, MAIN_MOUSE_MODE_REQUEST) => led(2, u32::MAX, 2, mouse_mode),
        (channel::MAIN, MAIN_AGENT_START | MAIN_AGENT_TOKEN) => fields(4),
        // The agent stream's framing is checked by `ClientCheck` (it has state).
        (channel::MAIN, MAIN_AGENT_DATA) => checked(0, MAX_AGENT_CHUNK, |_, _| Ok(())),
        (
            channel::MAIN,
            MAIN_MIGRATE_CONNECTED
            | MAIN_MIGRATE_CONNECT_ERROR
            | MAIN_MIGRATE_END
            | MAIN_MIGRATE_DST_DO_SEAMLESS
            | MAIN_MIGRATE_CONNECTED_SEAMLESS,
        ) => return Err("migration (Porthole does not migrate sessions)"),
        (channel::MAIN, MAIN_CLIENT_INFO) => {
            return Err("CLIENT_INFO (spice-server drops the client for it)");
        }
        (channel::DISPLAY, msg::DISPLAY_INIT) => led(14, u32::MAX, 14, display_init),
        (channel::DISPLAY, msg::STREAM_REPORT) => led(32, u32::MAX, 4, stream_report),
        (channel::DISPLAY, msg::PREFERRED_COMPRESSION) => {
            led(1, u32::MAX, 1, preferred_compression)
        }
        (channel::DISPLAY, msg::PREFERRED_VIDEO_CODEC_TYPE) => {
            checked(2, u32::MAX, preferred_video_codecs)
        }
        (channel::DISPLAY, msg::GL_DRAW_DONE) => {
            return Err("GL drawing is for local clients only");
        }
        (channel::INPUTS, INPUTS_KEY_DOWN | INPUTS_KEY_UP) => fields(4),
        (channel::INPUTS, INPUTS_KEY_MODIFIERS) => fields(2),
        (channel::INPUTS, INPUTS_KEY_SCANCODE) => sized(1, 64),
        (channel::INPUTS, INPUTS_MOUSE_MOTION) => fields(10),
        (channel::INPUTS, INPUTS_MOUSE_POSITION) => fields(11),
        (channel::INPUTS, INPUTS_MOUSE_PRESS | INPUTS_MOUSE_RELEASE) => fields(3),
        (channel::RECORD, RECORD_DATA) => fields(5),
        (channel::RECORD, RECORD_MODE) => led(6, u32::MAX, 6, record_mode),
        (channel::RECORD, RECORD_START_MARK) => fields(4),
        (channel::SMARTCARD, SMARTCARD_DATA) => led(12, u32::MAX, 12, smartcard_data),
        (channel::USBREDIR | channel::PORT | channel::WEBDAV, SPICEVMC_DATA) => fields(1),
        (channel::USBREDIR | channel::PORT | channel::WEBDAV, SPICEVMC_COMPRESSED_DATA) => {
            led(6, u32::MAX, 5, compressed_data)
        }
        (channel::PORT | channel::WEBDAV, PORT_EVENT) => fields(1),
        _ => return Err("not a message this channel's clients send"),
    };
    Ok(rule)
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Collecting a header.
    Header,
    /// Holding the first body bytes of a message until its fields are checked.
    Hold(Held),
    /// Passing this many body bytes on as they come.
    Stream(u64),
    /// Leaving out this many body bytes of a dropped message.
    Drop(u64),
}

/// A message whose first `need` body bytes are being held for `fields`.
#[derive(Debug, Clone, Copy)]
struct Held {
    serial: u64,
    kind: u16,
    size: u32,
    need: u32,
    fields: FieldCheck,
}

/// One channel's client messages, checked in order.
#[derive(Debug)]
pub struct ClientCheck {
    channel_type: u8,
    mini_header: bool,
    state: State,
    /// The message being checked: its header, and its body while held.
    held: Vec<u8>,
    /// The display channel's `DISPLAY_INIT` went through.
    inited: bool,
    /// The main channel's agent stream.
    agent: AgentStream,
    /// The client may watch, not act: see [`ClientCheck::view_only`].
    view_only: bool,
}

/// The main channel's agent messages, as spice-server's agent message
/// filter reads them: `AGENT_START` first (an `AGENT_TOKEN` before it
/// aborts QEMU 7.2), then `AGENT_DATA` chunks, each either the start of an
/// agent message (its 20-byte `VDAgentMessage` header whole, protocol 1, a
/// type that exists, no more data than the header's size) or the
/// continuation of the one before (no more than it still owes). Anything
/// else makes spice-server drop the client.
#[derive(Debug, Default)]
struct AgentStream {
    started: bool,
    /// Bytes the current agent message still owes.
    owed: u32,
}

/// `VDAgentMessage`: protocol u32, type u32, opaque u64, size u32.
const AGENT_HEADER: usize = 20;
/// `VD_AGENT_PROTOCOL`.
const AGENT_PROTOCOL: u32 = 1;
/// The last `VD_AGENT_*` message type (`VD_AGENT_END_MESSAGE` is one past it).
const AGENT_LAST_TYPE: u32 = 16;

impl AgentStream {
    fn chunk(&mut self, b: &[u8]) -> Result<(), &'static str> {
        let len = b.len() as u32;
        if self.owed > 0 {
            if len > self.owed {
                return Err("more agent data than its message holds");
            }
            self.owed -= len;
            return Ok(());
        }
        if b.len() < AGENT_HEADER {
            return Err("an agent message without its whole header");
        }
        if u32_at(b, 0) != AGENT_PROTOCOL {
            return Err("an agent protocol that does not exist");
        }
        if !(1..=AGENT_LAST_TYPE).contains(&u32_at(b, 4)) {
            return Err("an agent message type that does not exist");
        }
        let size = u32_at(b, 16);
        let carried = len - AGENT_HEADER as u32;
        if carried > size {
            return Err("more agent data than its message holds");
        }
        self.owed = size - carried;
        Ok(())
    }
}

impl ClientCheck {
    /// A check for a channel of `channel_type` linked with (`mini_header`)
    /// or without mini headers.
    pub fn new(mini_header: bool, channel_type: u8) -> Self {
        Self {
            channel_type,
            mini_header,
            state: State::Header,
            held: Vec::new(),
            inited: false,
            agent: AgentStream::default(),
            view_only: false,
        }
    }

    /// The check for a view-only client: on the main channel, what would
    /// reach into the VM is dropped whole (agent messages: clipboard, file
    /// transfer, monitor configuration; without `AGENT_START` spice-server
    /// sends the client no agent data either) and so is a mouse-mode
    /// request. The channels that carry input or data into the VM are
    /// refused at their link, before any check.
    pub fn view_only(mini_header: bool, channel_type: u8) -> Self {
        Self {
            view_only: true,
            ..Self::new(mini_header, channel_type)
        }
    }

    /// Whether the channel uses mini headers.
    pub fn mini_header(&self) -> bool {
        self.mini_header
    }

    fn header_len(&self) -> usize {
        if self.mini_header {
            MINI_HEADER_LEN
        } else {
            FULL_HEADER_LEN
        }
    }

    /// Body bytes that finish what has gone to the hypervisor (0: it stands
    /// between messages, whatever is held here).
    pub fn body_left(&self) -> Option<u64> {
        match self.state {
            State::Stream(left) => Some(left),
            State::Header | State::Hold { .. } | State::Drop(_) => Some(0),
        }
    }

    /// The client's next bytes: what may go now; each message that goes
    /// is appended to `went` as (serial, type).
    pub fn check(&mut self, mut data: &[u8], went: &mut Vec<(u64, u16)>) -> Checked {
        let mut out = Checked::default();
        while !data.is_empty() {
            match self.state {
                State::Stream(left) => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.forward.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Header
                    } else {
                        State::Stream(left)
                    };
                }
                State::Drop(left) => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Header
                    } else {
                        State::Drop(left)
                    };
                }
                State::Header => {
                    let want = self.header_len() - self.held.len();
                    let n = want.min(data.len());
                    self.held.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.held.len() == self.header_len()
                        && let Err(refused) = self.header(&mut out, went)
                    {
                        return self.refuse(out, refused);
                    }
                }
                State::Hold(held) => {
                    let whole = self.header_len() + held.need as usize;
                    let n = (whole - self.held.len()).min(data.len());
                    self.held.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.held.len() == whole
                        && let Err(refused) = self.body(held, &mut out.forward, went)
                    {
                        return self.refuse(out, refused);
                    }
                }
            }
        }
        out
    }

    /// Ends the check at a refused message: nothing of it goes, and what
    /// follows is never looked at.
    fn refuse(&mut self, mut out: Checked, refused: Refused) -> Checked {
        self.held.clear();
        self.state = State::Header;
        out.refused = Some(refused);
        out
    }

    /// A whole header is held: decides whether its message may go.
    fn header(&mut self, out: &mut Checked, went: &mut Vec<(u64, u16)>) -> Result<(), Refused> {
        let forward = &mut out.forward;
        let h = &self.held;
        let (serial, at) = if self.mini_header {
            (0, 0)
        } else {
            (u64::from_le_bytes(h[..8].try_into().unwrap_or_default()), 8)
        };
        let kind = u16::from_le_bytes([h[at], h[at + 1]]);
        let size = u32_at(h, at + 2);
        let refuse = |why| Err(Refused { kind, size, why });
        if !self.mini_header && u32_at(h, at + 6) != 0 {
            // spice-server would look for sub-messages there; no client sends any.
            return refuse("a sub-message list");
        }
        let rule = match rule(self.channel_type, kind) {
            Ok(r) => r,
            Err(why) => return refuse(why),
        };
        if size < rule.min {
            return refuse("shorter than its fields");
        }
        if size > rule.max.min(channel_cap(self.channel_type)) {
            return refuse("longer than this channel's clients send");
        }
        if let Some(name) = self.dropped_when_view_only(kind) {
            self.held.clear();
            out.dropped.push(name);
            self.state = if size == 0 {
                State::Header
            } else {
                State::Drop(u64::from(size))
            };
            return Ok(());
        }
        if self.channel_type == channel::DISPLAY
            && !self.inited
            && (msg::STREAM_REPORT..=msg::PREFERRED_VIDEO_CODEC_TYPE).contains(&kind)
        {
            // spice-server waits for the DISPLAY_INIT before anything else;
            // a display channel it drops before then crashes QEMU.
            return refuse("a display message before DISPLAY_INIT");
        }
        if self.channel_type == channel::DISPLAY && kind == msg::DISPLAY_INIT && self.inited {
            return refuse("a second DISPLAY_INIT");
        }
        if self.channel_type == channel::MAIN
            && matches!(kind, kind::MAIN_AGENT_TOKEN | kind::MAIN_AGENT_DATA)
            && !self.agent.started
        {
            return refuse("agent messages before AGENT_START");
        }
        if let Some((need, fields)) = rule.fields {
            let held = Held {
                serial,
                kind,
                size,
                need: need.min(size),
                fields,
            };
            self.state = State::Hold(held);
            if held.need == 0 {
                // Nothing more to wait for: its (empty) body decides now.
                return self.body(held, forward, went);
            }
            return Ok(());
        }
        self.went(serial, kind, forward, went);
        self.state = if size == 0 {
            State::Header
        } else {
            State::Stream(u64::from(size))
        };
        Ok(())
    }

    /// The name a view-only client's message of `kind` is dropped under,
    /// if it is.
    fn dropped_when_view_only(&self, kind: u16) -> Option<&'static str> {
        if !self.view_only || self.channel_type != channel::MAIN {
            return None;
        }
        match kind {
            kind::MAIN_AGENT_START => Some("agent_start"),
            kind::MAIN_AGENT_TOKEN => Some("agent_token"),
            kind::MAIN_AGENT_DATA => Some("agent_data"),
            kind::MAIN_MOUSE_MODE_REQUEST => Some("mouse_mode_request"),
            _ => None,
        }
    }

    /// A held message's checked bytes are there: its fields decide.
    fn body(
        &mut self,
        held: Held,
        forward: &mut Vec<u8>,
        went: &mut Vec<(u64, u16)>,
    ) -> Result<(), Refused> {
        let Held {
            serial,
            kind,
            size,
            fields,
            ..
        } = held;
        let body = &self.held[self.header_len()..];
        let checked = body.len() as u32;
        let verdict = if self.channel_type == channel::MAIN && kind == kind::MAIN_AGENT_DATA {
            self.agent.chunk(body)
        } else {
            fields(body, size)
        };
        if let Err(why) = verdict {
            return Err(Refused { kind, size, why });
        }
        self.went(serial, kind, forward, went);
        self.state = if size > checked {
            State::Stream(u64::from(size - checked))
        } else {
            State::Header
        };
        Ok(())
    }

    /// The held message goes.
    fn went(&mut self, serial: u64, kind: u16, forward: &mut Vec<u8>, went: &mut Vec<(u64, u16)>) {
        if self.channel_type == channel::DISPLAY && kind == msg::DISPLAY_INIT {
            self.inited = true;
        }
        if self.channel_type == channel::MAIN && kind == kind::MAIN_AGENT_START {
            self.agent.started = true;
        }
        forward.append(&mut self.held);
        went.push((serial, kind));
    }
}

/// Fuzzing entry point: a client's stream on a channel of the type the
/// first byte names (its low nibble), with mini headers or not (its top
/// bit), for a view-only client or not (the next bit), fed in chunks of
/// sizes the second byte varies.
pub fn fuzz_client_check(data: &[u8]) {
    let (Some(&first), Some(&second)) = (data.first(), data.get(1)) else {
        return;
    };
    let mut check = if first & 0x40 != 0 {
        ClientCheck::view_only(first & 0x80 != 0, first & 0x0f)
    } else {
        ClientCheck::new(first & 0x80 != 0, first & 0x0f)
    };
    let mut went = Vec::new();
    let step = usize::from(second % 31) + 1;
    let mut forwarded = 0usize;
    for chunk in data[2..].chunks(step) {
        let checked = check.check(chunk, &mut went);
        forwarded += checked.forward.len();
        assert!(forwarded <= data.len(), "forwards only what came in");
        if checked.refused.is_some() {
            assert_eq!(check.body_left(), Some(0), "a refusal stands at a boundary");
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
        channel_type: u8,
        stream: &[u8],
        cuts: &[usize],
    ) -> (Vec<u8>, Option<Refused>, ClientCheck) {
        let mut check = ClientCheck::new(true, channel_type);
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

    /// `good` goes whole in every split, and each of `bad` after it is
    /// refused for its reason with nothing of it gone.
    fn holds(channel_type: u8, good: &[u8], bad: &[(Vec<u8>, &str)]) {
        for cuts in splits(good.len()) {
            let (sent, refused, _) = relay(channel_type, good, &cuts);
            assert_eq!((sent.as_slice(), refused), (good, None), "{cuts:?}");
        }
        for (bad, why) in bad {
            let stream = [good, bad, &mini(msg::ACK, &[])].concat();
            for cuts in splits(stream.len()) {
                let (sent, refused, check) = relay(channel_type, &stream, &cuts);
                assert_eq!(sent, good, "{why} {cuts:?}");
                assert_eq!(refused.map(|r| r.why), Some(*why), "{cuts:?}");
                assert_eq!(check.body_left(), Some(0), "a boundary: {why} {cuts:?}");
            }
        }
    }

    /// spice-gtk's DISPLAY_INIT: pixmap cache 1 of 80 MiB / 4 pixels, GLZ
    /// dictionary 1 with a window of 16 MiB / 4.
    const SPICE_GTK_DISPLAY_INIT: &str = "65 00  0e 00 00 00
         01  00 00 40 01 00 00 00 00  01  00 00 40 00";

    #[test]
    fn display_messages_spice_server_cannot_take_never_reach_it_in_any_split() {
        let init = hex(SPICE_GTK_DISPLAY_INIT);
        // A report for stream 3, a codec list of two (MJPEG, VP8), an ACK.
        let report = mini(
            msg::STREAM_REPORT,
            &[[3, 0, 0, 0], [0; 4]].concat().repeat(4),
        );
        let codecs = hex("69 00  03 00 00 00  02  01 02");
        let good = [init.clone(), report, codecs, mini(msg::ACK, &[])].concat();
        let bad: Vec<(Vec<u8>, &str)> = vec![
            (
                hex("e7 03  04 00 00 00  00 00 00 00"),
                "not a message this channel's clients send",
            ),
            (hex("67 00  00 00 00 00"), "shorter than its fields"),
            (
                hex("67 00  01 00 00 00  09"),
                "an image compression that does not exist",
            ),
            (
                hex("69 00  02 00 00 00  02  01"),
                "lists more codecs than it holds",
            ),
            (
                hex("69 00  02 00 00 00  01  09"),
                "a video codec that does not exist",
            ),
            (
                hex("04 00  00 00 00 00"),
                "migration (Porthole does not migrate sessions)",
            ),
            (
                hex("66 00  01 04 00 00"),
                "longer than this channel's clients send",
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
        ];
        holds(channel::DISPLAY, &good, &bad);
    }

    #[test]
    fn a_display_init_with_a_hostile_glz_window_or_pixmap_cache_never_goes() {
        // The outside report's killers: a GLZ window of 0x7FFFFFFF and of -1.
        for (init, why) in [
            (
                "65 00  0e 00 00 00  01  00 00 40 01 00 00 00 00  01  ff ff ff 7f",
                "a GLZ window size no client asks for",
            ),
            (
                "65 00  0e 00 00 00  01  00 00 40 01 00 00 00 00  01  ff ff ff ff",
                "a GLZ window size no client asks for",
            ),
            (
                "65 00  0e 00 00 00  01  ff ff ff ff ff ff ff ff  01  00 00 40 00",
                "a pixmap cache size no client asks for",
            ),
            (
                "65 00  0e 00 00 00  01  00 00 00 00 00 00 00 7f  01  00 00 40 00",
                "a pixmap cache size no client asks for",
            ),
        ] {
            holds(channel::DISPLAY, &[], &[(hex(init), why)]);
        }
    }

    #[test]
    fn the_main_channel_takes_what_clients_send_and_no_migration() {
        // spice-gtk after the link: mouse mode client, agent start, an
        // agent message (its capabilities, 8 bytes) in one chunk, a
        // clipboard of 3000 bytes in two, agent tokens, attach channels.
        let caps = hex("6b 00  1c 00 00 00
            01 00 00 00  06 00 00 00  00 00 00 00 00 00 00 00  08 00 00 00
            01 00 00 00  ff ff ff ff");
        let clip_start = [
            hex("6b 00  00 08 00 00
                01 00 00 00  04 00 00 00  00 00 00 00 00 00 00 00  b8 0b 00 00"),
            vec![b'x'; 2048 - 20],
        ]
        .concat();
        let clip_rest = mini(107, &[b'y'; 3000 - (2048 - 20)]);
        let good = [
            hex("69 00  02 00 00 00  02 00"),
            hex("6a 00  04 00 00 00  0a 00 00 00"),
            caps,
            clip_start,
            clip_rest,
            hex("6c 00  04 00 00 00  01 00 00 00"),
            hex("68 00  00 00 00 00"),
        ]
        .concat();
        let bad: Vec<(Vec<u8>, &str)> = vec![
            // The outside report's killer: MIGRATE_DST_DO_SEAMLESS with a body of 1.
            (
                hex("6e 00  04 00 00 00  01 00 00 00"),
                "migration (Porthole does not migrate sessions)",
            ),
            (
                hex("66 00  00 00 00 00"),
                "migration (Porthole does not migrate sessions)",
            ),
            (
                hex("67 00  00 00 00 00"),
                "migration (Porthole does not migrate sessions)",
            ),
            (
                hex("6d 00  00 00 00 00"),
                "migration (Porthole does not migrate sessions)",
            ),
            (
                hex("6f 00  00 00 00 00"),
                "migration (Porthole does not migrate sessions)",
            ),
            (
                hex("65 00  08 00 00 00  00 00 10 00 00 00 00 00"),
                "CLIENT_INFO (spice-server drops the client for it)",
            ),
            (
                hex("69 00  02 00 00 00  00 00"),
                "a mouse mode that does not exist",
            ),
            (hex("69 00  01 00 00 00  02"), "shorter than its fields"),
            (
                mini(107, &[0; 2049]),
                "longer than this channel's clients send",
            ),
            (
                hex("e7 03  00 00 00 00"),
                "not a message this channel's clients send",
            ),
        ];
        holds(channel::MAIN, &good, &bad);
        // Agent chunks spice-server's filter refuses (it drops the client).
        let start = hex("6a 00  04 00 00 00  0a 00 00 00");
        let agent_bad: Vec<(Vec<u8>, &str)> = vec![
            (
                hex("6b 00  00 00 00 00"),
                "an agent message without its whole header",
            ),
            (
                mini(107, &[1; 10]),
                "an agent message without its whole header",
            ),
            (
                hex(
                    "6b 00  14 00 00 00  07 00 00 00  06 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00",
                ),
                "an agent protocol that does not exist",
            ),
            (
                hex(
                    "6b 00  14 00 00 00  01 00 00 00  63 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00",
                ),
                "an agent message type that does not exist",
            ),
            (
                hex(
                    "6b 00  18 00 00 00  01 00 00 00  06 00 00 00  00 00 00 00 00 00 00 00  02 00 00 00  01 02 03 04",
                ),
                "more agent data than its message holds",
            ),
        ];
        holds(channel::MAIN, &start, &agent_bad);
        // A continuation longer than what its message still owes.
        let owed = hex("6b 00  18 00 00 00
            01 00 00 00  06 00 00 00  00 00 00 00 00 00 00 00  08 00 00 00  01 02 03 04");
        holds(
            channel::MAIN,
            &[start, owed].concat(),
            &[(mini(107, &[0; 5]), "more agent data than its message holds")],
        );
    }

    #[test]
    fn a_view_only_main_channel_drops_agent_and_mouse_mode_whole() {
        // spice-gtk after the link, as above: the mouse mode request, the
        // agent's start, capabilities, a clipboard in two chunks and tokens
        // are dropped; attach channels and a pong go. Migration is still
        // refused.
        let clip_start = [
            hex("6b 00  00 08 00 00
                01 00 00 00  04 00 00 00  00 00 00 00 00 00 00 00  b8 0b 00 00"),
            vec![b'x'; 2048 - 20],
        ]
        .concat();
        let kept = [
            hex("68 00  00 00 00 00"),
            hex("03 00  0c 00 00 00  01 00 00 00  00 00 00 00 00 00 00 00"),
        ];
        let stream = [
            hex("69 00  02 00 00 00  02 00"),
            kept[0].clone(),
            hex("6a 00  04 00 00 00  0a 00 00 00"),
            clip_start,
            mini(107, &[b'y'; 3000 - (2048 - 20)]),
            hex("6c 00  04 00 00 00  01 00 00 00"),
            kept[1].clone(),
            hex("6e 00  04 00 00 00  01 00 00 00"),
        ]
        .concat();
        for cuts in splits(stream.len()) {
            let mut check = ClientCheck::view_only(true, channel::MAIN);
            let (mut sent, mut dropped, mut refused) = (Vec::new(), Vec::new(), None);
            for chunk in chunks(&stream, &cuts) {
                let mut checked = check.check(chunk, &mut Vec::new());
                sent.append(&mut checked.forward);
                dropped.append(&mut checked.dropped);
                if checked.refused.is_some() {
                    refused = checked.refused;
                    break;
                }
            }
            assert_eq!(sent, kept.concat(), "{cuts:?}");
            assert_eq!(
                dropped,
                [
                    "mouse_mode_request",
                    "agent_start",
                    "agent_data",
                    "agent_data",
                    "agent_token"
                ],
                "{cuts:?}"
            );
            assert_eq!(
                refused.map(|r| r.why),
                Some("migration (Porthole does not migrate sessions)")
            );
        }
    }

    #[test]
    fn agent_tokens_before_agent_start_never_go() {
        // Measured: AGENT_TOKEN before AGENT_START aborts QEMU 7.2 (SIGTRAP).
        holds(
            channel::MAIN,
            &hex("68 00  00 00 00 00"),
            &[(
                hex("6c 00  04 00 00 00  05 00 00 00"),
                "agent messages before AGENT_START",
            )],
        );
    }

    #[test]
    fn compressed_device_data_must_inflate_to_what_a_client_sends() {
        // LZ4 (1), 10 bytes inflated from 7, then the lz4 bytes: streamed.
        let good = hex("66 00  0c 00 00 00  01  0a 00 00 00  a1 b2 c3 d4 e5 f6 07");
        holds(
            channel::USBREDIR,
            &good,
            &[
                // Measured: an LZ4 block claiming 0xfffffff0 bytes aborts QEMU 7.2.
                (
                    hex("66 00  06 00 00 00  01  f0 ff ff ff  00"),
                    "inflates beyond what a client sends",
                ),
                (
                    hex("66 00  06 00 00 00  02  0a 00 00 00  00"),
                    "a compression that does not exist",
                ),
                (
                    hex("65 00  01 00 00 01"),
                    "longer than this channel's clients send",
                ),
            ],
        );
    }

    #[test]
    fn inputs_pass_keys_and_mouse_of_their_sizes_only() {
        let good = [
            hex("65 00  04 00 00 00  1e 00 00 00"),
            hex("66 00  04 00 00 00  9e 00 00 00"),
            hex("6f 00  0a 00 00 00  01 00 00 00 ff ff ff ff  00 00"),
            hex("70 00  0b 00 00 00  10 00 00 00 20 00 00 00  01 00  00"),
            hex("71 00  03 00 00 00  01  01 00"),
            hex("72 00  03 00 00 00  01  00 00"),
        ]
        .concat();
        let bad: Vec<(Vec<u8>, &str)> = vec![
            (hex("65 00  00 00 00 00"), "shorter than its fields"),
            (
                hex("04 00  00 00 00 00"),
                "migration (Porthole does not migrate sessions)",
            ),
            (
                hex("73 00  00 00 00 00"),
                "not a message this channel's clients send",
            ),
        ];
        holds(channel::INPUTS, &good, &bad);
    }

    #[test]
    fn device_channels_stream_their_data_and_refuse_the_rest() {
        let data = mini(101, &[9; 5000]);
        for ch in [channel::USBREDIR, channel::PORT, channel::WEBDAV] {
            holds(
                ch,
                &data,
                &[
                    (
                        hex("04 00  00 00 00 00"),
                        "migration (Porthole does not migrate sessions)",
                    ),
                    // Measured: a DATA declaring 0x80000000 bytes aborts QEMU 7.2.
                    (
                        hex("65 00  00 00 00 80"),
                        "longer than this channel's clients send",
                    ),
                    (hex("65 00  00 00 00 00"), "shorter than its fields"),
                ],
            );
        }
        holds(channel::PORT, &hex("c9 00  01 00 00 00  01"), &[]);
        holds(
            channel::USBREDIR,
            &[],
            &[(
                hex("c9 00  01 00 00 00  01"),
                "not a message this channel's clients send",
            )],
        );
        for ch in [channel::CURSOR, channel::PLAYBACK] {
            holds(
                ch,
                &mini(msg::ACK, &[]),
                &[(
                    mini(101, &[0; 4]),
                    "not a message this channel's clients send",
                )],
            );
        }
    }

    #[test]
    fn smartcard_data_names_reader_0_a_type_that_exists_and_its_own_length() {
        // VSC ReaderAdd for reader 0 with a 4-byte name, then an APDU of 5.
        let good = [
            hex("65 00  10 00 00 00  03 00 00 00  00 00 00 00  04 00 00 00  72 64 72 00"),
            hex("65 00  11 00 00 00  07 00 00 00  00 00 00 00  05 00 00 00  00 a4 04 00 00"),
        ]
        .concat();
        holds(
            channel::SMARTCARD,
            &good,
            &[
                (
                    hex("65 00  10 00 00 00  07 00 00 00  00 00 00 00  64 00 00 00  00 00 00 00"),
                    "a smartcard message longer than its body",
                ),
                (
                    hex("65 00  0c 00 00 00  09 00 00 00  00 00 00 00  00 00 00 00"),
                    "a smartcard message type that does not exist",
                ),
                (
                    hex("65 00  0c 00 00 00  07 00 00 00  01 00 00 00  00 00 00 00"),
                    "a smartcard reader that does not exist",
                ),
                (
                    hex("65 00  0b 00 00 00  07 00 00 00  00 00 00 00  00 00 00"),
                    "shorter than its fields",
                ),
                (
                    hex("65 00  01 00 01 00"),
                    "longer than this channel's clients send",
                ),
            ],
        );
    }

    #[test]
    fn record_takes_its_modes_and_data() {
        // spice-gtk: MODE Opus, START_MARK, DATA.
        let good = [
            hex("66 00  06 00 00 00  10 00 00 00  03 00"),
            hex("67 00  04 00 00 00  10 00 00 00"),
            mini(101, &[1; 960]),
        ]
        .concat();
        holds(
            channel::RECORD,
            &good,
            &[
                (
                    hex("66 00  06 00 00 00  10 00 00 00  02 00"),
                    "an audio mode that does not exist",
                ),
                (
                    hex("65 00  01 80 00 00"),
                    "longer than this channel's clients send",
                ),
            ],
        );
    }

    #[test]
    fn display_messages_before_display_init_never_go_and_extra_bytes_do() {
        holds(
            channel::DISPLAY,
            &mini(msg::ACK, &[]),
            &[(
                hex("67 00  01 00 00 00  01"),
                "a display message before DISPLAY_INIT",
            )],
        );
        // Fields first, more after: spice-server reads the fields (measured).
        let init = [hex(SPICE_GTK_DISPLAY_INIT), vec![0; 56]].concat();
        let mut init = init;
        init[2] = 14 + 56;
        holds(channel::DISPLAY, &init, &[]);
        // spice-html5's mouse motion carries 11 bytes, one more than its fields.
        holds(
            channel::INPUTS,
            &hex("6f 00  0b 00 00 00  01 00 00 00 ff ff ff ff  00 00  00"),
            &[],
        );
    }

    #[test]
    fn full_headers_with_a_sub_message_list_are_refused() {
        let mut check = ClientCheck::new(false, channel::INPUTS);
        let mut went = Vec::new();
        let good = [header(false, 7, 101, 4), vec![0x1e, 0, 0, 0]].concat();
        assert_eq!(check.check(&good, &mut went).forward, good);
        assert_eq!(went, vec![(7, 101)]);
        let mut bad = header(false, 8, 101, 4);
        bad[14] = 1;
        let checked = check.check(&bad, &mut went);
        assert!(checked.forward.is_empty());
        assert_eq!(checked.refused.unwrap().why, "a sub-message list");
    }

    #[test]
    fn an_unfinished_header_or_held_body_waits_and_is_not_part_of_what_went() {
        let mut check = ClientCheck::new(true, channel::DISPLAY);
        let mut went = Vec::new();
        assert_eq!(check.check(&hex("65 00 0e"), &mut went), Checked::default());
        assert_eq!(
            check.check(&hex("00 00 00 01 00 00"), &mut went),
            Checked::default()
        );
        assert_eq!(check.body_left(), Some(0));
        assert!(went.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut noise = Noise::new(0xc1e7);
        for len in 0..4000 {
            fuzz_client_check(&noise.bytes(len % 300));
        }
    }
}
