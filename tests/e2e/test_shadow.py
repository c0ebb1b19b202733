"""Shadowing against real peers: an operator asks Porthole for a view-only,
single-use link to a live session (`porthole sessions shadow`, or
POST /v1/sessions/{id}/shadow) and watches it. QEMU's VNC display in two
Chromium pages (Porthole's noVNC page), QEMU's serial console over raw
WebSockets, a guest that floods its serial port (a stalled shadow must not
slow the owner), two nodes on one redis-server, and a SPICE session that
cannot be shadowed."""

import json
import queue
import socket
import struct
import subprocess
import threading
import time
import urllib.parse

from websockets.sync.client import connect

import leak_check
from peers import RedisServer
from screen import differing_fraction, seabios_screen, vnc_capture, wait_for_final_vnc_screen
from spice_wire import MAIN, Channel
from support import HERE, Porthole, close_code, refused, rfb_client_handshake, wait_for, ws_url
from harness import http, run  # noqa: E402 (support puts tests/interop on the path)
from vm import VM


# ---------------------------------------------------------------- helpers

def remember(answer):
    """A shadow's answer holds its token, and its URL holds it too: the leak
    check looks for both (the URL's other parts, the gateway's address, are
    no secret and would match every log line)."""
    leak_check.remember(answer["token"])
    for value in urllib.parse.parse_qs(urllib.parse.urlsplit(answer["url"]).query).get("token", []):
        leak_check.remember(value)
    assert answer["token"] in answer["url"], "the link carries the shadow's token"
    return answer


def shadow_by_cli(p, session_id):
    """`porthole sessions shadow ID --json`, the operator's way."""
    return remember(json.loads(p.cli("sessions", "shadow", session_id, "--json").stdout))


def shadow_by_api(p, session_id, actor):
    status, answer = p.admin("POST", f"/v1/sessions/{session_id}/shadow", {}, actor=actor)
    assert status == 200, (status, answer)
    return remember(answer)


def sessions(p):
    status, listed = p.admin("GET", "/v1/sessions")
    assert status == 200, listed
    return listed["sessions"]


def session_of(p, jti, within=15):
    """The id of the live session `jti`'s token runs (once listed)."""
    found = wait_for(lambda: [s for s in sessions(p) if s["jti"] == jti], f"session {jti} never listed", within)
    return found[0]["id"]


def listed_as_shadow(p, owner_id, shadow_jti, within=15):
    """(owner's entry, shadow's entry) once the shadow is listed under its session."""
    def both():
        listed = {s["jti"]: s for s in sessions(p)}
        owner = next((s for s in listed.values() if s["id"] == owner_id), None)
        shadow = listed.get(shadow_jti)
        if owner and shadow and owner["shadows"] == [shadow["id"]]:
            return owner, shadow
        return None
    owner, shadow = wait_for(both, "the shadow is never listed under its session", within)
    assert shadow["shadow_of"] == owner_id and shadow["view_only"] is True, shadow
    assert owner.get("shadow_of") is None and owner["view_only"] is False, owner
    return owner, shadow


def check_answer(answer, session_id, console):
    assert answer["session"] == session_id and answer["type"] == console, answer
    assert 0 < answer["expires_at"] - time.time() <= 61, "a shadow's link is good for a minute"
    assert "/console?token=" in answer["url"], answer["url"]


class Pages:
    """pages.mjs: one Chromium, several console pages at once."""

    def __init__(self, tmp_path):
        self.stderr = open(tmp_path / "pages.stderr", "w")
        self.proc = subprocess.Popen(["node", str(HERE / "pages.mjs")], cwd=HERE, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)
        self.answers = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.answers.put(line)
        self.answers.put(None)

    def __call__(self, op, timeout=60, **args):
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"pages.mjs did not answer {op} within {timeout} s") from None
        assert line is not None, f"pages.mjs exited: {self.stderr.name}"
        answer = json.loads(line)
        assert answer["ok"], answer
        return answer

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def canvases_match(pages, names, reference, tmp_path, tag, within=15):
    """Polls the pages' canvases until each is SeaBIOS's screen and differs
    from `reference` (a direct capture) in at most 1% of pixels; returns
    {name: fraction}."""
    deadline = time.monotonic() + within
    n = 0
    while True:
        n += 1
        got = {}
        for name in names:
            out = tmp_path / f"{tag}-{name}-{n}.png"
            # (spice-html5 makes its canvas when the display channel's first
            # surface arrives, after the page says it is connected.)
            if not pages("canvas", name=name, out=str(out))["canvas"]:
                got[name] = 1.0
                continue
            try:
                seabios_screen(out)
                got[name] = differing_fraction(out, reference)
            except AssertionError:
                got[name] = 1.0
        if all(v <= 0.01 for v in got.values()):
            return got
        assert time.monotonic() < deadline, f"{tag}: the pages never showed the VM's screen: {got}"
        time.sleep(0.3)


class SerialReader:
    """A direct reader of the VM's COM1 (one client at a time: only while
    no Porthole session holds it)."""

    def __init__(self, vm):
        self.sock = socket.create_connection(("127.0.0.1", vm.serial_port), timeout=5)
        self.seen = b""

    def until(self, marker, within=15):
        deadline = time.monotonic() + within
        while marker not in self.seen:
            assert time.monotonic() < deadline, f"{marker!r} not on COM1: {self.seen[-300:]!r}"
            self.sock.settimeout(0.1)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            assert data, "COM1 closed"
            self.seen += data
        return self.seen

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------- 1. noVNC in Chromium

def test_a_novnc_shadow_in_chromium_shows_the_owner_s_screen_opens_once_and_ends_with_it(tmp_path):
    (tmp_path / "vm").mkdir()
    # share=ignore: a direct gvnccapture (which asks for exclusive access)
    # must not disconnect the two pages (noVNC and shadows ask shared), and
    # force-shared would refuse it.
    vm = VM(tmp_path / "vm", vnc_options="share=ignore")
    p = Porthole(tmp_path)
    pages = None
    try:
        final = wait_for_final_vnc_screen(vm, tmp_path)
        minted = p.mint("novnc", vm.vnc_port)
        pages = Pages(tmp_path)
        owner = pages("open", name="owner", url=minted["url"])
        assert owner["state"] == "connected" and owner["badge"] is None, owner
        owner_id = session_of(p, minted["jti"])

        # The operator asks for a shadow with the CLI and opens its link.
        answer = shadow_by_cli(p, owner_id)
        check_answer(answer, owner_id, "novnc")
        shadow = pages("open", name="shadow", url=answer["url"])
        assert shadow["state"] == "connected", shadow
        assert shadow["badge"] and "View only" in shadow["badge"], shadow
        _, shadow_entry = listed_as_shadow(p, owner_id, answer["jti"])
        # The operator's CLI shows it too (its table has no column for it: --json).
        listed = {s["id"]: s for s in json.loads(p.cli("sessions", "list", "--json").stdout)["sessions"]}
        assert listed[owner_id]["shadows"] == [shadow_entry["id"]], listed
        assert listed[shadow_entry["id"]]["shadow_of"] == owner_id, listed

        # The link opens once: a second page (and a plain socket) is refused
        # while the shadow runs.
        again = pages("open", name="again", url=answer["url"])
        assert again["state"] not in ("connected", "connecting"), again
        print(f"second open of the shadow's link: {again['state']!r} ({again['text']})")
        refused(ws_url(p, "vnc", answer["token"]), 403)
        pages("close", name="again")

        # The same screen on both pages as on the VM's own display.
        got = canvases_match(pages, ["owner", "shadow"], final, tmp_path, "final")
        print(f"final screen, differing from a direct capture: {got}")

        # The owner's page says it is watched ([sessions] tell_watched, the
        # default; the page asks every 10 s), the shadow's page does not.
        told = time.monotonic()
        wait_for(lambda: pages("state", name="owner")["watched"], "the owner's page never said it is watched",
                 within=25)
        print(f"the owner's page said it is watched {time.monotonic() - told:.1f} s after the check began")
        assert "watching" in pages("state", name="owner")["watched"]
        assert pages("state", name="shadow")["watched"] is None

        # Live: the owner opens SeaBIOS's boot menu; the shadow shows it too.
        com1 = SerialReader(vm)
        try:
            vm.qmp("system_reset")
            com1.until(b"Press ESC")
            deadline = time.monotonic() + 10
            while b"Select boot device" not in com1.seen:
                assert time.monotonic() < deadline, com1.seen[-300:]
                assert b"No bootable device" not in com1.seen, "the owner's ESC did not reach the VM"
                pages("press", name="owner", key="Escape")
                try:
                    com1.until(b"Select boot device", within=1)
                except AssertionError:
                    pass
        finally:
            com1.close()
        time.sleep(0.5)  # the menu drawn in full
        menu = vnc_capture(vm, tmp_path / "direct-menu.png")
        assert differing_fraction(menu, final) >= 0.003, "the boot menu looks like the final screen"
        got = canvases_match(pages, ["owner", "shadow"], menu, tmp_path, "menu")
        print(f"boot menu, differing from a direct capture: {got}; menu vs final screen: "
              f"{differing_fraction(menu, final):.2%}")

        # The owner leaves: the shadow's page is disconnected.
        left = time.monotonic()
        pages("close", name="owner")
        ended = pages("wait_ended", name="shadow", ms=20000)
        closes = [(c["code"], c["reason"]) for c in ended["closes"]]
        print(f"shadow's page after the owner left ({time.monotonic() - left:.2f} s): {ended['state']!r} "
              f"({ended['text']}), its socket closed with {closes}")
        assert ended["ended"], ended
        assert closes and closes[0][0] != 1006, closes
        # The page says why (its preflight answers as the socket would).
        assert ended["state"] == "ended" and "session you were watching has ended" in ended["text"], ended
        wait_for(lambda: sessions(p) == [], "sessions still listed after the owner left")
        # ...and its link is refused: its session has ended.
        assert b"ended" in refused(ws_url(p, "vnc", answer["token"]), 410)

        events = p.audit()
        issued = [e for e in events if e["event"] == "shadow_issued"]
        assert len(issued) == 1, issued
        assert issued[0]["session"] == owner_id and issued[0]["shadow_jti"] == answer["jti"], issued
        assert issued[0]["by"].startswith("cli:") and issued[0]["from"] == "127.0.0.1", issued
    finally:
        if pages is not None:
            pages.close()
        vm.stop()
        assert p.gateway.stop() == 0, p.log()[-3000:]


# ---------------------------------------------------------------- 2. serial

class Both:
    """The owner's and the shadow's serial sockets, read side by side."""

    def __init__(self, owner, shadow):
        self.ws = {"owner": owner, "shadow": shadow}
        self.seen = {"owner": b"", "shadow": b""}

    def pump(self):
        got = False
        for name, ws in self.ws.items():
            try:
                self.seen[name] += ws.recv(timeout=0.02)
                got = True
            except TimeoutError:
                pass
        return got

    def drain(self, quiet=0.5):
        """Reads both until neither has had anything for `quiet` s."""
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if self.pump():
                last = time.monotonic()

    def until(self, condition, what, within=20, each=None):
        deadline = time.monotonic() + within
        while not condition(self.seen):
            assert time.monotonic() < deadline, f"{what}: {dict((k, v[-300:]) for k, v in self.seen.items())}"
            self.pump()
            if each:
                each(self.seen)

    def same(self):
        """Asserts both saw the same bytes."""
        a, b = self.seen["owner"], self.seen["shadow"]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert a == b, (f"the shadow saw other bytes than the owner from byte {at} "
                        f"(owner {len(a)}, shadow {len(b)}): {a[at - 20:at + 40]!r} vs {b[at - 20:at + 40]!r}")

    def clear(self):
        self.seen = {"owner": b"", "shadow": b""}


def test_a_serial_shadow_sees_what_the_owner_sees_and_its_keys_do_not_reach_the_vm(tmp_path, porthole, vm):
    vm.wait_for_serial()  # the first boot's output is over: nothing is written until a reset
    minted = porthole.mint("serial", vm.serial_port, ttl=300)
    owner = connect(ws_url(porthole, "serial", minted["token"]), subprotocols=["binary"], open_timeout=10)
    owner_id = session_of(porthole, minted["jti"])
    answer = shadow_by_api(porthole, owner_id, actor="olga")
    check_answer(answer, owner_id, "serial")
    shadow = connect(ws_url(porthole, "serial", answer["token"]), subprotocols=["binary"], open_timeout=10)
    listed_as_shadow(porthole, owner_id, answer["jti"])
    refused(ws_url(porthole, "serial", answer["token"]), 403)  # the link opens once
    both = Both(owner, shadow)
    both.drain()  # what the first boot wrote last may reach the owner, who came first
    both.clear()

    # Reset: SeaBIOS prints its prompt; the shadow answers it with ESC, as
    # a user pressing keys would, and the menu does not open.
    vm.qmp("system_reset")
    escapes = []

    def shadow_presses_esc(seen):
        if b"Press ESC" in seen["shadow"] and (not escapes or time.monotonic() - escapes[-1] > 0.1):
            shadow.send(b"\x1b")
            escapes.append(time.monotonic())
    both.until(lambda s: b"No bootable device" in s["owner"] and b"No bootable device" in s["shadow"],
               "SeaBIOS's last line on both", each=shadow_presses_esc)
    assert escapes, "the shadow never saw the prompt"
    for name, seen in both.seen.items():
        assert b"SeaBIOS (version" in seen and b"Press ESC for boot menu" in seen, (name, seen)
        assert b"Select boot device" not in seen, f"the shadow's ESC ({len(escapes)}x) opened the boot menu"
    both.drain()
    both.same()
    print(f"serial: {len(both.seen['owner'])} identical bytes on both after the reset; "
          f"the shadow sent ESC {len(escapes)} times, the menu stayed shut")

    # Reset again: the owner's ESC opens the menu, and the shadow sees it.
    both.clear()
    vm.qmp("system_reset")
    pressed = []

    def owner_presses_esc(seen):
        if b"Press ESC" in seen["owner"] and not pressed:
            owner.send(b"\x1b")
            pressed.append(True)
    both.until(lambda s: all(b"Select boot device" in v for v in s.values()),
               "the owner's ESC opens the menu, on both", each=owner_presses_esc)
    both.drain()
    both.same()

    # The operator ends the owner's session: the shadow ends with it.
    out = porthole.cli("sessions", "kill", "--id", owner_id, "--reason", "shadow test")
    assert owner_id in out.stdout, out.stdout
    assert close_code(owner) == 4003
    code = close_code(shadow)
    print(f"serial: the shadow's socket closed with {code} when its session was killed")
    assert code is not None and code != 1006, code
    wait_for(lambda: sessions(porthole) == [], "sessions still listed after the kill")
    issued = [e for e in porthole.audit() if e["event"] == "shadow_issued"]
    assert [(e["by"], e["from"], e["session"], e["shadow_jti"]) for e in issued] == [
        ("olga", "127.0.0.1", owner_id, answer["jti"])], issued


# ---------------------------------------------------------------- 3. a stalled shadow

FLOOD = 600_000
BEGIN, END = b"\r\nFLOOD-BEGIN\r\n", b"\r\nFLOOD-END\r\n"


def flood_kernel(n):
    """A multiboot kernel (a flat binary, the a.out kludge) that writes
    BEGIN, n bytes of a pattern (flood_pattern(n)), then END to COM1 and
    halts. It waits for the UART's THR to empty before each byte, so QEMU's
    backpressure (a reader that does not keep up) slows the guest down
    instead of losing bytes. Checked with objdump -D -b binary -m i386."""
    base, header_len = 0x100000, 32
    code, labels, fixups = bytearray(), {}, []

    def ref(label, kind):
        fixups.append((len(code), label, kind))
        code.extend(b"\0" * (1 if kind == "rel8" else 4))

    code += b"\xbc" + struct.pack("<I", 0x90000) + b"\xfc"  # mov esp, 0x90000; cld
    code += b"\x66\xba\xfb\x03\xb0\x03\xee"  # LCR: 8N1, divisor latch off
    code += b"\x66\xba\xf9\x03\xb0\x00\xee"  # IER: no interrupts
    code += b"\xbe"; ref("begin", "abs32")  # mov esi, begin
    code += b"\xe8"; ref("puts", "rel32")
    code += b"\xb9" + struct.pack("<I", n)  # mov ecx, n
    labels["loop"] = len(code)
    code += b"\x89\xc8\x24\x3f\x04\x30"  # mov eax, ecx; and al, 63; add al, '0'
    code += b"\xe8"; ref("putc", "rel32")
    code += b"\xe2"; ref("loop", "rel8")  # loop
    code += b"\xbe"; ref("end", "abs32")
    code += b"\xe8"; ref("puts", "rel32")
    labels["halt"] = len(code)
    code += b"\xfa\xf4\xeb"; ref("halt", "rel8")  # cli; hlt; jmp halt
    labels["putc"] = len(code)
    code += b"\x88\xc4\x66\xba\xfd\x03"  # mov ah, al; mov dx, LSR
    labels["thre"] = len(code)
    code += b"\xec\xa8\x20\x74"; ref("thre", "rel8")  # in al, dx; test al, THRE; jz
    code += b"\x88\xe0\x66\xba\xf8\x03\xee\xc3"  # mov al, ah; mov dx, THR; out dx, al; ret
    labels["puts"] = len(code)
    code += b"\xac\x84\xc0\x74"; ref("puts_end", "rel8")  # lodsb; test al, al; jz
    code += b"\xe8"; ref("putc", "rel32")
    code += b"\xeb"; ref("puts", "rel8")
    labels["puts_end"] = len(code)
    code += b"\xc3"
    labels["begin"] = len(code)
    code += BEGIN + b"\0"
    labels["end"] = len(code)
    code += END + b"\0"
    for at, label, kind in fixups:
        target = labels[label]
        if kind == "rel32":
            code[at:at + 4] = struct.pack("<i", target - (at + 4))
        elif kind == "rel8":
            code[at:at + 1] = struct.pack("<b", target - (at + 1))
        else:
            code[at:at + 4] = struct.pack("<I", base + header_len + target)
    magic, flags = 0x1BADB002, 0x00010000  # flags: the load addresses below are valid
    header = struct.pack("<8I", magic, flags, -(magic + flags) & 0xFFFFFFFF, base, base, 0, 0, base + header_len)
    return header + bytes(code)


def flood_pattern(n):
    return bytes(0x30 + (c & 0x3F) for c in range(n, 0, -1))


def stalled_socket(p, token):
    """A WebSocket client that completes the upgrade and never reads again
    (a small receive buffer, so its window closes soon)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", p.public_port))
    s.sendall((f"GET /serial?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{p.public_port}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c2hhZG93LXN0YWxsZWQtMQ==\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def owner_throughput(vm, owner, n, within=60):
    """Resets the VM and reads the flood through the owner's socket:
    (bytes per second from BEGIN to END, seconds). The bytes must be the
    guest's, all of them, in order, within `within` s."""
    vm.qmp("system_reset")
    seen, start = b"", None
    deadline = time.monotonic() + within
    while start is None or END not in seen[-64:]:
        assert time.monotonic() < deadline, f"the flood did not end: {len(seen)} bytes"
        try:
            seen += owner.recv(timeout=1)
        except TimeoutError:
            continue
        if start is None:
            if BEGIN in seen:
                start = time.monotonic()
                seen = seen[seen.index(BEGIN):]
            else:
                seen = seen[-64:]
    took = time.monotonic() - start
    body = seen[len(BEGIN):seen.rindex(END)]
    assert body == flood_pattern(n), f"the owner got {len(body)} bytes, not the guest's {n}"
    return n / took, took


def test_a_shadow_that_never_reads_does_not_slow_the_owner(tmp_path):
    (tmp_path / "vm").mkdir()
    kernel = tmp_path / "flood.bin"
    kernel.write_bytes(flood_kernel(FLOOD))
    vm = VM(tmp_path / "vm", splash_ms=0, extra_args=["-kernel", str(kernel)])
    p = Porthole(tmp_path)
    stalled = None
    try:
        minted = p.mint("serial", vm.serial_port, ttl=300)
        owner = connect(ws_url(p, "serial", minted["token"]), subprotocols=["binary"], open_timeout=10,
                        max_size=None)
        owner_id = session_of(p, minted["jti"])
        alone, alone_s = owner_throughput(vm, owner, FLOOD)

        answer = shadow_by_api(p, owner_id, actor="olga")
        stalled = stalled_socket(p, answer["token"])
        listed_as_shadow(p, owner_id, answer["jti"])
        # A shadow that held the owner back would stop it dead once its
        # buffers (a small part of the flood) are full: the deadline catches that.
        watched, watched_s = owner_throughput(vm, owner, FLOOD, within=max(20, 5 * alone_s))
        # It stalled all along: still listed with little of the flood, or
        # cut as a stalled shadow is: for taking nothing (a slow run: the
        # flood outlasted SHADOW_STALL) or for falling 256 chunks behind
        # (its socket's and pipe's buffers full before the flood's end).
        shadow_entry = next((s for s in sessions(p) if s["jti"] == answer["jti"]), None)
        went = "cut" if shadow_entry is None else f"{shadow_entry['bytes_down']} bytes"
        print(f"owner's download of {FLOOD} bytes of guest output: alone {alone / 1e6:.3f} MB/s ({alone_s:.2f} s), "
              f"with a shadow that never reads {watched / 1e6:.3f} MB/s ({watched_s:.2f} s); shadow: {went}")
        if shadow_entry is None:
            cuts = [line for line in p.log().splitlines() if "shadow cut:" in line]
            assert cuts and all("took none" in c or "fell 256 chunks behind" in c for c in cuts), p.log()[-3000:]
        else:
            assert shadow_entry["bytes_down"] < FLOOD / 4, shadow_entry
        # Generous: a shared, noisy machine.
        assert watched >= alone / 4, (alone, watched)

        # The owner leaves: the stalled shadow ends with its session (it
        # cannot take its close frame: the relay does not wait for it long).
        left = time.monotonic()
        owner.close()
        wait_for(lambda: sessions(p) == [], "the stalled shadow outlived its session")
        print(f"the stalled shadow ended {time.monotonic() - left:.2f} s after its owner left")
    finally:
        if stalled is not None:
            stalled.close()
        vm.stop()
        assert p.gateway.stop() == 0, p.log()[-3000:]


# ---------------------------------------------------------------- 4. two nodes

def test_a_shadow_on_another_node_ends_when_its_session_is_ended(tmp_path, vm):
    redis = RedisServer()
    nodes = []
    try:
        for name in ("node-a", "node-b"):
            (tmp_path / name).mkdir()
            nodes.append(Porthole(tmp_path / name, key=nodes[0].key if nodes else None,
                                  sections=redis.sections(name, lease_secs=3)))
        a, b = nodes
        minted = a.mint("novnc", vm.vnc_port)
        owner = connect(ws_url(a, "vnc", minted["token"]), open_timeout=10, max_size=None)
        assert rfb_client_handshake(owner, server_init=None)[:4] == b"\x02\xd0\x01\x90", "QEMU's 720x400"
        owner_id = session_of(b, minted["jti"])  # node b lists node a's session

        # Node b issues the shadow and runs it.
        answer = shadow_by_api(b, owner_id, actor="erin")
        check_answer(answer, owner_id, "novnc")
        shadow = connect(ws_url(b, "vnc", answer["token"]), open_timeout=10, max_size=None)
        assert rfb_client_handshake(shadow, server_init=None)[:4] == b"\x02\xd0\x01\x90"
        # It sees the screen: a full framebuffer update request is answered.
        shadow.send(b"\x03\x00\x00\x00\x00\x00\x02\xd0\x01\x90")
        assert shadow.recv(timeout=10)[:1] == b"\x00", "a FramebufferUpdate"
        owner_entry, shadow_entry = listed_as_shadow(a, owner_id, answer["jti"])
        assert (owner_entry["node"], shadow_entry["node"]) == ("node-a", "node-b"), (owner_entry, shadow_entry)

        # Ended on node a: the shadow on node b ends too.
        ended_at = time.monotonic()
        status, body = a.admin("DELETE", f"/v1/sessions/{owner_id}?reason=done", actor="erin")
        assert status == 200 and body["terminated"] == [owner_id], body
        assert close_code(owner) == 4003
        code = close_code(shadow, within=20)
        took = time.monotonic() - ended_at
        print(f"cluster: the shadow on node b closed ({code}) {took * 1000:.0f} ms after node a was asked to end "
              "the session")
        assert code is not None and code != 1006, code
        wait_for(lambda: sessions(a) == [] and sessions(b) == [], "sessions still listed")
        issued = [e for e in b.audit() if e["event"] == "shadow_issued"]
        assert [(e["by"], e["from"], e["session"], e["shadow_jti"]) for e in issued] == [
            ("erin", "127.0.0.1", owner_id, answer["jti"])], issued
        assert not [e for e in a.audit() if e["event"] == "shadow_issued"], "issued on node b only"

        # A serial console serves one client: node a reads it and, while a
        # shadow on node b watches, sends what it reads through Redis.
        vm.wait_for_serial()
        serial = a.mint("serial", vm.serial_port, ttl=300)
        owner = connect(ws_url(a, "serial", serial["token"]), subprotocols=["binary"], open_timeout=10)
        serial_id = session_of(b, serial["jti"])
        answer = shadow_by_api(b, serial_id, actor="erin")
        shadow = connect(ws_url(b, "serial", answer["token"]), subprotocols=["binary"], open_timeout=10)
        owner_entry, shadow_entry = listed_as_shadow(a, serial_id, answer["jti"])
        assert (owner_entry["node"], shadow_entry["node"]) == ("node-a", "node-b"), (owner_entry, shadow_entry)
        both = Both(owner, shadow)
        both.drain()
        both.clear()
        vm.qmp("system_reset")
        # Both see it: the owner's bytes come in many small messages, the
        # shadow's batched through Redis, and each read takes one of each.
        both.until(lambda seen: b"Press ESC" in seen["shadow"]
                   and (b"Press ESC" in seen["owner"] or b"SeaBIOS" in seen["owner"]),
                   "SeaBIOS on node a's owner and, through Redis, node b's shadow")
        owner.close()
        assert close_code(shadow, within=20) not in (None, 1006)

        # Node b dies while its shadow watches: node a stops counting that
        # shadow once node b's entries run out (its lease, 3 s), and the
        # owner's page stops saying it is watched.
        def watched(token):
            status, body = http("GET", f"{a.base}/watched?token={token}")
            assert status == 200, body
            return json.loads(body)["watched"]

        serial = a.mint("serial", vm.serial_port, ttl=300)
        owner = connect(ws_url(a, "serial", serial["token"]), subprotocols=["binary"], open_timeout=10)
        serial_id = session_of(b, serial["jti"])
        answer = shadow_by_api(b, serial_id, actor="erin")
        shadow = connect(ws_url(b, "serial", answer["token"]), subprotocols=["binary"], open_timeout=10)
        listed_as_shadow(a, serial_id, answer["jti"])
        wait_for(lambda: watched(serial["token"]), "the owner's page never said it is watched")
        b.gateway.proc.kill()
        b.gateway.proc.wait(timeout=10)
        died = time.monotonic()
        wait_for(lambda: watched(serial["token"]) is False,
                 "node a still counts the shadow of a node that died", within=30)
        print(f"cluster: node a stopped counting node b's shadow {time.monotonic() - died:.1f} s after node b died")
        assert [s["id"] for s in sessions(a)] == [serial_id], sessions(a)
        owner.close()
    finally:
        for p in nodes:
            if p.gateway.proc.returncode == -9:
                continue  # node b, killed above
            assert p.gateway.stop() == 0, p.log()[-3000:]
        redis.stop()


# ---------------------------------------------------------------- 5. SPICE

def test_a_spice_session_is_not_shadowable(tmp_path, spice_vm):
    pw = tmp_path / "spice.pw"
    pw.write_text(spice_vm.spice_password)
    p = Porthole(tmp_path, backend_extra=f'[backends.spice]\npassword_file = "{pw}"\nca = "{spice_vm.spice_ca}"')
    main = None
    try:
        minted = p.mint("spice-direct", spice_vm.spice_port, tls_port=spice_vm.spice_tls_port)
        ticket = p.spice_details(minted["token"])["ticket"]
        main = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert main.open(MAIN, ticket) == "OK"
        session_id = session_of(p, minted["jti"])
        status, body = p.admin("POST", f"/v1/sessions/{session_id}/shadow", {}, actor="olga")
        assert (status, body["error"]["code"]) == (409, "not_shadowable"), (status, body)
        out = run("sessions", "shadow", session_id, "--json", "--admin", f"http://127.0.0.1:{p.admin_port}",
                  "--bearer-file", str(p.bearer), check=False)
        assert out.returncode != 0 and "SPICE" in out.stderr, (out.returncode, out.stdout, out.stderr)
        assert not [e for e in p.audit() if e["event"] == "shadow_issued"]
        status, body = p.admin("POST", "/v1/sessions/s-no-such-session/shadow", {}, actor="olga")
        assert status == 404, (status, body)
    finally:
        if main is not None:
            main.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]
