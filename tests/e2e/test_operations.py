"""Operating Porthole against real QEMU: the live session registry, ending
sessions through the admin API and the CLI (their tokens die with them),
revoking unused tokens, and the audit trail that says who did what."""

import time
import urllib.parse

import pytest

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import leak_check
from harness import AUDIENCE, ISSUER, metric_value
from mint_console_token import mint_console_token
from spice_wire import INPUTS, MAIN, Channel
from support import Porthole, first_line, rfb_client_handshake
from vm import VM


def vnc_session(p, port):
    """A noVNC-like session through the security proxy; returns (minted, ws)."""
    minted = p.mint("novnc", port)
    return minted, vnc_with(p, minted["token"])


def vnc_with(p, token):
    """A noVNC-like session with `token`, to QEMU's ServerInit; returns the ws."""
    ws = connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={token}", open_timeout=10, max_size=None)
    # Through the security proxy to QEMU's own ServerInit.
    assert ws.recv(timeout=10) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    assert ws.recv(timeout=10) == b"\x01\x01"
    ws.send(b"\x01")
    assert ws.recv(timeout=10)[:4] == b"\x00\x00\x00\x00"
    ws.send(b"\x01")
    assert ws.recv(timeout=10)[:4] == b"\x02\xd0\x01\x90", "QEMU's ServerInit: 720x400"
    return ws


def closed_code(ws, within=20):
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.1, deadline - time.monotonic()))
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else None
    raise AssertionError("the session was not ended")


def test_sessions_are_listed_killed_by_api_and_cli_and_their_tokens_die(tmp_path):
    (tmp_path / "vm").mkdir()
    vm = VM(tmp_path / "vm", spice=True, spice_extra_channels=False)
    pw = tmp_path / "spice.pw"
    pw.write_text(vm.spice_password)
    p = Porthole(tmp_path, backend_extra=f'[backends.spice]\npassword_file = "{pw}"\nca = "{vm.spice_ca}"')
    try:
        victim, vnc = vnc_session(p, vm.vnc_port)
        _, bystander = vnc_session(p, vm.vnc_port)
        spice_token = p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        ticket = p.spice_details(spice_token)["ticket"]
        main = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert main.open(MAIN, ticket) == "OK"
        session_id = main.session_id()
        inputs = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert inputs.open(INPUTS, ticket, connection_id=session_id) == "OK"

        # The registry: one entry per session (the SPICE channels are one session).
        status, listed = p.admin("GET", "/v1/sessions")
        assert status == 200, listed
        by_type = sorted(s["console"] for s in listed["sessions"])
        assert by_type == ["novnc", "novnc", "spice-direct"], listed
        status, only_spice = p.admin("GET", "/v1/sessions?type=spice-direct")
        spice_entry = only_spice["sessions"][0]
        assert spice_entry["instance"] == "e2e-vm" and spice_entry["bytes_down"] > 0, spice_entry
        assert spice_token not in str(listed) and ticket not in str(listed), "no tokens or tickets in the API"
        # The CLI shows the same.
        out = p.cli("sessions", "list").stdout
        assert spice_entry["id"] in out and out.count("novnc") == 2, out

        # Kill one noVNC session through the API, by its id.
        vnc_id = next(s["id"] for s in listed["sessions"] if s["jti"] == victim["jti"])
        status, answer = p.admin("DELETE", f"/v1/sessions/{vnc_id}?reason=leaked%20link", actor="alice")
        assert status == 200 and answer["terminated"] == [vnc_id], answer
        code, reason = closed_code(vnc)
        assert code == 4003 and reason == "session terminated by an operator", (code, reason)
        # The other noVNC session carries on (a framebuffer update request is answered).
        bystander.send(b"\x03\x00\x00\x00\x00\x00\x00\x01\x00\x01")
        assert bystander.recv(timeout=10)

        # Kill the SPICE session through the CLI, by instance and type; all its channels end.
        out = p.cli("sessions", "kill", "--instance", "e2e-vm", "--type", "spice-direct", "--reason", "VM deleted")
        assert spice_entry["id"] in out.stdout, out
        assert main.closed(timeout=20) and inputs.closed(timeout=20)

        # Their tokens are dead: no reconnect, no new ticket.
        try:
            connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={victim['token']}", open_timeout=10)
            raise AssertionError("a killed session's token reconnected")
        except InvalidStatus as e:
            assert e.response.status_code == 403, e.response
        from harness import http
        status, body = http("GET", f"{p.base}/spice-direct?format=json&token={spice_token}")
        assert status == 403, (status, body)

        # Revoke an unused token: refused with its reason.
        unused = p.mint("novnc", vm.vnc_port)
        status, answer = p.admin("POST", "/v1/revocations", {"jti": unused["jti"], "reason": "test"}, actor="bob")
        assert status == 200, answer
        try:
            connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={unused['token']}", open_timeout=10)
            raise AssertionError("a revoked token opened a session")
        except InvalidStatus as e:
            assert e.response.status_code == 403, e.response
        assert 'reason="revoked"' in p.log()

        # Revoke every token of an instance issued so far (a deleted VM); a later one works.
        earlier = p.mint("novnc", vm.vnc_port)["token"]
        out = p.cli("token", "revoke", "--instance", "e2e-vm", "--reason", "VM deleted")
        assert "revoked until" in out.stdout and "1 session(s) terminated" in out.stdout, out.stdout
        # ...which also ended the instance's remaining session.
        assert closed_code(bystander)[0] == 4003
        try:
            connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={earlier}", open_timeout=10)
            raise AssertionError("a token of a revoked instance opened a session")
        except InvalidStatus as e:
            assert e.response.status_code == 403
        time.sleep(1.1)  # a token issued in a later second
        _, ws = vnc_session(p, vm.vnc_port)
        ws.close()

        # The audit trail: who did what, and why; session starts and ends with ids.
        audit = p.audit()
        events = [e["event"] for e in audit]
        assert events.count("session_started") >= 3 and "session_ended" in events, events
        term = [e for e in audit if e["event"] == "session_terminated"]
        assert {(e["by"], e["reason"], e["console"]) for e in term} >= {
            ("alice", "leaked link", "novnc"), (term[-1]["by"], "VM deleted", "spice-direct")}, term
        assert any(e["by"].startswith("cli:") for e in term), term
        revoked = [e for e in audit if e["event"] == "tokens_revoked"]
        assert {(e["by"], e.get("jti"), e.get("instance")) for e in revoked} >= {("bob", unused["jti"], None)}, revoked
        ended = [e for e in audit if e["event"] == "session_ended" and e.get("terminated_by") == "alice"]
        assert ended and ended[0]["outcome"] == "terminated", ended
        text = p.audit_path.read_text() + p.log()
        for secret in (victim["token"], spice_token, ticket, vm.spice_password, unused["token"]):
            assert secret not in text

        # Metrics: exact counts of what this test did.
        m = p.metrics()
        assert metric_value(m, "porthole_admin_actions_total", action="terminate") == 3
        assert metric_value(m, "porthole_admin_actions_total", action="revoke") == 2
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]
        vm.stop()


def test_a_users_sessions_are_named_listed_audited_and_ended_by_user(tmp_path):
    """A token PyJWT mints with the documented example for a user (claim
    `user`): the session list, the CLI and the audit trail name the user, and
    ending a user's sessions ends theirs alone. A token the issuance API
    mints is audited with who asked for it, and for whom."""
    (tmp_path / "vm").mkdir()
    vm = VM(tmp_path / "vm")
    p = Porthole(tmp_path)
    try:
        # Characters a query string must escape, on purpose.
        user = "alice@example.org & co #1"
        key = p.key
        token = mint_console_token(key.signing_key(), key.kid, key.alg, "e2e-vm", "novnc", "127.0.0.1",
                                   vm.vnc_port, issuer=ISSUER, audience=AUDIENCE, user=user)
        leak_check.remember(token)
        alice = vnc_with(p, token)
        _, bystander = vnc_session(p, vm.vnc_port)

        status, listed = p.admin("GET", "/v1/sessions?" + urllib.parse.urlencode({"user": user}))
        assert status == 200 and [s.get("user") for s in listed["sessions"]] == [user], listed
        alice_id = listed["sessions"][0]["id"]
        status, everyone = p.admin("GET", "/v1/sessions")
        assert sorted(str(s.get("user")) for s in everyone["sessions"]) == ["None", user], everyone
        out = p.cli("sessions", "list", "--user", user).stdout
        assert alice_id in out and user in out and out.count("novnc") == 1, out

        out = p.cli("sessions", "kill", "--user", user, "--reason", "account disabled").stdout
        assert out.split() == [alice_id], out
        assert closed_code(alice)[0] == 4003
        # The other user's session carries on.
        bystander.send(b"\x03\x00\x00\x00\x00\x00\x00\x01\x00\x01")
        assert bystander.recv(timeout=10)
        bystander.close()

        # The audit trail names the user on each of alice's events, and on no other.
        deadline = time.monotonic() + 20
        while True:
            audit = p.audit()
            mine = [e for e in audit if e.get("session") == alice_id]
            if {"session_started", "session_terminated", "session_ended"} <= {e["event"] for e in mine}:
                break
            assert time.monotonic() < deadline, audit
            time.sleep(0.2)
        assert all(e.get("user") == user for e in mine), mine
        others = [e for e in audit if e.get("session") not in (None, alice_id)]
        assert others and all("user" not in e for e in others), others

        # A token the issuance API mints for her: audited with who asked.
        request = {"instance": "e2e-vm", "type": "novnc", "user": user,
                   "target": {"host": "127.0.0.1", "port": vm.vnc_port}}
        status, issued = p.admin("POST", "/v1/consoles", request, actor="portal")
        assert status == 200, issued
        leak_check.remember(issued["token"])
        deadline = time.monotonic() + 20
        while not (minted := [e for e in p.audit() if e["event"] == "token_issued"]):
            assert time.monotonic() < deadline, p.audit()
            time.sleep(0.2)
        assert [(e["by"], e["jti"], e["user"], e["console"], e["instance"]) for e in minted] == [
            ("portal", issued["jti"], user, "novnc", "e2e-vm")], minted
        assert issued["token"] not in p.audit_path.read_text()
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]
        vm.stop()


def test_reload_rotates_certificates_keys_and_backends_under_live_sessions(tmp_path):
    """SIGHUP (and POST /v1/reload) swap in new token keys, a new TLS
    certificate and new backend settings; live sessions stay up, new
    connections see only the new material; a broken file changes nothing."""
    import shutil
    import signal as sig
    import ssl
    from harness import Key
    from vm import make_spice_certs
    (tmp_path / "vm").mkdir()
    vm = VM(tmp_path / "vm", spice=True, spice_extra_channels=False)
    pw = tmp_path / "spice.pw"
    pw.write_text(vm.spice_password)
    p = Porthole(tmp_path, backend_extra=f'[backends.spice]\npassword_file = "{pw}"\nca = "{vm.spice_ca}"')
    try:
        _, vnc = vnc_session(p, vm.vnc_port)
        ticket = p.spice_details(p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"])["ticket"]
        spice = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert spice.open(MAIN, ticket) == "OK"
        spice.session_id()
        configured = p.key  # as the file names it
        old_ca = (tmp_path / "old-ca.pem")
        shutil.copy(p.spice_ca, old_ca)
        old_token = p.mint("novnc", vm.vnc_port)["token"]

        # New certificate (new CA) in place, new key pair under the same kid
        # (public for verifying, private for the issuance API: a reload
        # refuses an issuance key whose tokens the keys would refuse).
        make_spice_certs(tmp_path / "porthole-spice-certs")
        (tmp_path / "newkey").mkdir()
        new_key = Key(tmp_path / "newkey", "EdDSA", p.key.kid)
        shutil.copy(new_key.public, p.key.public)
        shutil.copy(new_key.private, p.key.private)
        p.gateway.proc.send_signal(sig.SIGHUP)
        deadline = time.monotonic() + 20
        while "SIGHUP: reloaded" not in p.log():
            assert time.monotonic() < deadline, p.log()[-2000:]
            time.sleep(0.1)

        # Live sessions carry on.
        vnc.send(b"\x03\x00\x00\x00\x00\x00\x00\x01\x00\x01")
        assert vnc.recv(timeout=10)
        assert not spice.closed(timeout=1)
        # New connections see the new certificate: the old CA no longer verifies it.
        with pytest.raises(ssl.SSLError):
            Channel(p.spice_tls_port, ca=old_ca)
        Channel(p.spice_tls_port, ca=p.spice_ca).close()
        # Old-key tokens are refused, new-key tokens work.
        try:
            connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={old_token}", open_timeout=10)
            raise AssertionError("a token signed with the retired key was accepted")
        except InvalidStatus as e:
            assert e.response.status_code == 403
        p.key = new_key
        _, ws = vnc_session(p, vm.vnc_port)
        ws.close()

        # A broken certificate file: the reload is refused, the old one stays.
        cert = tmp_path / "porthole-spice-certs" / "server-cert.pem"
        good = cert.read_text()
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        status, body = p.admin("POST", "/v1/reload")
        assert status == 422 and body["error"]["code"] == "reload_failed", body
        cert.write_text(good)
        Channel(p.spice_tls_port, ca=p.spice_ca).close()
        assert "reload failed, the running configuration is kept" in p.log()
        status, body = p.admin("POST", "/v1/reload")
        assert status == 200 and body["reloaded"]["backends"] == 1, body
        assert body["reloaded"]["restart_required"] == [], body

        # Key rotation by editing the file (#10 item 1): a new kid replaces
        # the old one in [[tokens.keys]] and [issuance]; after SIGHUP the old
        # kid's tokens are refused and the issuance API signs with the new kid.
        old_kid_token = p.mint("novnc", vm.vnc_port)["token"]
        (tmp_path / "rotated").mkdir()
        rotated = Key(tmp_path / "rotated", "EdDSA", "e2e-rotated")
        config = tmp_path / "porthole.toml"
        text = config.read_text()
        edited = (text.replace(configured.config_entry(), rotated.config_entry())
                  .replace(f'signing_key = "{configured.private}"', f'signing_key = "{rotated.private}"')
                  .replace(f'signing_kid = "{configured.kid}"', f'signing_kid = "{rotated.kid}"'))
        assert edited.count("e2e-rotated") == 4, edited
        config.write_text(edited)
        p.gateway.proc.send_signal(sig.SIGHUP)
        deadline = time.monotonic() + 20
        while p.log().count("SIGHUP: reloaded") < 2:
            assert time.monotonic() < deadline, p.log()[-2000:]
            time.sleep(0.1)
        assert 'keys_removed=["e2e"]' in p.log() and 'keys_added=["e2e-rotated"]' in p.log(), p.log()[-2000:]
        try:
            connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={old_kid_token}", open_timeout=10)
            raise AssertionError("a token of the removed kid was accepted")
        except InvalidStatus as e:
            assert e.response.status_code == 403
        status, issued = p.admin("POST", "/v1/consoles", {
            "instance": "e2e-vm", "type": "novnc", "target": {"host": "127.0.0.1", "port": vm.vnc_port}})
        assert status == 200, issued
        import jwt
        assert jwt.get_unverified_header(issued["token"])["kid"] == "e2e-rotated"
        ws = connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={issued['token']}", open_timeout=10, max_size=None)
        assert ws.recv(timeout=10) == b"RFB 003.008\n"
        ws.close()
        vnc.close()
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]
        vm.stop()




def test_real_clients_see_an_operator_end_their_sessions(tmp_path):
    """noVNC in Chromium and remote-viewer (spice-gtk) are connected through
    Porthole; the operator ends both (API, CLI): the page says an operator
    ended it, remote-viewer's SPICE session goes down, and the audit says who."""
    import json
    import os
    import re
    import signal
    import subprocess
    from support import HERE
    (tmp_path / "vm").mkdir()
    vm = VM(tmp_path / "vm", spice=True, spice_extra_channels=False)
    pw = tmp_path / "spice.pw"
    pw.write_text(vm.spice_password)
    p = Porthole(tmp_path, backend_extra=f'[backends.spice]\npassword_file = "{pw}"')
    page = viewer = None
    try:
        # noVNC in Chromium, held open until its session ends.
        page = subprocess.Popen(["node", str(HERE / "browser.mjs"), "until-ended", p.mint("novnc", vm.vnc_port)["url"],
                                 "60000"], stdout=subprocess.PIPE, text=True, cwd=HERE)
        assert first_line(page).strip() == "CONNECTED"
        # remote-viewer with a .vv file, on a virtual X display.
        token = p.mint("spice-direct", vm.spice_port)["token"]
        from harness import http
        status, vv = http("GET", f"{p.base}/spice-direct?token={token}")
        assert status == 200, vv
        (tmp_path / "console.vv").write_text(vv)
        log = tmp_path / "remote-viewer.log"
        with open(log, "w") as out:
            viewer = subprocess.Popen(["xvfb-run", "-a", "remote-viewer", "--debug", str(tmp_path / "console.vv")],
                                      stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "SPICE_DEBUG": "1"},
                                      start_new_session=True)
        deadline = time.monotonic() + 30
        while not re.search(r"display-2:0: channel up", log.read_text(errors="replace")):
            assert time.monotonic() < deadline and viewer.poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        listed = {s["console"]: s["id"] for s in p.admin("GET", "/v1/sessions")[1]["sessions"]}
        assert set(listed) == {"novnc", "spice-direct"}, listed

        # The API ends the browser's session; the page says why.
        status, _ = p.admin("DELETE", f"/v1/sessions/{listed['novnc']}?reason=maintenance", actor="carol")
        assert status == 200
        result = json.loads(page.communicate(timeout=60)[0].strip().splitlines()[-1])
        assert result["state"] == "revoked" and "operator" in result["text"], result

        # The CLI ends the SPICE session; remote-viewer's channels go down.
        before = len(log.read_text(errors="replace"))
        p.cli("sessions", "kill", "--id", listed["spice-direct"], "--reason", "maintenance")
        deadline = time.monotonic() + 30
        while True:
            tail = log.read_text(errors="replace")[before:]
            if re.search(r"main-1:0: .*(channel down|disconnect|Closing|error)", tail, re.I):
                break
            assert time.monotonic() < deadline, tail[-3000:]
            time.sleep(0.2)
        assert p.admin("GET", "/v1/sessions")[1]["sessions"] == []
        # The audit trail is written by its own task: poll it.
        deadline = time.monotonic() + 10
        while True:
            ended = {(e["console"], e["by"]) for e in p.audit() if e["event"] == "session_terminated"}
            if ("novnc", "carol") in ended and any(c == "spice-direct" and b.startswith("cli:") for c, b in ended):
                break
            assert time.monotonic() < deadline, ended
            time.sleep(0.1)
    finally:
        for proc in (page, viewer):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM) if proc is viewer else proc.terminate()
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    proc.kill()
        assert p.gateway.stop() == 0, p.log()[-3000:]
        vm.stop()
