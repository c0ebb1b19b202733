"""The VNC security proxy against real QEMU: Porthole authenticates to the
hypervisor itself (VeNCrypt x509 with the backend's CA, optionally a client
certificate; the VNC password it holds) and offers browsers only None and
native clients only VeNCrypt X509Plain with a one-session ticket.

Every VM has two VNC displays on the same screen: a plain one (the "direct"
reference: gvnccapture with no credentials, no proxy) and a secured one
(tls-creds x509 and/or password=on) that only Porthole can open. A capture
through Porthole of the secured display must match a direct capture of the
plain one: same guest, same framebuffer, so any difference is the proxy's."""

import json
import os
import pty
import pwd
import re
import secrets
import select
import signal
import socket
import ssl
import time
import urllib.parse

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from harness import http
from screen import differing_fraction, seabios_screen, vnc_capture, wait_for_final_vnc_screen
from support import Porthole, browser
from vm import VM, free_vnc_display, make_spice_certs, make_vnc_x509_dir

GENERIC_FAILURE = b"console unavailable"


# --- the VM and Porthole ----------------------------------------------------

def secured_vm(tmp_path, verify_peer=False, password=True):
    """A VM with a plain VNC display (vm.vnc_port) and a secured one
    (vm.secured_port, id vnc-sec): VeNCrypt x509 with its own test CA
    (vm.x509/ca-cert.pem; client-cert.pem/client-key.pem signed by it) and,
    with password, VNC authentication inside (X509Vnc) with a random
    8-character password set over QMP (vm.vnc_password)."""
    folder = tmp_path / "vm"
    folder.mkdir()
    x509 = make_vnc_x509_dir(folder / "x509", client=True)
    options = "id=vnc-sec,tls-creds=tls0" + (",password=on" if password else "")
    vm = VM(folder, extra_vnc=[options],
            extra_args=["-object", f"tls-creds-x509,id=tls0,dir={x509},endpoint=server,"
                                   f"verify-peer={'on' if verify_peer else 'off'}"])
    vm.x509 = x509
    vm.secured_port = 5900 + vm.extra_vnc_displays[0]
    vm.vnc_password = None
    try:
        if password:
            vm.vnc_password = secrets.token_urlsafe(6)[:8]
            vm.qmp("set_password", protocol="vnc", password=vm.vnc_password, display="vnc-sec")
        servers = {s["id"]: s for s in vm.qmp("query-vnc-servers")}
        assert servers["vnc-sec"]["auth"] == "vencrypt", servers
        assert servers["vnc-sec"]["vencrypt"] == ("x509-vnc" if password else "x509-none"), servers
        assert servers["default"]["auth"] == "none", servers
    except BaseException:
        vm.stop()
        raise
    return vm


def vnc_porthole(tmp_path, name, vm=None, password=None, ca=None, client_cert=False, native=False, **table):
    """A Porthole whose loopback backend has a [backends.vnc] table: the
    password (a file), the CA, the VM's client certificate, and any other
    keys given (tls_name=..., force_shared=False). native=True also opens the
    native VNC listener on a free 5900+N port (gvnccapture can only address
    those): p.vnc_port."""
    folder = tmp_path / name
    folder.mkdir()
    lines = ["[backends.vnc]"]
    if password is not None:
        (folder / "vnc-password").write_text(password + "\n")
        lines.append(f'password_file = "{folder / "vnc-password"}"')
    if ca is None and vm is not None:
        ca = vm.x509 / "ca-cert.pem"
    if ca:
        lines.append(f'ca = "{ca}"')
    if client_cert:
        lines += [f'client_cert = "{vm.x509 / "client-cert.pem"}"', f'client_key = "{vm.x509 / "client-key.pem"}"']
    for key, value in table.items():
        lines.append(f"{key} = {json.dumps(value)}")
    vnc = None
    vnc_port = None
    if native:
        vnc_port = 5900 + free_vnc_display()
        vnc = f'listen = "127.0.0.1:{vnc_port}"\nhandshake_timeout_secs = 3'
    p = Porthole(folder, backend_extra="\n".join(lines), vnc=vnc)
    p.vnc_port = vnc_port
    return p


def stopped(p):
    """Stops Porthole; it must exit 0, and never have panicked."""
    assert p.gateway.stop() == 0, p.log()[-3000:]
    assert "panicked" not in p.log(), p.log()[-3000:]


def vnc_details(p, token):
    status, body = http("GET", f"{p.base}/vnc-direct?token={urllib.parse.quote(token)}")[:2]
    assert status == 200, (status, body)
    return json.loads(body)


def failures(p, reason):
    """porthole_handshake_failures_total{protocol="rfb",reason} summed over blame."""
    total = 0
    for line in p.metrics().splitlines():
        if line.startswith("porthole_handshake_failures_total{") and 'protocol="rfb"' in line \
                and f'reason="{reason}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


# --- gvnccapture -------------------------------------------------------------

def gvnc_capture(out, port, ca_pem=None, username=None, password=None, timeout=30):
    """Runs `gvnccapture 127.0.0.1:DISPLAY out` on a pty (gtk-vnc reads a
    username and password only from a tty) and types the credentials it asks
    for, the password only once the tty's echo is off (what was typed before
    is flushed). ca_pem: the CA gtk-vnc must trust; it reads it only from
    <home in /etc/passwd>/.pki/CA/cacert.pem, so gvnccapture runs in a
    private mount namespace where a temp home is bind-mounted over that home:
    nothing on the machine changes. Returns (exit code, tty transcript)."""
    args = [f"127.0.0.1:{port - 5900}", str(out)]
    if ca_pem is None:
        argv = ["gvnccapture", *args]
    else:
        home = out.parent / f"{out.stem}-home"
        (home / ".pki" / "CA").mkdir(parents=True)
        (home / ".pki" / "CA" / "cacert.pem").write_text(ca_pem)
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$0" "$1" && exec gvnccapture "$2" "$3"', str(home),
                pwd.getpwuid(os.getuid()).pw_dir, *args]
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    seen = b""
    typed = set()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"gvnccapture: no result within {timeout} s: {seen[-2000:]!r}")
            if select.select([fd], [], [], min(left, 0.05))[0]:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the tty
                    data = b""
                if not data:
                    break
                seen += data
            for prompt, value, hidden in ((b"Username:", username, False), (b"Password:", password, True)):
                if prompt in seen and prompt not in typed:
                    if value is None:
                        raise AssertionError(f"gvnccapture asked {prompt!r}: {seen!r}")
                    if hidden and termios_echo(fd):
                        continue
                    os.write(fd, value.encode() + b"\n")
                    typed.add(prompt)
        _, status = os.waitpid(pid, 0)
        pid = None
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def termios_echo(fd):
    import termios
    return bool(termios.tcgetattr(fd)[3] & termios.ECHO)


# --- a minimal RFB viewer (None security, Raw encoding) ----------------------

class Viewer:
    """An RFB viewer over a byte stream: a /vnc WebSocket through Porthole or
    a TCP socket straight to QEMU. It asks for Raw only, so every update it
    gets can be parsed exactly; alive() asks for a small non-incremental
    update and says whether one came."""

    def __init__(self, ws=None, sock=None):
        self.ws, self.sock, self.buf = ws, sock, b""

    @classmethod
    def through(cls, p, token):
        return cls(ws=connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={token}", open_timeout=10,
                              max_size=None))

    @classmethod
    def direct(cls, port):
        return cls(sock=socket.create_connection(("127.0.0.1", port), timeout=10))

    def send(self, data):
        if self.ws:
            self.ws.send(data)
        else:
            self.sock.sendall(data)

    def read(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waited {timeout} s for {n} bytes, have {self.buf[:64]!r}")
            if self.ws:
                chunk = self.ws.recv(timeout=left)
            else:
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def handshake(self, shared=True):
        """Up to ServerInit; returns (width, height, name)."""
        assert self.read(12) == b"RFB 003.008\n"
        self.send(b"RFB 003.008\n")
        types = self.read(self.read(1)[0])
        assert 1 in types, f"no None security offered: {types!r}"
        self.types = types
        self.send(b"\x01")
        result = self.read(4)
        assert result == b"\0\0\0\0", result + self.buf
        self.send(bytes([1 if shared else 0]))
        init = self.read(24)
        width, height = int.from_bytes(init[0:2], "big"), int.from_bytes(init[2:4], "big")
        assert init[4] == 32, f"bpp {init[4]}"
        name = self.read(int.from_bytes(init[20:24], "big")).decode()
        self.send(b"\x02\x00\x00\x01" + (0).to_bytes(4, "big"))  # SetEncodings: Raw only
        return width, height, name

    def update(self, timeout=10):
        """A non-incremental update of the top-left corner; returns the
        number of pixels received."""
        self.send(b"\x03\x00" + b"".join(v.to_bytes(2, "big") for v in (0, 0, 16, 16)))
        head = self.read(4, timeout)
        assert head[0] == 0, f"not a FramebufferUpdate: {head + self.buf[:32]!r}"
        pixels = 0
        for _ in range(int.from_bytes(head[2:4], "big")):
            rect = self.read(12, timeout)
            w, h = int.from_bytes(rect[4:6], "big"), int.from_bytes(rect[6:8], "big")
            assert rect[8:12] == b"\0\0\0\0", f"not Raw: {rect!r}"
            self.read(w * h * 4, timeout)
            pixels += w * h
        return pixels

    def alive(self):
        try:
            return self.update(timeout=5) > 0
        except (ConnectionClosed, EOFError, ConnectionError, TimeoutError):
            return False

    def close(self):
        (self.ws or self.sock).close()


# --- 1: noVNC to an X509Vnc display ------------------------------------------

def test_novnc_reaches_an_x509_vnc_display_without_seeing_its_password(tmp_path):
    vm = secured_vm(tmp_path)
    p = vnc_porthole(tmp_path, "porthole", vm, password=vm.vnc_password)
    try:
        reference = wait_for_final_vnc_screen(vm, tmp_path)
        minted = p.mint("novnc", vm.secured_port)
        shot = tmp_path / "novnc.png"
        result = browser("vnc", minted["url"], shot, 2000)
        assert result["state"] == "connected", result
        assert result["canvas"], result
        # noVNC was offered None only: no password prompt, and none needed.
        received = b"".join(bytes.fromhex(f["hex"]) for f in result["frames"] if f["dir"] == "received")
        assert received.startswith(b"RFB 003.008\n\x01\x01\x00\x00\x00\x00"), result["frames"][:6]
        seabios_screen(shot)
        after = vnc_capture(vm, tmp_path / "direct-after.png")
        diff = min(differing_fraction(shot, reference), differing_fraction(shot, after))
        assert diff <= 0.01, f"noVNC through Porthole differs from a direct capture in {diff:.2%} of pixels"
        # The password is in nothing the browser got (every frame, every HTTP
        # response), nor in Porthole's log.
        traffic = (tmp_path / "novnc.png.traffic").read_bytes()
        assert len(traffic) > 720 * 400, "the traffic dump misses the screen"
        assert vm.vnc_password.encode() not in traffic
        log = p.log()
        assert "session started" in log and "console=novnc" in log, log[-3000:]
        assert vm.vnc_password not in log and minted["token"] not in log
        assert "vnc handshake failed" not in log, log[-3000:]
    finally:
        stopped(p)
        vm.stop()


# --- 2: verify-peer=on (X509None) ---------------------------------------------

def test_a_display_that_verifies_peers_needs_porthole_client_certificate(tmp_path):
    vm = secured_vm(tmp_path, verify_peer=True, password=False)
    with_cert = vnc_porthole(tmp_path, "with-cert", vm, client_cert=True)
    without = vnc_porthole(tmp_path, "without-cert", vm)
    try:
        viewer = Viewer.through(with_cert, with_cert.mint("novnc", vm.secured_port)["token"])
        try:
            assert viewer.handshake() == (720, 400, "QEMU (porthole-test)")
            assert viewer.types == b"\x01"
            assert viewer.update() > 0
            # QEMU saw Porthole's client certificate.
            clients = {s["id"]: s for s in vm.qmp("query-vnc-servers")}["vnc-sec"]["clients"]
            assert [c.get("x509_dname") for c in clients] == ["O=Porthole test,CN=porthole"], clients
        finally:
            viewer.close()

        # Without one, QEMU refuses Porthole; the browser gets a generic failure.
        # (QEMU checks the client certificate after the TLS 1.3 handshake and
        # just closes, so Porthole logs an unexpected EOF: hypervisor_io.)
        viewer = Viewer.through(without, without.mint("novnc", vm.secured_port)["token"])
        try:
            assert viewer.read(12) == b"RFB 003.008\n"
            assert viewer.read(1 + 4 + len(GENERIC_FAILURE)) == (
                b"\0" + len(GENERIC_FAILURE).to_bytes(4, "big") + GENERIC_FAILURE)
            with pytest.raises(ConnectionClosed) as closed:
                viewer.read(1)
            assert closed.value.rcvd.code == 1011, closed.value
        finally:
            viewer.close()
        log = without.wait_for_log("vnc handshake failed")
        m = re.search(r'vnc handshake failed: (.*) client=\S+ console=novnc reason="(\w+)" blame="(\w+)"', log)
        assert m, log[-3000:]
        assert m.group(2) in ("hypervisor_tls", "hypervisor_io", "hypervisor_closed"), m.group(0)
        assert m.group(3) == "backend", m.group(0)
        assert failures(without, m.group(2)) == 1
        print("refusal without a client certificate:", m.group(0))
    finally:
        stopped(with_cert)
        stopped(without)
        vm.stop()


# --- 3: wrong CA, wrong name, wrong password ------------------------------------

def test_wrong_ca_name_or_password_is_refused_with_its_reason(tmp_path):
    vm = secured_vm(tmp_path)
    make_spice_certs(tmp_path / "other-ca")  # a CA that signed nothing of the VM's
    other_ca = tmp_path / "other-ca" / "ca-cert.pem"
    wrong_password = secrets.token_hex(4)
    cases = {
        "wrong-ca": (vnc_porthole(tmp_path, "wrong-ca", vm, password=vm.vnc_password, ca=other_ca),
                     "hypervisor_tls"),
        "wrong-name": (vnc_porthole(tmp_path, "wrong-name", vm, password=vm.vnc_password,
                                    tls_name="not-the-hypervisor.example"), "hypervisor_tls"),
        "wrong-password": (vnc_porthole(tmp_path, "wrong-password", vm, password=wrong_password),
                           "hypervisor_auth_failed"),
    }
    try:
        for name, (p, reason) in cases.items():
            minted = p.mint("novnc", vm.secured_port)
            started = time.monotonic()
            result = browser("status", minted["url"], 0)
            took = time.monotonic() - started
            assert result["state"] in ("unavailable", "disconnected"), (name, result)
            assert took < 20, f"{name}: the page took {took:.1f} s to give up"
            log = p.log()
            assert f'reason="{reason}" blame="backend"' in log, (name, log[-3000:])
            assert failures(p, reason) >= 1, (name, p.metrics())
            assert "session started" in log  # the WebSocket opened; the console did not
            assert vm.vnc_password not in log and wrong_password not in log
            print(f"{name}: page {result['state']!r} ({result['text']}) after {took:.1f} s; "
                  + "; ".join(line.split("WARN ", 1)[1] for line in log.splitlines()
                              if "vnc handshake failed" in line)[:600])
        # The two TLS failures are told apart in the log's detail.
        assert "invalid peer certificate: UnknownIssuer" in cases["wrong-ca"][0].log()
        assert 'certificate not valid for name "not-the-hypervisor.example"' in cases["wrong-name"][0].log()
    finally:
        for p, _ in cases.values():
            stopped(p)
        vm.stop()


# --- 4: two viewers, one exclusive -----------------------------------------------

def test_an_exclusive_native_viewer_through_porthole_does_not_kick_the_others(tmp_path):
    """gvnccapture asks QEMU for exclusive access (ClientInit shared=0). Straight
    to QEMU (share=allow-exclusive, the default) that disconnects the viewer
    already there; through Porthole, whose ClientInit upstream says shared,
    the first viewer (a /vnc session) keeps getting updates. With
    force_shared = false Porthole passes gvnccapture's wish on, and QEMU kicks
    the first viewer again: the setting is what keeps it."""
    vm = secured_vm(tmp_path)
    # Contrast: straight to QEMU's plain display.
    first = Viewer.direct(vm.vnc_port)
    first.handshake(shared=True)
    assert first.alive()
    code, transcript = gvnc_capture(tmp_path / "direct.png", vm.vnc_port)
    assert code == 0, transcript
    assert not first.alive(), "QEMU did not disconnect the shared viewer for an exclusive one"
    first.close()

    p = vnc_porthole(tmp_path, "porthole", vm, password=vm.vnc_password, native=True)
    try:
        first = Viewer.through(p, p.mint("novnc", vm.secured_port)["token"])
        try:
            first.handshake(shared=True)
            assert first.alive()
            details = vnc_details(p, p.mint("vnc-direct", vm.secured_port)["token"])
            code, transcript = gvnc_capture(tmp_path / "native.png", p.vnc_port, details["ca"], "porthole",
                                            details["ticket"])
            assert code == 0, transcript
            assert "Connected to" in transcript and "Saved display" in transcript, transcript
            assert first.alive(), "the first viewer was disconnected:\n" + p.log()[-3000:]
            assert first.alive()
        finally:
            first.close()
    finally:
        stopped(p)

    p = vnc_porthole(tmp_path, "not-forced", vm, password=vm.vnc_password, native=True, force_shared=False)
    try:
        first = Viewer.through(p, p.mint("novnc", vm.secured_port)["token"])
        try:
            first.handshake(shared=True)
            assert first.alive()
            details = vnc_details(p, p.mint("vnc-direct", vm.secured_port)["token"])
            code, transcript = gvnc_capture(tmp_path / "native2.png", p.vnc_port, details["ca"], "porthole",
                                            details["ticket"])
            assert code == 0, transcript
            assert not first.alive(), "force_shared = false, yet the first viewer stayed"
        finally:
            first.close()
    finally:
        stopped(p)
        vm.stop()


# --- 5: a native client with a ticket ---------------------------------------------

def test_a_native_vnc_client_sees_the_vm_through_porthole_with_a_ticket(tmp_path):
    vm = secured_vm(tmp_path)
    p = vnc_porthole(tmp_path, "porthole", vm, password=vm.vnc_password, native=True)
    try:
        reference = wait_for_final_vnc_screen(vm, tmp_path)
        token = p.mint("vnc-direct", vm.secured_port)["token"]
        details = vnc_details(p, token)
        assert details["type"] == "vnc" and details["host"] == "127.0.0.1", details
        assert details["port"] == p.vnc_port, details
        assert details["security"] == "VeNCrypt X509Plain" and details["username"] == "porthole", details
        assert details["ca"] == p.spice_ca.read_text(), "the CA to trust is the listener's"
        assert details["instance"] == "e2e-vm" and details["ticket_expires_at"] > time.time(), details
        ticket = details["ticket"]
        assert vm.vnc_password not in ticket and len(ticket) < 100  # gtk-vnc reads up to 99 characters

        shot = tmp_path / "native.png"
        code, transcript = gvnc_capture(shot, p.vnc_port, details["ca"], "porthole", ticket)
        assert code == 0, transcript
        seabios_screen(shot)
        diff = differing_fraction(shot, reference)
        if diff > 0.01:
            diff = min(diff, differing_fraction(shot, vnc_capture(vm, tmp_path / "direct-after.png")))
        assert diff <= 0.01, f"through Porthole differs from a direct capture in {diff:.2%} of pixels"
        log = p.wait_for_log('console="vnc-direct" reason="client_left"')
        assert "auth=X509Vnc" in log, log[-3000:]
        assert vm.vnc_password not in log and ticket not in log and token not in log

        # The ticket opened one session; it is dead now.
        code, transcript = gvnc_capture(tmp_path / "again.png", p.vnc_port, details["ca"], "porthole", ticket)
        assert code != 0 and "Unable to connect" in transcript, transcript
        assert not (tmp_path / "again.png").exists()
        p.wait_for_log('reason="ticket_unknown"')
        # gtk-vnc checks the listener's certificate: trusting another CA, it
        # never opens a session.
        fresh = vnc_details(p, p.mint("vnc-direct", vm.secured_port)["token"])
        code, transcript = gvnc_capture(tmp_path / "other-ca.png", p.vnc_port, (vm.x509 / "ca-cert.pem").read_text(),
                                        "porthole", fresh["ticket"])
        assert code != 0 and "Password:" not in transcript, transcript
        deadline = time.monotonic() + 5
        while (log := p.log()).count("vnc handshake refused") < 2:
            assert time.monotonic() < deadline, log[-3000:]
            time.sleep(0.05)
        last = [line for line in log.splitlines() if "vnc handshake refused" in line][-1]
        assert 'reason="client_left"' in last or 'reason="tls_handshake"' in last, last
        assert log.count("session started") == 1
    finally:
        stopped(p)
        vm.stop()


# --- the native listener at the protocol level ----------------------------------

def test_the_native_listener_refuses_what_it_did_not_offer_and_junk(tmp_path):
    """A raw client on the native listener: a type not offered, junk instead of
    RFB, a subtype not offered, a made-up ticket (inside real TLS), silence,
    junk instead of TLS, a SPICE ticket. Each gets a failure and the
    connection closes; none hangs. No VM: none of these reaches a hypervisor."""
    tmp_path.mkdir(exist_ok=True)
    p = Porthole(tmp_path, vnc=f'listen = "127.0.0.1:{5900 + free_vnc_display()}"\nhandshake_timeout_secs = 2')
    port = int(re.search(r'listen = "127.0.0.1:(\d+)"', (tmp_path / "porthole.toml").read_text()).group(1))
    failure = (1).to_bytes(4, "big") + len(GENERIC_FAILURE).to_bytes(4, "big") + GENERIC_FAILURE

    def rfb(timeout=5):
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        assert recv_exact(s, 12) == b"RFB 003.008\n"
        return s

    def until_closed(s, timeout=5):
        """Everything the listener still sends, up to its close."""
        s.settimeout(timeout)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        s.close()
        return got

    def vencrypt_x509plain():
        s = rfb()
        s.sendall(b"RFB 003.008\n")
        assert recv_exact(s, 2) == b"\x01\x13", "VeNCrypt only"
        s.sendall(b"\x13")
        assert recv_exact(s, 2) == b"\x00\x02"
        s.sendall(b"\x00\x02")
        assert recv_exact(s, 6) == b"\x00\x01" + (262).to_bytes(4, "big"), "X509Plain only"
        return s

    def plain_credentials(password):
        s = vencrypt_x509plain()
        s.sendall((262).to_bytes(4, "big"))
        assert recv_exact(s, 1) == b"\x01"
        tls = ssl.create_default_context(cafile=str(p.spice_ca)).wrap_socket(s, server_hostname="127.0.0.1")
        user = b"porthole"
        tls.sendall(len(user).to_bytes(4, "big") + len(password).to_bytes(4, "big") + user + password)
        return until_closed(tls)

    try:
        # The None type (not offered).
        s = rfb()
        s.sendall(b"RFB 003.008\n")
        assert recv_exact(s, 2) == b"\x01\x13"
        s.sendall(b"\x01")
        assert until_closed(s) == failure
        # An HTTP request.
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert until_closed(s) == (b"RFB 003.008\n\x00" + len(GENERIC_FAILURE).to_bytes(4, "big")
                                   + GENERIC_FAILURE)
        # VeNCrypt, then X509None (not offered): refused, never TLS.
        s = vencrypt_x509plain()
        s.sendall((260).to_bytes(4, "big"))
        assert until_closed(s) == b"\x00" + failure
        # A made-up ticket, inside TLS.
        assert plain_credentials(secrets.token_urlsafe(24).encode()) == failure
        # A SPICE ticket is not a VNC one.
        spice = p.spice_details(p.mint("spice-direct", 5999, tls_port=5998)["token"])
        assert plain_credentials(spice["ticket"].encode()) == failure
        # Silence: the handshake deadline (2 s) ends it (a bare close: the
        # timed-out handshake owned the stream).
        s = rfb(timeout=10)
        started = time.monotonic()
        assert until_closed(s, timeout=10) == b""
        assert 1.5 < time.monotonic() - started < 5
        # Junk where the TLS ClientHello should be.
        s = vencrypt_x509plain()
        s.sendall((262).to_bytes(4, "big"))
        assert recv_exact(s, 1) == b"\x01"
        s.sendall(b"\x16\x03\x01\x00\x05hello, not TLS" * 4)
        until_closed(s)

        log = p.wait_for_log('reason="tls_handshake"')
        expected = {"security_type_not_offered": 2, "not_rfb": 1, "ticket_unknown": 1, "wrong_console_type": 1,
                    "handshake_timeout": 1, "tls_handshake": 1}
        for reason in expected:
            assert f'reason="{reason}"' in log, (reason, log[-3000:])
        assert "session started" not in log
        assert log.count("vnc handshake refused") == sum(expected.values()), log[-3000:]
        # One count per refused connection, as logged.
        counted = {reason: failures(p, reason) for reason in expected}
        assert counted == expected, f"porthole_handshake_failures_total: {counted}"
    finally:
        stopped(p)


def recv_exact(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise EOFError(f"closed after {got!r}")
        got += chunk
    return got
