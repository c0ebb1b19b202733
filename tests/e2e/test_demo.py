"""The README's first command: on embedded defaults, with QEMU installed,
Porthole starts a demo VM and prints console URLs that work in a browser."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

from support import browser
from harness import Gateway, free_port, http, porthole_bin
from screen import seabios_capture
from spice_client import remote_viewer_connects, spicy_capture


def test_the_demo_prints_console_urls_that_show_the_vm(tmp_path):
    admin = free_port()
    gw = Gateway(["--admin-listen", f"127.0.0.1:{admin}", "--public-listen", "127.0.0.1:0",
                  "--spice-listen", "127.0.0.1:0", "--vnc-listen", "127.0.0.1:0"],
                 tmp_path / "serve.log", env={"PORTHOLE_STATE_DIR": str(tmp_path / "state")}, admin_port=admin)
    try:
        deadline = time.monotonic() + 30
        while "remote-viewer console.vv" not in gw.output():
            assert time.monotonic() < deadline, gw.output()
            time.sleep(0.1)
        banner = gw.output()
        vnc_url = re.search(r"screen \(noVNC\): (\S+)", banner).group(1)
        serial_url = re.search(r"serial console: (\S+)", banner).group(1)
        vnc_port = int(re.search(r'"port":(\d+)', __import__("base64").urlsafe_b64decode(
            vnc_url.split("token=")[1].split(".")[1] + "==").decode()).group(1))

        # SeaBIOS retries its boot every few seconds: one retry of the check is allowed.
        def novnc_shot():
            result = browser("vnc", vnc_url, tmp_path / "demo.png", 4000)
            assert result["state"] == "connected", result
            return tmp_path / "demo.png"
        seabios_capture(novnc_shot)
        result = browser("serial", serial_url, 12000)
        assert result["state"] == "connected", result
        assert "SeaBIOS" in result["terminal"], result

        # SPICE: the printed .vv link, as JSON for spicy-screenshot (a native
        # client through Porthole's TLS listener, trusting the development CA
        # the details carry), and as the .vv file remote-viewer opens as it is.
        vv_url = re.search(r"curl -so console.vv '(\S+)'", banner).group(1)
        # The same one retry, with a fresh ticket: the first one is spent.
        def spice_shot():
            status, body = http("GET", vv_url + "&format=json")
            assert status == 200, body
            details = json.loads(body)
            ca = tmp_path / "ca.pem"
            ca.write_text(details["ca"])
            return spicy_capture(tmp_path / "spice.png", details["host"], details["ticket"],
                                 tls_port=details["tls_port"], ca_file=ca)
        seabios_capture(spice_shot)
        vv = tmp_path / "console.vv"
        status, body = http("GET", vv_url)
        assert status == 200 and body.startswith("[virt-viewer]"), body
        vv.write_text(body)
        assert remote_viewer_connects(vv, tmp_path), "remote-viewer did not bring up the display channel"
    finally:
        assert gw.stop() == 0
    # The demo VM went with Porthole.
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", vnc_port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "the demo VM outlived Porthole"
        time.sleep(0.2)


def test_a_sigterm_while_the_demo_vm_starts_stops_porthole_and_its_vm(tmp_path):
    """A SIGTERM during start-up (listeners bound, the demo VM's QEMU
    started but its console not yet up) takes the one shutdown path:
    Porthole exits 0 and its VM goes with it. Before, the handler was
    installed only once the demo VM was up: the signal's default action
    killed Porthole (exit by signal 15) and left QEMU running with nobody
    to stop it."""
    state = tmp_path / "state"
    log = tmp_path / "serve.log"
    # The demo VM's command line names a file in this test's state folder.
    marker = str(state / "demo-sercon-port.bin").encode()

    def demo_vms():
        found = []
        for p in pathlib.Path("/proc").iterdir():
            try:
                if p.name.isdigit() and marker in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
        return found
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [porthole_bin(), "serve", "--admin-listen", "127.0.0.1:0", "--public-listen", "127.0.0.1:0",
             "--spice-listen", "127.0.0.1:0", "--vnc-listen", "127.0.0.1:0"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PORTHOLE_STATE_DIR": str(state)})
    try:
        # QEMU runs, and its console is not up yet (that takes it a good
        # part of a second): the start-up is under way.
        deadline = time.monotonic() + 60
        while not demo_vms():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no demo VM started (is QEMU installed?):\n{log.read_text()}"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        text = log.read_text()
        assert "SIGTERM: shutting down" in text, text
        # Stopped before the VM was up: no console URLs were printed for it.
        assert "screen (noVNC)" not in text, text
        deadline = time.monotonic() + 10
        while demo_vms():
            assert time.monotonic() < deadline, f"the demo VM outlived Porthole: {demo_vms()}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in demo_vms():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
