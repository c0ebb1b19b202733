"""Recordings against real peers: a serial session on QEMU recorded by
Porthole as asciicast v2 and played back by Debian's `asciinema cat`, with
the SHA-256 in the audit trail matching the file (and no longer matching
once the file is changed)."""

import hashlib
import re
import subprocess
import time

from websockets.sync.client import connect

from support import Porthole, wait_for, ws_url


def read_until(ws, marker, within=30):
    seen = b""
    deadline = time.monotonic() + within
    while marker not in seen:
        assert time.monotonic() < deadline, f"{marker!r} not seen: {seen[-400:]!r}"
        try:
            seen += ws.recv(timeout=1)
        except TimeoutError:
            pass
    return seen


def visible(text):
    """Text as a terminal leaves it, near enough to compare: no escape
    sequences, no carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r", "", text)


def test_a_serial_session_plays_back_in_asciinema_with_its_hash_in_the_audit_trail(tmp_path, vm):
    p = Porthole(tmp_path, sections='[recording]\nfolder = "recordings"\nbackends = ["loopback"]\n')
    try:
        vm.wait_for_serial()  # the first boot is over: nothing is written until a reset
        minted = p.mint("serial", vm.serial_port, ttl=300)
        with connect(ws_url(p, "serial", minted["token"]), subprotocols=["binary"], open_timeout=10) as ws:
            vm.qmp("system_reset")
            shown = read_until(ws, b"No bootable device")
        finished = wait_for(lambda: [e for e in p.audit() if e["event"] == "recording_finished"],
                            "no recording_finished in the audit trail")
        assert len(finished) == 1 and finished[0]["complete"] is True, finished
        started = [e for e in p.audit() if e["event"] == "session_started"]
        assert finished[0]["session"] == started[0]["session"], (finished, started)
        path = finished[0]["path"]
        assert path.startswith(str(tmp_path / "recordings")), path

        # Debian's asciinema plays it: the same SeaBIOS text the session showed.
        # (`asciinema cat` 2.2 reads /dev/tty: `script` gives it a terminal.)
        played = subprocess.run(["script", "-qec", f"asciinema cat {path}", "/dev/null"], stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=30, check=True).stdout
        want = visible(shown.decode("utf-8", "replace"))
        got = visible(played.decode("utf-8", "replace"))
        for line in ("SeaBIOS", "Press ESC for boot menu", "No bootable device"):
            assert line in want and line in got, (line, want[-300:], got[-300:])
        assert got.endswith(want[-200:]), (want[-200:], got[-300:])

        # The audit trail's SHA-256 is the file's; a changed file no longer matches.
        data = open(path, "rb").read()
        assert hashlib.sha256(data).hexdigest() == finished[0]["sha256"]
        assert finished[0]["bytes"] == len(data)
        with open(path, "r+b") as f:
            f.seek(len(data) // 2)
            f.write(b"X")
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() != finished[0]["sha256"]
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]
