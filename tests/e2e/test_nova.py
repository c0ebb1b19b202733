"""Porthole as a drop-in for Nova's console proxies, against a real Keystone
and a real Nova compute API (tests/e2e/nova.py): tokens minted by Nova's own
objects, URLs built by Nova's own access_url from the base URLs the README
documents, consoles of a real QEMU. Keystone and Nova start once for the module."""

import json
import re
import threading
import time
import urllib.parse
import uuid

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import leak_check
from harness import http, metric_value
from nova import NovaLab
from peers import RedisServer
from screen import differing_fraction, seabios_screen, vnc_capture, wait_for_final_vnc_screen
from spice_client import remote_viewer_connects, spicy_capture, wait_for_final_spice_screen
from support import EchoBackend, Porthole, browser


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    n = NovaLab(tmp_path_factory.mktemp("novalab"))
    leak_check.remember(n.porthole_password)
    leak_check.remember(n.appcred()["secret"])
    yield n
    n.stop()


def nova_section(lab, tmp, who="porthole", appcred=False, extra=""):
    """Porthole's [nova] section for the lab's user `who` (or its application credential)."""
    if appcred:
        ac = lab.appcred()
        secret = tmp / "nova-appcred-secret"
        secret.write_text(ac["secret"] + "\n")
        cred = f'application_credential_id = "{ac["id"]}"\napplication_credential_secret_file = "{secret}"'
    else:
        pw = tmp / "nova-password"
        pw.write_text(lab.porthole_password + "\n")
        cred = f'username = "{who}"\npassword_file = "{pw}"\nproject_name = "service"'
    return f"""
[nova]
auth_url = "{lab.ks_url}"
{cred}
region_name = "RegionOne"
interface = "internal"
timeout_secs = 3
{extra}
"""


def nova_porthole(lab, tmp, backend_extra="", more_sections="", **kw):
    tmp.mkdir(parents=True, exist_ok=True)
    return Porthole(tmp, sections=nova_section(lab, tmp, **kw) + more_sections, backend_extra=backend_extra)


def mint(lab, *args, **kw):
    token, url = lab.mint(*args, **kw)
    leak_check.remember(token)
    return token, url


def status_of(p, route, token):
    """A WebSocket route's preflight (what an upgrade would get): (status, JSON)."""
    status, body = http("GET", f"{p.base}/{route}?token={urllib.parse.quote(token)}")[:2]
    return status, json.loads(body or "null")


def vnc_server_init(ws, timeout=10):
    """The browser's side of the RFB handshake through Porthole; returns (width, height)."""
    assert ws.recv(timeout=timeout) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    assert ws.recv(timeout=timeout) == b"\x01\x01"
    ws.send(b"\x01")
    got = b""
    while len(got) < 4:
        got += ws.recv(timeout=timeout)
    assert got[:4] == b"\x00\x00\x00\x00", got
    ws.send(b"\x01")
    got = got[4:]
    while len(got) < 4:
        got += ws.recv(timeout=timeout)
    return int.from_bytes(got[0:2], "big"), int.from_bytes(got[2:4], "big")


def read_serial_until(ws, marker=b"No bootable device", timeout=30):
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, seen[-400:]
        try:
            seen += ws.recv(timeout=1)
        except TimeoutError:
            continue
    return seen


def test_novas_own_urls_open_novnc_and_serial_through_porthole(lab, vm, tmp_path):
    reference = wait_for_final_vnc_screen(vm, tmp_path)
    p = nova_porthole(lab, tmp_path / "p")
    try:
        # nova.conf: [vnc] novncproxy_base_url = <porthole>/vendor/novnc/vnc_lite.html?path=vnc
        token, url = mint(lab, "novnc", "127.0.0.1", vm.vnc_port,
                          base_url=f"{p.base}/vendor/novnc/vnc_lite.html?path=vnc")
        assert url == f"{p.base}/vendor/novnc/vnc_lite.html?path=vnc%3Ftoken%3D{token}", url
        # noVNC's own page, unchanged, in Chromium, through Nova's URL.
        result = browser("vnc", url, tmp_path / "novnc.png", 4000)
        assert result.get("canvas"), result
        seabios_screen(tmp_path / "novnc.png")
        # What it shows is what a client straight on QEMU sees.
        after = vnc_capture(vm, tmp_path / "direct-after.png")
        diff = min(differing_fraction(tmp_path / "novnc.png", reference),
                   differing_fraction(tmp_path / "novnc.png", after))
        assert diff <= 0.01, f"noVNC through Nova's URL differs from a direct capture in {diff:.2%} of pixels"
        # The same token again, from a WebSocket client, at the path the page opens.
        with connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={token}", open_timeout=10, origin=p.base) as ws:
            assert vnc_server_init(ws) == (720, 400)

        # noVNC's full vnc.html waits for a click unless autoconnect=true is
        # in its URL; Nova keeps a base URL's other query parameters and
        # merges the token into its path=, so this base URL connects at once.
        token, url = mint(lab, "novnc", "127.0.0.1", vm.vnc_port,
                          base_url=f"{p.base}/vendor/novnc/vnc.html?autoconnect=true&path=vnc")
        assert url == f"{p.base}/vendor/novnc/vnc.html?autoconnect=true&path=vnc%3Ftoken%3D{token}", url
        result = browser("vnc", url, tmp_path / "vnc-html.png", 3000)
        assert result.get("canvas") and result["opened"] >= 1, result
        seabios_screen(tmp_path / "vnc-html.png")
        # Without it, the page opens no socket (it waits for a click).
        token, url = mint(lab, "novnc", "127.0.0.1", vm.vnc_port, base_url=f"{p.base}/vendor/novnc/vnc.html?path=vnc")
        result = browser("vnc", url, tmp_path / "vnc-html-idle.png", 1000)
        assert result["opened"] == 0, result

        # nova.conf: [serial_console] base_url = ws://<porthole>/serial
        token, url = mint(lab, "serial", "127.0.0.1", vm.serial_port, base_url=f"ws://127.0.0.1:{p.public_port}/serial")
        assert url == f"ws://127.0.0.1:{p.public_port}/serial?token={token}", url
        with connect(url, open_timeout=10, origin=p.base) as ws:
            vm.qmp("system_reset")
            read_serial_until(ws, marker=b"SeaBIOS")

        log = p.log()
        assert "token_hash" in log or "jti=" in log
        from nova import INSTANCE
        assert INSTANCE in json.dumps(p.audit()), "the audit trail names the instance"
        m = p.metrics()
        assert metric_value(m, "porthole_nova_lookups_total", outcome="found") >= 2
        assert metric_value(m, "porthole_keystone_auths_total", outcome="ok") == 1
    finally:
        assert p.gateway.stop() == 0, p.log()


def test_unknown_expired_junk_and_wrong_type_tokens_are_refused_before_connecting(lab, tmp_path):
    backend = EchoBackend(rfb=True)
    p = nova_porthole(lab, tmp_path / "p")
    try:
        def lookups():
            m = p.metrics()
            return sum(metric_value(m, "porthole_nova_lookups_total", outcome=o) or 0
                       for o in ("found", "not_found", "cached"))

        assert status_of(p, "vnc", str(uuid.uuid4())) == (403, {"error": "refused"})
        short, _ = mint(lab, "novnc", "127.0.0.1", backend.port, ttl=1)
        time.sleep(2)
        assert status_of(p, "vnc", short) == (403, {"error": "refused"}), "Nova answers 404 once it expired"
        before = lookups()
        for junk in ("junk", str(uuid.uuid4()).upper(), "00000000-0000-0000-0000-00000000000g"):
            assert status_of(p, "vnc", junk)[0] == 400, junk
        assert lookups() == before, "junk never reaches Nova"

        direct, _ = mint(lab, "spice-direct", "127.0.0.1", backend.port, tls_port=backend.port)
        novnc, _ = mint(lab, "novnc", "127.0.0.1", backend.port)
        assert status_of(p, "vnc", direct) == (403, {"error": "refused"})
        assert status_of(p, "serial", direct) == (403, {"error": "refused"})
        assert http("GET", f"{p.base}/spice-direct?format=json&token={novnc}")[0] == 403
        with pytest.raises(InvalidStatus):
            connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={direct}", open_timeout=10, origin=p.base)
        assert backend.accepted == 0, "a refused token reached the hypervisor"
        m = p.metrics()
        assert metric_value(m, "porthole_token_refusals_total", reason="unknown_token") == 2
        assert metric_value(m, "porthole_token_refusals_total", reason="malformed") == 3
        assert metric_value(m, "porthole_token_refusals_total", reason="wrong_console_type") >= 3
        # A good token still opens.
        with connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={novnc}", open_timeout=10, origin=p.base) as ws:
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
        assert backend.accepted == 1
    finally:
        assert p.gateway.stop() == 0, p.log()
        backend.close()


def test_a_spice_direct_url_gives_a_ticket_a_native_client_uses(lab, spice_vm, tmp_path):
    vm = spice_vm
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password + "\n")
    p = nova_porthole(lab, tmp_path / "p", backend_extra=f'[backends.spice]\npassword_file = "{pw}"\nca = "{vm.spice_ca}"')
    try:
        direct = wait_for_final_spice_screen(vm, tmp_path)
        # nova.conf: [spice] spice_direct_proxy_base_url = <porthole>/spice-direct
        # (Nova 34's default names Kerbside's http://127.0.0.1:13002/nova).
        token, url = mint(lab, "spice-direct", "127.0.0.1", vm.spice_port, tls_port=vm.spice_tls_port,
                          base_url=f"{p.base}/spice-direct")
        assert url == f"{p.base}/spice-direct?token={token}", url
        details = p.spice_details(token)
        assert details["instance"] == "11111111-2222-4333-8444-555555555555"
        shot = spicy_capture(tmp_path / "through.png", "127.0.0.1", details["ticket"], tls_port=p.spice_tls_port,
                             ca_file=p.spice_ca)
        seabios_screen(shot)
        assert differing_fraction(direct, shot) <= 0.01
        before_viewer = p.log().count("spice channel linked")
        # The URL Nova built downloads a .vv file: remote-viewer opens it.
        status, vv = http("GET", url)
        assert status == 200 and "[virt-viewer]" in vv, vv
        assert f"tls-port={p.spice_tls_port}" in vv and "host=127.0.0.1" in vv, vv
        leak_check.remember(re.search(r"^password=(.+)$", vv, re.M).group(1))
        (tmp_path / "console.vv").write_text(vv)
        assert remote_viewer_connects(tmp_path / "console.vv", tmp_path), "remote-viewer never showed the display"
        assert p.log().count("spice channel linked") > before_viewer, "remote-viewer linked nothing through Porthole"
    finally:
        assert p.gateway.stop() == 0, p.log()


def test_least_privilege_user_and_application_credential_work_a_member_does_not(lab, tmp_path):
    backend = EchoBackend(rfb=True)
    try:
        token, _ = mint(lab, "novnc", "127.0.0.1", backend.port)
        ac = nova_porthole(lab, tmp_path / "ac", appcred=True)
        try:
            assert status_of(ac, "vnc", token) == (200, {"status": "ok"})
        finally:
            assert ac.gateway.stop() == 0, ac.log()
        member = nova_porthole(lab, tmp_path / "member", who="porthole-member")
        try:
            assert status_of(member, "vnc", token) == (503, {"error": "unavailable"})
            log = member.log()
            assert "os_compute_api:os-console-auth-tokens" in log and "console_auth" in log, log[-2000:]
            assert metric_value(member.metrics(), "porthole_nova_lookups_total", outcome="policy") == 1
        finally:
            assert member.gateway.stop() == 0, member.log()
    finally:
        backend.close()


def test_nova_stopped_refuses_new_sessions_keeps_live_ones_and_recovers(lab, vm, tmp_path):
    p = nova_porthole(lab, tmp_path / "p")
    try:
        token, url = mint(lab, "serial", "127.0.0.1", vm.serial_port, base_url=f"ws://127.0.0.1:{p.public_port}/serial")
        with connect(url, open_timeout=10, origin=p.base) as ws:
            lab.stop_one("nova")
            try:
                fresh, _ = mint(lab, "novnc", "127.0.0.1", vm.vnc_port)
                assert status_of(p, "vnc", fresh) == (503, {"error": "unavailable"})
                assert "Nova token lookup failed" in p.log()
                # The live session is untouched.
                vm.qmp("system_reset")
                read_serial_until(ws, marker=b"SeaBIOS")
            finally:
                lab.start_nova()
        assert status_of(p, "vnc", fresh) == (200, {"status": "ok"})
    finally:
        assert p.gateway.stop() == 0, p.log()


def test_keystone_stopped_lookups_work_until_porthole_must_authenticate(lab, tmp_path):
    backend = EchoBackend(rfb=True)
    p = nova_porthole(lab, tmp_path / "p")
    try:
        first, _ = mint(lab, "novnc", "127.0.0.1", backend.port)
        assert status_of(p, "vnc", first) == (200, {"status": "ok"})
        lab.stop_one("keystone")
        try:
            # Nova's keystonemiddleware cached the validation of Porthole's Keystone token.
            second, _ = mint(lab, "novnc", "127.0.0.1", backend.port)
            assert status_of(p, "vnc", second) == (200, {"status": "ok"})
            # A fresh Porthole must authenticate: it cannot, and says which service failed.
            assert p.gateway.stop() == 0, p.log()
            p = nova_porthole(lab, tmp_path / "p2")
            assert status_of(p, "vnc", second) == (503, {"error": "unavailable"})
            assert "Keystone" in p.log()
            assert metric_value(p.metrics(), "porthole_keystone_auths_total", outcome="failed") >= 1
        finally:
            lab.start_keystone()
        assert status_of(p, "vnc", second) == (200, {"status": "ok"})
    finally:
        assert p.gateway.stop() == 0, p.log()
        backend.close()


def test_a_jwt_and_a_nova_token_work_side_by_side(lab, vm, tmp_path):
    p = nova_porthole(lab, tmp_path / "p")
    try:
        jwt_url = p.mint("novnc", vm.vnc_port)["token"]
        token, _ = mint(lab, "novnc", "127.0.0.1", vm.vnc_port)
        for t in (jwt_url, token):
            with connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={t}", open_timeout=10, origin=p.base) as ws:
                assert vnc_server_init(ws) == (720, 400)
    finally:
        assert p.gateway.stop() == 0, p.log()


def test_spice_html5_and_novnc_through_portholes_own_pages_from_nova_urls(lab, spice_vm, tmp_path):
    vm = spice_vm
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password + "\n")
    # A Nova spice-html5 token names no TLS port: Porthole links on the plain one.
    p = nova_porthole(lab, tmp_path / "p", backend_extra=f'[backends.spice]\npassword_file = "{pw}"')
    try:
        reference = wait_for_final_spice_screen(vm, tmp_path)
        # nova.conf: [spice] html5proxy_base_url = <porthole>/console-spice-html5
        token, url = mint(lab, "spice-html5", "127.0.0.1", vm.spice_port, base_url=f"{p.base}/console-spice-html5")
        assert url == f"{p.base}/console-spice-html5?token={token}"
        shot = tmp_path / "spice-html5.png"
        result = browser("spice", url, shot, 2000)
        report = {k: v for k, v in result.items() if k != "html"}
        assert result["state"] == "connected", report
        seabios_screen(shot)
        assert differing_fraction(reference, shot) <= 0.01
        # The type is the route's: the same token on Porthole's generic page is refused.
        assert http("GET", f"{p.base}/console?token={token}")[0] == 403

        # nova.conf: [spice] html5proxy_base_url = <porthole>/vendor/spice-html5/spice_auto.html
        # Debian's page, unchanged: the token travels in a cookie to /websockify,
        # the SPICE password is empty.
        token, url = mint(lab, "spice-html5", "127.0.0.1", vm.spice_port,
                          base_url=f"{p.base}/vendor/spice-html5/spice_auto.html")
        assert url == f"{p.base}/vendor/spice-html5/spice_auto.html?token={token}"
        shot = tmp_path / "spice-auto.png"
        result = browser("spice", url, shot, 2000)
        report = {k: v for k, v in result.items() if k != "html"}
        assert result["canvas"] and result["drawn"], report
        assert {s["url"] for s in result["sockets"]} == {f"ws://127.0.0.1:{p.public_port}/websockify"}, report
        seabios_screen(shot)
        assert differing_fraction(reference, shot) <= 0.01

        # nova.conf: [vnc] novncproxy_base_url = <porthole>/console-novnc
        token, url = mint(lab, "novnc", "127.0.0.1", vm.vnc_port, base_url=f"{p.base}/console-novnc")
        assert url == f"{p.base}/console-novnc?path=%3Ftoken%3D{token}", url
        result = browser("vnc", url, tmp_path / "novnc.png", 3000)
        assert result.get("canvas"), result
        seabios_screen(tmp_path / "novnc.png")

        # Horizon frames these pages: only the allowed origins may.
        import urllib.request
        with urllib.request.urlopen(f"{p.base}/vendor/novnc/vnc_lite.html", timeout=10) as r:
            assert r.headers["Content-Security-Policy"].startswith("frame-ancestors 'self'"), r.headers
    finally:
        assert p.gateway.stop() == 0, p.log()


def test_horizons_two_tabs_the_new_tab_takes_over_and_the_old_says_why(lab, vm, tmp_path):
    """Horizon embeds Nova's noVNC URL in an iframe and offers "show only
    console", which opens the same URL in a new tab while the iframe's socket
    is still open: the new tab takes over, the old page says why it closed,
    and the token never runs two sessions at once."""
    p = nova_porthole(lab, tmp_path / "p")
    try:
        # nova.conf: [vnc] novncproxy_base_url = <porthole>/console-novnc (the iframe: Porthole's own page)
        token, iframe_url = mint(lab, "novnc", "127.0.0.1", vm.vnc_port, base_url=f"{p.base}/console-novnc")
        iframe = {}
        t = threading.Thread(target=lambda: iframe.update(browser("until-ended", iframe_url, 60000)), daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while not p.admin("GET", "/v1/sessions")[1]["sessions"]:
            assert time.monotonic() < deadline and t.is_alive(), (iframe, p.log()[-3000:])
            time.sleep(0.2)
        [first] = p.admin("GET", "/v1/sessions")[1]["sessions"]

        # The new tab: noVNC's own page through the same token shows the VM.
        tab = f"{p.base}/vendor/novnc/vnc_lite.html?path=vnc%3Ftoken%3D{token}"
        result = browser("vnc", tab, tmp_path / "tab.png", 3000)
        assert result.get("canvas"), result
        seabios_screen(tmp_path / "tab.png")

        t.join(timeout=60)
        assert not t.is_alive()
        report = {k: v for k, v in iframe.items() if k != "html"}
        assert iframe["state"] == "disconnected", report
        assert "another window or tab" in iframe["text"], report
        assert [c["code"] for c in iframe["closes"]] == [4006], report

        # And a WebSocket client takes over from the tab's session in turn
        # (the tab's browser has closed by now; a third connection still works).
        with connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={token}", open_timeout=10, origin=p.base) as ws:
            assert vnc_server_init(ws) == (720, 400)
            sessions = p.admin("GET", "/v1/sessions")[1]["sessions"]
            assert len(sessions) == 1 and sessions[0]["id"] != first["id"], sessions
        ended = [e for e in p.audit() if e.get("event") == "session_ended" and e.get("session") == first["id"]]
        assert ended and "takeover" in json.dumps(ended[0]), ended
    finally:
        assert p.gateway.stop() == 0, p.log()


def test_horizons_two_tabs_across_two_nodes_sharing_one_store(lab, vm, tmp_path):
    """Horizon's two tabs, each reaching another node behind a balancer: the
    iframe (Porthole's own page) on node A, the new tab (noVNC's
    vnc_lite.html) on node B. B ends A's session through the shared store
    before its own opens: one session, on B, never two."""
    redis = RedisServer()
    nodes = []
    try:
        for name in ("node-a", "node-b"):
            nodes.append(nova_porthole(lab, tmp_path / name, more_sections=redis.sections(name)))
        a, b = nodes
        token, iframe_url = mint(lab, "novnc", "127.0.0.1", vm.vnc_port, base_url=f"{a.base}/console-novnc")
        iframe = {}
        t = threading.Thread(target=lambda: iframe.update(browser("until-ended", iframe_url, 60000)), daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while not (listed := b.admin("GET", "/v1/sessions")[1]["sessions"]):
            assert time.monotonic() < deadline and t.is_alive(), (iframe, a.log()[-3000:])
            time.sleep(0.2)
        [first] = listed
        assert first["node"] == "node-a", first

        # The new tab, on node B; while it is open, both nodes list its session only.
        tab = f"{b.base}/vendor/novnc/vnc_lite.html?path=vnc%3Ftoken%3D{token}"
        shown = {}
        tab_thread = threading.Thread(
            target=lambda: shown.update(browser("vnc", tab, tmp_path / "tab.png", 6000)), daemon=True)
        tab_thread.start()
        seen = []
        deadline = time.monotonic() + 30
        while True:
            now = [(n, [(s["node"], s["id"]) for s in n.admin("GET", "/v1/sessions")[1]["sessions"]]) for n in nodes]
            seen += [listing for _, listing in now]
            if all(len(listing) == 1 and listing[0][0] == "node-b" for _, listing in now):
                break
            assert time.monotonic() < deadline and tab_thread.is_alive(), (now, shown, b.log()[-3000:])
            time.sleep(0.1)
        assert tab_thread.is_alive(), "the tab had closed before its session was seen"
        assert all(len(listing) <= 1 for listing in seen), seen
        tab_thread.join(timeout=60)
        assert shown.get("canvas"), shown
        seabios_screen(tmp_path / "tab.png")

        t.join(timeout=60)
        assert not t.is_alive()
        report = {k: v for k, v in iframe.items() if k != "html"}
        assert iframe["state"] == "disconnected", report
        assert "another window or tab" in iframe["text"], report
        assert [c["code"] for c in iframe["closes"]] == [4006], report
        # Node A's session ended (taken over) before node B's began.
        ended = [e for e in a.audit() if e.get("event") == "session_ended" and e.get("session") == first["id"]]
        assert ended and "takeover" in json.dumps(ended[0]), ended
        started = [e for e in b.audit() if e.get("event") == "session_started"]
        assert len(started) == 1 and started[0]["ts"] >= ended[0]["ts"], (ended, started)
    finally:
        for n in nodes:
            assert n.gateway.stop() == 0, n.log()[-3000:]
        redis.stop()


def test_nova_check_passes_for_the_service_user_and_names_the_policy_for_a_member(lab, tmp_path):
    """`porthole nova check` against the real Keystone and Nova: every step
    for the least-privilege user; for a member-only user, the policy and the
    role to grant, in words an operator can act on."""
    from harness import run
    good = nova_porthole(lab, tmp_path / "good")
    member = nova_porthole(lab, tmp_path / "member", who="porthole-member")
    try:
        p = run("nova", "check", "--config", str(tmp_path / "good" / "porthole.toml"))
        out = p.stdout
        for step in ("keystone: ok", "compute endpoint: ok", "microversion: ok", "policy: ok"):
            assert step in out, out
        assert f"{lab.nova_url}" in out or "/v2.1" in out, out
        assert "404" in out, out

        p = run("nova", "check", "--config", str(tmp_path / "member" / "porthole.toml"), check=False)
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert "keystone: ok" in p.stdout and "microversion: ok" in p.stdout, p.stdout
        failed = [line for line in p.stdout.splitlines() if line.startswith("policy: FAILED")]
        assert failed, p.stdout
        for words in ("403", "os_compute_api:os-console-auth-tokens", "console_auth", "openstack role add"):
            assert words in failed[0], failed[0]
        for secret in (lab.porthole_password,):
            assert secret not in p.stdout + p.stderr
    finally:
        for g in (good, member):
            assert g.gateway.stop() == 0, g.log()
