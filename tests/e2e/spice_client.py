"""A real SPICE client for the end-to-end tests: spice-gtk's spicy-screenshot
(package spice-client-gtk). It needs no X display: it links the main and
display channels (and usbredir, if offered), waits for the primary surface
and writes it as PPM; we convert that to PNG."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

from PIL import Image

SPICY_SCREENSHOT = "spicy-screenshot"

# spice-gtk's SpiceChannelEvent, as spicy-screenshot prints it ("main channel event: 23").
CHANNEL_EVENTS = {"20": "ERROR_CONNECT", "21": "ERROR_TLS", "22": "ERROR_LINK", "23": "ERROR_AUTH (password)",
                  "24": "ERROR_IO"}


def spicy_capture(out_png, host, password, port=None, tls_port=None, ca_file=None, timeout=60, debug=False):
    """Takes one screenshot over SPICE and saves it as PNG; returns its path.

    port: the plain port; tls_port: the TLS port (ca_file: the CA PEM to trust,
    passed as SSL_CERT_FILE since spicy-screenshot has no CA option; it also
    checks the host name against the certificate). With both ports given,
    spice-gtk links over the plain port. The password travels on the command
    line (fine for tests). debug=True sets SPICE_DEBUG=1 (channel links on
    stderr, kept in OUT.log). Raises AssertionError with spicy-screenshot's
    stderr if it fails or times out."""
    if shutil.which(SPICY_SCREENSHOT) is None:
        raise AssertionError(f"{SPICY_SCREENSHOT} is not installed: scripts/test installs spice-client-gtk")
    if port is None and tls_port is None:
        raise ValueError("spicy_capture needs port or tls_port")
    out_png = pathlib.Path(out_png)
    ppm = out_png.with_suffix(".ppm")
    ppm.unlink(missing_ok=True)
    cmd = [SPICY_SCREENSHOT, "-h", host]
    if port is not None:
        cmd += ["-p", str(port)]
    if tls_port is not None:
        cmd += ["-s", str(tls_port)]
    cmd += ["-w", password, "-o", str(ppm)]
    env = dict(os.environ)
    env.pop("DISPLAY", None)  # proves it needs none
    if ca_file is not None:
        env["SSL_CERT_FILE"] = str(ca_file)
    if debug:
        env["SPICE_DEBUG"] = "1"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"spicy-screenshot {host} port={port} tls_port={tls_port}: no screen within "
                             f"{timeout} s:\n{stderr[-4000:]}") from None
    if debug:
        out_png.with_suffix(".log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not ppm.exists():
        events = [name for code, name in CHANNEL_EVENTS.items() if f"channel event: {code}" in p.stderr]
        raise AssertionError(f"spicy-screenshot {host} port={port} tls_port={tls_port} exited "
                             f"{p.returncode} {' '.join(events)}:\n{p.stderr[-4000:]}")
    with Image.open(ppm) as img:
        img.convert("RGB").save(out_png)
    ppm.unlink()
    return out_png


def wait_for_final_spice_screen(vm, tmp_path):
    """Waits for SeaBIOS's last line on the serial port, then polls direct
    plain-port captures until the screen is SeaBIOS's and stable. (Polling the
    screen alone stops too early: "Press ESC for boot menu." stays put for the
    3 s boot-menu wait and passes seabios_screen.) Returns the last capture."""
    import time
    from screen import differing_fraction, seabios_screen
    vm.wait_for_serial(b"No bootable device")
    deadline = time.monotonic() + 30
    previous = None
    n = 0
    while True:
        assert time.monotonic() < deadline, "the screen never settled"
        n += 1
        shot = spicy_capture(tmp_path / f"direct-{n}.png", "127.0.0.1", vm.spice_password, port=vm.spice_port)
        try:
            seabios_screen(shot)
            if previous is not None and differing_fraction(previous, shot) < 0.01:
                return shot
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        previous = shot
        time.sleep(0.5)


class RemoteViewer:
    """remote-viewer (virt-viewer) opening a .vv file on a virtual X display
    of its own, run under `run_there` when given (a test host's command
    prefix, netns.TestHost.run_there: remote-viewer and its Xvfb run there);
    spice-gtk's debug log, `log`, says which channels are up. A context
    manager: it stops at the block's end."""

    def __init__(self, vv, log, run_there=()):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([*run_there, "xvfb-run", "-a", "remote-viewer", "--debug", str(vv)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "SPICE_DEBUG": "1"}, start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def displayed(self, timeout=30, then=None):
        """True once spice-gtk reports the display channel up (and, if given,
        `then()` is true while it still runs: its other channels link after
        the display's); false if it exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(r"display-2:0: channel up", self.log_text()) and (then is None or then()):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def log_text(self):
        return self.log.read_text(errors="replace")

    def stop(self):
        """Its whole process group (xvfb-run, Xvfb, remote-viewer): TERM,
        then KILL after 10 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def remote_viewer_connects(vv, tmp_path, timeout=30, then=None):
    """Opens the .vv file in a RemoteViewer and stops it; true once it showed
    the display (RemoteViewer.displayed). Its log's end is printed if not."""
    with RemoteViewer(vv, tmp_path / "remote-viewer.log") as viewer:
        if viewer.displayed(timeout, then):
            return True
        print(viewer.log_text()[-4000:])
        return False
