"""SPICE-direct end to end: a native SPICE client (spice-gtk's
spicy-screenshot) exchanges a spice-direct token for a ticket, links every
channel through Porthole's TLS listener, and sees the VM's screen, while
Porthole holds the hypervisor's password and TLS trust."""

import re

import pytest

from harness import metric_value
from screen import differing_fraction, seabios_screen
from spice_client import spicy_capture, wait_for_final_spice_screen
from support import Porthole


def wait_for(condition, p, within=20):
    """Log lines are written as sessions progress: wait (a bounded while) for one."""
    import time
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, p.log()[-2000:]
        time.sleep(0.05)


def spice_porthole(tmp_path, vm, tls=True, prefer=None, channels=None):
    """A Porthole whose loopback backend holds the VM's SPICE password (and,
    with tls, the VM's CA, so Porthole links over QEMU's TLS port);
    channels: the backend's `[backends.spice] channels`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password + "\n")
    lines = ["[backends.spice]", f'password_file = "{pw}"']
    if tls:
        lines.append(f'ca = "{vm.spice_ca}"')
    if prefer:
        lines.append(f'prefer = "{prefer}"')
    if channels is not None:
        lines.append("channels = [" + ", ".join(f'"{c}"' for c in channels) + "]")
    return Porthole(tmp_path, backend_extra="\n".join(lines))


def test_a_native_client_sees_the_vm_through_porthole_with_a_ticket(spice_vm, tmp_path):
    vm = spice_vm
    p = spice_porthole(tmp_path, vm)
    try:
        direct = wait_for_final_spice_screen(vm, tmp_path)
        token = p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        details = p.spice_details(token)
        assert details["host"] == "127.0.0.1" and details["tls_port"] == p.spice_tls_port, details
        assert "port" not in details, "no clear SPICE port is offered"
        assert details["ca"].startswith("-----BEGIN CERTIFICATE-----")
        ticket = details["ticket"]
        assert len(ticket) < 60 and ticket != vm.spice_password
        shot = spicy_capture(tmp_path / "through.png", "127.0.0.1", ticket, tls_port=p.spice_tls_port,
                             ca_file=p.spice_ca, debug=True)
        seabios_screen(shot)
        diff = differing_fraction(direct, shot)
        assert diff <= 0.01, f"through Porthole differs from the direct capture in {diff:.2%} of pixels"
        log = p.log()
        assert "spice channel linked" in log and 'channel="main"' in log or "channel=main" in log, log[-3000:]
        # Porthole linked upstream over QEMU's TLS port, with the VM's CA.
        assert vm.spice_password not in log and ticket not in log and token not in log
        # The ticket opened one session; it is dead now.
        with pytest.raises(AssertionError, match="ERROR_AUTH"):
            spicy_capture(tmp_path / "again.png", "127.0.0.1", ticket, tls_port=p.spice_tls_port,
                          ca_file=p.spice_ca)
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_channel_the_operator_does_not_permit_is_refused_and_the_client_keeps_the_rest(spice_vm, tmp_path):
    """`[backends.spice] channels` without usbredir: spicy-screenshot's USB
    redirection channel (this VM offers one) is refused at its link with
    CHANNEL_NOT_AVAILABLE, logged and counted, and the client still shows the
    VM's screen as a direct capture does."""
    vm = spice_vm
    p = spice_porthole(tmp_path, vm, channels=["main", "display", "cursor", "inputs"])
    try:
        direct = wait_for_final_spice_screen(vm, tmp_path)
        ticket = p.spice_details(p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"])["ticket"]
        shot = spicy_capture(tmp_path / "through.png", "127.0.0.1", ticket, tls_port=p.spice_tls_port,
                             ca_file=p.spice_ca, debug=True)
        diff = differing_fraction(direct, shot)
        assert diff <= 0.01, f"through Porthole differs from the direct capture in {diff:.2%} of pixels"
        client = (tmp_path / "through.log").read_text()
        assert re.search(r"usbredir-9:\d+: link result: reply 9", client), client[-3000:]
        assert re.search(r"display-2:\d+: channel up", client), client[-3000:]
        refused = re.findall(r"permits no (\w+) channel .*reason=\"channel_not_permitted\"", p.log())
        assert "usbredir" in refused and not {"main", "display"} & set(refused), refused
        counted = metric_value(p.metrics(), "porthole_spice_link_refusals_total",
                               reason="channel_not_permitted", blame="client")
        assert counted == len(refused), (counted, refused)
    finally:
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_hypervisor_that_demands_tls_gets_it_and_one_without_a_ca_gets_plain(tmp_path):
    """QEMU with tls-channel=default answers NEED_SECURED on its plain port:
    Porthole, told to try plain first, moves to the TLS port. Without a CA for
    the backend, Porthole links over the plain port only."""
    from vm import VM
    folder = tmp_path / "vm"
    folder.mkdir()
    vm = VM(folder, spice=True, spice_extra_channels=False, spice_options="tls-channel=default")
    plain_first = spice_porthole(tmp_path / "a", vm, prefer="plain")
    try:
        token = plain_first.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        ticket = plain_first.spice_details(token)["ticket"]
        from spice_wire import MAIN, Channel
        c = Channel(plain_first.spice_tls_port, ca=plain_first.spice_ca)
        assert c.open(MAIN, ticket) == "OK"
        assert c.session_id() != 0
        c.close()
        wait_for(lambda: 'upstream="tls"' in plain_first.log(), plain_first)
    finally:
        assert plain_first.gateway.stop() == 0, plain_first.log()[-3000:]
        vm.stop()

    folder = tmp_path / "vm2"
    folder.mkdir()
    vm = VM(folder, spice=True, spice_extra_channels=False)
    no_ca = spice_porthole(tmp_path / "b", vm, tls=False)
    try:
        token = no_ca.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
        ticket = no_ca.spice_details(token)["ticket"]
        from spice_wire import MAIN, Channel
        c = Channel(no_ca.spice_tls_port, ca=no_ca.spice_ca)
        assert c.open(MAIN, ticket) == "OK"
        c.close()
        wait_for(lambda: 'upstream="plain"' in no_ca.log(), no_ca)
    finally:
        assert no_ca.gateway.stop() == 0, no_ca.log()[-3000:]
        vm.stop()
