"""SPICE client messages for fuzzing a hypervisor or a proxy in front of it,
and a client that delivers one message on a fresh session and watches what
happens (tests/e2e/test_spice_fuzz.py).

generate(seed, count) gives a fixed list for a seed: the client messages
known to kill QEMU 7.2 first (interleaved with others), then a mix per
channel kind of valid types with hostile field values (extremes, negative,
huge sizes and counts), types at random (common 1-6, 101-120, 201-202, any
u16) and bodies of 0 to 2048 bytes, in mini headers or full ones.

deliver(message, connect, ticket, alive) links a main channel (and the
message's channel), sends it, keeps the session going for a short window
(answering SET_ACK and ACK windows as spice-gtk does) and closes it; alive()
is sampled all along, so a death is seen within the window or just after the
close. The same message goes the same way to QEMU directly or through a
proxy: only connect() differs."""

import dataclasses
import random
import struct
import time

from spice_wire import link_mess

# Channel kinds (protocols.md §6.7) and the id each has on the fuzz VM.
CHANNELS = {"main": 1, "display": 2, "inputs": 3, "cursor": 4, "playback": 5, "record": 6,
            "smartcard": 8, "usbredir": 9, "port": 10, "webdav": 11}

# QEMU devices for the smartcard, port and webdav channels (vm.SPICE_EXTRA_DEVICES
# has playback, record, usbredir and the agent), each on its own bus: extra_args
# come before SPICE_EXTRA_DEVICES on QEMU's command line. QEMU 7.2 takes them all.
FUZZ_DEVICES = [
    "-device", "qemu-xhci,id=fuzzusb", "-device", "usb-ccid,bus=fuzzusb.0",
    "-chardev", "spicevmc,id=fuzzccid,name=smartcard", "-device", "ccid-card-passthru,chardev=fuzzccid",
    "-device", "virtio-serial,id=fuzzvs",
    "-chardev", "spiceport,id=fuzzport,name=org.porthole.fuzz",
    "-device", "virtserialport,bus=fuzzvs.0,chardev=fuzzport,name=org.porthole.fuzz",
    "-chardev", "spiceport,id=fuzzdav,name=org.spice-space.webdav.0",
    "-device", "virtserialport,bus=fuzzvs.0,chardev=fuzzdav,name=org.spice-space.webdav.0",
]

# Capabilities the client offers when it links (common: AUTH_SELECTION,
# AUTH_SPICE, MINI_HEADER or not), per channel as spice-gtk would, minus
# migration and GL_SCANOUT (Porthole takes those off upstream: both paths
# then link alike).
CHANNEL_CAPS = {
    "main": 0b0110,  # NAME_AND_UUID, AGENT_CONNECTED_TOKENS
    "display": 0b1_0011_0101_1111,  # SIZED_STREAM..STREAM_REPORT, PREF_COMPRESSION, MULTI_CODEC, MJPEG, PREF_VIDEO
    "inputs": 0b1,  # KEY_SCANCODE
    "playback": 0b10, "record": 0b10,  # VOLUME
}

# Common client message types (protocols.md §6.9).
ACK_SYNC, ACK, PONG, FLUSH_MARK, MIGRATE_DATA, DISCONNECTING = 1, 2, 3, 4, 5, 6
DISPLAY_INIT, STREAM_REPORT, PREFERRED_COMPRESSION, GL_DRAW_DONE, PREFERRED_VIDEO_CODEC = 101, 102, 103, 104, 105
SET_ACK = 3  # server to client
MAIN_INIT = 103  # server to client, on main

# DISPLAY_INIT as spice-gtk sends it: pixmap cache 1 of 20 MB, GLZ dictionary 1 of 16 MB.
GOOD_DISPLAY_INIT = struct.pack("<BqBi", 1, 20 << 20, 1, 4 << 20)


@dataclasses.dataclass(frozen=True)
class Message:
    """One client message for one channel of a fresh session."""
    index: int
    channel: str
    kind: int
    body: bytes
    # Mini headers (6 bytes) or full ones (18): the client offers MINI_HEADER or not.
    mini: bool
    # Display only: a well-formed DISPLAY_INIT goes first (a display channel
    # must have one before a client may close it: see test_spice_drain.py).
    init_first: bool
    # "known" (a known killer), "hostile" (a valid type, hostile fields), "random".
    family: str
    note: str

    def label(self):
        hdr = "" if self.mini else ", full header"
        pre = ", after DISPLAY_INIT" if self.channel == "display" and self.init_first else ""
        return f"#{self.index} {self.channel} type {self.kind} ({len(self.body)} B{hdr}{pre}) {self.note}"

    def wire(self, serial=1):
        """The bytes the client sends on the message's channel: the
        DISPLAY_INIT first if any, then the message."""
        out = b""
        if self.init_first:
            out += frame(DISPLAY_INIT, GOOD_DISPLAY_INIT, self.mini, serial)
            serial += 1
        return out + frame(self.kind, self.body, self.mini, serial)


def frame(kind, body, mini, serial=1):
    if mini:
        return struct.pack("<HI", kind, len(body)) + body
    return struct.pack("<QHII", serial, kind, len(body), 0) + body


# --- the generator ---------------------------------------------------------

def _known():
    """The client messages known to kill QEMU 7.2 when sent to it directly."""
    def init(glz_window, note):
        return ("display", DISPLAY_INIT, struct.pack("<BqBi", 1, 20 << 20, 1, glz_window), False, note)
    report = struct.pack("<8I", 50, 1, 0, 0, 0, 0, 0, 0)
    return [
        ("main", 110, b"\x01\x00\x00\x00", False, "MIGRATE_DST_DO_SEAMLESS src_version 1"),
        init(0x7FFFFFFF, "DISPLAY_INIT glz window 0x7fffffff"),
        init(-1, "DISPLAY_INIT glz window -1"),
        ("main", FLUSH_MARK, b"", False, "MIGRATE_FLUSH_MARK"),
        ("inputs", FLUSH_MARK, b"", False, "MIGRATE_FLUSH_MARK"),
        ("display", 999, b"\x00", True, "unknown display type"),
        ("display", DISPLAY_INIT, GOOD_DISPLAY_INIT, True, "second DISPLAY_INIT"),
        ("display", GL_DRAW_DONE, b"", True, "GL_DRAW_DONE"),
        ("display", STREAM_REPORT, report, True, "STREAM_REPORT stream 50"),
    ]


class _Gen:
    def __init__(self, rng):
        self.r = rng

    def u8(self):
        return self.r.choice([0, 1, 0x7F, 0x80, 0xFF, self.r.getrandbits(8)])

    def u16(self):
        return self.r.choice([0, 1, 0x7FFF, 0x8000, 0xFFFF, self.r.getrandbits(16)])

    def u32(self):
        return self.r.choice([0, 1, 2, 49, 50, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, self.r.getrandbits(32)])

    def u64(self):
        return self.r.choice([0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, self.r.getrandbits(64)])

    def size(self):
        """A body length from 0 to 2048, small ones more often."""
        pick = self.r.random()
        if pick < 0.2:
            return 0
        if pick < 0.5:
            return self.r.randint(1, 16)
        if pick < 0.75:
            return self.r.randint(17, 256)
        return self.r.randint(257, 2048)

    def junk(self, n=None):
        return self.r.randbytes(self.size() if n is None else n)

    # Valid types per channel, their fields hostile: (type, body, note).
    def common(self):
        kind = self.r.choice([ACK_SYNC, ACK, PONG, DISCONNECTING, ACK_SYNC, ACK, PONG, DISCONNECTING,
                              FLUSH_MARK, MIGRATE_DATA])
        body = {ACK_SYNC: lambda: struct.pack("<I", self.u32()),
                ACK: lambda: b"",
                PONG: lambda: struct.pack("<IQ", self.u32(), self.u64()),
                DISCONNECTING: lambda: struct.pack("<QI", self.u64(), self.u32()),
                FLUSH_MARK: lambda: b"" if self.r.random() < 0.5 else self.junk(),
                MIGRATE_DATA: self.junk}[kind]()
        return kind, body, "common, hostile fields"

    def main(self):
        kind = self.r.choice([101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111])
        if kind == 101:
            return kind, struct.pack("<Q", self.u64()), "CLIENT_INFO cache size"
        if kind == 105:
            return kind, struct.pack("<H", self.u16()), "MOUSE_MODE_REQUEST"
        if kind in (106, 108):
            return kind, struct.pack("<I", self.u32()), "AGENT_START/TOKEN tokens"
        if kind == 107:
            # A VDAgentMessage header (protocol, type, opaque, size) then data.
            data = self.junk()
            head = struct.pack("<IIQI", self.r.choice([1, self.u32()]), self.r.randint(0, 20), self.u64(),
                               self.r.choice([len(data), self.u32()]))
            return kind, head + data, "AGENT_DATA, hostile size"
        if kind == 110:
            return kind, struct.pack("<I", self.u32()), "MIGRATE_DST_DO_SEAMLESS"
        body = b"" if self.r.random() < 0.7 else self.junk()
        return kind, body, "migration/attach message"

    def display(self):
        kind = self.r.choice([DISPLAY_INIT, STREAM_REPORT, STREAM_REPORT, PREFERRED_COMPRESSION,
                              PREFERRED_VIDEO_CODEC, PREFERRED_VIDEO_CODEC])
        if kind == DISPLAY_INIT:
            glz = self.r.choice([0, 1, -1, 0x7FFFFFFF, -0x80000000, self.r.getrandbits(31)])
            cache = self.r.choice([0, -1, (1 << 63) - 1, -(1 << 63), self.r.getrandbits(62)])
            body = struct.pack("<BqBi", self.u8(), cache, self.u8(), glz)
            return kind, body, f"DISPLAY_INIT cache {cache} glz window {glz}"
        if kind == STREAM_REPORT:
            stream = self.r.choice([0, 1, 49, self.r.randint(0, 49), 50, self.u32()])
            body = struct.pack("<8I", stream, *(self.u32() for _ in range(7)))
            if self.r.random() < 0.2:
                body += self.junk()
            return kind, body, f"STREAM_REPORT stream {stream}"
        if kind == PREFERRED_COMPRESSION:
            return kind, bytes([self.u8()]), "PREFERRED_COMPRESSION"
        count = self.u8()
        codecs = bytes(self.r.choice([0, 1, 2, 3, 4, 5, 255]) for _ in range(self.r.randint(0, 8)))
        return kind, bytes([count]) + codecs, f"PREFERRED_VIDEO_CODEC_TYPE count {count}"

    def inputs(self):
        kind = self.r.choice([101, 102, 103, 104, 111, 112, 113, 114])
        if kind in (101, 102):
            return kind, struct.pack("<I", self.u32()), "KEY_DOWN/UP code"
        if kind == 103:
            return kind, struct.pack("<H", self.u16()), "KEY_MODIFIERS"
        if kind == 104:
            return kind, self.junk(), "KEY_SCANCODE bytes"
        if kind == 111:
            return kind, struct.pack("<IIH", self.u32(), self.u32(), self.u16()), "MOUSE_MOTION"
        if kind == 112:
            return kind, struct.pack("<IIHB", self.u32(), self.u32(), self.u16(), self.u8()), "MOUSE_POSITION"
        return kind, struct.pack("<BH", self.u8(), self.u16()), "MOUSE_PRESS/RELEASE"

    def record(self):
        kind = self.r.choice([101, 102, 103])
        if kind == 101:
            return kind, struct.pack("<I", self.u32()) + self.junk(), "RECORD DATA"
        if kind == 102:
            return kind, struct.pack("<IH", self.u32(), self.u16()) + self.junk(), "RECORD MODE"
        return kind, struct.pack("<I", self.u32()), "RECORD START_MARK"

    def spicevmc(self, channel):
        kinds = [101, 101, 102] + ([201] if channel in ("port", "webdav") else [])
        kind = self.r.choice(kinds)
        if kind == 102:
            size = self.r.choice([0, 1, 64, 65536, 0x7FFFFFFF, self.u32()])
            return kind, struct.pack("<BI", self.r.choice([0, 1, 2, self.u8()]), size) + self.junk(), \
                f"COMPRESSED_DATA uncompressed size {size}"
        if kind == 201:
            return kind, bytes([self.u8()]), "PORT_EVENT"
        data = self.junk()
        if channel == "usbredir":
            # A usbredir packet header (type, length, id) with a hostile length.
            head = struct.pack("<III", self.r.choice([0, 1, 2, 3, 100, 101, self.u32()]),
                               self.r.choice([len(data), self.u32()]), self.u32())
            return kind, head + data, "usbredir packet, hostile length"
        if channel == "smartcard":
            # A VSCMsgHeader (type, reader id, length; big endian).
            head = struct.pack(">III", self.r.choice([1, 2, 3, 7, 8, self.u32()]), self.u32(),
                               self.r.choice([len(data), self.u32()]))
            return kind, head + data, "VSC message, hostile length"
        return kind, data, "DATA"

    def hostile(self, channel):
        if self.r.random() < 0.2:
            return self.common()
        if channel == "main":
            return self.main()
        if channel == "display":
            return self.display()
        if channel == "inputs":
            return self.inputs()
        if channel == "record":
            return self.record()
        if channel in ("usbredir", "port", "webdav", "smartcard"):
            return self.spicevmc(channel)
        return self.common()  # cursor, playback: no channel-specific client messages

    def random_type(self):
        pick = self.r.random()
        if pick < 0.25:
            kind = self.r.randint(1, 6)
        elif pick < 0.65:
            kind = self.r.randint(101, 120)
        elif pick < 0.8:
            kind = self.r.randint(201, 202)
        else:
            kind = self.r.getrandbits(16)
        return kind, self.junk(), "random type"


# Channels drawn for the mix: main and display twice as often.
_MIX = ["main", "main", "display", "display", "inputs", "cursor", "playback", "record", "usbredir",
        "port", "webdav", "smartcard"]


def generate(seed, count):
    """count messages for seed, the same list every time. The known killers
    come first, spread over the first 3x their number."""
    rng = random.Random(seed)
    gen = _Gen(rng)
    mixed = []
    for _ in range(max(count, 0)):
        channel = rng.choice(_MIX)
        if rng.random() < 0.55:
            kind, body, note = gen.hostile(channel)
            family = "hostile"
        else:
            kind, body, note = gen.random_type()
            family = "random"
        mini = rng.random() < 0.85
        if channel == "display":
            # A DISPLAY_INIT at random is the channel's first one as often as a second.
            init_first = kind != DISPLAY_INIT or rng.random() < 0.5
        else:
            init_first = False
        mixed.append((channel, kind, body, mini, init_first, family, note))
    known = _known()
    head = mixed[:2 * len(known)]
    for item in known:
        channel, kind, body, init_first, note = item
        head.insert(rng.randint(0, len(head)), (channel, kind, body, True, init_first, "known", note))
    rows = (head + mixed[2 * len(known):])[:count]
    return [Message(i, *row) for i, row in enumerate(rows)]


# --- delivering one message ------------------------------------------------

@dataclasses.dataclass
class Outcome:
    """What happened to one message on one session."""
    linked: bool = False
    # The hypervisor died: during the window after the message, or after the close.
    died: bool = False
    when: str = ""
    returncode: int | None = None
    # The hypervisor's last words, which one it was, the messages it had before.
    why: str = ""
    vm: str = ""
    before: list = dataclasses.field(default_factory=list)
    # The peer closed the message's channel during the window (a proxy's
    # refusal, or spice-server dropping the channel).
    channel_closed: bool = False
    error: str = ""


class Wire:
    """One linked channel: what it reads, parsed into messages, and the
    client's side of flow control (SET_ACK answered with ACK_SYNC, one ACK
    per window of messages, as spice-gtk does)."""

    def __init__(self, chan, mini, serial=0):
        self.chan, self.mini, self.serial = chan, mini, serial
        # WsChannel keeps what it read past the link reply.
        self.buf = getattr(chan, "buf", b"")
        self.closed = False
        self.window = self.left = 0

    def send(self, data, messages=1):
        self.chan.send(data)
        self.serial += messages

    def send_msg(self, kind, body):
        self.send(frame(kind, body, self.mini, self.serial + 1))

    def read(self, timeout):
        """Reads what comes within timeout; sets closed on EOF."""
        if self.closed:
            time.sleep(timeout)
            return
        ws = getattr(self.chan, "ws", None)
        try:
            if ws is not None:
                data = ws.recv(timeout=timeout)
            else:
                self.chan.sock.settimeout(timeout)
                data = self.chan.sock.recv(1 << 16)
                if not data:
                    self.closed = True
        except TimeoutError:
            return
        except Exception:  # noqa: BLE001 (reset, TLS alert, WebSocket closed: all mean closed here)
            self.closed = True
            return
        if isinstance(data, str):
            data = data.encode()
        self.buf += data

    def messages(self):
        """Complete messages read so far: [(type, body)]."""
        out = []
        hl = 6 if self.mini else 18
        while len(self.buf) >= hl:
            if self.mini:
                kind, size = struct.unpack("<HI", self.buf[:6])
            else:
                _, kind, size, _ = struct.unpack("<QHII", self.buf[:18])
            if len(self.buf) < hl + size:
                break
            out.append((kind, self.buf[hl:hl + size]))
            self.buf = self.buf[hl + size:]
        return out

    def pump(self, timeout):
        """Reads for up to timeout, answering flow control; the messages read."""
        self.read(timeout)
        got = self.messages()
        for kind, body in got:
            if self.closed:
                break
            try:
                if kind == SET_ACK and len(body) >= 8:
                    generation, window = struct.unpack("<II", body[:8])
                    self.window = self.left = window
                    self.send_msg(ACK_SYNC, struct.pack("<I", generation))
                elif self.left:
                    self.left -= 1
                    if not self.left:
                        self.send_msg(ACK, b"")
                        self.left = self.window
            except OSError:
                self.closed = True
            except Exception:  # noqa: BLE001 (a closed WebSocket)
                self.closed = True
        return got


def _link(chan, channel, ticket, mini, connection_id=0):
    common = 0b0011 | (0b1000 if mini else 0)
    chan.send(link_mess(CHANNELS[channel], 0, connection_id, common=common,
                        channel_caps=CHANNEL_CAPS.get(channel, 0)))
    error, key = chan.reply()
    if error != "OK":
        return error
    return chan.auth(key, ticket)


def wait_dead(alive, secs):
    """Samples alive() for up to secs; True once it is dead."""
    deadline = time.monotonic() + secs
    while True:
        if not alive():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def deliver(msg, connect, ticket, alive, window=0.3, after=0.1, deadline=10):
    """Sends msg on a fresh session: links main (and msg's channel) with
    ticket over connections from connect(), sends it, reads and answers for
    `window` s while sampling alive(), closes main then the channel, and
    samples alive() `after` s more. Never longer than about `deadline` s."""
    out = Outcome()
    until = time.monotonic() + deadline
    opened = []
    try:
        main = connect()
        opened.append(main)
        result = _link(main, "main", ticket, msg.mini)
        if result != "OK":
            out.error = f"main link: {result}"
            return out
        mw = Wire(main, msg.mini)
        session = None
        while session is None:
            if time.monotonic() > until:
                out.error = "no main INIT"
                return out
            for kind, body in mw.pump(0.05):
                if kind == MAIN_INIT and len(body) >= 4:
                    session = struct.unpack("<I", body[:4])[0]
            if mw.closed and session is None:
                out.error = "main closed before INIT"
                return out
        wires = [mw]
        if msg.channel == "main":
            target = mw
        else:
            chan = connect()
            opened.append(chan)
            result = _link(chan, msg.channel, ticket, msg.mini, connection_id=session)
            if result != "OK":
                out.error = f"{msg.channel} link: {result}"
                return out
            target = Wire(chan, msg.mini)
            wires.append(target)
        out.linked = True
        wire = msg.wire(target.serial + 1)
        target.send(wire, messages=2 if msg.init_first else 1)
        end = time.monotonic() + window
        while time.monotonic() < end:
            if not alive():
                out.died, out.when = True, "window"
                return out
            for w in wires:
                w.pump(0.02)
        out.channel_closed = target.closed
    except Exception as e:  # noqa: BLE001 (any failure to talk is an outcome, not a crash of the fuzzer)
        out.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        for c in opened:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
    if not out.died and wait_dead(alive, after):
        out.died, out.when = True, "after close"
    return out


def tally(messages, outcomes):
    """{label: count} of the message kinds (channel, type, note) among outcomes that killed."""
    seen = {}
    for m, o in zip(messages, outcomes):
        if o is not None and o.died:
            key = f"{m.channel} {m.kind} {m.note}"
            seen[key] = seen.get(key, 0) + 1
    return seen


__all__ = ["CHANNELS", "FUZZ_DEVICES", "Message", "Outcome", "Wire", "deliver", "generate", "tally", "wait_dead"]
