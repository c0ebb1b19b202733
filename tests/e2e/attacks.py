"""Attacks on a running Porthole, at any scale: the floods of issue #10 as a
hostile client would run them. tests/e2e/test_chaos.py runs them small
(hundreds) and asserts what must hold; scripts/attack runs them at full
scale (tens of thousands) and prints what held.

Every attacker and victim has its own loopback source address (127.0.0.2,
127.0.0.3, ...): Porthole counts connections per address, and an attack
from one address must not touch another's console. Nothing here asserts
speed: callers get measurements and decide what to check."""

import errno
import http.client
import json
import os
import resource
import selectors
import socket
import ssl
import struct
import threading
import time
import urllib.parse

from websockets.sync.client import connect

import leak_check


# --- the machine --------------------------------------------------------------

def raise_fd_limit():
    """Raises this process's soft descriptor limit to the hard one; returns
    (soft before, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def fd_count(pid):
    """Open descriptors of process pid."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid):
    """Resident memory of process pid, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class ProcWatch:
    """Samples a process's descriptors and resident memory every `every` s
    in a thread, keeping the peaks (and the start values) until stop()."""

    def __init__(self, pid, every=0.05):
        self.pid, self.every = pid, every
        self.fds_start = self.fds_peak = fd_count(pid)
        self.rss_start = self.rss_peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.fds_peak = max(self.fds_peak, fd_count(self.pid))
                self.rss_peak = max(self.rss_peak, rss_kib(self.pid))
            except OSError:
                return

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        return self


def connect_from(src, port, timeout=10, host="127.0.0.1"):
    """A blocking TCP connection from source address src to host:port."""
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect((host, port))
    return s


def listener_queue(port):
    """What the kernel holds for the listener on 127.0.0.1:port, for a
    failure's message: its accept queue (ss's Recv-Q on the LISTEN line)
    and its connections by state (SYN-RECV: a handshake not finished)."""
    import subprocess
    try:
        out = subprocess.run(["ss", "-tanH", f"( sport = :{port} )"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"ss: {e}"
    states = {}
    listen = ""
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "LISTEN":
            listen = line
        elif fields:
            states[fields[0]] = states.get(fields[0], 0) + 1
    return f"listener: {listen.strip()!r}; connections by state: {states}"


def metric_sum(text, name, **labels):
    """A metric's value summed over every series whose labels include
    `labels` (0 when none): counters split by labels we do not care about
    (e.g. blame) are added up."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            if all(w in series for w in want):
                total += int(float(value))
    return total


# --- consoles that must keep working ------------------------------------------

class EchoConsole:
    """Another user's serial console (a fake that echoes), opened over
    Porthole's WebSocket from its own address. probe() sends random bytes
    and reads them back."""

    def __init__(self, p, backend_port, src="127.0.0.2", timeout=10):
        token = p.mint("serial", backend_port)["token"]
        started = time.monotonic()
        sock = connect_from(src, p.public_port, timeout)
        self.ws = connect(f"ws://127.0.0.1:{p.public_port}/serial?token={token}", sock=sock,
                          open_timeout=timeout, max_size=None)
        self.opened_ms = (time.monotonic() - started) * 1000
        self.timeout = timeout
        self.received = 0

    def probe(self):
        """Sends 64 random bytes and reads them back; returns the seconds it took."""
        started = time.monotonic()
        data = os.urandom(64)
        self.ws.send(data)
        got = b""
        while len(got) < len(data):
            got += self.ws.recv(timeout=self.timeout)
        assert got == data, "the echo came back changed"
        self.received += len(got)
        return time.monotonic() - started

    def close(self):
        self.ws.close()


class VncConsole:
    """Another user's noVNC console on a real VM, from its own address: an
    RFB client over Porthole's WebSocket (Porthole offers browsers security
    None). probe() asks for an 8x8 non-incremental update, which QEMU always
    answers, and reads it whole."""

    def __init__(self, p, vnc_port, src="127.0.0.2", timeout=10, host="127.0.0.1"):
        token = p.mint("novnc", vnc_port, host=host)["token"]
        started = time.monotonic()
        sock = connect_from(src, p.public_port, timeout)
        self.ws = connect(f"ws://127.0.0.1:{p.public_port}/vnc?token={token}", sock=sock,
                          open_timeout=timeout, max_size=None)
        self.timeout = timeout
        self.buf = b""
        self.received = 0
        assert self._read(12) == b"RFB 003.008\n"
        self.ws.send(b"RFB 003.008\n")
        assert self._read(2) == b"\x01\x01", "only None is offered to browsers"
        self.ws.send(b"\x01")
        assert self._read(4) == b"\x00\x00\x00\x00", "security result"
        self.ws.send(b"\x01")  # ClientInit: shared
        init = self._read(24)
        self.bytes_per_pixel = init[4] // 8
        self._read(struct.unpack(">I", init[20:24])[0])  # the desktop's name
        self.opened_ms = (time.monotonic() - started) * 1000

    def _read(self, n):
        while len(self.buf) < n:
            self.buf += self.ws.recv(timeout=self.timeout)
        data, self.buf = self.buf[:n], self.buf[n:]
        self.received += n
        return data

    def probe(self):
        """One 8x8 update, asked for and read; returns the seconds it took."""
        started = time.monotonic()
        self.ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 8, 8))
        kind, _, rects = struct.unpack(">BBH", self._read(4))
        assert kind == 0, f"message type {kind}, not a FramebufferUpdate"
        for _ in range(rects):
            _, _, w, h, encoding = struct.unpack(">HHHHi", self._read(12))
            assert encoding == 0, f"encoding {encoding}: only raw was allowed"
            self._read(w * h * self.bytes_per_pixel)
        return time.monotonic() - started

    def close(self):
        self.ws.close()


# --- connection floods ----------------------------------------------------------

class Flood:
    """n TCP connections to 127.0.0.1:port from the `sources` addresses in
    turn, that never send a byte (half-open, as far as the server's protocol
    goes), run in a thread. It keeps every connection that stays open and
    notes each one the server closes and when. Connections the server's
    kernel has not let in yet (a full backlog drops SYNs) complete later, on
    the kernel's retries.

    Counters: started, connected, failed (the connect itself failed),
    closed (by the server), and for each closed one its life in seconds."""

    def __init__(self, port, n, sources, connect_timeout=60, start=True):
        self.port, self.n, self.sources = port, n, list(sources)
        self.connect_timeout = connect_timeout
        self.started = self.connected = self.failed = self.closed = 0
        self.lives = []
        # When the first and the last connect completed (from the flood's start).
        self.began = time.monotonic()
        self.connects_done = [None, None]
        self.peak_open = 0
        self.connect_errors = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        if start:
            self.start()

    def start(self):
        """Starts the connects (at once, unless made with start=False)."""
        self.began = time.monotonic()
        self._thread.start()

    @property
    def open(self):
        with self._lock:
            return self.connected - self.closed

    @property
    def in_progress(self):
        with self._lock:
            return self.started - self.connected - self.failed

    def _run(self):
        sel = selectors.DefaultSelector()
        try:
            self._open_all(sel)
            next_expiry = time.monotonic() + 1
            while not self._stop.is_set():
                for key, mask in sel.select(0.1):
                    self._event(sel, key)
                if time.monotonic() > next_expiry:
                    self._expire_connects(sel)
                    next_expiry = time.monotonic() + 1
        finally:
            for s, _ in list(self._socks.values()):
                try:
                    # A reset, not a FIN: no TIME_WAIT left behind per connection.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                s.close()
            self._socks.clear()
            sel.close()

    def _open_all(self, sel):
        for i in range(self.n):
            if self._stop.is_set():
                return
            s = socket.socket()
            s.setblocking(False)
            try:
                s.bind((self.sources[i % len(self.sources)], 0))
                err = s.connect_ex(("127.0.0.1", self.port))
            except OSError as e:
                err = e.errno
            with self._lock:
                self.started += 1
            if err not in (0, errno.EINPROGRESS):
                self._failed(s, err)
                continue
            self._socks[s.fileno()] = (s, time.monotonic())
            sel.register(s, selectors.EVENT_WRITE, "connecting")
            # Between connects, take what has happened so far (keeps the
            # selector's backlog of events short at large n).
            if i % 500 == 499:
                for key, _ in sel.select(0):
                    self._event(sel, key)

    def _failed(self, s, err):
        with self._lock:
            self.failed += 1
            name = errno.errorcode.get(err, str(err))
            self.connect_errors[name] = self.connect_errors.get(name, 0) + 1
        s.close()

    def _event(self, sel, key):
        s = key.fileobj
        fd = s.fileno()
        if key.data == "connecting":
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sel.unregister(s)
                del self._socks[fd]
                self._failed(s, err)
                return
            with self._lock:
                self.connected += 1
                self.peak_open = max(self.peak_open, self.connected - self.closed)
                at = round(time.monotonic() - self.began, 3)
                first = self.connects_done[0]
                self.connects_done = [at if first is None else first, at]
            self._socks[fd] = (s, time.monotonic())
            sel.modify(s, selectors.EVENT_READ, "open")
            return
        try:
            data = s.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # an answer (e.g. an error page): still open until it closes
        _, since = self._socks.pop(fd)
        sel.unregister(s)
        s.close()
        with self._lock:
            self.closed += 1
            self.lives.append(time.monotonic() - since)

    def _expire_connects(self, sel):
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            if key.data == "connecting":
                s, since = self._socks[key.fd]
                if now - since > self.connect_timeout:
                    sel.unregister(s)
                    del self._socks[key.fd]
                    self._failed(s, errno.ETIMEDOUT)

    def wait(self, condition, timeout):
        """Waits until condition(self) holds; returns whether it did."""
        deadline = time.monotonic() + timeout
        while not condition(self):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def settled(self, quiet=1.0, timeout=60):
        """Waits until every connect has finished and no connection has been
        closed for `quiet` s; returns whether that happened within timeout."""
        deadline = time.monotonic() + timeout
        last = (-1, -1)
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                now = (self.connected + self.failed, self.closed)
                done = self.connected + self.failed == self.n
            if now != last:
                last, last_change = now, time.monotonic()
            elif done and time.monotonic() - last_change >= quiet:
                return True
            time.sleep(0.05)
        return False

    def closed_within(self, secs):
        with self._lock:
            return sum(1 for life in self.lives if life <= secs)

    def stop(self):
        """Closes every connection still open (with a reset)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=60)
        return self

    def report(self):
        """The summary with the lives folded (slowest and fastest five), for
        a failure's message."""
        s = self.summary()
        lives = sorted(s.pop("lives"))
        with self._lock:
            s["connects_done_at"] = list(self.connects_done)
        s["lives"] = {"fastest": [round(x, 2) for x in lives[:5]],
                      "slowest": [round(x, 2) for x in lives[-5:]]}
        return s

    def summary(self):
        with self._lock:
            return {"started": self.started, "connected": self.connected, "failed": self.failed,
                    "closed": self.closed, "open": self.connected - self.closed, "peak_open": self.peak_open,
                    "connect_errors": dict(self.connect_errors), "lives": list(self.lives)}


# --- the admin listener ---------------------------------------------------------

def healthz(admin_port, src="127.0.0.1", timeout=10):
    """GET /healthz on the admin listener from src; returns (status, seconds)."""
    started = time.monotonic()
    c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=timeout, source_address=(src, 0))
    try:
        c.request("GET", "/healthz")
        status = c.getresponse().status
    finally:
        c.close()
    return status, time.monotonic() - started


def unauthenticated_bodies(admin_port, n, src, announced=2 * 1024 * 1024, sent=64 * 1024, timeout=10):
    """n connections, each a POST /v1/consoles without a bearer that
    announces a 2 MiB body and sends 64 KiB of it, then waits: all at once
    (the old admin listener read each whole body first). Returns the status
    codes answered (None: closed without an answer) and the sockets, still
    open, for the caller to close."""
    socks, statuses = [], []
    head = (f"POST /v1/consoles HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {announced}\r\n\r\n").encode()
    for _ in range(n):
        s = connect_from(src, admin_port, timeout)
        s.sendall(head)
        socks.append(s)
    for s in socks:
        try:
            s.settimeout(0.5)
            s.sendall(b"{" + b" " * (sent - 1))
        except OSError:
            pass  # refused before the body: Porthole may close its side
    for s in socks:
        s.settimeout(timeout)
        try:
            line = s.recv(64).split(b"\r\n", 1)[0]
            statuses.append(int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else None)
        except OSError:
            statuses.append(None)
    return statuses, socks


# --- tickets ----------------------------------------------------------------------

def exchange_many(p, token, n, src, endpoint="vnc-direct", min_secs=0):
    """Exchanges one token n times (and for at least min_secs) on one
    kept-alive connection from src (GET /vnc-direct); returns
    ({status: count}, [tickets in order])."""
    statuses, tickets = {}, []
    c = http.client.HTTPConnection("127.0.0.1", p.public_port, timeout=10, source_address=(src, 0))
    path = f"/{endpoint}?token={urllib.parse.quote(token)}"
    started = time.monotonic()
    done = 0
    try:
        while done < n or time.monotonic() - started < min_secs:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            done += 1
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if r.status == 200:
                tickets.append(json.loads(body)["ticket"])
            if r.getheader("connection", "").lower() == "close":
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", p.public_port, timeout=10, source_address=(src, 0))
    finally:
        c.close()
    for t in (tickets[:1] + tickets[-1:]):
        leak_check.remember(t)
    return statuses, tickets


def exchange_once(p, token, src="127.0.0.1", endpoint="vnc-direct"):
    """One exchange from src; returns (status, JSON body or None)."""
    statuses, tickets = exchange_many(p, token, 1, src, endpoint)
    status = next(iter(statuses))
    return status, (tickets[0] if tickets else None)


class NativeVnc:
    """A native VNC client on Porthole's VNC listener, from src: VeNCrypt
    X509Plain (Porthole's CA), the ticket as the password. ok says whether
    the security result was OK; the connection stays open (the session runs)
    until close()."""

    def __init__(self, port, context, ticket, src, timeout=10):
        self.tls = None
        s = connect_from(src, port, timeout)
        try:
            assert _recv_exact(s, 12) == b"RFB 003.008\n"
            s.sendall(b"RFB 003.008\n")
            assert _recv_exact(s, 2) == b"\x01\x13", "VeNCrypt only"
            s.sendall(b"\x13")
            assert _recv_exact(s, 2) == b"\x00\x02"
            s.sendall(b"\x00\x02")
            assert _recv_exact(s, 6) == b"\x00\x01" + (262).to_bytes(4, "big"), "X509Plain only"
            s.sendall((262).to_bytes(4, "big"))
            assert _recv_exact(s, 1) == b"\x01"
            self.tls = context.wrap_socket(s, server_hostname="127.0.0.1")
            user, password = b"porthole", ticket.encode()
            self.tls.sendall(len(user).to_bytes(4, "big") + len(password).to_bytes(4, "big") + user + password)
            self.ok = _recv_exact(self.tls, 4) == b"\x00\x00\x00\x00"
        except (OSError, EOFError):
            self.ok = False
        if not self.ok:
            self.close()

    def close(self):
        if self.tls is not None:
            self.tls.close()
            self.tls = None


def tls_context(ca):
    return ssl.create_default_context(cafile=str(ca))


def guess_tickets(vnc_port, ca, n, src, workers=4, min_secs=0):
    """n made-up tickets (and more until min_secs have passed) presented on
    the native VNC listener from src by `workers` threads. Returns (guesses
    let in, which must be 0; guesses made); a guess that breaks off before
    its answer raises."""
    context = tls_context(ca)
    lock = threading.Lock()
    state = {"made": 0, "let_in": 0, "error": None}
    started = time.monotonic()

    def work():
        while True:
            with lock:
                if state["error"] or (state["made"] >= n and time.monotonic() - started >= min_secs):
                    return
                state["made"] += 1
            try:
                guess = NativeVnc(vnc_port, context, os.urandom(16).hex(), src)
            except Exception as e:  # noqa: BLE001 (re-raised below, in the caller's thread)
                state["error"] = e
                return
            if guess.ok:
                with lock:
                    state["let_in"] += 1
                guess.close()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["error"]:
        raise state["error"]
    return state["let_in"], state["made"]


# --- liveness -------------------------------------------------------------------------

def masked_frame(opcode, payload):
    """A client frame (masked, as RFC 6455 requires), FIN set."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def unsolicited_pongs(p, token, src, every=0.3, timeout=120):
    """A serial WebSocket client from src that never reads (a 4 KiB receive
    buffer) but sends a pong every `every` s. Returns the seconds until
    Porthole's log says it was cut as unresponsive (None: not within
    timeout)."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.bind((src, 0))
    client.settimeout(10)
    client.connect(("127.0.0.1", p.public_port))
    try:
        client.sendall((f"GET /serial?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        assert client.recv(12) == b"HTTP/1.1 101", "the upgrade was refused"
        started = time.monotonic()
        cut = 'reason="client_unresponsive"'
        before = p.log().count(cut)
        while p.log().count(cut) == before:
            if time.monotonic() - started > timeout:
                return None
            try:
                client.sendall(masked_frame(0xA, b"alive"))
            except OSError:
                pass  # cut: the log line follows
            time.sleep(every)
        return time.monotonic() - started
    finally:
        client.close()


def _recv_exact(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise EOFError(f"closed after {got!r}")
        got += chunk
    return got


class Prober:
    """Probes a console (anything with probe()) every `every` s in a thread
    and notes when each probe completed; the first failure stops it and is
    kept. flowed(start, end) says whether bytes went both ways in between."""

    def __init__(self, console, every=0.05):
        self.console, self.every = console, every
        self.done = []
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.console.probe()
            except Exception as e:  # kept and reported by the caller
                self.error = e
                return
            self.done.append(time.monotonic())

    def flowed(self, start, end):
        return any(start <= t <= end for t in list(self.done))

    def wait_for_probe_after(self, start, timeout=15):
        """Waits for a probe that completed after `start`; returns whether one did."""
        deadline = time.monotonic() + timeout
        while not (self.done and self.done[-1] > start):
            if self.error is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=30)
        return self
