"""Refusals end to end: each bad request gets its own refusal before any
upgrade, and the hypervisor never sees a connection; limits end only the
session that broke them; a slow reader cannot grow Porthole's memory."""

import socket
import threading
import time

import jwt
import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from support import AUDIENCE, ISSUER, EchoBackend, FloodBackend, Porthole, browser, rfb_client_handshake
from harness import metric_value


@pytest.fixture
def backend():
    b = EchoBackend(rfb=True)  # a VNC console: Porthole's security proxy speaks RFB to it
    yield b
    b.close()


def ws_url(p, endpoint, token):
    return f"ws://127.0.0.1:{p.public_port}/{endpoint}?token={token}"


def refused(url, status, code, **kw):
    with pytest.raises(InvalidStatus) as e:
        connect(url, open_timeout=10, **kw)
    assert e.value.response.status_code == status, e.value.response
    assert f'"error":"{code}"'.encode() in e.value.response.body, e.value.response.body


def expired_token(p, port):
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "vm", "iat": now - 600, "nbf": now - 600, "exp": now - 300,
              "jti": "expired-1", "console": {"type": "novnc", "host": "127.0.0.1", "port": port}}
    return jwt.encode(claims, p.key.signing_key(), algorithm="EdDSA", headers={"kid": p.key.kid})


def test_bad_tokens_and_origins_are_refused_before_the_upgrade(porthole, backend):
    p = porthole
    good = p.mint("novnc", backend.port)["token"]
    serial = p.mint("serial", backend.port)["token"]
    header, payload, sig = good.split(".")
    tampered = f"{header}.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{sig}"

    refused(ws_url(p, "vnc", tampered), 403, "refused")
    refused(ws_url(p, "vnc", expired_token(p, backend.port)), 401, "expired")
    refused(ws_url(p, "vnc", ""), 400, "refused")
    refused(f"ws://127.0.0.1:{p.public_port}/vnc", 401, "refused")
    # Wrong console type, on every endpoint.
    refused(ws_url(p, "serial", good), 403, "refused")
    refused(ws_url(p, "vnc", serial), 403, "refused")
    refused(ws_url(p, "websockify", serial), 403, "refused")
    # A foreign page cannot open a console socket, even with a good token.
    refused(ws_url(p, "vnc", good), 403, "refused", origin="https://evil.example")
    refused(ws_url(p, "vnc", good), 403, "refused", origin=f"http://127.0.0.1:{p.public_port}.evil.example")
    assert backend.accepted == 0, "a refused request reached the hypervisor"

    # The same good token, from the right origin (and with none), gets through.
    with connect(ws_url(p, "vnc", good), open_timeout=10, origin=p.base) as ws:
        rfb_client_handshake(ws)
        ws.send(b"hello")
        assert ws.recv(timeout=10) == b"hello"
    with connect(ws_url(p, "websockify", good), open_timeout=10) as ws:
        rfb_client_handshake(ws)
        ws.send(b"again")
        assert ws.recv(timeout=10) == b"again"
    assert backend.accepted == 2

    m = p.metrics()
    assert metric_value(m, "porthole_token_refusals_total", reason="bad_signature") == 1
    assert metric_value(m, "porthole_token_refusals_total", reason="expired") == 1
    assert metric_value(m, "porthole_token_refusals_total", reason="wrong_console_type") == 3
    assert metric_value(m, "porthole_session_refusals_total", reason="origin_not_allowed") == 2
    log = p.log()
    for t in (good, serial, tampered):
        assert t not in log and t.split(".")[2][:16] not in log


def test_one_token_runs_one_session_at_a_time(porthole, backend):
    p = porthole
    token = p.mint("novnc", backend.port)["token"]
    with connect(ws_url(p, "vnc", token), open_timeout=10) as ws:
        rfb_client_handshake(ws)
        ws.send(b"x")
        assert ws.recv(timeout=10) == b"x"
        refused(ws_url(p, "vnc", token), 403, "refused")
    # A reconnect after the session ended works within the token's life.
    deadline = time.monotonic() + 10
    while True:
        try:
            with connect(ws_url(p, "vnc", token), open_timeout=10) as ws:
                rfb_client_handshake(ws)
                ws.send(b"y")
                assert ws.recv(timeout=10) == b"y"
            break
        except InvalidStatus:
            # The first session's end is processed asynchronously.
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert "replayed" in p.log()


def test_an_oversized_message_closes_only_that_session(tmp_path, backend):
    p = Porthole(tmp_path, websocket="max_message_bytes = 65536\nmax_frame_bytes = 65536")
    try:
        a = connect(ws_url(p, "vnc", p.mint("novnc", backend.port)["token"]), open_timeout=10, max_size=None)
        b = connect(ws_url(p, "vnc", p.mint("novnc", backend.port)["token"]), open_timeout=10, max_size=None)
        rfb_client_handshake(a)
        rfb_client_handshake(b)
        a.send(b"a" * 1000)
        assert a.recv(timeout=10) == b"a" * 1000
        a.send(b"x" * 100_000)
        with pytest.raises(ConnectionClosedError) as closed:
            while True:
                a.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009, closed.value
        # The other session carries on.
        b.send(b"still here")
        assert b.recv(timeout=10) == b"still here"
        b.close()
    finally:
        assert p.gateway.stop() == 0


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_cannot_grow_memory(porthole):
    """The backend floods; the client never reads. Porthole must stop reading
    from the backend once its bounded buffers are full: the backend's sends
    block, and Porthole's resident memory stays under a stated bound."""
    p = porthole
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    sent = {"bytes": 0}
    stop = threading.Event()

    def flood():
        conn, _ = srv.accept()
        conn.settimeout(0.5)
        chunk = b"\xaa" * 65536
        with conn:
            while not stop.is_set():
                try:
                    sent["bytes"] += conn.send(chunk)
                except socket.timeout:
                    continue
                except OSError:
                    return

    threading.Thread(target=flood, daemon=True).start()
    token = p.mint("serial", srv.getsockname()[1])["token"]
    before = rss_kib(p.gateway.proc.pid)
    # A raw WebSocket handshake on a socket we then never read from.
    client = socket.socket()
    client.settimeout(10)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.connect(("127.0.0.1", p.public_port))
    client.sendall((f"GET /serial?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert client.recv(12) == b"HTTP/1.1 101"
    try:
        # Let the flood fill every buffer on the way, then watch it stall.
        time.sleep(3)
        stalled_at = sent["bytes"]
        time.sleep(2)
        growth = sent["bytes"] - stalled_at
        grown_kib = rss_kib(p.gateway.proc.pid) - before
        # Bound: the write buffer cap (4 MiB) + one read chunk (64 KiB) + kernel
        # socket buffers on both sides; the flood itself is unbounded.
        print(f"flood stalled at {stalled_at} bytes, then +{growth}; RSS +{grown_kib} KiB")
        assert stalled_at < 48 * 2**20, f"backend sent {stalled_at} bytes into a client that reads nothing"
        assert growth < 2 * 2**20, f"backend kept sending ({growth} bytes in 2 s): no backpressure"
        assert grown_kib < 24 * 1024, f"Porthole grew by {grown_kib} KiB for one stalled session"
    finally:
        stop.set()
        client.close()
        srv.close()


def test_the_console_page_says_why(porthole, backend):
    p = porthole
    expired = expired_token(p, backend.port)
    result = browser("status", f"{p.base}/console?token={expired}", 0)
    assert result["http_status"] == 401 and result["state"] == "expired", result
    result = browser("status", f"{p.base}/console?token=not-a-token", 0)
    assert result["http_status"] == 400 and result["state"] == "refused", result
    result = browser("status", f"{p.base}/console", 0)
    assert result["state"] == "refused", result
    assert backend.accepted == 0
    # A console whose hypervisor does not answer: the page says unavailable.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    result = browser("status", p.mint("novnc", dead_port)["url"], 0)
    assert result["state"] == "unavailable", result


def test_a_hypervisor_that_accepts_and_never_answers_is_cut_at_the_deadline(tmp_path):
    """The VNC console's TCP port accepts, then says nothing: the security
    proxy's handshake deadline (the upgrade deadline, 2 s here) ends the
    session with 1011, and it is counted against the hypervisor."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # the kernel accepts; nobody ever reads or writes
    p = Porthole(tmp_path, websocket="upgrade_timeout_secs = 2")
    try:
        ws = connect(ws_url(p, "vnc", p.mint("novnc", silent.getsockname()[1])["token"]), open_timeout=10)
        started = time.monotonic()
        with pytest.raises(ConnectionClosedError) as closed:
            while True:
                ws.recv(timeout=30)
        elapsed = time.monotonic() - started
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011, closed.value
        assert 1.5 <= elapsed < 2 * 10, f"cut after {elapsed:.1f} s (deadline 2 s)"
        m = p.metrics()
        assert metric_value(m, "porthole_handshake_failures_total", protocol="rfb", reason="hypervisor_timeout",
                            blame="backend") == 1
    finally:
        silent.close()
        assert p.gateway.stop() == 0


def test_a_client_that_stops_reading_is_cut_after_three_silent_ping_intervals(tmp_path):
    """A client that reads nothing (so never answers a ping) holds its session
    for three ping intervals at most (1 s here), then it ends as
    client_unresponsive and is counted; the flooding console is let go."""
    flood = FloodBackend()
    p = Porthole(tmp_path, websocket="ping_interval_secs = 1")
    client = socket.socket()
    client.settimeout(10)
    try:
        token = p.mint("serial", flood.port)["token"]
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.connect(("127.0.0.1", p.public_port))
        client.sendall((f"GET /serial?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        assert client.recv(12) == b"HTTP/1.1 101"
        started = time.monotonic()
        # Never read again. A generous bound: ten times the 3 s it may take.
        while 'reason="client_unresponsive"' not in p.log():
            assert time.monotonic() - started < 30, p.log()[-2000:]
            time.sleep(0.2)
        assert time.monotonic() - started >= 2.5, "cut before three ping intervals"
        m = p.metrics()
        assert metric_value(m, "porthole_sessions_ended_total", console="serial", reason="client_unresponsive") == 1
    finally:
        client.close()
        flood.close()
        assert p.gateway.stop() == 0
