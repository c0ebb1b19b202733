"""HTTP responses over a slow link, from a test host of our own (netns.py)
whose link this machine shapes with the kernel's token bucket (tc tbf): 512
kbit/s through a queue of up to a second, a bad mobile link. Porthole gives
up a response its client takes none of for `websocket.upgrade_timeout_secs`
(transport/write_stall.rs). The write it waits on moves only as the
kernel's send queue drains, so on a link like this one it waits about a
round trip, queueing included, between steps: a client the link holds back
(not the client itself) must still get a large file whole (the 489 KB
xterm.js served under /vendor/xterm, larger than anything a console page
loads), and a client on the same link that stops reading must still be
given up.
Nothing asserts speed; the bounds are generous."""

import select
import subprocess
import time

from harness import ROOT
from netns import TestHost
from support import Porthole

DEADLINE = 5  # upgrade_timeout_secs
# xterm.js's CommonJS build (489 KB), larger than anything a page loads
# (the serial page's xterm.mjs is 345 KB): at 512 kbit/s it takes longer
# than a deadline.
ASSET = "/vendor/xterm/lib/xterm.js"
ASSET_FILE = ROOT / "web/node_modules/@xterm/xterm/lib/xterm.js"

CLIENT = """
import socket, sys, time
address, port, path, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket()
if mode == "stop":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # what it holds unread stays small
s.settimeout(120)
s.connect((address, port))
s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: {address}\\r\\nConnection: close\\r\\n\\r\\n".encode())
got = b""
while b"\\r\\n\\r\\n" not in got:
    got += s.recv(4096)
print(got.split(b"\\r\\n")[0].decode(), flush=True)
if mode == "stop":
    time.sleep(120)  # reads no more; the test ends it
t0 = time.monotonic()
while True:
    b = s.recv(65536)
    if not b:
        break
    got += b
print(len(got.partition(b"\\r\\n\\r\\n")[2]), round(time.monotonic() - t0, 1), flush=True)
"""


def shape(host):
    """What this machine sends the host leaves at 512 kbit/s, through a
    queue of up to a second."""
    done = subprocess.run(["tc", "qdisc", "add", "dev", host.outside, "root", "tbf", "rate", "512kbit",
                           "burst", "32kbit", "latency", "1000ms"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"tc: {done.stderr.strip()} (the test needs root and iproute2's tc)"


def established(port, peer):
    """Porthole's connections on `port` to `peer` that are still open."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [line for line in out.splitlines() if f"{peer}:" in line]


def test_a_client_held_back_by_a_slow_link_gets_a_page_whole_and_one_that_stops_reading_is_given_up(tmp_path):
    size = ASSET_FILE.stat().st_size
    assert size > 400_000, size
    host = TestHost()
    p = None
    stopped = None
    try:
        shape(host)
        p = Porthole(tmp_path, websocket=f"upgrade_timeout_secs = {DEADLINE}", public_address=host.gateway)
        args = [*host.run_there, "python3", "-c", CLIENT, host.gateway, str(p.public_port), ASSET]

        # Held back by the link: the whole file, over several deadlines.
        done = subprocess.run([*args, "all"], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        status, body = done.stdout.splitlines()[:2]
        assert status == "HTTP/1.1 200 OK", done.stdout
        got, took = body.split()
        assert int(got) == size, (got, size)
        print(f"{size} bytes at 512 kbit/s through a 1 s queue in {took} s, deadline {DEADLINE} s")
        assert float(took) > DEADLINE, "the link did not hold the response past one deadline"

        # The same link, a client that stops reading after the head: Porthole
        # closes its side within a few deadlines, while the client still
        # holds the connection open.
        stopped = subprocess.Popen([*args, "stop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([stopped.stdout], [], [], 30)
        assert ready, "no answer's head within 30 s"
        head = stopped.stdout.readline().strip()
        assert head == "HTTP/1.1 200 OK", (head, stopped.stderr.read() if stopped.poll() is not None else "")
        assert established(p.public_port, host.address), "no connection from the host"
        started = time.monotonic()
        while established(p.public_port, host.address):
            assert time.monotonic() - started < 6 * DEADLINE, "a client that reads nothing kept its response"
            assert stopped.poll() is None, "the client ended first"
            time.sleep(0.2)
        print(f"a client that stopped reading was given up {time.monotonic() - started:.1f} s after its head")
    finally:
        try:
            if stopped is not None:
                stopped.kill()
                stopped.communicate(timeout=30)
            if p is not None:
                assert p.gateway.stop() == 0, p.log()[-3000:]
        finally:
            host.remove()
