"""Liveness: a browser client is alive while it drains what it is sent.

A client that stops reading but sends pongs nobody asked for does not keep
an exclusive console (QEMU's serial port) from the next user; a client that
reads slowly while the console floods it keeps its session, whatever its
pongs do. Ping intervals of 1-2 s here, so deadlines of 3-6 s; bounds are
generous multiples of them."""

import os
import socket
import time

from websockets.sync.client import connect

from harness import metric_value
from support import FloodBackend, Porthole


def upgrade(p, endpoint, token, rcvbuf=None):
    """A raw WebSocket client that has read nothing past the 101 line."""
    client = socket.socket()
    client.settimeout(10)
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect(("127.0.0.1", p.public_port))
    client.sendall((f"GET /{endpoint}?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert client.recv(12) == b"HTTP/1.1 101"
    return client


def masked_frame(opcode, payload):
    """A client frame (masked, as RFC 6455 requires), FIN set."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def test_a_client_that_never_reads_loses_the_serial_console_despite_unsolicited_pongs(tmp_path, vm):
    vm.wait_for_serial()
    p = Porthole(tmp_path, websocket="ping_interval_secs = 1")
    holder = None
    try:
        holder = upgrade(p, "serial", p.mint("serial", vm.serial_port)["token"], rcvbuf=4096)
        started = time.monotonic()
        # Pongs every 0.3 s, answering nothing; never a read.
        while 'reason="client_unresponsive"' not in p.log():
            assert time.monotonic() - started < 30, p.log()[-3000:]
            holder.sendall(masked_frame(0xA, b"alive"))
            time.sleep(0.3)
        assert time.monotonic() - started >= 2.5, "cut before three ping intervals"
        assert metric_value(p.metrics(), "porthole_sessions_ended_total", console="serial",
                            reason="client_unresponsive") == 1
        # The console is free for the next user, who gets QEMU's serial port.
        url = f"ws://127.0.0.1:{p.public_port}/serial?token={p.mint('serial', vm.serial_port)['token']}"
        with connect(url, open_timeout=10):
            status, listed = p.admin("GET", "/v1/sessions")
            assert status == 200 and [s["console"] for s in listed["sessions"]] == ["serial"], listed
    finally:
        if holder:
            holder.close()
        assert p.gateway.stop() == 0


def test_a_slow_reader_under_a_flood_keeps_its_session(tmp_path):
    """20 kB/s against a console that floods: its pongs are late (or, here,
    never sent), yet it drains, so it is alive; the old rule (answer a ping
    within three intervals) cut it after 6 s. Ping interval 2 s: the kernel
    tells a writer there is room once half its 64 KiB of unsent bytes left,
    every 1.6 s at this pace."""
    flood = FloodBackend()
    p = Porthole(tmp_path, websocket="ping_interval_secs = 2")
    client = None
    try:
        client = upgrade(p, "serial", p.mint("serial", flood.port)["token"], rcvbuf=16 * 1024)
        client.settimeout(5)
        started = time.monotonic()
        received = 0
        # Over two deadlines' worth of slow reading: 2 kB every 0.1 s.
        while time.monotonic() - started < 14:
            chunk = client.recv(2048)
            assert chunk, "Porthole closed the slow reader: " + p.log()[-3000:]
            received += len(chunk)
            time.sleep(0.1)
        assert received > 50_000, received
        assert 'reason="client_unresponsive"' not in p.log(), p.log()[-3000:]
        assert len(p.admin("GET", "/v1/sessions")[1]["sessions"]) == 1
    finally:
        if client:
            client.close()
        flood.close()
        assert p.gateway.stop() == 0
