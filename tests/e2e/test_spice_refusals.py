"""SPICE refusals end to end, against real QEMU: tickets that are expired,
reused, for another console type or for another session, junk and oversized
link messages from a client and from a hypervisor, and the plain port's
NEED_SECURED. Each gets its SPICE link error code, a logged reason and a
counter; a good session keeps working beside them."""

import socket
import struct
import time

import pytest

from harness import free_port, http, metric_value
from screen import seabios_screen
from spice_client import spicy_capture
from spice_wire import DISPLAY, INPUTS, MAIN, Channel, link_mess
from support import FakeServer, Porthole


def porthole_for(tmp_path, vm, spice=""):
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password)
    return Porthole(tmp_path, spice=spice, backend_extra=f'[backends.spice]\npassword_file = "{pw}"\nca = "{vm.spice_ca}"')


def refusals(p, reason):
    return metric_value(p.metrics(), "porthole_spice_link_refusals_total", reason=reason, blame="client") or 0


def test_tickets_are_bound_to_one_session_and_refused_otherwise(spice_vm, tmp_path):
    vm = spice_vm
    plain_port = free_port()
    p = porthole_for(tmp_path, vm, spice=f'ticket_ttl_secs = 5\nlisten_plain = "127.0.0.1:{plain_port}"')
    try:
        def ticket(kind="spice-direct"):
            token = p.mint(kind, vm.spice_port, tls_port=vm.spice_tls_port)["token"]
            return p.spice_details(token)["ticket"] if kind == "spice-direct" else token

        expiring = ticket()
        issued_at = time.monotonic()
        a, b = ticket(), ticket()

        # Session A: its main channel opens it; QEMU names it in INIT.
        main_a = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert main_a.open(MAIN, a) == "OK"
        session_a = main_a.session_id()
        assert session_a != 0
        # Its channels join with its id.
        inputs_a = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert inputs_a.open(INPUTS, a, connection_id=session_a) == "OK"
        # The ticket opens one session only.
        assert Channel(p.spice_tls_port, ca=p.spice_ca).open(MAIN, a) == "PERMISSION_DENIED"
        # Ticket B names session A's id before having a session of its own...
        assert Channel(p.spice_tls_port, ca=p.spice_ca).open(DISPLAY, b, connection_id=session_a) == "BAD_CONNECTION_ID"
        # ...and after opening its own (same VM: spice-server itself would take it).
        main_b = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert main_b.open(MAIN, b) == "OK"
        session_b = main_b.session_id()
        assert session_b != session_a
        assert Channel(p.spice_tls_port, ca=p.spice_ca).open(DISPLAY, b, connection_id=session_a) == "BAD_CONNECTION_ID"
        # (An inputs channel: QEMU 7.2's spice-server crashes when a display
        # channel that never read anything is closed; spicy reads and is fine.)
        inputs_b = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert inputs_b.open(INPUTS, b, connection_id=session_b) == "OK"
        # A main channel naming a session (a migration target) is refused.
        assert Channel(p.spice_tls_port, ca=p.spice_ca).open(MAIN, b, connection_id=session_b) == "BAD_CONNECTION_ID"
        # Made-up tickets and other console types' tickets.
        assert Channel(p.spice_tls_port, ca=p.spice_ca).open(MAIN, "not-a-ticket") == "PERMISSION_DENIED"
        html5_token = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        status, body = http("POST", f"{p.base}/spice-ticket?token={html5_token}")
        assert status == 200, body
        import json
        html5_ticket = json.loads(body)["ticket"]
        assert Channel(p.spice_tls_port, ca=p.spice_ca).open(MAIN, html5_ticket) == "PERMISSION_DENIED"
        # A novnc token gets no SPICE ticket at all.
        novnc = p.mint("novnc", vm.spice_port)["token"]
        status, body = http("GET", f"{p.base}/spice-direct?format=json&token={novnc}")
        assert status == 403 and "refused" in body, (status, body)
        for c in (main_a, inputs_a, main_b, inputs_b):
            c.close()

        # The plain listener only ever says NEED_SECURED, before any ticket.
        plain = Channel(plain_port)
        assert plain.link(MAIN)[0] == "NEED_SECURED"

        # An unused ticket dies after its time-to-live (5 s here; whole seconds).
        time.sleep(max(0.0, 6.1 - (time.monotonic() - issued_at)))
        assert Channel(p.spice_tls_port, ca=p.spice_ca).open(MAIN, expiring) == "PERMISSION_DENIED"

        # A good session still works, through a real client.
        shot = spicy_capture(tmp_path / "after.png", "127.0.0.1", ticket(), tls_port=p.spice_tls_port,
                             ca_file=p.spice_ca)
        seabios_screen(shot)

        log = p.log()
        for reason in ("ticket_used", "no_session", "foreign_session", "migration_target_refused",
                       "ticket_unknown", "wrong_console_type", "ticket_expired"):
            assert f'reason="{reason}"' in log, f"{reason} not logged"
            assert refusals(p, reason) >= 1, f"{reason} not counted"
        assert refusals(p, "need_secured") == 1
        assert vm.spice_password not in log
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_junk_and_oversized_link_messages_get_their_codes(spice_vm, tmp_path):
    p = porthole_for(tmp_path, spice_vm)
    try:
        c = Channel(p.spice_tls_port, ca=p.spice_ca)
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.reply()[0] == "INVALID_MAGIC"
        assert c.closed()

        # A 1 GiB body announced (CVE-2016-9578 was a link-header size): refused
        # from the header alone, without waiting for or buffering the body.
        c = Channel(p.spice_tls_port, ca=p.spice_ca)
        c.send(b"REDQ" + struct.pack("<III", 2, 2, 1 << 30))
        assert c.reply()[0] == "INVALID_DATA"

        # Capability counts past the cap (16 words; spice-server allows 1024).
        c = Channel(p.spice_tls_port, ca=p.spice_ca)
        body = struct.pack("<IBBIII", 0, MAIN, 0, 5000, 0, 18)
        c.send(b"REDQ" + struct.pack("<III", 2, 2, len(body)) + body)
        assert c.reply()[0] == "INVALID_DATA"

        # Capabilities said to lie outside the message.
        c = Channel(p.spice_tls_port, ca=p.spice_ca)
        body = struct.pack("<IBBIII", 0, MAIN, 0, 1, 1, 100) + b"\0" * 8
        c.send(b"REDQ" + struct.pack("<III", 2, 2, len(body)) + body)
        assert c.reply()[0] == "INVALID_DATA"

        # A wrong major version.
        c = Channel(p.spice_tls_port, ca=p.spice_ca)
        c.send(b"REDQ" + struct.pack("<III", 3, 2, 0))
        assert c.reply()[0] == "VERSION_MISMATCH"

        # Truncated: half a link message, then silence. Cut at the deadline
        # (10 s by default; generous bound).
        c = Channel(p.spice_tls_port, ca=p.spice_ca, timeout=30)
        c.send(link_mess(MAIN)[:20])
        assert c.closed(timeout=30)

        for reason in ("bad_magic", "oversized_link_message", "malformed_link_message", "version_mismatch",
                       "handshake_timeout"):
            assert refusals(p, reason) >= 1, f"{reason} not counted"
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


class JunkHypervisor(FakeServer):
    """A 'hypervisor' that answers every link with the given bytes."""

    def __init__(self, answer):
        self.answer = answer
        super().__init__(backlog=8)

    def handle(self, conn):
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(4096)
                conn.sendall(self.answer)
                time.sleep(0.5)
            except OSError:
                pass


@pytest.mark.parametrize("answer,reason", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "bad_magic"),
    (b"REDQ" + struct.pack("<III", 2, 2, 0x7FFFFFFF), "oversized_link_message"),
    (b"REDQ" + struct.pack("<III", 2, 2, 178) + b"\0" * 20, "hypervisor_closed"),  # truncated, then closed
])
def test_a_hypervisor_sending_junk_gets_the_client_a_generic_error(tmp_path, answer, reason):
    hv = JunkHypervisor(answer)
    p = Porthole(tmp_path)
    try:
        token = p.mint("spice-direct", hv.port)["token"]
        ticket = p.spice_details(token)["ticket"]
        c = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert c.open(MAIN, ticket) == "ERROR"
        m = p.metrics()
        assert metric_value(m, "porthole_spice_link_refusals_total", reason=reason, blame="backend") == 1
        assert f'reason="{reason}"' in p.log()
    finally:
        hv.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_listener_held_to_tls13_refuses_tls12_clients(tmp_path):
    import ssl
    p = Porthole(tmp_path, spice='tls_min_version = "1.3"')
    try:
        old = ssl.create_default_context(cafile=str(p.spice_ca))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            with socket.create_connection(("127.0.0.1", p.spice_tls_port), timeout=10) as raw:
                old.wrap_socket(raw, server_hostname="127.0.0.1")
        Channel(p.spice_tls_port, ca=p.spice_ca).close()  # TLS 1.3 clients get in
        deadline = time.monotonic() + 10
        while "spice tls handshake failed" not in p.log():
            assert time.monotonic() < deadline, p.log()[-2000:]
            time.sleep(0.05)
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_balancers_health_check_is_counted_not_logged_and_junk_still_is(tmp_path):
    """HAProxy's TCP check connects and closes without a byte, every few
    seconds per node: counted (closed_silently), logged only at debug. A
    client that sends something that is not TLS is still a logged refusal."""
    from support import wait_for
    p = Porthole(tmp_path)
    try:
        for _ in range(3):
            socket.create_connection(("127.0.0.1", p.spice_tls_port), timeout=5).close()
        junk = socket.create_connection(("127.0.0.1", p.spice_tls_port), timeout=5)
        junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
        junk.recv(100)
        junk.close()
        wait_for(lambda: refusals(p, "closed_silently") == 3 and refusals(p, "tls_handshake") == 1,
                 "the checks and the junk were not counted")
        assert p.log().count("spice tls handshake failed") == 1, p.log()[-2000:]
    finally:
        assert p.gateway.stop() == 0, p.log()
