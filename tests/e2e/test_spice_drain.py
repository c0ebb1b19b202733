"""A spice-server crash any user could trigger (issue #10 item 10), against
real QEMU 7.2: a client that links the main channel, links a display channel,
reads nothing and closes it kills the VM (SIGSEGV in spice-server's worker).
Through Porthole the same pattern leaves the VM alive: the display
channel's hypervisor side is drained (DISPLAY_INIT sent for the client,
SET_ACK and ACKs answered) until the session ends, and the drain then ends
too: when the client closes its main channel, when an operator ends the
session, on the native listener and on the spice-html5 WebSocket."""

import json
import re
import signal
import socket
import struct
import time

from harness import http, metric_value
from screen import seabios_screen
from spice_client import spicy_capture
from spice_wire import DISPLAY, MAIN, Channel, WsChannel
from support import Porthole


def porthole_for(tmp_path, vm):
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password)
    # A short grace, so an end that needs it is seen well within the bounds below.
    return Porthole(tmp_path, spice="drain_grace_secs = 2",
                    backend_extra=f'[backends.spice]\npassword_file = "{pw}"\nca = "{vm.spice_ca}"')


def drains(p, end):
    return metric_value(p.metrics(), "porthole_spice_display_drains_total", end=end) or 0


def drains_active(p):
    m = re.search(r"^porthole_spice_display_drains_active (\S+)$", p.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(what, check, p, timeout=30):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s:\n{p.log()[-3000:]}"
        time.sleep(0.1)


def alive_for(vm, secs):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if vm.proc.poll() is not None:
            return False
        time.sleep(0.1)
    return True


def ended_drains(p):
    return sum(drains(p, end) for end in ("hypervisor_closed", "grace_over", "deadline", "malformed", "io_error"))


def test_directly_a_display_channel_closed_unread_kills_qemu(spice_vm):
    """The reproduction, no Porthole: this is what Porthole must not pass on."""
    vm = spice_vm
    main = Channel(vm.spice_port)
    assert main.open(MAIN, vm.spice_password) == "OK"
    session = main.session_id()
    display = Channel(vm.spice_port)
    assert display.open(DISPLAY, vm.spice_password, connection_id=session) == "OK"
    display.close()
    deadline = time.monotonic() + 10
    while vm.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vm.proc.returncode == -signal.SIGSEGV, f"QEMU did not crash: {vm.proc.returncode}"
    main.close()


def test_through_porthole_a_dropped_display_is_drained_until_its_session_ends(spice_vm, tmp_path):
    vm = spice_vm
    p = porthole_for(tmp_path, vm)
    try:
        def ticket():
            token = p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
            return p.spice_details(token)["ticket"]

        # 1. Native: main linked, display linked, nothing read, display closed.
        t = ticket()
        main = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert main.open(MAIN, t) == "OK"
        session = main.session_id()
        display = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert display.open(DISPLAY, t, connection_id=session) == "OK"
        display.close()
        wait_for("a drain", lambda: drains_active(p) == 1, p)
        assert "spice display channel drained after its client left" in p.log()
        # The drain lasts while the session does (the VM alive all along).
        assert alive_for(vm, 3), f"QEMU died ({vm.proc.returncode}) with the display drained"
        assert drains_active(p) == 1 and ended_drains(p) == 0
        # The client ends its session: the hypervisor closes the display, the drain ends.
        main.close()
        wait_for("the drain's end", lambda: ended_drains(p) == 1, p)
        assert drains_active(p) == 0
        assert alive_for(vm, 2), f"QEMU died ({vm.proc.returncode}) after the drain"

        # 2. Native again; this time an operator ends the session mid-drain.
        t = ticket()
        main = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert main.open(MAIN, t) == "OK"
        session = main.session_id()
        display = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert display.open(DISPLAY, t, connection_id=session) == "OK"
        display.close()
        wait_for("a second drain", lambda: drains_active(p) == 1, p)
        listed = p.admin("GET", "/v1/sessions?type=spice-direct")[1]["sessions"]
        assert len(listed) == 1, listed
        status, answer = p.admin("DELETE", f"/v1/sessions/{listed[0]['id']}?reason=drain-test")
        assert status == 200, answer
        wait_for("the second drain's end", lambda: ended_drains(p) == 2, p)
        assert alive_for(vm, 2), f"QEMU died ({vm.proc.returncode}) after a terminate"
        main.close()

        # 3. spice-html5's WebSocket: the same pattern.
        token = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        status, body = http("POST", f"{p.base}/spice-ticket?token={token}")[:2]
        assert status == 200, body
        t = json.loads(body)["ticket"]
        main = WsChannel(p, token)
        assert main.open(MAIN, t) == "OK"
        session = main.session_id()
        display = WsChannel(p, token)
        assert display.open(DISPLAY, t, connection_id=session) == "OK"
        display.close()
        wait_for("a browser drain", lambda: drains_active(p) == 1, p)
        assert alive_for(vm, 3), f"QEMU died ({vm.proc.returncode}) with a browser display drained"
        main.close()
        wait_for("the browser drain's end", lambda: ended_drains(p) == 3, p)

        assert drains(p, "not_drainable") == 0
        log = p.log()
        assert log.count("spice display drain ended") == 3, log[-3000:]
        assert vm.spice_password not in log

        # A later client gets the VM's screen through Porthole (its own display
        # channel is drained briefly too, when it exits).
        shot = spicy_capture(tmp_path / "after.png", "127.0.0.1", ticket(), tls_port=p.spice_tls_port,
                             ca_file=p.spice_ca)
        seabios_screen(shot)
        assert alive_for(vm, 2), f"QEMU died ({vm.proc.returncode}) after a real client"
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


def reset(channel):
    """Closes a channel's TCP connection with a reset, as a killed client's
    kernel does (no close_notify, no WebSocket close)."""
    sock = channel.ws.socket if isinstance(channel, WsChannel) else channel.sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_through_porthole_a_display_link_cut_short_never_kills_qemu(spice_vm, tmp_path):
    """The display channel's link is a race too: Porthole links the
    hypervisor's side after the client sent its ticket, so a client that
    leaves in that moment (a page closed mid-link, CI's stop 29 at four
    workers) or a session that ends in it (the main channel closed) leaves
    Porthole holding a display channel spice-server has just linked. Closing
    it is the crash above; Porthole drains it instead. Native and
    spice-html5, the display's own connection reset as its ticket goes, and
    the main channel reset a few milliseconds later."""
    vm = spice_vm
    p = porthole_for(tmp_path, vm)
    try:
        def opened(kind):
            token = p.mint(kind, vm.spice_port, tls_port=vm.spice_tls_port)["token"]
            if kind == "spice-direct":
                t = p.spice_details(token)["ticket"]
                channel = lambda: Channel(p.spice_tls_port, ca=p.spice_ca)  # noqa: E731
            else:
                status, body = http("POST", f"{p.base}/spice-ticket?token={token}")[:2]
                assert status == 200, body
                t = json.loads(body)["ticket"]
                channel = lambda: WsChannel(p, token)  # noqa: E731
            main = channel()
            assert main.open(MAIN, t) == "OK"
            session = main.session_id()
            display = channel()
            error, key = display.link(DISPLAY, connection_id=session)
            assert error == "OK", error
            return main, display, key, t

        rounds = 0
        for kind in ("spice-direct", "spice-html5"):
            # The display's client leaves as its ticket goes: Porthole's
            # link reply finds it gone, the hypervisor's side is linked.
            for _ in range(4):
                main, display, key, t = opened(kind)
                display.send_ticket(key, t)
                reset(display)
                assert alive_for(vm, 1), f"QEMU died ({vm.proc.returncode}): {kind}, display reset mid-link"
                main.close()
                rounds += 1
                wait_for("the session's end", lambda: not p.admin("GET", "/v1/sessions")[1]["sessions"], p)
            # The main channel ends while the display links: the session
            # stops with the link on the hypervisor's side in flight.
            for delay_ms in (0, 2, 5, 10, 20):
                main, display, key, t = opened(kind)
                display.send_ticket(key, t)
                time.sleep(delay_ms / 1000)
                reset(main)
                assert alive_for(vm, 1), \
                    f"QEMU died ({vm.proc.returncode}): {kind}, main reset {delay_ms} ms into the display's link"
                display.close()
                rounds += 1
                wait_for("the session's end", lambda: not p.admin("GET", "/v1/sessions")[1]["sessions"], p)
        assert alive_for(vm, 2), f"QEMU died ({vm.proc.returncode}) after {rounds} cut links"
        # At least the resets after the hypervisor accepted the ticket were drained.
        assert drains(p, "not_drainable") == 0
        wait_for("every drain's end", lambda: drains_active(p) == 0, p)
        # And a real client still gets the VM's screen.
        shot = spicy_capture(tmp_path / "after.png", "127.0.0.1", p.spice_details(
            p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"])["ticket"],
            tls_port=p.spice_tls_port, ca_file=p.spice_ca)
        seabios_screen(shot)
        assert alive_for(vm, 1)
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


# DISPLAY_INIT as spice-gtk sends it, then a message spice-server cannot parse.
DISPLAY_INIT = struct.pack("<HI", 101, 14) + bytes([1]) + bytes(13)
UNKNOWN_TYPE = struct.pack("<HIB", 999, 1, 0)
NO_COMPRESSION_BYTE = struct.pack("<HI", 103, 0)
FLUSH_MARK = struct.pack("<HI", 4, 0)


def test_directly_a_migration_flush_mark_on_the_main_channel_aborts_qemu(spice_vm):
    """No Porthole: MIGRATE_FLUSH_MARK outside a migration is an assertion
    in spice-server, on any channel."""
    vm = spice_vm
    main = Channel(vm.spice_port)
    assert main.open(MAIN, vm.spice_password) == "OK"
    main.session_id()
    main.send(FLUSH_MARK)
    deadline = time.monotonic() + 10
    while vm.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vm.proc.returncode is not None and vm.proc.returncode < 0, f"QEMU lives: {vm.proc.returncode}"


def test_directly_an_unparsable_display_message_kills_qemu(spice_vm):
    """spice-server drops a display channel whose client sends a message it
    cannot parse, and the drop is the same crash: no Porthole here."""
    vm = spice_vm
    main = Channel(vm.spice_port)
    assert main.open(MAIN, vm.spice_password) == "OK"
    display = Channel(vm.spice_port)
    assert display.open(DISPLAY, vm.spice_password, connection_id=main.session_id()) == "OK"
    display.send(DISPLAY_INIT + UNKNOWN_TYPE)
    deadline = time.monotonic() + 10
    while vm.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vm.proc.returncode == -signal.SIGSEGV, f"QEMU did not crash: {vm.proc.returncode}"
    main.close()


def test_through_porthole_unparsable_display_messages_never_reach_qemu(spice_vm, tmp_path):
    """Porthole checks every client display message before the hypervisor
    sees it: one spice-server could not parse ends the client's display
    channel there (the channel is drained), the session and the VM go on.
    On the native listener and on the spice-html5 WebSocket, the bad message
    whole or cut into pieces."""
    vm = spice_vm
    p = porthole_for(tmp_path, vm)
    try:
        def refused(why):
            return metric_value(p.metrics(), "porthole_spice_messages_refused_total", why=why) or 0

        def ticket(kind):
            token = p.mint(kind, vm.spice_port, tls_port=vm.spice_tls_port)["token"]
            if kind == "spice-direct":
                return token, p.spice_details(token)["ticket"]
            status, body = http("POST", f"{p.base}/spice-ticket?token={token}")[:2]
            assert status == 200, body
            return token, json.loads(body)["ticket"]

        cases = [
            ("spice-direct", [DISPLAY_INIT + UNKNOWN_TYPE], "not a message this channel's clients send"),
            ("spice-direct", [DISPLAY_INIT + NO_COMPRESSION_BYTE[:3], NO_COMPRESSION_BYTE[3:]],
             "shorter than its fields"),
            ("spice-html5", [DISPLAY_INIT, UNKNOWN_TYPE[:4], UNKNOWN_TYPE[4:]], "not a message this channel's clients send"),
        ]
        for n, (kind, sends, why) in enumerate(cases, start=1):
            token, t = ticket(kind)
            channel = (lambda: Channel(p.spice_tls_port, ca=p.spice_ca)) if kind == "spice-direct" \
                else (lambda: WsChannel(p, token))
            main = channel()
            assert main.open(MAIN, t) == "OK"
            display = channel()
            assert display.open(DISPLAY, t, connection_id=main.session_id()) == "OK"
            for piece in sends:
                display.send(piece)
                time.sleep(0.2)
            assert display.closed(timeout=10), "Porthole ends the client's display channel"
            assert alive_for(vm, 3), f"QEMU died ({vm.proc.returncode}): {why} reached it"
            assert refused(why) >= 1, p.log()[-3000:]
            # The session goes on: its main channel is still open and listed.
            assert not main.closed(timeout=1)
            assert len(p.admin("GET", "/v1/sessions")[1]["sessions"]) == 1
            main.close()
            wait_for("the drain's end", lambda: ended_drains(p) == n, p)
        assert "spice channel ended" in p.log() and "not passed on" in p.log()

        # Any channel: a migration flush mark, which aborts QEMU outright.
        _, t = ticket("spice-direct")
        main = Channel(p.spice_tls_port, ca=p.spice_ca)
        assert main.open(MAIN, t) == "OK"
        main.session_id()
        main.send(FLUSH_MARK)
        assert main.closed(timeout=10), "Porthole ends the main channel"
        assert alive_for(vm, 3), f"QEMU died ({vm.proc.returncode}): the flush mark reached it"
        assert refused("migration (Porthole does not migrate sessions)") == 1

        # And a real client still gets the VM's screen.
        shot = spicy_capture(tmp_path / "after.png", "127.0.0.1", ticket("spice-direct")[1],
                             tls_port=p.spice_tls_port, ca_file=p.spice_ca)
        seabios_screen(shot)
        assert alive_for(vm, 1)
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]
