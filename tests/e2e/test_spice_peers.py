"""The SPICE baseline, no Porthole: a real client (spice-gtk's spicy-screenshot)
against QEMU's own SPICE server, on its plain port and its TLS port. The
Porthole SPICE tests compare their captures with captures like these."""

import re

import pytest

from screen import differing_fraction, seabios_screen
from spice_client import spicy_capture, wait_for_final_spice_screen


def test_spicy_screenshot_over_plain_and_tls_ports_sees_seabios(spice_vm, tmp_path):
    vm = spice_vm
    assert vm.spice_port != vm.spice_tls_port
    reference = wait_for_final_spice_screen(vm, tmp_path)
    plain = spicy_capture(tmp_path / "plain.png", "127.0.0.1", vm.spice_password, port=vm.spice_port)
    tls = spicy_capture(tmp_path / "tls.png", "127.0.0.1", vm.spice_password, tls_port=vm.spice_tls_port,
                        ca_file=vm.spice_ca, debug=True)
    seabios_screen(plain)
    seabios_screen(tls)
    diff = differing_fraction(plain, tls)
    assert diff <= 0.01, f"the TLS capture differs from the plain one in {diff:.2%} of pixels"
    assert differing_fraction(reference, tls) <= 0.01

    # The TLS session really was TLS, with the VM's own CA and name checks,
    # and the server offered the extra channels (audio, usbredir) besides
    # main/display/inputs/cursor.
    log = (tmp_path / "tls.log").read_text()
    assert "trying with TLS port" in log and "alt name IP match=127.0.0.1" in log, log[-2000:]
    offered = set(re.findall(r"\b([a-z]+)-\d+:\d+: spice_channel_constructed", log))
    assert offered == {"main", "display", "inputs", "cursor", "playback", "record", "usbredir"}, offered

    # A wrong password is refused (QEMU's ticket check is what Porthole will front).
    with pytest.raises(AssertionError, match="ERROR_AUTH"):
        spicy_capture(tmp_path / "wrong.png", "127.0.0.1", "not-the-password", port=vm.spice_port)
