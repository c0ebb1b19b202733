"""SPICE-direct end to end: a native SPICE client (spice-gtk's
spicy-screenshot) exchanges a spice-direct token for a ticket, links every
channel through Porthole's TLS listener, and sees the VM's screen, while
Porthole holds the hypervisor's password and TLS trust."""

import pytest

from screen import differing_fraction, seabios_screen
from spice_client import spicy_capture, wait_for_final_spice_screen
from support import Porthole


def spice_porthole(tmp_path, vm, tls=True):
    """A Porthole whose loopback backend holds the VM's SPICE password (and,
    with tls, the VM's CA, so Porthole links over QEMU's TLS port)."""
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password + "\n")
    lines = ["[backends.spice]", f'password_file = "{pw}"']
    if tls:
        lines.append(f'ca = "{vm.spice_ca}"')
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
