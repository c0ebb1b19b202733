"""Peers that go dark mid-session (power or network lost: no FIN, no reset,
nothing), on test hosts of our own (network namespaces over veth links,
netns.py) whose link the test takes down. A hypervisor host: Porthole's
keepalive on the hypervisor connection notices, the session ends as the
hypervisor's failure (close 1011, counted and logged as backend_error)
instead of holding its slot on a frozen screen, and a session on another
host carries on. A native client (remote-viewer): its session ends the same
way, and once the client's host is back its user opens the console again
with the same token (under the `reconnect` policy a session that lived on
would refuse it as in use). Bounds on time are generous; nothing asserts
speed."""

import re
import time
from types import SimpleNamespace

from websockets.exceptions import ConnectionClosed

import leak_check
from harness import http

from attacks import VncConsole, metric_sum
from netns import TestHost
from spice_client import RemoteViewer
from support import Porthole
from vm import VM, make_spice_certs

KEEPALIVE = 2  # seconds: probed from 2 s of silence, given up 4 s after the last byte


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


def test_a_native_client_gone_dark_leaves_its_console_free_to_open_again(tmp_path, spice_vm):
    host = TestHost()
    p = None
    viewers = []
    try:
        # The client reaches Porthole at the test host's gateway address,
        # which its certificate does not name: the .vv names its subject.
        certs = tmp_path / "porthole-certs"
        subject = make_spice_certs(certs)
        password = tmp_path / "spice-password"
        password.write_text(spice_vm.spice_password + "\n")
        p = Porthole(tmp_path, spice_address=host.gateway,
                     certs_of=SimpleNamespace(spice_certs=certs, spice_subject=subject),
                     spice=f'public_host = "{host.gateway}"\nhost_subject = "{subject}"',
                     sections=f"[sessions]\nclient_keepalive_secs = {KEEPALIVE}\n",
                     backend_extra=f'[backends.spice]\npassword_file = "{password}"')
        token = p.mint("spice-direct", spice_vm.spice_port, tls_port=spice_vm.spice_tls_port)["token"]

        def opened(n):
            status, vv = http("GET", f"{p.base}/spice-direct?token={token}")[:2]
            assert status == 200 and f"host={host.gateway}" in vv, vv
            leak_check.remember(re.search(r"^password=(.+)$", vv, re.M).group(1))
            (tmp_path / f"console-{n}.vv").write_text(vv)
            viewer = RemoteViewer(tmp_path / f"console-{n}.vv", tmp_path / f"remote-viewer-{n}.log",
                                  run_there=host.run_there)
            viewers.append(viewer)
            assert viewer.displayed(), f"remote-viewer never showed the display:\n{viewer.log_text()[-3000:]}"
            return viewer

        first = opened(1)
        listed = p.admin("GET", "/v1/sessions")[1]["sessions"]
        assert [s["console"] for s in listed] == ["spice-direct"], listed

        # The client's host goes dark, and its remote-viewer with it (its
        # goodbye would be dropped on the way all the same).
        host.go_dark()
        first.stop()
        deadline = time.monotonic() + 60
        while p.admin("GET", "/v1/sessions")[1]["sessions"]:
            assert time.monotonic() < deadline, f"the session outlived its dark client:\n{p.log()[-3000:]}"
            time.sleep(0.5)
        ended = [ln for ln in p.log().splitlines() if "session ended" in ln]
        assert len(ended) == 1 and 'reason="client_' in ended[0], ended

        # Back on the network, the same token opens the console again.
        host.come_back()
        opened(2)
        listed = p.admin("GET", "/v1/sessions")[1]["sessions"]
        assert [s["console"] for s in listed] == ["spice-direct"], listed
    finally:
        for viewer in viewers:
            viewer.stop()
        if p:
            p.gateway.stop()
        host.remove()
