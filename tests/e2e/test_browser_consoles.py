"""Browser consoles against real peers: QEMU's VNC and serial consoles,
noVNC and xterm.js in headless Chromium, and a plain WebSocket client."""

import json
import subprocess
import time

from support import HERE, EchoBackend, browser, wait_for
from screen import differing_fraction, seabios_screen
from websockets.sync.client import connect


def direct_capture(vm, out):
    p = subprocess.run(["gvnccapture", f"127.0.0.1:{vm.display}", str(out)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    return out


def wait_for_final_screen(vm, tmp_path):
    """Polls direct captures until SeaBIOS's screen is there and stable."""
    deadline = time.monotonic() + 30
    previous = None
    n = 0
    while True:
        assert time.monotonic() < deadline, "the screen never settled"
        n += 1
        shot = direct_capture(vm, tmp_path / f"direct-{n}.png")
        try:
            seabios_screen(shot)
            if previous is not None and differing_fraction(previous, shot) < 0.01:
                return shot
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        previous = shot
        time.sleep(0.5)


def test_novnc_in_chromium_shows_the_vm_screen(porthole, vm, tmp_path):
    reference = wait_for_final_screen(vm, tmp_path)
    minted = porthole.mint("novnc", vm.vnc_port)
    result = browser("vnc", minted["url"], tmp_path / "novnc.png", 3000)
    assert result["http_status"] == 200
    assert result["state"] == "connected", result
    assert "script-src 'self'" in result["csp"] and "'unsafe-eval'" not in result["csp"]
    assert result["canvas"], result
    seabios_screen(tmp_path / "novnc.png")
    after = direct_capture(vm, tmp_path / "direct-after.png")
    diff = min(differing_fraction(tmp_path / "novnc.png", reference),
               differing_fraction(tmp_path / "novnc.png", after))
    assert diff <= 0.01, f"noVNC through Porthole differs from a direct capture in {diff:.2%} of pixels"
    log = porthole.log()
    assert "session started" in log and 'reason="client_left"' in log
    assert minted["token"] not in log


def test_serial_console_in_xterm_page_and_plain_websocket(porthole, vm, tmp_path):
    minted = porthole.mint("serial", vm.serial_port, ttl=300)
    # The page: connect, then reset the VM so SeaBIOS prints again on COM1.
    page = subprocess.Popen(["node", "browser.mjs", "serial", minted["url"], "6000"], cwd=HERE,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "console=serial target" not in porthole.log():
        assert time.monotonic() < deadline, porthole.log()
        time.sleep(0.1)
    vm.qmp("system_reset")
    out, _ = page.communicate(timeout=90)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["state"] == "connected", result
    assert "SeaBIOS" in result["terminal"], result["terminal"]

    # A plain WebSocket client on the same endpoint (the page has left, the
    # console is free again): reset, press ESC on the serial port during the
    # boot-menu window, and the boot menu answers on the serial port.
    url = minted["url"].replace("http://", "ws://").replace("/console?", "/serial?")
    with connect(url, subprotocols=["binary"], open_timeout=10) as ws:
        assert ws.subprotocol == "binary"
        vm.qmp("system_reset")
        seen = b""
        deadline = time.monotonic() + 20
        while b"Select boot device" not in seen:
            assert time.monotonic() < deadline, seen[-400:]
            if b"Press ESC" in seen:
                ws.send(b"\x1b")
            try:
                seen += ws.recv(timeout=0.5)
            except TimeoutError:
                pass
        assert b"SeaBIOS" in seen


def test_every_byte_value_passes_unchanged_both_ways(porthole):
    backend = EchoBackend()
    try:
        minted = porthole.mint("serial", backend.port)
        url = f"ws://127.0.0.1:{porthole.public_port}/serial?token={minted['token']}"
        payload = bytes(range(256)) * 256  # 64 KiB, every byte value
        with connect(url, open_timeout=10, max_size=None) as ws:
            for i in range(0, len(payload), 4096):
                ws.send(payload[i:i + 4096])
            got = b""
            while len(got) < len(payload):
                got += ws.recv(timeout=20)
        assert got == payload
    finally:
        backend.close()


def test_a_second_serial_viewer_is_told_busy(porthole):
    backend = EchoBackend()
    try:
        first = porthole.mint("serial", backend.port)
        second = porthole.mint("serial", backend.port)
        base = f"ws://127.0.0.1:{porthole.public_port}/serial?token="
        with connect(base + first["token"], open_timeout=10) as ws:
            ws.send(b"ping")
            assert ws.recv(timeout=10) == b"ping"
            from websockets.exceptions import InvalidStatus
            try:
                connect(base + second["token"], open_timeout=10)
                raise AssertionError("second viewer was accepted")
            except InvalidStatus as e:
                assert e.response.status_code == 409
                assert b"busy" in e.response.body
            assert backend.accepted == 1, "the busy viewer never reached the console"
            # The page says so too.
            result = browser("status", second["url"], 0)
            assert result["state"] == "busy", result
        # Once the first viewer leaves, the console is free.
        with connect(base + second["token"], open_timeout=10) as ws:
            ws.send(b"again")
            assert ws.recv(timeout=10) == b"again"
    finally:
        backend.close()


class Xvnc:
    """TigerVNC's X server as the console: a VNC server whose clipboard is
    X's, set and read with xclip (QEMU's VNC clipboard needs an agent inside
    the guest). It picks its own display number; stopped by PID."""

    def __init__(self, tmp_path):
        import os
        import select
        from harness import free_port
        self.port = free_port()
        self.log = open(tmp_path / "xvnc.log", "w")
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            ["Xtigervnc", "-displayfd", str(w), "-rfbport", str(self.port), "-localhost", "-SecurityTypes", "None",
             "-AlwaysShared", "-ac", "-nolisten", "tcp", "-geometry", "640x480", "-depth", "24"],
            pass_fds=(w,), stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.close(w)
        try:
            number = b""
            while not number.endswith(b"\n"):
                assert select.select([r], [], [], 30)[0], "Xtigervnc gave no display number within 30 s"
                chunk = os.read(r, 16)
                assert chunk, f"Xtigervnc exited: {(tmp_path / 'xvnc.log').read_text()[-2000:]}"
                number += chunk
        finally:
            os.close(r)
        self.env = {**os.environ, "DISPLAY": ":" + number.decode().strip()}
        self.owners = []

    def set_clipboard(self, text):
        """X's CLIPBOARD, owned by an xclip that serves it until stopped."""
        owner = subprocess.Popen(["xclip", "-quiet", "-selection", "clipboard", "-i"], env=self.env,
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        owner.stdin.write(text.encode())
        owner.stdin.close()
        self.owners.append(owner)

    def clipboard(self):
        p = subprocess.run(["xclip", "-o", "-selection", "clipboard"], env=self.env, capture_output=True,
                           text=True, timeout=10)
        return p.stdout if p.returncode == 0 else None

    def stop(self):
        from vm import stop_process
        for owner in self.owners:
            owner.kill()
            owner.wait()
        stop_process(self.proc, self.log)


def test_the_novnc_page_carries_the_clipboard_both_ways_and_fits_the_window(tmp_path):
    """Porthole's noVNC page in Chromium against TigerVNC's Xvnc: text the
    desktop copies shows in the page's clipboard panel, and text typed
    there and sent lands in the desktop's clipboard; a view-only page beside
    it offers no panel and shows nothing copied. "Fit to window" scales the
    screen to the room the page has, and back."""
    from support import Porthole
    from test_shadow import Pages
    xvnc = Xvnc(tmp_path)
    p = Porthole(tmp_path)
    pages = None
    try:
        pages = Pages(tmp_path)
        minted = p.mint("novnc", xvnc.port)
        opened = pages("open", name="vnc", url=minted["url"])
        assert opened["state"] == "connected", opened
        # A view-only page beside it: no panel, so a watcher never sees what was copied.
        watcher = pages("open", name="watcher", url=p.mint("novnc", xvnc.port, view_only=True)["url"])
        assert watcher["state"] == "connected", watcher
        assert pages("call", name="watcher", fn="clipboardOffered")["value"] is False

        # From the desktop to the page.
        xvnc.set_clipboard("copied in the VM: ünïcode ✓")
        pages("click", name="vnc", selector="#clipboard-toggle")
        wait_for(lambda: pages("call", name="vnc", fn="clipboardText")["value"] == "copied in the VM: ünïcode ✓",
                 "the desktop's clipboard never reached the page")
        assert pages("call", name="watcher", fn="clipboardText")["value"] == ""

        # From the page to the desktop: typed into the panel, then sent.
        pages("click", name="vnc", selector="#clipboard-text")
        pages("keys", name="vnc", keys=["Control+A", "Delete", *"pasted from the browser"])
        pages("click", name="vnc", selector="#clipboard-send")
        wait_for(lambda: xvnc.clipboard() == "pasted from the browser",
                 f"the page's text never reached the desktop: {xvnc.clipboard()!r}")

        # Fit to window: the 640x480 screen drawn to fill the room the page
        # has for it (1024x600 less its header and the open panel), its
        # shape kept; then at its own size again.
        def canvas_size():
            return tuple(pages("call", name="vnc", fn="canvasSize")["value"])
        assert canvas_size() == (640, 480)
        pages("click", name="vnc", selector="#fit")
        assert pages("call", name="vnc", fn="fitting")["value"] is True
        fitted = wait_for(lambda: (size := canvas_size()) != (640, 480) and size, "the screen was not fitted")
        assert abs(fitted[0] / fitted[1] - 4 / 3) < 0.02 and fitted[1] < 600 - 30, fitted
        pages("click", name="vnc", selector="#fit")
        wait_for(lambda: canvas_size() == (640, 480), "the screen was not drawn at its own size again")
        state = pages("state", name="vnc")
        assert state["errors"] == [] and state["recorded"] is None, state
    finally:
        if pages:
            pages.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]
        xvnc.stop()
