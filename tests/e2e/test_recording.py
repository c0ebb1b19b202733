"""Recordings against real peers: a serial session on QEMU recorded by
Porthole as asciicast v2 and played back by Debian's `asciinema cat` and by
asciinema-player in Chromium (through the playback link: pause, seek,
speed), with the SHA-256 in the audit trail matching the file, downloaded
too (and no longer matching once the file is changed)."""

import hashlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

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


def get(url, bearer=None):
    """GET url: (status, headers, body)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def tampered(token):
    """`token` with one character of its signature changed."""
    head, sig = token.rsplit(".", 1)
    return f"{head}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"


def downloads_match_the_audit_trail(p, finished, console_token, playback_token):
    """/playback/file (the playback's token) and the admin API's
    /v1/recordings/{id}/file give the file the audit trail hashed; a
    console's token, a tampered one and no bearer key get nothing."""
    session = finished["session"]
    status, headers, body = get(f"{p.base}/playback/file?token={playback_token}")
    assert status == 200, (status, body[:200])
    assert headers["Content-Type"] == "application/x-asciicast", dict(headers)
    assert headers["Cache-Control"] == "no-store", dict(headers)
    assert f'filename="{session}.cast"' in headers["Content-Disposition"], dict(headers)
    assert hashlib.sha256(body).hexdigest() == finished["sha256"]
    for token in (console_token, tampered(playback_token)):
        status, _, body = get(f"{p.base}/playback/file?token={urllib.parse.quote(token)}")
        assert status in (400, 401, 403) and b"error" in body and b"SeaBIOS" not in body, (status, body[:200])
    status, _, body = get(f"{p.base}/playback/file")
    assert status == 401, (status, body[:200])

    admin = f"http://127.0.0.1:{p.admin_port}/v1/recordings/{session}/file"
    status, headers, body = get(admin, bearer=p.bearer.read_text())
    assert status == 200 and hashlib.sha256(body).hexdigest() == finished["sha256"], (status, body[:200])
    assert f'filename="{session}.cast"' in headers["Content-Disposition"], dict(headers)
    status, _, body = get(admin)
    assert status == 401 and b"SeaBIOS" not in body, (status, body[:200])
    status, _, _ = get(f"http://127.0.0.1:{p.admin_port}/v1/recordings/nothing/file", bearer=p.bearer.read_text())
    assert status == 404
    # The audit trail is written beside the answer, not before it.
    downloaded = wait_for(lambda: [e for e in p.audit() if e["event"] == "recording_downloaded"],
                          "the download in the audit trail")
    assert [e["recording"] for e in downloaded] == [session], downloaded


def plays_in_asciinema_player(pages, url, tmp_path):
    """The playback link opens asciinema-player on the recording: it plays
    from the start (SeaBIOS's banner), pauses (its clock and screen stand
    still), seeks with its keys and its bar (the end: "No bootable device"),
    and plays again at 4x to its end."""
    def call(fn, *args):
        return pages("call", name="player", fn=fn, args=list(args))["value"]

    def until(what, check, within=30):
        deadline = time.monotonic() + within
        while not (got := check()):
            assert time.monotonic() < deadline, f"{what}: {pages('state', name='player')} {call('terminalText')!r}"
            time.sleep(0.1)
        return got

    opened = pages("open", name="player", url=url)
    assert opened["state"] == "playing" and "Playback" in opened["badge"], opened
    # Paused at once (the recording is a few seconds long): the time and the
    # screen stand still.
    pages("click", name="player", selector=".ap-playback-button")
    until("paused", lambda: pages("state", name="player")["state"] == "paused")
    duration = call("duration")
    at, shown = call("currentTime"), call("terminalText")
    time.sleep(1.5)
    assert (call("currentTime"), call("terminalText")) == (at, shown), "a paused player moved on"
    assert at < duration - 1, (at, duration)
    # Seek to the end with the player's keys (Shift+Right: a tenth further),
    # never having played there: SeaBIOS's last words.
    pages("keys", name="player", keys=["Shift+ArrowRight"] * 11)
    until("the end", lambda: "No bootable device" in call("terminalText"))
    assert call("currentTime") == duration
    # Back to the start on the seek bar: nothing shown yet.
    pages("click", name="player", selector=".ap-progressbar .ap-bar", x=0)
    until("the start", lambda: "No bootable device" not in call("terminalText") and call("currentTime") < 0.5)
    assert pages("state", name="player")["state"] == "paused"
    # Played (at 4x) from the start: SeaBIOS's banner, then its end.
    pages("select", name="player", selector="#speed", value="4")
    pages("click", name="player", selector=".ap-playback-button")
    started = time.monotonic()
    playing = until("playing", lambda: (s := pages("state", name="player"))["state"] == "playing" and s)
    assert playing["text"] == "Playing at 4×", playing
    until("SeaBIOS's banner", lambda: "SeaBIOS" in call("terminalText"))
    ended = until("the end", lambda: (s := pages("state", name="player"))["state"] == "ended" and s)
    took = time.monotonic() - started
    # The player says "ended" as its clock reaches the end; its screen may
    # be drawn a frame later (a CI run read the banner alone just then).
    until("the end on the screen", lambda: "No bootable device" in call("terminalText"))
    assert took < max(duration * 0.75, 2), (took, duration)
    assert ended["errors"] == [], ended
    pages("screenshot", name="player", out=str(tmp_path / "asciinema-player.png"))
    return duration, took


def test_a_serial_session_plays_back_in_asciinema_and_the_web_player_with_its_hash_in_the_audit_trail(tmp_path, vm):
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
        # Compared up to the last words the session waited for: SeaBIOS's
        # ".\n" after them can come in a later write, which the recording
        # keeps (the session was still open) and `shown` may not have.
        def upto_end(text):
            return text[: text.rindex("No bootable device") + len("No bootable device")]
        assert upto_end(got).endswith(upto_end(want)[-200:]), (want[-200:], got[-300:])

        # The audit trail's SHA-256 is the file's; a changed file no longer matches.
        data = open(path, "rb").read()
        assert hashlib.sha256(data).hexdigest() == finished[0]["sha256"]
        assert finished[0]["bytes"] == len(data)

        # The same recording in asciinema-player, through the playback link.
        status, answer = p.admin("POST", f"/v1/recordings/{finished[0]['session']}/playback", {}, actor="auditor")
        assert status == 200, answer
        import leak_check
        leak_check.remember(answer["token"])
        downloads_match_the_audit_trail(p, finished[0], minted["token"], answer["token"])
        from test_shadow import Pages
        pages = Pages(tmp_path)
        try:
            duration, took = plays_in_asciinema_player(pages, answer["url"], tmp_path)
        finally:
            pages.close()
        print(f"asciinema-player: {duration:.1f} s recorded, played to its end at 4x in {took:.1f} s")
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
        # Its user is told that the session is recorded.
        wait_for(lambda: pages("state", name="owner")["recorded"] == "This session is recorded",
                 "the page never said the session is recorded")
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
    from screen import differing_fraction, seabios_screen
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
        assert rec["path"].endswith(".spice.gz") and rec["complete"] is True, rec
        assert rec["console"] == "spice-html5" and rec["jti"] == minted["jti"], rec
        stored = open(rec["path"], "rb").read()
        assert hashlib.sha256(stored).hexdigest() == rec["sha256"] and rec["bytes"] == len(stored)
        # A gzip stream (Python's own gzip reads it), of PHSPICE 001 records.
        import gzip
        data = gzip.decompress(stored)
        assert data.startswith(b"PHSPICE 001\n")
        print(f"spice recording: {len(data)} bytes, {len(stored)} on disk")
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

        # Natively: the link's .vv (here its JSON form) gives a ticket that
        # spicy links with on Porthole's SPICE TLS listener, and sees the
        # recording (its first screen: spicy-screenshot saves the first
        # frame it is sent), never the VM.
        import urllib.parse
        from harness import http
        # (A link holds one ticket at a time: the .vv's is replaced by the JSON's.)
        status, vv = http("GET", f"{p.base}/playback/vv?token={urllib.parse.quote(answer['token'])}")
        assert status == 200 and "password=" in vv and f"tls-port={p.spice_tls_port}" in vv, vv
        leak_check.remember(re.search(r"^password=(.+)$", vv, re.M).group(1))
        status, details = http("GET", f"{p.base}/playback/vv?format=json&token={urllib.parse.quote(answer['token'])}")
        details = json.loads(details)
        assert status == 200 and details["tls_port"] == p.spice_tls_port, details
        leak_check.remember(details["ticket"])
        native = spicy_capture(tmp_path / "native.png", "127.0.0.1", details["ticket"], tls_port=p.spice_tls_port,
                               ca_file=p.spice_ca)
        seabios_screen(native)
        first = {"final": differing_fraction(native, final), "menu": differing_fraction(native, menu)}
        print(f"spicy's playback, differing from the session's first and last screens: {first}")
        assert min(first.values()) <= 0.01, first
        assert "spice playback channel linked" in p.log()
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


def test_without_asciinema_player_the_page_says_so_and_links_the_serial_page(tmp_path):
    """Where `npm ci` never ran in web/, a serial recording's page says that
    asciinema-player is missing, how to install it, and links the serial
    page, which plays the recording without it."""
    from test_first_run import web_without_npm
    from support import browser
    web = web_without_npm(tmp_path)
    p = Porthole(tmp_path, web=f'root = "{web}"',
                 sections='[recording]\nfolder = "recordings"\nbackends = ["loopback"]\n')
    try:
        p.wait_for_log("asciinema-player not found")
        (tmp_path / "recordings").mkdir(exist_ok=True)
        (tmp_path / "recordings" / "s-1.cast").write_text('{"version": 2, "width": 80, "height": 24}\n'
                                                          '[0.1, "o", "SeaBIOS\\r\\n"]\n')
        status, answer = p.admin("POST", "/v1/recordings/s-1/playback", {})
        assert status == 200, answer
        import leak_check
        leak_check.remember(answer["token"])
        result = browser("status", answer["url"], 500)
        assert result["http_status"] == 200 and result["state"] == "missing", result
        assert "asciinema-player is missing" in result["page"] and "cd web && npm ci" in result["page"], result
        assert "serial console page" in result["page"], result
        status, _, page = get(answer["url"] + "&client=terminal")
        assert status == 200 and b"serial.js" in page
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]
