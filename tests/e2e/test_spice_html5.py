"""spice-html5 end to end: Porthole's browser SPICE console page (Debian's
spice-html5 in headless Chromium) gets a ticket for its token, links every
channel over Porthole's /spice WebSocket, and draws the VM's screen, while the
hypervisor's password stays inside Porthole."""

import json
import re
import time

import jwt
import pytest

from screen import differing_fraction, seabios_screen
from spice_client import wait_for_final_spice_screen
import leak_check
from harness import http, metric_value
from support import AUDIENCE, ISSUER, Porthole, browser, first_line


def spice_porthole(tmp_path, vm, tls=True, password=None, spice=""):
    """A Porthole whose loopback backend holds the VM's SPICE password (and,
    with tls, the VM's CA, so Porthole links over QEMU's TLS port)."""
    tmp_path.mkdir(exist_ok=True)
    pw = tmp_path / "spice-password"
    pw.write_text((password or vm.spice_password) + "\n")
    lines = ["[backends.spice]", f'password_file = "{pw}"']
    if tls:
        lines.append(f'ca = "{vm.spice_ca}"')
    return Porthole(tmp_path, backend_extra="\n".join(lines), spice=spice)


def expired_spice_token(p, vm):
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "vm", "iat": now - 600, "nbf": now - 600, "exp": now - 300,
              "jti": "expired-spice-1",
              "console": {"type": "spice-html5", "host": "127.0.0.1", "port": vm.spice_port,
                          "tls_port": vm.spice_tls_port}}
    return jwt.encode(claims, p.key.signing_key(), algorithm="EdDSA", headers={"kid": p.key.kid})


def test_spice_html5_in_chromium_shows_the_vm_screen(spice_vm, tmp_path):
    vm = spice_vm
    p = spice_porthole(tmp_path, vm)
    try:
        reference = wait_for_final_spice_screen(vm, tmp_path)
        token = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        shot = tmp_path / "spice-html5.png"
        result = browser("spice", f"{p.base}/console?token={token}", shot, 2000)
        report = {k: v for k, v in result.items() if k != "html"}
        assert result["http_status"] == 200, report
        assert "script-src 'self'" in result["csp"] and "'unsafe-eval'" not in result["csp"]
        assert result["state"] == "connected", report
        assert result["canvas"] and result["drawn"], report
        # Chromium asks for /favicon.ico, which Porthole does not serve.
        errors = [e for e in result["errors"] if not e.endswith("/favicon.ico)")]
        assert not errors, report
        # Every channel is its own socket to /spice: main, display, inputs at least.
        urls = [s["url"] for s in result["sockets"]]
        assert len(urls) >= 3 and all(u.startswith(f"ws://127.0.0.1:{p.public_port}/spice?token=") for u in urls), \
            report
        seabios_screen(shot)
        diff = differing_fraction(reference, shot)
        # (What differs, if anything, is VGA's blinking text cursor: 9x2 pixels.)
        assert diff <= 0.01, f"spice-html5 through Porthole differs from a direct capture in {diff:.2%} of pixels"

        # The hypervisor's password is nowhere the browser or the log can see.
        secret = vm.spice_password
        assert secret not in result["html"]
        traffic = (tmp_path / "spice-html5.png.traffic").read_bytes()
        tickets = re.findall(rb'"ticket":"([^"]+)"', traffic)
        assert b"REDQ" in traffic and len(tickets) == 1, "the dump holds the SPICE links and the page's one ticket"
        ticket = tickets[0].decode()
        assert secret.encode() not in traffic and ticket != secret
        log = p.log()
        assert metric_value(p.metrics(), "porthole_tickets_issued_total", console="spice-html5") == 1
        for channel in ("main", "display", "inputs", "cursor"):
            assert "spice channel linked" in log and f'channel="{channel}"' in log, log[-3000:]
        assert secret not in log and token not in log and ticket not in log
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_spice_console_page_explains_refusals(spice_vm, tmp_path):
    vm = spice_vm
    # spice-html5 tokens single-use here, so the second page load is refused
    # by POST spice-ticket (the page's own refusal path, after /console served
    # it). Porthole() has no [tokens] lines: the table follows [spice]'s.
    p = spice_porthole(tmp_path, vm, spice='[tokens.reuse]\nspice-html5 = "single-use"')
    wrong = None
    try:
        # A second Porthole, whose backend holds a wrong SPICE password.
        wrong = spice_porthole(tmp_path / "wrong", vm, password="not-" + vm.spice_password)
        result = browser("status", f"{p.base}/console?token={expired_spice_token(p, vm)}", 0)
        assert result["http_status"] == 401 and result["state"] == "expired", result
        # A spice-direct token has no browser page: refused, as a wrong type.
        direct = p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        result = browser("status", f"{p.base}/console?token={direct}", 0)
        assert result["http_status"] == 403 and result["state"] == "refused", result

        token = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        result = browser("status", f"{p.base}/console?token={token}", 500)
        assert result["state"] == "connected", result
        result = browser("status", f"{p.base}/console?token={token}", 0)
        assert result["http_status"] == 200 and result["state"] == "refused", result

        # The hypervisor refuses Porthole's password: the page cannot tell
        # why, and says the console is unavailable.
        token = wrong.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        result = browser("status", f"{wrong.base}/console?token={token}", 0)
        assert result["state"] == "unavailable", result
        assert 'reason="hypervisor_refused_ticket"' in wrong.log(), wrong.log()[-3000:]
        for log in (p.log(), wrong.log()):
            assert vm.spice_password not in log and direct not in log and token not in log
    finally:
        wrong_rc = wrong.gateway.stop() if wrong else 0
        assert p.gateway.stop() == 0, p.log()[-3000:]
        assert wrong_rc == 0, wrong.log()[-3000:]


def test_spice_html5_says_an_operator_ended_the_session(spice_vm, tmp_path):
    """spice-html5 in Chromium is connected through Porthole; an operator ends
    the session through the admin API. The main channel's WebSocket closes
    with Porthole's own code (4003, as a noVNC session's does), every channel
    goes down, and the page says an operator ended it instead of reconnecting."""
    import json
    import subprocess
    from support import HERE
    vm = spice_vm
    p = spice_porthole(tmp_path, vm)
    page = None
    try:
        minted = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)
        # Ended once main, display and inputs are open (the page says
        # connected with main alone; a channel linking after the end is refused).
        page = subprocess.Popen(["node", str(HERE / "browser.mjs"), "until-ended",
                                 f"{p.base}/console?token={minted['token']}", "60000", "3"],
                                stdout=subprocess.PIPE, text=True, cwd=HERE)
        line = first_line(page).strip()
        assert line == "CONNECTED", line
        deadline = time.monotonic() + 20
        while not (listed := p.admin("GET", "/v1/sessions?type=spice-html5")[1]["sessions"]):
            assert time.monotonic() < deadline, p.log()[-3000:]
            time.sleep(0.1)
        assert len(listed) == 1 and listed[0]["jti"] == minted["jti"], listed

        status, answer = p.admin("DELETE", f"/v1/sessions/{listed[0]['id']}?reason=maintenance", actor="dave")
        assert status == 200 and answer["terminated"] == [listed[0]["id"]], answer
        result = json.loads(page.communicate(timeout=90)[0].strip().splitlines()[-1])
        report = {k: v for k, v in result.items() if k != "html"}
        # The main channel is the page's first socket; all of them closed.
        assert result["opened"] >= 3 and len(result["closes"]) == result["opened"], report
        main = next(c for c in result["closes"] if c["index"] == 0)
        assert main["code"] == 4003, f"the main channel's socket closed with {main['code']}, not 4003: {report}"
        assert result["text"].startswith("Session ended by an operator"), report
        assert p.admin("GET", "/v1/sessions")[1]["sessions"] == []
        ended = [e for e in p.audit() if e["event"] == "session_ended" and e.get("terminated_by") == "dave"]
        assert [e["console"] for e in ended] == ["spice-html5"], ended
    finally:
        if page is not None and page.poll() is None:
            page.terminate()
            try:
                page.wait(timeout=10)
            except subprocess.TimeoutExpired:
                page.kill()
                page.wait()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_the_token_in_the_url_or_the_cookie_follows_one_rule(spice_vm, tmp_path):
    """/spice?token= and the token cookie are one thing: the socket's token.
    An empty SPICE password means that token (exchanged under its reuse
    policy: one session per token), a ticket must be one of that token, and
    the URL's token wins over a cookie."""
    from spice_wire import DISPLAY, MAIN, WsChannel
    vm = spice_vm
    p = spice_porthole(tmp_path, vm)
    try:
        token = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        other = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        main = WsChannel(p, token)
        assert main.open(MAIN, "") == "OK", "an empty password on /spice?token= is the token"
        session = main.session_id()
        # One session per token, whichever way the token came.
        for second in (WsChannel(p, token), WsChannel(p, None, path="spice", cookie=token)):
            assert second.open(MAIN, "") != "OK", "a token runs one session at a time"
            second.close()
        status, body = http("POST", f"{p.base}/spice-ticket?token={token}")[:2]
        assert status == 403, ("no ticket while the token's session runs", status, body)
        # A channel joins with the token, in the URL or the cookie; the URL wins.
        display = WsChannel(p, token, path=f"spice?token={token}", cookie=other)
        assert display.open(DISPLAY, "", connection_id=session) == "OK"
        foreign = WsChannel(p, other, path=f"spice?token={other}", cookie=token)
        assert foreign.open(DISPLAY, "", connection_id=session) == "BAD_CONNECTION_ID"
        # A ticket of another token on this token's socket is refused.
        status, body = http("POST", f"{p.base}/spice-ticket?token={other}")[:2]
        assert status == 200, (status, body)
        other_ticket = json.loads(body)["ticket"]
        leak_check.remember_ticket(other_ticket)
        crossed = WsChannel(p, token)
        assert crossed.open(MAIN, other_ticket) == "PERMISSION_DENIED"
        for c in (crossed, foreign, display, main):
            c.close()
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_debians_spice_auto_html_links_with_its_token_in_a_cookie(spice_vm, tmp_path):
    """Debian's spice_auto.html, unchanged (what Nova's spice-html5 URLs open):
    it copies ?token= into a `token` cookie, opens /websockify with no token in
    the URL and sends an empty SPICE password. The cookie is read only on the
    spice-html5 socket and only from an allowed Origin; the empty password is
    the token itself: the main channel opens the token's session, a further
    channel joins only that token's session, by the id the hypervisor gave."""
    from websockets.exceptions import InvalidStatus
    from spice_wire import DISPLAY, MAIN, WsChannel
    vm = spice_vm
    p = spice_porthole(tmp_path, vm)
    try:
        reference = wait_for_final_spice_screen(vm, tmp_path)
        token = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        shot = tmp_path / "spice-auto.png"
        result = browser("spice", f"{p.base}/vendor/spice-html5/spice_auto.html?token={token}", shot, 2000)
        report = {k: v for k, v in result.items() if k != "html"}
        assert result["canvas"] and result["drawn"], report
        urls = [s["url"] for s in result["sockets"]]
        assert len(urls) >= 3 and all(u == f"ws://127.0.0.1:{p.public_port}/websockify" for u in urls), report
        seabios_screen(shot)
        assert differing_fraction(reference, shot) <= 0.01
        log = p.log()
        for channel in ("main", "display", "inputs"):
            assert f'channel="{channel}"' in log, log[-3000:]

        # Wire level, as the page does it: the cookie, an empty password.
        fresh = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        other = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        with pytest.raises(InvalidStatus) as refused:
            WsChannel(p, None, path="websockify", cookie=fresh, origin="http://evil.example")
        assert refused.value.response.status_code == 403, "a cookie from a foreign page opens nothing"
        with pytest.raises(InvalidStatus) as refused:
            WsChannel(p, None, path="vnc", cookie=fresh)
        assert refused.value.response.status_code == 401, "only the spice-html5 socket reads the cookie"
        main = WsChannel(p, None, path="websockify", cookie=fresh)
        assert main.open(MAIN, "") == "OK"
        session = main.session_id()
        stray = WsChannel(p, None, path="websockify", cookie=fresh)
        assert stray.open(DISPLAY, "", connection_id=session ^ 1) == "BAD_CONNECTION_ID"
        foreign = WsChannel(p, None, path="websockify", cookie=other)
        assert foreign.open(DISPLAY, "", connection_id=session) == "BAD_CONNECTION_ID", \
            "another token's channel cannot join this session"
        again = WsChannel(p, None, path="websockify", cookie=fresh)
        assert again.open(MAIN, "") != "OK", "a token runs one session at a time"
        display = WsChannel(p, None, path="websockify", cookie=fresh)
        assert display.open(DISPLAY, "", connection_id=session) == "OK"
        for c in (display, again, foreign, stray, main):
            c.close()
        log = p.log()
        assert token not in log and fresh not in log and vm.spice_password not in log
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]
