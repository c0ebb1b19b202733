"""A hypervisor host that goes dark mid-session (power or network lost: no
FIN, no reset, nothing). QEMU runs on a test host of our own (a network
namespace, netns.py) reached over a veth link, which the test then takes
down. Porthole's keepalive on the hypervisor connection notices: the
session ends as the hypervisor's failure (close 1011, counted and logged as
backend_error) instead of holding its slot on a frozen screen, and a
session on another host carries on. Bounds on time are generous; nothing
asserts speed."""

import time

from websockets.exceptions import ConnectionClosed

from attacks import VncConsole, metric_sum
from netns import TestHost
from support import Porthole
from vm import VM

KEEPALIVE = 2  # seconds: probed from 2 s of silence, given up about 3 s later


def test_a_console_whose_host_goes_dark_ends_with_1011_and_another_carries_on(tmp_path, vm):
    host = TestHost()
    dark_vm = p = dark = other = None
    try:
        (tmp_path / "dark").mkdir()
        dark_vm = VM(tmp_path / "dark", host=host)
        p = Porthole(tmp_path, sections=f"""
[sessions]
hypervisor_keepalive_secs = {KEEPALIVE}

[[backends]]
name = "test-host"
networks = ["{host.address}/32"]
ports = ["5900-5999"]
""")
        dark = VncConsole(p, dark_vm.vnc_port, host=host.address)
        # Its socket waits as long as the test does (the probe's reply is
        # the last byte before the silence, so the next read has no timeout).
        dark.ws.socket.settimeout(None)
        dark.probe()
        other = VncConsole(p, vm.vnc_port, src="127.0.0.3")
        other.probe()

        host.go_dark()
        # Nothing comes from a dark host: the session goes quiet until the
        # keepalive gives up on it. (websockets answers Porthole's pings.)
        deadline = time.monotonic() + 60
        closed = None
        while closed is None:
            assert time.monotonic() < deadline, f"the session outlived its dark host:\n{p.log()[-3000:]}"
            try:
                dark.ws.recv(timeout=1)
            except TimeoutError:
                continue
            except ConnectionClosed as e:
                closed = e
        assert closed.rcvd is not None and closed.rcvd.code == 1011, (closed, p.log()[-3000:])

        other.probe()
        m = p.metrics()
        assert metric_sum(m, "porthole_sessions_ended_total", reason="backend_error") == 1, m
        ended = [ln for ln in p.log().splitlines() if "session ended" in ln]
        assert len(ended) == 1 and "backend_error" in ended[0], ended
        assert [s["console"] for s in p.admin("GET", "/v1/sessions")[1]["sessions"]] == ["novnc"]
    finally:
        for console in (dark, other):
            if console:
                try:
                    console.close()
                except Exception:
                    pass
        if p:
            p.gateway.stop()
        if dark_vm:
            dark_vm.stop()
        host.remove()
