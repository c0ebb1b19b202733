"""End-to-end helpers: Porthole as a process with its own key, and Debian's
Chromium driven by playwright-core (tests/e2e/browser.mjs)."""

import json
import pathlib
import secrets
import socket
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "interop"))
sys.path.insert(0, str(HERE))

from harness import AUDIENCE, ISSUER, ROOT, Gateway, Key, free_port, run  # noqa: E402
import leak_check  # noqa: E402


class Porthole:
    """A running gateway with its own signing key, and a way to mint tokens for it."""

    def __init__(self, tmp, websocket="", listen_extra="", scheme="http", spice="", backend_extra="", vnc=None,
                 web=None, sections="", key=None, base_url=None, certs_of=None, spice_address="127.0.0.1",
                 public_address="127.0.0.1"):
        """spice: extra lines for [spice]; backend_extra: lines for the loopback
        [[backends]] entry (e.g. its [backends.spice] table, which must come last).
        Porthole's native SPICE TLS listener is always on, with its own test CA
        (self.spice_ca, self.spice_subject) on self.spice_tls_port.
        vnc: lines for a [vnc] section (e.g. its listen address; the native VNC
        listener then uses the SPICE listener's certificate); None: no [vnc].
        web: the [web] section's lines; None: the checkout's web/ as root.
        sections: more sections (e.g. [nova]), before [[backends]].
        key: another gateway's signing key (nodes of one cluster share it).
        base_url: listen.public_base_url (and self.base, so minted URLs use it):
        the balancer's address in front of several nodes; default this node's.
        certs_of: another Porthole whose SPICE certificate, key and CA this one
        presents too (every node behind one balancer address must).
        spice_address: where the native SPICE TLS listener listens (a test
        host's gateway address, for a client on that host).
        public_address: where the public listener listens (likewise, or
        "[::]" for a dual-stack listener reached over IPv4)."""
        from vm import make_spice_certs
        self.key = key or Key(tmp, "EdDSA", "e2e")
        self.public_port = free_port()
        self.admin_port = free_port()
        self.spice_tls_port = free_port()
        # A wildcard listener (e.g. "[::]") is reached on loopback.
        reach = "127.0.0.1" if public_address.startswith("[") else public_address
        self.base = base_url or f"{scheme}://{reach}:{self.public_port}"
        if certs_of is None:
            certs = tmp / "porthole-spice-certs"
            self.spice_subject = make_spice_certs(certs)
        else:
            certs, self.spice_subject = certs_of.spice_certs, certs_of.spice_subject
        self.spice_certs = certs
        self.spice_ca = certs / "ca-cert.pem"
        # The admin API's bearer key (an [issuance] bearer key), and the audit file.
        self.bearer = tmp / "admin-bearer.key"
        self.bearer.write_text(secrets.token_urlsafe(24))
        self.audit_path = tmp / "audit.jsonl"
        web_lines = f'root = "{ROOT / "web"}"' if web is None else web
        config = tmp / "porthole.toml"
        config.write_text(f"""
[listen]
public = "{public_address}:{self.public_port}"
admin = "127.0.0.1:{self.admin_port}"
public_base_url = "{self.base}"
{listen_extra}
[tokens]
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]

{self.key.config_entry()}

[websocket]
{websocket}

[web]
{web_lines}

[issuance]
bearer_key_files = ["{self.bearer}"]
signing_key = "{self.key.private}"
signing_kid = "{self.key.kid}"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"

[audit]
path = "{self.audit_path}"

[spice]
listen_tls = "{spice_address}:{self.spice_tls_port}"
tls_cert = "{certs / 'server-cert.pem'}"
tls_key = "{certs / 'server-key.pem'}"
ca = "{self.spice_ca}"
{spice}
{"" if vnc is None else "[vnc]" + chr(10) + vnc}
{sections}

[[backends]]
name = "loopback"
networks = ["127.0.0.0/8"]
ports = ["1024-65535"]
{backend_extra}
""")
        leak_check.watch(tmp / "porthole.log")
        leak_check.watch(self.audit_path)
        leak_check.remember(self.bearer.read_text())
        self.gateway = Gateway(["--config", str(config)], tmp / "porthole.log", admin_port=self.admin_port)

    def mint(self, console, port, ttl=120, host="127.0.0.1", tls_port=None, view_only=False, record=False):
        """A token from `porthole token mint`; view_only: --view-only (the
        client may watch, Porthole drops its input); record: --record (the
        session must be recorded)."""
        extra = ["--tls-port", str(tls_port)] if tls_port else []
        if view_only:
            extra.append("--view-only")
        if record:
            extra.append("--record")
        out = run("token", "mint", "--key", str(self.key.private), "--kid", self.key.kid, "--type", console,
                  "--instance", "e2e-vm", "--host", host, "--port", str(port), "--ttl", str(ttl),
                  "--issuer", ISSUER, "--audience", AUDIENCE, "--base-url", self.base, "--json", *extra).stdout
        minted = json.loads(out)
        leak_check.remember(minted["token"])
        return minted

    def spice_details(self, token):
        """The exchange: JSON connection details with a fresh ticket."""
        import urllib.parse
        from harness import http
        status, body = http("GET", f"{self.base}/spice-direct?format=json&token={urllib.parse.quote(token)}")[:2]
        assert status == 200, (status, body)
        details = json.loads(body)
        leak_check.remember_ticket(details["ticket"])
        return details

    def log(self):
        return self.gateway.output()

    def wait_for_log(self, needle, timeout=10):
        """Porthole's log once it holds `needle` (a session's end is written
        just after its close frame goes out); fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while needle not in (log := self.log()):
            assert time.monotonic() < deadline, f"{needle!r} not in Porthole's log:\n{log[-3000:]}"
            time.sleep(0.05)
        return log

    def audit(self):
        """The audit trail so far, as a list of events."""
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def admin(self, method, path, body=None, actor=None):
        """Calls the admin API with the bearer key; returns (status, JSON)."""
        import urllib.request
        import urllib.error
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.bearer.read_text()}",
                                              "Content-Type": "application/json",
                                              **({"X-Porthole-Actor": actor} if actor else {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def cli(self, *args):
        """Runs `porthole ARGS` against this gateway's admin API."""
        from harness import run
        return run(*args, "--admin", f"http://127.0.0.1:{self.admin_port}", "--bearer-file", str(self.bearer))

    def metrics(self):
        from harness import http
        return http("GET", f"http://127.0.0.1:{self.admin_port}/metrics")[1]


def get_from(client, port, path):
    """GET http://127.0.0.1:PORT/PATH from the local address `client` (e.g.
    127.0.0.5, to tell a client behind a balancer from the balancer): (status, body)."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(client, 0))
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def browser(*args, timeout=90):
    """Runs browser.mjs; returns its JSON result."""
    p = subprocess.run(["node", str(HERE / "browser.mjs"), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=HERE)
    if p.returncode != 0:
        raise AssertionError(f"browser.mjs failed:\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])



def first_line(proc, within=120):
    """The next line `proc` prints on its stdout (a pipe), or a failure
    once `within` seconds pass without one (the process is killed): a
    browser that hangs fails its test instead of holding the run."""
    import select
    ready, _, _ = select.select([proc.stdout], [], [], within)
    if not ready:
        proc.kill()
        raise AssertionError(f"no line from {proc.args[:3]} within {within} s")
    return proc.stdout.readline()


def wait_for(condition, what, within=20):
    """Polls condition() until it gives something true (returned) or `within` s pass."""
    deadline = time.monotonic() + within
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def ws_url(p, endpoint, token):
    """`endpoint`'s WebSocket URL on Porthole `p`'s public listener, with a token."""
    return f"ws://127.0.0.1:{p.public_port}/{endpoint}?token={token}"


def refused(url, status):
    """Opens the WebSocket `url`, which must be refused with HTTP `status`;
    returns the refusal's body."""
    import pytest
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect
    with pytest.raises(InvalidStatus) as e:
        connect(url, open_timeout=10)
    assert e.value.response.status_code == status, e.value.response
    return e.value.response.body


def close_code(ws, within=15):
    """Reads the WebSocket `ws` until it closes (at most `within` s); its close code."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            ws.recv(timeout=1)
        except TimeoutError:
            continue
        except Exception:  # noqa: BLE001 - the close is what we wait for
            break
    return ws.close_code


class FakeServer:
    """A TCP server on a free loopback port that counts the connections it
    accepts and hands each to handle() (a subclass's), from its accept thread.

    That thread polls a stop flag and is joined before the socket is closed:
    a thread still blocked on a closed socket's descriptor number would
    otherwise accept on whichever socket reuses that number next (one test's
    server stealing the next test's connections). Subclasses set their own
    attributes before calling __init__, which starts the thread."""

    def __init__(self, backlog=16):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(backlog)
        self.srv.settimeout(0.1)
        self.port = self.srv.getsockname()[1]
        self._lock = threading.Lock()
        self._accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def accepted(self):
        with self._lock:
            return self._accepted

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self._accepted += 1
            self.handle(conn)

    def handle(self, conn):
        raise NotImplementedError

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.srv.close()


class EchoBackend(FakeServer):
    """A TCP backend on a free port that counts connections and echoes."""

    def __init__(self, rfb=False):
        """rfb=True: first a minimal RFB 3.8 server handshake (security None,
        a 1x1 ServerInit), as a VNC console behind Porthole's security proxy
        needs; then the echo. The client side is rfb_client_handshake()."""
        self.rfb = rfb
        super().__init__()

    def handle(self, conn):
        threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        with conn:
            try:
                if self.rfb:
                    conn.settimeout(10)
                    conn.sendall(b"RFB 003.008\n")
                    _recv_exact(conn, 12)
                    conn.sendall(b"\x01\x01")  # one security type: None
                    _recv_exact(conn, 1)
                    conn.sendall(b"\x00\x00\x00\x00")  # SecurityResult OK
                    _recv_exact(conn, 1)  # ClientInit
                    conn.sendall(SERVER_INIT)
                    conn.settimeout(None)
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass


class FloodBackend(FakeServer):
    """A console that writes as fast as its reader takes, until closed."""

    def handle(self, conn):
        threading.Thread(target=self._flood, args=(conn,), daemon=True).start()

    def _flood(self, conn):
        conn.settimeout(0.5)
        with conn:
            while not self._stop.is_set():
                try:
                    conn.send(b"\x55" * 65536)
                except socket.timeout:
                    continue
                except OSError:
                    return


# A 1x1 ServerInit: 32 bpp true colour, name "echo".
SERVER_INIT = (b"\x00\x01\x00\x01" + bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
               + b"\x00\x00\x00\x04echo")


def _recv_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def rfb_client_handshake(ws, timeout=10, server_init=SERVER_INIT):
    """The browser's side of an RFB handshake through Porthole's security
    proxy (offered None), up to the hypervisor's ServerInit (with its name);
    returns it, checked against `server_init` (the echo backend's) unless
    that is None (a real VM's)."""
    assert ws.recv(timeout=timeout) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    assert ws.recv(timeout=timeout) == b"\x01\x01", "only None is offered to browsers"
    ws.send(b"\x01")
    got = b""
    while len(got) < 4:
        got += ws.recv(timeout=timeout)
    assert got[:4] == b"\x00\x00\x00\x00", got
    ws.send(b"\x01")  # ClientInit: shared
    got = got[4:]
    while len(got) < 24 or len(got) < 24 + int.from_bytes(got[20:24], "big"):
        got += ws.recv(timeout=timeout)
    if server_init is not None:
        assert got == server_init, got
    return got
