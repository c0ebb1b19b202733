"""A throwaway QEMU VM per test: VNC and a serial chardev on free loopback
ports, QMP on a unix socket, and optionally a SPICE server (plain and TLS
ports, its own test CA, a password set over QMP). No disk: SeaBIOS's screen
and serial output are the evidence. Stopped by PID."""

import datetime
import ipaddress
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

QEMU = "qemu-system-x86_64"


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "interop"))
from harness import free_port  # noqa: E402,F401 (one way to pick a port, below the ephemeral range)


def _listening(port, host="0100007F"):
    """True if a TCP socket listens on 127.0.0.1:port (read from /proc/net/tcp)."""
    want = f"{host}:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in f)


def _display_range():
    """The VNC displays this test process may use: QEMU numbers them from
    5900 (some of 5900-5902 are taken on shared machines), and parallel
    workers (pytest-xdist) each get a slice, so two never pick one display
    between the pick and QEMU's bind."""
    import os
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    per = 89 // max(count, 1)
    return range(10 + index * per, 10 + (index + 1) * per)


def free_vnc_display():
    return free_vnc_displays(1)[0]


def _rdn_string(name):
    """A certificate name as spice-gtk's / virt-viewer's host-subject wants it:
    "C=XX,O=...,CN=..." in the certificate's own order (not RFC 4514's reversed
    order), no spaces. (Values with ',' would need '\\,'; ours have none.)"""
    return ",".join(f"{a.rfc4514_attribute_name}={a.value}" for a in name)


def make_spice_certs(folder):
    """A fresh test CA and a server certificate for localhost / 127.0.0.1,
    written as QEMU's -spice x509-dir wants them. Returns the server subject
    in host-subject form."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Porthole test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("Porthole test CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = name("localhost")
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "server-key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return _rdn_string(cert.subject)


# SPICE channels beyond main/display/inputs/cursor: playback + record (HDA
# codec on the spice audiodev), usbredir, and the agent port (no agent runs).
SPICE_EXTRA_DEVICES = [
    "-audiodev", "spice,id=snd0", "-device", "intel-hda", "-device", "hda-duplex,audiodev=snd0",
    "-device", "qemu-xhci", "-chardev", "spicevmc,name=usbredir,id=ur1", "-device", "usb-redir,chardev=ur1",
    "-device", "virtio-serial", "-chardev", "spicevmc,id=vdagent,name=vdagent",
    "-device", "virtserialport,chardev=vdagent,name=com.redhat.spice.0",
]


class VM:
    """spice=True adds a SPICE server on two free loopback ports (plain and
    TLS) with its own test CA, and sets a random SPICE password over QMP:
    vm.spice_port, vm.spice_tls_port, vm.spice_password, vm.spice_ca,
    vm.spice_host_subject. spice_extra_channels (default: same as spice) adds
    the audio, usbredir and agent devices, so a session also gets the
    playback, record and usbredir channels."""

    def __init__(self, workdir, vnc_options=None, splash_ms=3000, spice=False, spice_extra_channels=None,
                 spice_options="", extra_vnc=(), extra_args=(), spice_certs=None, host=None):
        """extra_vnc: options of more VNC displays (each "id=...,..."), each on
        its own free display: vm.extra_vnc_displays (same order). extra_args:
        more QEMU arguments (e.g. an -object tls-creds-x509 for them).
        spice_certs: a folder make_spice_certs() filled, for VMs that share
        one CA (several behind one Porthole backend entry); default: a fresh one.
        host: a TestHost (netns.py) to run on, its VNC display and serial port
        on the host's address (vm.address); default this machine's loopback."""
        if shutil.which(QEMU) is None:
            raise AssertionError(f"{QEMU} is not installed: scripts/test installs qemu-system-x86")
        if host and (spice or extra_vnc):
            raise ValueError("a VM on a test host has its one VNC display and serial port there, nothing else")
        self.dir = workdir
        self.address = host.address if host else "127.0.0.1"
        self.display, *self.extra_vnc_displays = free_vnc_displays(1 + len(extra_vnc))
        self.vnc_port = 5900 + self.display
        self.serial_port = free_port()
        self.qmp_path = str(workdir / "qmp.sock")
        sercon = workdir / "sercon-port.bin"
        sercon.write_bytes((0x3F8).to_bytes(2, "little"))
        vnc = f"{self.address}:{self.display}" + (f",{vnc_options}" if vnc_options else "")
        self.spice_port = self.spice_tls_port = self.spice_password = None
        self.spice_ca = self.spice_host_subject = None
        spice_args = []
        if spice:
            self.spice_port, self.spice_tls_port = free_port(), free_port()
            if spice_certs is None:
                certs = workdir / "spice-certs"
                self.spice_host_subject = make_spice_certs(certs)
            else:
                from cryptography import x509
                certs = pathlib.Path(spice_certs)
                cert = x509.load_pem_x509_certificate((certs / "server-cert.pem").read_bytes())
                self.spice_host_subject = _rdn_string(cert.subject)
            self.spice_ca = str(certs / "ca-cert.pem")
            spice_args = ["-spice", f"addr=127.0.0.1,port={self.spice_port},tls-port={self.spice_tls_port},"
                                    f"x509-dir={certs}" + (f",{spice_options}" if spice_options else "")]
            if spice_extra_channels is None or spice_extra_channels:
                spice_args += SPICE_EXTRA_DEVICES
        self.log = open(workdir / "qemu.log", "w")
        self.proc = subprocess.Popen(
            [*(host.run_there if host else ()), QEMU, "-name", "porthole-test", "-machine", "pc,accel=tcg", "-cpu", "qemu64", "-smp", "1",
             "-m", "64", "-nodefaults", "-no-user-config", "-nic", "none", "-vga", "std", "-display", "none",
             "-vnc", vnc, *[a for d, o in zip(self.extra_vnc_displays, extra_vnc)
                            for a in ("-vnc", f"127.0.0.1:{d},{o}")],
             *extra_args, "-serial", f"tcp:{self.address}:{self.serial_port},server=on,wait=off",
             "-fw_cfg", f"name=etc/sercon-port,file={sercon}",
             "-boot", f"menu=on,splash-time={splash_ms}",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *spice_args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_up(workdir)
        except BaseException:
            self.stop()
            raise

    def _wait_up(self, workdir):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited: {(workdir / 'qemu.log').read_text()}")
            if os.path.exists(self.qmp_path) and self._port_open(self.vnc_port, self.address) and all(
                    _listening(5900 + d) for d in self.extra_vnc_displays):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("QEMU did not come up within 30 s")
        if self.spice_port is None:
            return
        # SPICE refuses every client until a password is set.
        password = secrets.token_hex(8)
        self.qmp("set_password", protocol="spice", password=password)
        self.spice_password = password
        # Checked in /proc, not by connecting: a probe connection would be a
        # (failed) SPICE client in QEMU's log.
        while not (_listening(self.spice_port) and _listening(self.spice_tls_port)):
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited: {(workdir / 'qemu.log').read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("QEMU's SPICE ports did not listen within 30 s")
            time.sleep(0.05)

    @staticmethod
    def _port_open(port, address="127.0.0.1"):
        try:
            with socket.create_connection((address, port), timeout=1):
                return True
        except OSError:
            return False

    def wait_for_serial(self, marker=b"No bootable device", timeout=30):
        """Reads COM1 until marker; returns what was read. SeaBIOS prints its
        text there too ("sercon") while it boots, so with the default marker
        this returns once SeaBIOS's final screen is drawn (~3.5 s after
        launch). Connect before it prints (a fresh VM) or reset over QMP
        after: output with no client connected is dropped."""
        seen = b""
        deadline = time.monotonic() + timeout
        with socket.create_connection((self.address, self.serial_port), timeout=5) as s:
            while marker not in seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{marker!r} not on the serial port within {timeout} s: {seen[-400:]!r}")
                s.settimeout(min(left, 1))
                try:
                    data = s.recv(4096)
                except socket.timeout:
                    continue
                if not data:
                    raise AssertionError(f"serial port closed before {marker!r}: {seen[-400:]!r}")
                seen += data
        return seen

    def qmp(self, command, **arguments):
        if command == "set_password":
            import leak_check
            leak_check.remember(arguments.get("password"))
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
        stop_process(self.proc, self.log)


def stop_process(proc, log):
    """SIGTERM, ten seconds, then SIGKILL, for a process a test started (by
    its PID); then its log file is closed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


def free_vnc_displays(n):
    """n distinct free VNC displays (free_vnc_display() alone would return
    the same one twice before QEMU binds it)."""
    displays = []
    for display in _display_range():
        if len(displays) == n:
            break
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5900 + display))
            except OSError:
                continue
        displays.append(display)
    if len(displays) < n:
        raise RuntimeError("no free VNC display")
    return displays


def make_vnc_x509_dir(folder, client=False, hosts=("localhost", "127.0.0.1")):
    """QEMU's tls-creds-x509 directory (endpoint=server): a fresh test CA
    (ca-cert.pem) and a server certificate for hosts (server-cert.pem,
    server-key.pem). client=True adds client-cert.pem / client-key.pem
    (extendedKeyUsage clientAuth) signed by the same CA, for the peer of a
    verify-peer=on display. Returns folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Porthole test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def usage(**on):
        flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                     encipher_only=False, decipher_only=False)
        flags.update(on)
        return x509.KeyUsage(**flags)

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("Porthole test VNC CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn, eku, sans=None):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(usage(digital_signature=True, key_encipherment=True), critical=True)
             .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                            critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    def write(stem, cert, key):
        (folder / f"{stem}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        path = folder / f"{stem}-key.pem"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write("server", *leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans))
    if client:
        write("client", *leaf("porthole", ExtendedKeyUsageOID.CLIENT_AUTH))
    return folder
