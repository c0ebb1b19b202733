//! A view-only VNC client's messages, filtered before the hypervisor sees
//! them.
//!
//! After ClientInit a client sends a stream of messages whose lengths
//! follow from their first bytes (RFC 6143 §7.5 and the registered
//! extensions QEMU and noVNC use). The filter frames that stream and lets
//! through only what asks the server for pixels: SetPixelFormat,
//! SetEncodings, FramebufferUpdateRequest, EnableContinuousUpdates and
//! ClientFence. Everything that would act on the VM or reach into it is
//! dropped whole: KeyEvent, PointerEvent, ClientCutText, XVP (shutdown,
//! reboot, reset), SetDesktopSize, and QEMU's client message (extended key
//! events, audio). RFB has no reply to any of them a client waits for, so
//! the client goes on as if the server ignored it.
//!
//! SetEncodings goes with one change: the extended clipboard
//! pseudo-encoding is replaced by [`NOT_AN_ENCODING`], which servers
//! ignore (QEMU's `set_encodings` skips a value it does not know). A client
//! that announces the extended clipboard is told of every change to the
//! guest's clipboard and its formats; QEMU sends the text itself only in
//! answer to a ClientCutText, which is dropped, so the notices are all a
//! view-only client could get. Replacing the value in place keeps the
//! message's length, so it still streams.
//!
//! A message type the filter cannot frame (one no real client sends to
//! QEMU) ends the client's side: past it the stream has no boundaries.
//! Only a message's first bytes are held (20 at most), or a part of one
//! encoding's value; the rest of a message streams, or is skipped, as it
//! arrives.

use crate::protocol::client_filter::{Checked, Refused};

/// Client-to-server message types.
pub mod kind {
    /// RFC 6143 §7.5.1.
    pub const SET_PIXEL_FORMAT: u8 = 0;
    /// §7.5.2.
    pub const SET_ENCODINGS: u8 = 2;
    /// §7.5.3.
    pub const FRAMEBUFFER_UPDATE_REQUEST: u8 = 3;
    /// §7.5.4.
    pub const KEY_EVENT: u8 = 4;
    /// §7.5.5.
    pub const POINTER_EVENT: u8 = 5;
    /// §7.5.6.
    pub const CLIENT_CUT_TEXT: u8 = 6;
    /// The ContinuousUpdates extension.
    pub const ENABLE_CONTINUOUS_UPDATES: u8 = 150;
    /// The Fence extension.
    pub const CLIENT_FENCE: u8 = 248;
    /// XVP: shutdown, reboot, reset.
    pub const XVP: u8 = 250;
    /// The ExtendedDesktopSize extension.
    pub const SET_DESKTOP_SIZE: u8 = 251;
    /// QEMU's client message: subtype 0 extended key event, 1 audio.
    pub const QEMU: u8 = 255;
}

/// The extended clipboard pseudo-encoding (0xC0A1E5CE in the registry).
pub const EXTENDED_CLIPBOARD: [u8; 4] = 0xC0A1_E5CE_u32.to_be_bytes();

/// What a view-only client's SetEncodings carries in the extended
/// clipboard's place: "Port" in ASCII, a value no encoding registers and
/// a capture shows for what it is.
pub const NOT_AN_ENCODING: [u8; 4] = *b"Port";

/// Replaces the extended clipboard in `encodings`, whole 4-byte values.
fn without_clipboard(encodings: &mut [u8]) {
    for e in encodings.chunks_exact_mut(4) {
        if *e == EXTENDED_CLIPBOARD {
            e.copy_from_slice(&NOT_AN_ENCODING);
        }
    }
}

/// A fence's payload is at most 64 bytes (the Fence extension).
const MAX_FENCE_PAYLOAD: u8 = 64;

/// What the first bytes of a message say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framed {
    /// Its length follows from its first `.0` bytes.
    Need(usize),
    /// It is `len` bytes long; `keep`: it goes to the hypervisor.
    Whole {
        len: u64,
        keep: bool,
        name: &'static str,
    },
}

fn whole(len: u64, keep: bool, name: &'static str) -> Result<Framed, &'static str> {
    Ok(Framed::Whole { len, keep, name })
}

/// Frames the message `m` starts (at least its type byte is there, and as
/// many bytes as the last `Need` asked for).
fn frame(m: &[u8]) -> Result<Framed, &'static str> {
    let need = |n: usize| -> Option<Result<Framed, &'static str>> {
        (m.len() < n).then_some(Ok(Framed::Need(n)))
    };
    let u16_at = |at: usize| u64::from(u16::from_be_bytes([m[at], m[at + 1]]));
    match m[0] {
        kind::SET_PIXEL_FORMAT => whole(20, true, "set_pixel_format"),
        kind::SET_ENCODINGS => {
            if let Some(n) = need(4) {
                return n;
            }
            whole(4 + 4 * u16_at(2), true, "set_encodings")
        }
        kind::FRAMEBUFFER_UPDATE_REQUEST => whole(10, true, "framebuffer_update_request"),
        kind::KEY_EVENT => whole(8, false, "key_event"),
        kind::POINTER_EVENT => whole(6, false, "pointer_event"),
        kind::CLIENT_CUT_TEXT => {
            if let Some(n) = need(8) {
                return n;
            }
            // A negative length is the extended clipboard's: its magnitude
            // is the payload's length.
            let len = i32::from_be_bytes([m[4], m[5], m[6], m[7]]);
            whole(8 + u64::from(len.unsigned_abs()), false, "client_cut_text")
        }
        kind::ENABLE_CONTINUOUS_UPDATES => whole(10, true, "enable_continuous_updates"),
        kind::CLIENT_FENCE => {
            if let Some(n) = need(9) {
                return n;
            }
            if m[8] > MAX_FENCE_PAYLOAD {
                return Err("a fence payload over 64 bytes");
            }
            whole(9 + u64::from(m[8]), true, "client_fence")
        }
        kind::XVP => whole(4, false, "xvp"),
        kind::SET_DESKTOP_SIZE => {
            if let Some(n) = need(8) {
                return n;
            }
            whole(8 + 16 * u64::from(m[6]), false, "set_desktop_size")
        }
        kind::QEMU => {
            if let Some(n) = need(2) {
                return n;
            }
            match m[1] {
                0 => whole(12, false, "qemu_extended_key_event"),
                1 => {
                    if let Some(n) = need(4) {
                        return n;
                    }
                    // Operation 2 sets the sample format: 6 more bytes.
                    match u16_at(2) {
                        0 | 1 => whole(4, false, "qemu_audio"),
                        2 => whole(10, false, "qemu_audio"),
                        _ => Err("a QEMU audio operation that does not exist"),
                    }
                }
                _ => Err("a QEMU message subtype that cannot be framed"),
            }
        }
        _ => Err("a message type that cannot be framed"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a message's first bytes, this many of them.
    Head(usize),
    /// Passing this many more bytes of a kept message.
    Pass(u64),
    /// Skipping this many more bytes of a dropped message.
    Skip(u64),
    /// Passing this many more bytes of SetEncodings' list, a whole value
    /// at a time (a part of one waits in `held`).
    Encodings(u64),
}

/// A view-only client's stream after ClientInit.
#[derive(Debug)]
pub struct ViewOnly {
    state: State,
    /// The message's first bytes, while they decide its length; in
    /// SetEncodings' list, the part of a value read so far.
    held: Vec<u8>,
}

impl Default for ViewOnly {
    fn default() -> Self {
        Self {
            state: State::Head(1),
            held: Vec::with_capacity(20),
        }
    }
}

impl ViewOnly {
    /// A filter standing at the client's first message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the filter stands between two messages (nothing held, none
    /// part-way through).
    pub fn at_boundary(&self) -> bool {
        self.state == State::Head(1) && self.held.is_empty()
    }

    /// The client's next bytes: what may go now, and what was dropped.
    pub fn check(&mut self, mut data: &[u8]) -> Checked {
        let mut out = Checked::default();
        while !data.is_empty() {
            if self.at_boundary()
                && let Ok(Framed::Whole { len, keep, name }) = frame(data)
                && let Some(n) = usize::try_from(len).ok().filter(|&n| n <= data.len())
            {
                // A whole message at the start of `data`: no holding.
                if keep {
                    let at = out.forward.len();
                    out.forward.extend_from_slice(&data[..n]);
                    if data[0] == kind::SET_ENCODINGS {
                        without_clipboard(&mut out.forward[at + 4..]);
                    }
                } else {
                    out.dropped.push(name);
                }
                data = &data[n..];
                continue;
            }
            match self.state {
                State::Pass(left) | State::Skip(left) => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    if matches!(self.state, State::Pass(_)) {
                        out.forward.extend_from_slice(&data[..n]);
                    }
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = match self.state {
                        _ if left == 0 => State::Head(1),
                        State::Pass(_) => State::Pass(left),
                        _ => State::Skip(left),
                    };
                }
                State::Encodings(left) => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let mut list = &data[..n];
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = match left {
                        0 => State::Head(1),
                        _ => State::Encodings(left),
                    };
                    if !self.held.is_empty() {
                        let k = (4 - self.held.len()).min(list.len());
                        self.held.extend_from_slice(&list[..k]);
                        list = &list[k..];
                        if self.held.len() < 4 {
                            continue;
                        }
                        without_clipboard(&mut self.held);
                        out.forward.append(&mut self.held);
                    }
                    // The list is whole values, so at its end nothing is held.
                    let whole = list.len() - list.len() % 4;
                    let at = out.forward.len();
                    out.forward.extend_from_slice(&list[..whole]);
                    without_clipboard(&mut out.forward[at..]);
                    self.held.extend_from_slice(&list[whole..]);
                }
                State::Head(need) => {
                    let n = (need - self.held.len()).min(data.len());
                    self.held.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.held.len() < need {
                        continue;
                    }
                    match frame(&self.held) {
                        Ok(Framed::Need(more)) => self.state = State::Head(more),
                        Ok(Framed::Whole { len, keep, name }) => {
                            let rest = len - self.held.len() as u64;
                            let encodings = self.held[0] == kind::SET_ENCODINGS;
                            if keep {
                                out.forward.append(&mut self.held);
                            } else {
                                self.held.clear();
                                out.dropped.push(name);
                            }
                            self.state = match rest {
                                0 => State::Head(1),
                                _ if encodings => State::Encodings(rest),
                                _ if keep => State::Pass(rest),
                                _ => State::Skip(rest),
                            };
                        }
                        Err(why) => {
                            out.refused = Some(Refused {
                                kind: u16::from(self.held[0]),
                                size: self.held.len() as u32,
                                why,
                            });
                            self.held.clear();
                            self.state = State::Head(1);
                            return out;
                        }
                    }
                }
            }
        }
        out
    }
}

/// Fuzzing entry point: a client's stream fed in chunks of sizes the first
/// byte varies.
pub fn fuzz_view_only(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let whole = ViewOnly::new().check(rest);
    let mut filter = ViewOnly::new();
    let mut forwarded = Vec::new();
    for chunk in rest.chunks(usize::from(first % 31) + 1) {
        let mut checked = filter.check(chunk);
        forwarded.append(&mut checked.forward);
        assert!(forwarded.len() <= rest.len(), "forwards only what came in");
        if checked.refused.is_some() {
            assert!(filter.at_boundary(), "a refusal holds nothing back");
            assert_eq!(forwarded, whole.forward, "the same in any split");
            return;
        }
    }
    assert_eq!(forwarded, whole.forward, "the same in any split");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transcript::{Noise, chunks, hex, splits};

    /// Feeds `stream` cut at `cuts`: what went, what was dropped, the refusal.
    fn run(stream: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<&'static str>, Option<Refused>) {
        let mut filter = ViewOnly::new();
        let (mut sent, mut dropped) = (Vec::new(), Vec::new());
        for chunk in chunks(stream, cuts) {
            let mut checked = filter.check(chunk);
            sent.append(&mut checked.forward);
            dropped.append(&mut checked.dropped);
            if checked.refused.is_some() {
                return (sent, dropped, checked.refused);
            }
        }
        (sent, dropped, None)
    }

    /// What noVNC sends QEMU once connected, as captured, then the input a
    /// view-only user must not get through.
    const KEPT: &str = "
        # SetPixelFormat: 32 bpp, depth 24, little endian, true colour,
        # max 255/255/255, shifts 0/8/16
        00 000000  20 18 00 01  00ff 00ff 00ff  00 08 10  000000
        # SetEncodings, 3: Tight (7), Raw (0), the QEMU extended key event
        # pseudo-encoding (-258)
        02 00 0003  00000007  00000000  fffffefe
        # FramebufferUpdateRequest: incremental, 0,0 1024x768
        03 01 0000 0000 0400 0300
        # EnableContinuousUpdates on, 0,0 1024x768
        96 01 0000 0000 0400 0300
        # ClientFence: flags, 2-byte payload
        f8 000000 80000002 02 abcd
    ";

    fn dropped_messages() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            // KeyEvent: down, Escape (0xff1b)
            ("key_event", hex("04 01 0000 0000ff1b")),
            // PointerEvent: button 1 at 10,20
            ("pointer_event", hex("05 01 000a 0014")),
            // ClientCutText: 5 bytes "hello"
            ("client_cut_text", hex("06 000000 00000005 68656c6c6f")),
            // ClientCutText, extended clipboard: length -4, 4 bytes of flags
            ("client_cut_text", hex("06 000000 fffffffc 10000001")),
            // XVP: version 1, code 4 (reset)
            ("xvp", hex("fa 00 01 04")),
            // SetDesktopSize 800x600, one screen
            (
                "set_desktop_size",
                hex("fb 00 0320 0258 01 00  00000001 0000 0000 0320 0258 00000000"),
            ),
            // QEMU extended key event: down, keysym Escape, keycode 1
            (
                "qemu_extended_key_event",
                hex("ff 00 0001 0000ff1b 00000001"),
            ),
            // QEMU audio: enable; set format (s16, 2 channels, 44100 Hz)
            ("qemu_audio", hex("ff 01 0000")),
            ("qemu_audio", hex("ff 01 0002 03 02 0000ac44")),
        ]
    }

    #[test]
    fn what_asks_for_pixels_goes_and_input_is_dropped_whole_in_every_split() {
        let kept = hex(KEPT);
        let drops = dropped_messages();
        // Each dropped message between two kept halves of the transcript.
        let mut stream = Vec::new();
        let mut expect_sent = Vec::new();
        for (_, bytes) in &drops {
            stream.extend_from_slice(&kept);
            stream.extend_from_slice(bytes);
            expect_sent.extend_from_slice(&kept);
        }
        stream.extend_from_slice(&kept);
        expect_sent.extend_from_slice(&kept);
        let names: Vec<&str> = drops.iter().map(|(n, _)| *n).collect();
        for cuts in splits(stream.len()) {
            let (sent, dropped, refused) = run(&stream, &cuts);
            assert_eq!(refused, None, "{cuts:?}");
            assert_eq!(sent, expect_sent, "{cuts:?}");
            assert_eq!(dropped, names, "{cuts:?}");
        }
    }

    #[test]
    fn set_encodings_goes_without_the_extended_clipboard_in_every_split() {
        let stream = hex("
            # SetEncodings, 4: Tight (7), the extended clipboard (0xc0a1e5ce),
            # a value whose bytes straddle it (0000c0a1 e5ce0000 are two
            # values, neither of them it), the QEMU extended key event (-258)
            02 00 0005  00000007  c0a1e5ce  0000c0a1 e5ce0000  fffffefe
            # ClientFence whose payload holds the same bytes: passed as it is
            f8 000000 80000000 04 c0a1e5ce
            # SetEncodings, 1: the extended clipboard alone
            02 00 0001  c0a1e5ce
            # SetEncodings, 0
            02 00 0000
        ");
        let expect = hex("
            02 00 0005  00000007  506f7274  0000c0a1 e5ce0000  fffffefe
            f8 000000 80000000 04 c0a1e5ce
            02 00 0001  506f7274
            02 00 0000
        ");
        for cuts in splits(stream.len()) {
            let (sent, dropped, refused) = run(&stream, &cuts);
            assert_eq!(refused, None, "{cuts:?}");
            assert!(dropped.is_empty(), "{cuts:?}");
            assert_eq!(sent, expect, "{cuts:?}");
        }
    }

    #[test]
    fn an_unknown_message_ends_the_client_side_after_what_came_before() {
        let kept = hex(KEPT);
        for (bad, why) in [
            (hex("07 00 00 00"), "a message type that cannot be framed"),
            (hex("fd 00 00 00"), "a message type that cannot be framed"),
            (
                hex("ff 02 0000"),
                "a QEMU message subtype that cannot be framed",
            ),
            (
                hex("ff 01 0003"),
                "a QEMU audio operation that does not exist",
            ),
            (
                hex("f8 000000 00000000 41"),
                "a fence payload over 64 bytes",
            ),
        ] {
            let stream = [&kept[..], &bad, &hex("03 00 0000 0000 0010 0010")].concat();
            for cuts in splits(stream.len()) {
                let (sent, _, refused) = run(&stream, &cuts);
                assert_eq!(sent, kept, "{why} {cuts:?}");
                assert_eq!(refused.map(|r| r.why), Some(why), "{cuts:?}");
            }
        }
    }

    #[test]
    fn a_huge_dropped_message_is_skipped_without_being_held() {
        let mut filter = ViewOnly::new();
        // ClientCutText claiming 2^31 - 1 bytes: skipped as it comes.
        let checked = filter.check(&hex("06 000000 7fffffff"));
        assert_eq!(checked.dropped, ["client_cut_text"]);
        let checked = filter.check(&[0x41; 4096]);
        assert!(checked.forward.is_empty() && checked.refused.is_none());
        assert_eq!(filter.state, State::Skip(0x7fff_ffff - 4096));
        assert!(filter.held.capacity() <= 20);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut noise = Noise::new(0x51ed);
        for _ in 0..2000 {
            let n = (noise.next() % 300) as usize;
            fuzz_view_only(&noise.bytes(n));
        }
    }
}
