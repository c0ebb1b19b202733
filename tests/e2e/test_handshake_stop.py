"""Stopping a session while Porthole is still in its handshake with the
hypervisor. The hypervisor here accepts the connection and never says a
word; every handshake deadline is 60 s. An operator's terminate and a
gateway shutdown must reach such a session at once, not when the deadline
runs out: the tests allow a third of the deadline, so passing means the
stop reached the handshake. Browser VNC (/vnc), native VNC (vnc-direct) and
native SPICE (spice-direct) alike; native sessions are in the registry from
their admission, so an operator can see and end them while they wait."""

import signal
import socket
import ssl
import struct
import subprocess
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import leak_check
from spice_wire import MAIN, Channel
from support import FakeServer, Porthole
from test_vnc_security import recv_exact, vnc_details
from vm import free_port

DEADLINE = 60  # every handshake deadline (and the shutdown grace) in these tests
WITHIN = 20  # how long a stop may take to reach the client: well before DEADLINE


class SilentHypervisor(FakeServer):
    """A console port that accepts connections and never sends a byte; it
    holds them open until close(). released() says whether Porthole has let
    go of them (closed its end)."""

    def __init__(self):
        self._conns = []
        super().__init__()

    def handle(self, conn):
        with self._lock:
            self._conns.append(conn)

    def wait_accepted(self, n=1, timeout=10):
        """Waits until Porthole has opened n connections (it is then in its
        handshake with this hypervisor)."""
        deadline = time.monotonic() + timeout
        while self.accepted < n:
            assert time.monotonic() < deadline, f"Porthole opened {self.accepted} of {n} connections in {timeout} s"
            time.sleep(0.05)

    def released(self, timeout):
        """Whether Porthole closes every connection it opened here within
        timeout (what it sent is read and dropped)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                conn.settimeout(left)
                try:
                    if not conn.recv(65536):
                        break
                except (socket.timeout, TimeoutError):
                    return False
                except OSError:
                    break
        return True

    def close(self):
        super().close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


def gateway(tmp_path):
    """A Porthole whose every handshake deadline is DEADLINE: the browser VNC
    handshake (websocket.upgrade_timeout_secs), the native VNC listener's
    ([vnc], on p.vnc_port) and SPICE's; the shutdown grace too, so a shutdown
    cannot end a stuck handshake by simply giving up on it."""
    vnc_port = free_port()
    p = Porthole(tmp_path, websocket=f"upgrade_timeout_secs = {DEADLINE}\nshutdown_grace_secs = {DEADLINE}",
                 spice=f"handshake_timeout_secs = {DEADLINE}",
                 vnc=f'listen = "127.0.0.1:{vnc_port}"\nhandshake_timeout_secs = {DEADLINE}')
    p.vnc_port = vnc_port
    return p


def listed(p, console, jti, timeout=10):
    """The registry entry of the session with token id jti, waited for."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = p.admin("GET", f"/v1/sessions?type={console}")
        assert status == 200, body
        found = [s for s in body["sessions"] if s["jti"] == jti]
        if found:
            assert len(found) == 1 and found[0]["instance"] == "e2e-vm", found
            return found[0]
        assert time.monotonic() < deadline, (
            f"no {console} session in GET /v1/sessions after {timeout} s while Porthole waits for the "
            f"hypervisor: {body}\n{p.log()[-3000:]}")
        time.sleep(0.1)


def registry_empties(p, timeout=10):
    deadline = time.monotonic() + timeout
    while (sessions := p.admin("GET", "/v1/sessions")[1]["sessions"]):
        assert time.monotonic() < deadline, f"still listed after {timeout} s: {sessions}"
        time.sleep(0.1)


def close_frame(ws, p, within=WITHIN):
    """Waits (at most within seconds) for the server to close the WebSocket;
    returns (code, reason) of its close frame (None if it sent none)."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            try:
                data = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                continue
            raise AssertionError(f"data from a silent hypervisor's session: {data!r}")
    except ConnectionClosed as e:
        return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, None)
    raise AssertionError(f"the WebSocket was not closed within {within} s (handshake deadline {DEADLINE} s):\n"
                         f"{p.log()[-3000:]}")


def until_eof(sock, p, within=WITHIN):
    """Everything the peer sends up to its close (EOF, or a reset), waited
    for at most within seconds."""
    deadline = time.monotonic() + within
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except (socket.timeout, TimeoutError):
            break
        except OSError:  # reset, TLS torn down
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the connection was not closed within {within} s (handshake deadline {DEADLINE} s); "
                         f"got {got!r}:\n{p.log()[-3000:]}")


def terminated_in_audit(p, session_id, by):
    """The session's session_ended audit event says the operator ended it."""
    deadline = time.monotonic() + 10
    while True:
        ended = [e for e in p.audit() if e["event"] == "session_ended" and e.get("session") == session_id]
        if ended:
            break
        assert time.monotonic() < deadline, p.audit()
        time.sleep(0.1)
    assert ended[0].get("terminated_by") == by and ended[0]["outcome"] == "terminated", ended
    assert any(e["event"] == "session_terminated" and e["by"] == by for e in p.audit()), p.audit()


def browser_vnc(p, hv):
    """A /vnc WebSocket (a noVNC token) whose hypervisor never speaks; returns
    (minted, ws, registry entry) once Porthole waits for the hypervisor."""
    minted = p.mint("novnc", hv.port)
    ws = connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={minted['token']}", open_timeout=10, close_timeout=2)
    hv.wait_accepted(1)
    return minted, ws, listed(p, "novnc", minted["jti"])


def test_terminate_reaches_a_browser_vnc_handshake(tmp_path):
    hv = SilentHypervisor()
    p = gateway(tmp_path)
    ws = None
    try:
        minted, ws, entry = browser_vnc(p, hv)
        started = time.monotonic()
        status, answer = p.admin("DELETE", f"/v1/sessions/{entry['id']}?reason=stuck%20console", actor="erin")
        assert status == 200 and answer["terminated"] == [entry["id"]], answer
        code, reason = close_frame(ws, p)
        assert code == 4003 and reason == "session terminated by an operator", (code, reason, p.log()[-3000:])
        assert hv.released(WITHIN - (time.monotonic() - started)), "Porthole kept the hypervisor connection open"
        registry_empties(p)
        terminated_in_audit(p, entry["id"], "erin")
    finally:
        if ws is not None:
            ws.close()
        hv.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_revoke_reaches_a_browser_vnc_handshake(tmp_path):
    """Revoking the token (by jti) ends the session it runs, even one still
    waiting for its hypervisor: 4003, long before the handshake deadline."""
    hv = SilentHypervisor()
    p = gateway(tmp_path)
    ws = None
    try:
        minted, ws, entry = browser_vnc(p, hv)
        started = time.monotonic()
        status, answer = p.admin("POST", "/v1/revocations", {"jti": minted["jti"], "reason": "leaked link"},
                                 actor="heidi")
        assert status == 200, answer
        code, reason = close_frame(ws, p)
        assert code == 4003 and reason == "session terminated by an operator", (code, reason, p.log()[-3000:])
        assert hv.released(WITHIN - (time.monotonic() - started)), "Porthole kept the hypervisor connection open"
        registry_empties(p)
        terminated_in_audit(p, entry["id"], "heidi")
    finally:
        if ws is not None:
            ws.close()
        hv.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_shutdown_reaches_a_browser_vnc_handshake(tmp_path):
    hv = SilentHypervisor()
    p = gateway(tmp_path)
    ws = None
    try:
        _, ws, _ = browser_vnc(p, hv)
        started = time.monotonic()
        p.gateway.proc.send_signal(signal.SIGTERM)
        code, reason = close_frame(ws, p)
        assert code == 1001 and reason == "gateway shutting down", (code, reason, p.log()[-3000:])
        try:
            rc = p.gateway.proc.wait(timeout=max(0.1, WITHIN - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"Porthole still running {WITHIN} s after SIGTERM (grace and handshake deadline "
                                 f"{DEADLINE} s):\n{p.log()[-3000:]}") from None
        assert rc == 0, p.log()[-3000:]
        assert "grace period over" not in p.log(), p.log()[-3000:]
        assert hv.released(5), "the hypervisor connection outlived Porthole"
    finally:
        if ws is not None:
            ws.close()
        hv.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_native_vnc_session_waiting_for_its_hypervisor_is_listed_and_terminated(tmp_path):
    hv = SilentHypervisor()
    p = gateway(tmp_path)
    tls = None
    try:
        minted = p.mint("vnc-direct", hv.port)
        details = vnc_details(p, minted["token"])
        leak_check.remember_ticket(details["ticket"])
        assert details["port"] == p.vnc_port, details
        # A raw native client: VeNCrypt X509Plain, then the ticket inside TLS.
        s = socket.create_connection(("127.0.0.1", p.vnc_port), timeout=10)
        assert recv_exact(s, 12) == b"RFB 003.008\n"
        s.sendall(b"RFB 003.008\n")
        assert recv_exact(s, 2) == b"\x01\x13", "VeNCrypt only"
        s.sendall(b"\x13")
        assert recv_exact(s, 2) == b"\x00\x02"
        s.sendall(b"\x00\x02")
        assert recv_exact(s, 6) == b"\x00\x01" + (262).to_bytes(4, "big"), "X509Plain only"
        s.sendall((262).to_bytes(4, "big"))
        assert recv_exact(s, 1) == b"\x01"
        tls = ssl.create_default_context(cafile=str(p.spice_ca)).wrap_socket(s, server_hostname="127.0.0.1")
        user, password = b"porthole", details["ticket"].encode()
        tls.sendall(len(user).to_bytes(4, "big") + len(password).to_bytes(4, "big") + user + password)
        # The ticket let it in: Porthole now waits for the hypervisor, and
        # the session is in the registry from that admission on.
        hv.wait_accepted(1)
        entry = listed(p, "vnc-direct", minted["jti"])
        started = time.monotonic()
        # Ended by instance, as when a VM is deleted.
        status, answer = p.admin("POST", "/v1/sessions/terminate", {"instance": "e2e-vm", "reason": "VM deleted"},
                                 actor="frank")
        assert status == 200 and answer["terminated"] == [entry["id"]], answer
        got = until_eof(tls, p)
        assert not got.startswith(b"\x00\x00\x00\x00"), f"an OK SecurityResult for a terminated session: {got!r}"
        assert hv.released(WITHIN - (time.monotonic() - started)), "Porthole kept the hypervisor connection open"
        registry_empties(p)
        terminated_in_audit(p, entry["id"], "frank")
        assert details["ticket"] not in p.log()
    finally:
        if tls is not None:
            tls.close()
        hv.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_native_spice_session_waiting_for_its_hypervisor_is_listed_and_terminated(tmp_path):
    hv = SilentHypervisor()
    p = gateway(tmp_path)
    main = None
    try:
        minted = p.mint("spice-direct", hv.port)
        ticket = p.spice_details(minted["token"])["ticket"]
        # The main channel over TLS: Porthole's link reply, then the ticket.
        main = Channel(p.spice_tls_port, ca=p.spice_ca)
        error, key = main.link(MAIN)
        assert error == "OK", error
        main.send_ticket(key, ticket)
        hv.wait_accepted(1)
        entry = listed(p, "spice-direct", minted["jti"])
        started = time.monotonic()
        status, answer = p.admin("DELETE", f"/v1/sessions/{entry['id']}?reason=stuck%20console", actor="grace")
        assert status == 200 and answer["terminated"] == [entry["id"]], answer
        got = until_eof(main.sock, p)
        assert len(got) < 4 or struct.unpack("<I", got[:4])[0] != 0, f"an OK link result after terminate: {got!r}"
        assert hv.released(WITHIN - (time.monotonic() - started)), "Porthole kept the hypervisor connection open"
        registry_empties(p)
        terminated_in_audit(p, entry["id"], "grace")
        assert ticket not in p.log()
    finally:
        if main is not None:
            main.close()
        hv.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]
