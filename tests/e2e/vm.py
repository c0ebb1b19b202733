"""A throwaway QEMU VM per test: VNC and a serial chardev on free loopback
ports, QMP on a unix socket. No disk: SeaBIOS's screen and serial output are
the evidence. Stopped by PID."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

QEMU = "qemu-system-x86_64"


def free_port(lo=20000, hi=60000):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_vnc_display():
    # QEMU numbers VNC displays from 5900; some of 5900-5902 are taken on shared machines.
    for display in range(10, 99):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5900 + display))
                return display
            except OSError:
                continue
    raise RuntimeError("no free VNC display")


class VM:
    def __init__(self, workdir, vnc_options=None, splash_ms=3000):
        if shutil.which(QEMU) is None:
            raise AssertionError(f"{QEMU} is not installed: scripts/test installs qemu-system-x86")
        self.dir = workdir
        self.display = free_vnc_display()
        self.vnc_port = 5900 + self.display
        self.serial_port = free_port()
        self.qmp_path = str(workdir / "qmp.sock")
        sercon = workdir / "sercon-port.bin"
        sercon.write_bytes((0x3F8).to_bytes(2, "little"))
        vnc = f"127.0.0.1:{self.display}" + (f",{vnc_options}" if vnc_options else "")
        self.log = open(workdir / "qemu.log", "w")
        self.proc = subprocess.Popen(
            [QEMU, "-name", "porthole-test", "-machine", "pc,accel=tcg", "-cpu", "qemu64", "-smp", "1",
             "-m", "64", "-nodefaults", "-no-user-config", "-nic", "none", "-vga", "std", "-display", "none",
             "-vnc", vnc, "-serial", f"tcp:127.0.0.1:{self.serial_port},server=on,wait=off",
             "-fw_cfg", f"name=etc/sercon-port,file={sercon}",
             "-boot", f"menu=on,splash-time={splash_ms}",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited: {(workdir / 'qemu.log').read_text()}")
            if os.path.exists(self.qmp_path) and self._port_open(self.vnc_port):
                return
            time.sleep(0.05)
        raise AssertionError("QEMU did not come up within 30 s")

    @staticmethod
    def _port_open(port):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def qmp(self, command, **arguments):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(self.qmp_path)
            f = s.makefile("rw")
            json.loads(f.readline())  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(cmd) + "\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
