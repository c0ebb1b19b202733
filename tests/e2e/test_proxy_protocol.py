"""Real client addresses behind a TCP balancer: Debian's HAProxy in TCP mode
with send-proxy-v2 in front of Porthole's public listener and its native
SPICE TLS listener. The test client connects from 127.0.0.5; HAProxy
connects to Porthole from 127.0.0.1 (the only trusted proxy). Porthole's
session list, audit trail and log name 127.0.0.5, never HAProxy, and name
the node. The same through a dual-stack ([::]) public listener, which sees
HAProxy as ::ffff:127.0.0.1."""

import json
import socket
import urllib.parse

import pytest
from websockets.sync.client import connect as ws_connect

from harness import free_port
from peers import HAProxy, Route
from spice_wire import MAIN, Channel
from support import EchoBackend, Porthole, get_from, wait_for

CLIENT = "127.0.0.5"
NODE = "e2e-node-a"


@pytest.fixture
def behind_haproxy(spice_vm, tmp_path):
    """Porthole (node NODE, PROXY headers expected from 127.0.0.1 on its
    public and SPICE listeners) behind HAProxy; the VM's SPICE password in its backend."""
    vm = spice_vm
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password + "\n")
    p = Porthole(tmp_path,
                 listen_extra='trusted_proxies = ["127.0.0.1/32"]\nproxy_protocol = true',
                 spice="proxy_protocol = true",
                 backend_extra="\n".join(["[backends.spice]", f'password_file = "{pw}"',
                                          f'ca = "{vm.spice_ca}"', "[node]", f'name = "{NODE}"']))
    public_front, spice_front = free_port(), free_port()
    lb = HAProxy(tmp_path, {"public": Route(public_front, [p.public_port]),
                            "spice": Route(spice_front, [p.spice_tls_port])})
    try:
        yield vm, p, public_front, spice_front
    finally:
        lb.stop()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def serial_sessions_through(p, front):
    """A serial console WebSocket from CLIENT through HAProxy's frontend at
    `front`, echoed; the serial sessions Porthole lists while it is open."""
    echo = EchoBackend()
    try:
        token = p.mint("serial", echo.port)["token"]
        sock = socket.create_connection(("127.0.0.1", front), timeout=10, source_address=(CLIENT, 0))
        with ws_connect(f"ws://127.0.0.1:{front}/serial?token={urllib.parse.quote(token)}", sock=sock,
                        origin=p.base, subprotocols=["binary"], open_timeout=10) as ws:
            ws.send(b"hello")
            assert ws.recv(timeout=10) == b"hello"
            status, listed = p.admin("GET", "/v1/sessions")
            assert status == 200, listed
            return [s for s in listed["sessions"] if s["console"] == "serial"]
    finally:
        echo.close()


def test_haproxy_passes_the_client_address_to_every_listener(behind_haproxy):
    vm, p, public_front, spice_front = behind_haproxy

    # Public listener: a serial console WebSocket from CLIENT through HAProxy.
    [serial] = serial_sessions_through(p, public_front)
    assert serial["client"] == CLIENT and serial["node"] == NODE, serial

    # The ticket exchange through HAProxy, then the SPICE main channel through
    # HAProxy's TCP frontend to the TLS listener, both from CLIENT.
    token = p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
    status, body = get_from(CLIENT, public_front, f"/spice-direct?format=json&token={urllib.parse.quote(token)}")
    assert status == 200, body
    ticket = json.loads(body)["ticket"]
    main = Channel(spice_front, ca=p.spice_ca, source=CLIENT)
    try:
        assert main.open(MAIN, ticket) == "OK"
        assert main.session_id() != 0
        listed = wait_for(lambda: [s for s in p.admin("GET", "/v1/sessions")[1]["sessions"]
                                   if s["console"] == "spice-direct"], "the SPICE session is listed")
        assert [(s["client"], s["node"]) for s in listed] == [(CLIENT, NODE)], listed
    finally:
        main.close()

    # The audit trail and the log name the client and the node, never HAProxy.
    started = wait_for(lambda: [e for e in p.audit() if e["event"] == "session_started"], "audited")
    assert {e["console"] for e in started} == {"serial", "spice-direct"}, started
    for e in started:
        assert e["client"] == CLIENT and e["node"] == NODE, e
    assert all(e.get("node") == NODE for e in p.audit()), p.audit()
    log = p.wait_for_log(f"node={NODE}")
    assert f"client={CLIENT}" in log or f'client="{CLIENT}"' in log, log[-3000:]
    # Every session line names the client behind HAProxy, none HAProxy's own address.
    session_lines = [line for line in log.splitlines() if "session=" in line and "client=" in line]
    assert session_lines and all("client=127.0.0.1" not in line for line in session_lines), log[-3000:]
    assert f'porthole_node_info{{node="{NODE}"}} 1' in p.metrics()


def test_without_a_header_a_trusted_address_is_refused_and_an_untrusted_one_is_served(behind_haproxy):
    """Straight to Porthole: from 127.0.0.1 (trusted, so a header is owed)
    the request goes unanswered; from CLIENT (untrusted) it is an ordinary client."""
    _vm, p, _public_front, _spice_front = behind_haproxy
    s = socket.create_connection(("127.0.0.1", p.public_port), timeout=10)
    s.sendall(b"GET /console HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        # Closed unanswered (reset, as the request was never read).
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    s.close()
    status, _ = get_from(CLIENT, p.public_port, "/console")
    assert status == 401
    assert 'reason="proxy_header_missing"' in p.metrics()


def test_a_dual_stack_listener_trusts_haproxy_connecting_over_ipv4(tmp_path):
    """Porthole's public listener on [::] (dual stack): HAProxy's IPv4
    connections arrive as ::ffff:127.0.0.1, which is the trusted
    127.0.0.1/32 all the same (before session 23, every connection through
    it was refused for a missing header: the PROXY header of an untrusted
    peer is not read). The session names the client behind HAProxy, in its
    IPv4 form."""
    p = Porthole(tmp_path, public_address="[::]",
                 listen_extra='trusted_proxies = ["127.0.0.1/32"]\nproxy_protocol = true')
    front = free_port()
    lb = HAProxy(tmp_path, {"public": Route(front, [p.public_port])})
    try:
        listed = serial_sessions_through(p, front)
        assert [s["client"] for s in listed] == [CLIENT], listed
        started = wait_for(lambda: [e for e in p.audit() if e["event"] == "session_started"], "audited")
        assert [e["client"] for e in started] == [CLIENT], started
        assert 'reason="proxy_header_missing"' not in p.metrics()
    finally:
        lb.stop()
        assert p.gateway.stop() == 0, p.log()[-3000:]
