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


def test_a_novnc_session_plays_back_in_chromium_ending_on_the_vms_last_frame(tmp_path):
    from screen import differing_fraction, vnc_capture, wait_for_final_vnc_screen
    from test_shadow import Pages, SerialReader, canvases_match
    from vm import VM

    (tmp_path / "vm").mkdir()
    # share=ignore: the direct captures must not disconnect the page.
    vm = VM(tmp_path / "vm", vnc_options="share=ignore")
    p = Porthole(tmp_path, sections='[recording]\nfolder = "recordings"\nbackends = ["loopback"]\n')
    pages = None
    try:
        final = wait_for_final_vnc_screen(vm, tmp_path)
        minted = p.mint("novnc", vm.vnc_port)
        pages = Pages(tmp_path)
        owner = pages("open", name="owner", url=minted["url"])
        assert owner["state"] == "connected", owner
        canvases_match(pages, ["owner"], final, tmp_path, "live")
        # The screen changes during the session: a reset, then the owner
        # opens SeaBIOS's boot menu, the recording's last frame.
        com1 = SerialReader(vm)
        try:
            vm.qmp("system_reset")
            com1.until(b"Press ESC")
            deadline = time.monotonic() + 10
            while b"Select boot device" not in com1.seen:
                assert time.monotonic() < deadline, com1.seen[-300:]
                pages("press", name="owner", key="Escape")
                try:
                    com1.until(b"Select boot device", within=1)
                except AssertionError:
                    pass
        finally:
            com1.close()
        time.sleep(0.5)
        menu = vnc_capture(vm, tmp_path / "direct-menu.png")
        assert differing_fraction(menu, final) >= 0.003, "the boot menu looks like the final screen"
        canvases_match(pages, ["owner"], menu, tmp_path, "live-menu")
        pages("close", name="owner")

        finished = wait_for(lambda: [e for e in p.audit() if e["event"] == "recording_finished"],
                            "no recording_finished in the audit trail")
        assert finished[0]["path"].endswith(".fbs") and finished[0]["complete"] is True, finished
        data = open(finished[0]["path"], "rb").read()
        assert data.startswith(b"FBS 001.000\n")
        assert hashlib.sha256(data).hexdigest() == finished[0]["sha256"]

        # Played back in Porthole's noVNC page: it ends on the boot menu,
        # as a direct capture of the VM showed it.
        status, answer = p.admin("POST", f"/v1/recordings/{finished[0]['session']}/playback", {}, actor="auditor")
        assert status == 200, answer
        import leak_check
        leak_check.remember(answer["token"])
        played = pages("open", name="playback", url=answer["url"])
        assert played["badge"] and "Playback" in played["badge"], played
        got = canvases_match(pages, ["playback"], menu, tmp_path, "played", within=60)
        print(f"playback's last frame, differing from a direct capture of the menu: {got}")
        issued = [e for e in p.audit() if e["event"] == "playback_issued"]
        assert issued and issued[0]["by"] == "auditor", issued
    finally:
        if pages is not None:
            pages.close()
        vm.stop()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_spice_html5_session_plays_back_in_spice_html5_ending_on_the_sessions_last_frame(spice_vm, tmp_path):
    from screen import differing_fraction
    from spice_client import spicy_capture, wait_for_final_spice_screen
    from test_shadow import Pages, SerialReader, canvases_match

    vm = spice_vm
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password + "\n")
    backend = f'[backends.spice]\npassword_file = "{pw}"\nca = "{vm.spice_ca}"'
    p = Porthole(tmp_path, backend_extra=backend,
                 sections='[recording]\nfolder = "recordings"\nbackends = ["loopback"]\n')
    pages = None
    try:
        final = wait_for_final_spice_screen(vm, tmp_path)
        minted = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)
        pages = Pages(tmp_path)
        owner = pages("open", name="owner", url=minted["url"])
        assert owner["state"] == "connected", owner
        canvases_match(pages, ["owner"], final, tmp_path, "live")
        # The screen changes during the session: a reset, then the owner
        # opens SeaBIOS's boot menu, the recording's last frame.
        com1 = SerialReader(vm)
        try:
            vm.qmp("system_reset")
            com1.until(b"Press ESC")
            deadline = time.monotonic() + 10
            while b"Select boot device" not in com1.seen:
                assert time.monotonic() < deadline, com1.seen[-300:]
                pages("press", name="owner", key="Escape")
                try:
                    com1.until(b"Select boot device", within=1)
                except AssertionError:
                    pass
        finally:
            com1.close()
        time.sleep(1)
        live = tmp_path / "live-menu.png"
        assert pages("canvas", name="owner", out=str(live))["canvas"]
        assert differing_fraction(live, final) >= 0.003, "the boot menu looks like the final screen"
        pages("close", name="owner")
        # What the VM shows now, captured directly: the session's last frame.
        menu = spicy_capture(tmp_path / "direct-menu.png", "127.0.0.1", vm.spice_password, port=vm.spice_port)
        assert differing_fraction(menu, live) <= 0.01, "the page's last frame is not the VM's screen"

        finished = wait_for(lambda: [e for e in p.audit() if e["event"] == "recording_finished"],
                            "no recording_finished in the audit trail")
        assert len(finished) == 1, finished
        rec = finished[0]
        assert rec["path"].endswith(".spice") and rec["complete"] is True, rec
        assert rec["console"] == "spice-html5" and rec["jti"] == minted["jti"], rec
        data = open(rec["path"], "rb").read()
        assert data.startswith(b"PHSPICE 001\n")
        assert hashlib.sha256(data).hexdigest() == rec["sha256"]
        # Every channel is in it (main 1, display 2, inputs 3, cursor 4), and
        # never the hypervisor's password.
        channels = spice_channels(data)
        assert {1, 2, 3, 4} <= channels, channels
        assert vm.spice_password.encode() not in data

        status, answer = p.admin("POST", f"/v1/recordings/{rec['session']}/playback", {}, actor="auditor")
        assert status == 200, answer
        import leak_check
        leak_check.remember(answer["token"])
        played = pages("open", name="playback", url=answer["url"])
        assert played["state"] == "connected", played
        assert played["badge"] and "Playback" in played["badge"], played
        got = canvases_match(pages, ["playback"], menu, tmp_path, "played", within=60)
        print(f"spice playback's last frame, differing from a direct capture of the menu: {got}")
        assert "spice channel linked" not in p.log().split("playback issued")[-1], "a playback touched the hypervisor"
    finally:
        if pages is not None:
            pages.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def spice_channels(data):
    """The channel types that linked in a SPICE recording (docs/recording.md)."""
    import struct
    at, seen = 12, set()
    while at + 11 <= len(data):
        _ms, kind, _id, what, length = struct.unpack(">IBBBI", data[at:at + 11])
        if what == 0:
            seen.add(kind)
        at += 11 + length
    assert at == len(data), "records do not end where the file does"
    return seen
