"""Session timers and endings as a client sees them (on serial consoles,
which Porthole relays as raw bytes; VNC sessions share the same bridge after
the security proxy's handshake): pings keep quiet
sessions alive, the idle timeout and token expiry end them with their own
close codes, shutdown drains them with 1001, and static serving stays inside
its roots. Deadlines are checked against generous multiples, never speed."""

import http.client
import re
import select
import socket
import os
import signal
import ssl
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from support import EchoBackend, Porthole, rfb_client_handshake
from test_refusals import ws_url


@pytest.fixture
def backend():
    b = EchoBackend()
    yield b
    b.close()


def closed_with(ws, within):
    """Waits (at most `within` seconds) for the server to close; returns the close frame."""
    deadline = time.monotonic() + within
    with pytest.raises(ConnectionClosed) as e:
        while time.monotonic() < deadline:
            try:
                ws.recv(timeout=0.5)
            except TimeoutError:
                pass
        raise AssertionError(f"no close within {within} s")
    return e.value.rcvd


def test_pings_keep_a_quiet_session_and_idle_timeout_ends_it(tmp_path, backend):
    p = Porthole(tmp_path, websocket="ping_interval_secs = 1\nidle_timeout_secs = 3")
    try:
        with connect(ws_url(p, "serial", p.mint("serial", backend.port)["token"]), open_timeout=10) as ws:
            started = time.monotonic()
            frame = closed_with(ws, within=30)
            elapsed = time.monotonic() - started
        assert frame is not None and frame.code == 4002, frame
        assert frame.reason == "idle timeout"
        # Pongs are not activity from the client's console: the timeout still fires,
        # and not before the configured 3 s.
        assert elapsed >= 2.5, elapsed
        p.wait_for_log('reason="idle_timeout"')
    finally:
        assert p.gateway.stop() == 0


def test_sessions_can_end_at_token_expiry(tmp_path, backend):
    p = Porthole(tmp_path, websocket="end_at_token_expiry = true")
    try:
        with connect(ws_url(p, "serial", p.mint("serial", backend.port, ttl=3)["token"]), open_timeout=10) as ws:
            ws.send(b"x")
            assert ws.recv(timeout=10) == b"x"
            frame = closed_with(ws, within=30)
        assert frame.code == 4001 and frame.reason == "console token expired", frame
    finally:
        assert p.gateway.stop() == 0


def test_shutdown_closes_sessions_with_going_away_and_exits_within_grace(tmp_path, backend):
    p = Porthole(tmp_path, websocket="shutdown_grace_secs = 5")
    ws = connect(ws_url(p, "serial", p.mint("serial", backend.port)["token"]), open_timeout=10)
    ws.send(b"x")
    assert ws.recv(timeout=10) == b"x"
    started = time.monotonic()
    p.gateway.proc.send_signal(signal.SIGTERM)
    frame = closed_with(ws, within=30)
    assert frame.code == 1001 and frame.reason == "gateway shutting down", frame
    assert p.gateway.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 5 * 3, "exit took far longer than the grace period"
    assert 'reason="shutdown"' in p.log()


def test_static_serving_stays_inside_its_roots(porthole):
    def get(path):
        c = http.client.HTTPConnection("127.0.0.1", porthole.public_port, timeout=10)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()

    status, headers, body = get("/static/console.css")
    assert status == 200 and headers["x-content-type-options"] == "nosniff"
    assert get("/vendor/novnc/core/rfb.js")[0] == 200
    assert get("/vendor/xterm/lib/xterm.mjs")[0] == 200
    for path in ["//evil.example/", "//evil.example/%2e%2e", "/static//evil.example", "/static/",
                 "/static", "/vendor/novnc/", "/vendor/novnc/core", "/static/../Cargo.toml",
                 "/static/%2e%2e/%2e%2e/Cargo.toml", "/static/..%2f..%2fCargo.toml", "/vendor/xterm/../../../Cargo.toml"]:
        status, headers, body = get(path)
        assert status in (400, 404), (path, status)
        assert "location" not in {k.lower() for k in headers}, (path, headers)
        assert b"[package]" not in body


def tls_connect(base, p, console_port, ctx, **kw):
    """A noVNC socket at `base` (wss://host:port) with a fresh token, over a
    TLS connection whose TLS 1.3 session tickets were read before the
    WebSocket client took it.

    websockets' sync client reads its socket in a thread of its own while
    the calling thread writes the upgrade request, and one OpenSSL object
    serves both: a read that takes in the tickets (which Porthole, as any
    TLS 1.3 server, sends right after the handshake) while the request is
    written can lose the request. The connection then waits for an answer
    to a request the server never had, in one run of this test in 10 to 40
    beside two busy loops (Porthole's log: the handshake done, its tickets
    sent, then nothing until its header deadline; `ss`: nothing queued
    either way). Reading the tickets first, in this one thread, leaves
    nothing for the two to meet on: 90 runs so, none hung."""
    token = p.mint("novnc", console_port)["token"]
    host, port = base.removeprefix("wss://").rsplit(":", 1)
    host = host.strip("[]")
    raw = socket.create_connection((host, int(port)), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname=host)
    tls.setblocking(False)
    deadline = time.monotonic() + 10
    while True:
        try:
            # Nothing comes before the request: this reads the tickets.
            extra = tls.recv(1)
            raise AssertionError(f"Porthole sent {extra!r} before any request")
        except ssl.SSLWantReadError:
            pass
        if tls.session is not None and tls.session.has_ticket:
            break
        left = deadline - time.monotonic()
        assert left > 0, "no TLS session ticket from Porthole within 10 s"
        select.select([tls], [], [], left)
    tls.setblocking(True)
    # The socket is TLS already: the WebSocket client speaks over it as is.
    url = base.replace("wss://", "ws://", 1)
    return connect(f"{url}/vnc?token={token}", sock=tls, open_timeout=10, **kw)


def test_tls_and_ipv6_listeners(tmp_path, backend):
    """A TLS public listener with the development CA, on IPv4 and IPv6."""
    import subprocess
    from harness import porthole_bin
    state = tmp_path / "state"
    # The development PKI from embedded defaults: its server certificate names
    # localhost, 127.0.0.1 and ::1.
    subprocess.run([porthole_bin(), "token", "mint", "--type", "novnc", "--instance", "x", "--host", "127.0.0.1",
                    "--port", "5900"], env={"PORTHOLE_STATE_DIR": str(state), "PATH": "/usr/bin:/bin"},
                   check=True, capture_output=True, timeout=60)
    extra = (f'tls_cert = "{state / "server.pem"}"\ntls_key = "{state / "server.key"}"\n'
             f'public_extra = ["[::1]:0"]\n')
    p = Porthole(tmp_path, listen_extra=extra, scheme="https")
    vnc_console = EchoBackend(rfb=True)
    try:
        ctx = ssl.create_default_context(cafile=str(state / "dev-ca.pem"))
        with tls_connect(f"wss://127.0.0.1:{p.public_port}", p, vnc_console.port, ctx,
                         origin=p.base) as ws:
            rfb_client_handshake(ws)
            ws.send(b"over tls")
            assert ws.recv(timeout=10) == b"over tls"
        # Plain HTTP on the TLS port gets nothing useful.
        c = http.client.HTTPConnection("127.0.0.1", p.public_port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            c.request("GET", "/static/console.css")
            c.getresponse().read()
        # The IPv6 listener serves the same router.
        v6_port = int(re.search(r"public=\[[^ ]+, \[::1\]:(\d+)\]", p.log()).group(1))
        with tls_connect(f"wss://[::1]:{v6_port}", p, vnc_console.port, ctx) as ws:
            rfb_client_handshake(ws)
            ws.send(b"over ipv6")
            assert ws.recv(timeout=10) == b"over ipv6"
    finally:
        vnc_console.close()
        assert p.gateway.stop() == 0


def test_a_slow_upgrade_request_is_cut_at_its_deadline(tmp_path):
    """Headers trickled byte by byte cannot hold a connection past the upgrade deadline."""
    p = Porthole(tmp_path, websocket="upgrade_timeout_secs = 2")
    try:
        s = socket.create_connection(("127.0.0.1", p.public_port), timeout=30)
        started = time.monotonic()
        s.sendall(b"GET /vnc?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        while time.monotonic() - started < 30:
            try:
                s.sendall(b"X")
                data = s.recv(4096, socket.MSG_DONTWAIT)
                if data == b"" or data.startswith(b"HTTP/1.1 408"):
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        assert closed, "the server kept a trickling request open"
        assert elapsed >= 1.5, f"cut after {elapsed:.1f} s, before the 2 s deadline"
        s.close()
    finally:
        assert p.gateway.stop() == 0


def raw_websocket(port, path):
    """A bare WebSocket client on a socket: the frames Porthole sends, unfiltered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(1)
        assert c, f"closed before the end of the handshake's answer: {head!r}"
        head += c
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def read_frame(s):
    """(opcode, payload) of the next server frame (servers never mask)."""
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data
    b0, b1 = exact(2)
    length = b1 & 0x7F
    if length == 126:
        length = int.from_bytes(exact(2), "big")
    elif length == 127:
        length = int.from_bytes(exact(8), "big")
    return b0 & 0x0F, exact(length)


def test_pings_are_sent_on_quiet_sessions(tmp_path, backend):
    """A ping at a time, each with its own payload; the next comes once the
    client answered the last (a pong that echoes its payload)."""
    p = Porthole(tmp_path, websocket="ping_interval_secs = 1")
    try:
        s = raw_websocket(p.public_port, f"/serial?token={p.mint('serial', backend.port)['token']}")
        payloads = []
        for _ in range(2):
            opcode, payload = read_frame(s)
            assert opcode == 0x9, opcode  # a ping, nothing else, on a quiet console
            payloads.append(payload)
            mask = os.urandom(4)
            s.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask
                      + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        assert len(payloads[0]) == 8 and payloads[0] != payloads[1], payloads
        s.close()
    finally:
        assert p.gateway.stop() == 0


def test_the_hypervisor_closing_ends_the_session_with_its_own_code(porthole):
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def accept_then_close():
        conn, _ = srv.accept()
        conn.sendall(b"login: ")
        conn.close()

    threading.Thread(target=accept_then_close, daemon=True).start()
    s = raw_websocket(porthole.public_port, f"/serial?token={porthole.mint('serial', srv.getsockname()[1])['token']}")
    opcode, payload = read_frame(s)
    assert (opcode, payload) == (0x2, b"login: ")
    opcode, payload = read_frame(s)
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 4000, (opcode, payload)
    assert payload[2:] == b"console closed by the hypervisor"
    s.close()
    srv.close()


def test_websocket_protocol_violations_are_closed_with_their_codes(tmp_path, backend):
    """A client that breaks RFC 6455 hears which rule (1002, 1007) in a close
    frame, and the session's end is counted as the client's protocol error,
    not as a client that left."""
    p = Porthole(tmp_path)

    def close_code_after(frame):
        s = raw_websocket(p.public_port, f"/serial?token={p.mint('serial', backend.port)['token']}")
        s.sendall(frame)
        opcode, payload = read_frame(s)
        while opcode == 0x9:  # a ping may come first
            opcode, payload = read_frame(s)
        s.close()
        assert opcode == 0x8, (opcode, payload)
        return int.from_bytes(payload[:2], "big")

    def ended(reason):
        m = re.search(r'porthole_sessions_ended_total\{[^}]*reason="%s"[^}]*\} (\d+)' % reason, p.metrics())
        return int(m.group(1)) if m else 0

    def wait_ended(reason):
        deadline = time.monotonic() + 10
        while ended(reason) < 1:
            assert time.monotonic() < deadline, p.metrics()
            time.sleep(0.05)

    try:
        # An unmasked client frame (clients must mask, §5.1).
        assert close_code_after(b"\x82\x03abc") == 1002
        wait_ended("client_protocol_error")
        # A masked text frame whose bytes are not UTF-8 (§8.1).
        mask, data = b"\x01\x02\x03\x04", b"\xff\xfe\xfd"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        assert close_code_after(bytes([0x81, 0x80 | len(data)]) + mask + masked) == 1007
        wait_ended("client_invalid_utf8")
        assert ended("client_left") == 0, p.metrics()
    finally:
        assert p.gateway.stop() == 0
