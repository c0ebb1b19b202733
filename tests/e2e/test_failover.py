"""Redis fails over under two Porthole nodes, deployed as docs/scaling.md
says: a primary, one replica and three Sentinels (Debian's redis-sentinel,
quorum 2, down-after 1 s), and HAProxy in TCP mode in front of both Redis
servers, sending connections only to the one whose INFO says role:master;
both nodes' [store] url is HAProxy's. The console is QEMU's VNC display.

The primary is killed (SIGKILL) while a session runs on node A. The session
goes on; new sessions are refused as unavailable (503) until Sentinel has
promoted the replica and HAProxy follows it, then admitted again, within a
bound (the figures are printed). Nothing the replica had is lost: the epoch
is the same (no node re-seeds), node B still lists node A's session and
ends it (through the store's channels, which node A follows again), its
token's lease still holds, and a token revoked before the kill is still
refused."""

import struct
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from harness import free_port
from peers import HAProxy, RedisServer, Route, Sentinel, redis_command
from support import Porthole, close_code, refused, rfb_client_handshake, wait_for, ws_url

NODES = ("node-a", "node-b")
# The default lease: every lease and session entry must outlive the failover
# (an entry whose lease ran out while no primary answered is gone).
LEASE = 30
DOWN_AFTER_MS = 1000
# From the kill to both nodes admitting again (measured: see docs/scaling.md).
BOUND = 30
PREFIX = "e2e:"


class Store:
    """The primary, its replica, the Sentinels and HAProxy's frontend."""

    def __init__(self, primary, replica, sentinels, lb, front):
        self.primary, self.replica, self.sentinels = primary, replica, sentinels
        self.lb, self.front = lb, front


@pytest.fixture
def store(request, tmp_path):
    """Sentinel's down-after-milliseconds: the test's parameter, or DOWN_AFTER_MS."""
    down_after_ms = getattr(request, "param", DOWN_AFTER_MS)
    started = []
    try:
        primary = RedisServer()
        started.append(primary)
        replica = RedisServer(replica_of=primary.port)
        started.append(replica)
        wait_for(lambda: replica.info("replication").get("master_link_status") == "up", "the replica never synced")
        folder = tmp_path / "sentinels"
        folder.mkdir()
        sentinels = []
        for _ in range(3):
            sentinels.append(Sentinel(folder, primary.port, down_after_ms=down_after_ms))
            started.append(sentinels[-1])
        # Each Sentinel knows the replica (from the primary's INFO) and the
        # two others (from their hellos, every 2 s): a failover can be agreed.
        wait_for(lambda: all(s.master()["num-slaves"] == "1" and s.master()["num-other-sentinels"] == "2"
                             for s in sentinels), "the Sentinels never found each other and the replica", within=30)
        front = free_port()
        lb = HAProxy(tmp_path, {"redis": Route(front, [primary.port, replica.port], redis_primary=True)})
        started.append(lb)
        # HAProxy counts every server up until its checks fail: the nodes
        # start once the replica is out.
        wait_for(lambda: "redis_nodes/redis-1 is DOWN" in lb.output(), "HAProxy never took the replica out")
        yield Store(primary, replica, sentinels, lb, front)
    finally:
        for s in reversed(started):
            s.stop()


@pytest.fixture
def nodes(tmp_path, store):
    started = []
    try:
        for name in NODES:
            folder = tmp_path / name
            folder.mkdir()
            started.append(Porthole(folder, key=started[0].key if started else None,
                                    sections=store.replica.sections(name, lease_secs=LEASE, port=store.front)))
        yield started
    finally:
        for n in started:
            assert n.gateway.stop() == 0, n.log()[-3000:]


def frame(ws, server_init, size=16):
    """Asks QEMU for the top-left size x size pixels (non-incremental; raw
    encoding, as no SetEncodings was sent) through the session and reads the
    whole FramebufferUpdate back; returns its length."""
    bpp = server_init[4] // 8
    ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, size, size))
    buf = b""

    def take(n):
        nonlocal buf
        while len(buf) < n:
            buf += ws.recv(timeout=10)
        out, buf = buf[:n], buf[n:]
        return out

    kind, _, rects = struct.unpack(">BBH", take(4))
    assert kind == 0, f"not a FramebufferUpdate: {kind}"
    total = 4
    for _ in range(rects):
        _, _, w, h, encoding = struct.unpack(">HHHHi", take(12))
        assert encoding == 0, f"not raw: {encoding}"
        total += 12 + len(take(w * h * bpp))
    assert not buf, "more than one update"
    return total


def admit(node, vm):
    """A new session on `node` with a fresh token: "ok" (admitted: QEMU's
    banner came through), or the refusal's HTTP status (503 must say
    unavailable)."""
    token = node.mint("novnc", vm.vnc_port)["token"]
    try:
        with connect(ws_url(node, "vnc", token), open_timeout=10) as ws:
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
            return "ok"
    except InvalidStatus as e:
        status, body = e.response.status_code, e.response.body
        assert status == 503 and b"unavailable" in body, (status, body)
        return status


def role(port):
    """ROLE's first word on 127.0.0.1:port (through HAProxy: whichever it
    picks), or None if nothing answers."""
    try:
        return redis_command(port, "ROLE", timeout=0.5)[0]
    except (OSError, ConnectionError):
        return None


def subscribers(port):
    """How many connections listen on the store's two channels, by channel."""
    reply = redis_command(port, "PUBSUB", "NUMSUB", f"{PREFIX}commands", f"{PREFIX}events")
    return {channel[len(PREFIX):]: n for channel, n in zip(reply[::2], reply[1::2])}


def fmt(t):
    """Seconds (or a dict of them, by node) as printed."""
    if isinstance(t, dict):
        return ", ".join(f"{name} {fmt(v)}" for name, v in t.items())
    return "-" if t is None else f"{t:.2f}"


def store_lines(node, since):
    return [line for line in node.log()[since:].splitlines() if "store" in line]


def test_the_nodes_follow_a_failover_and_lose_nothing(vm, store, nodes):
    a, b = nodes
    primary, replica = store.primary, store.replica

    # A session on node A, its bytes flowing; node B lists it, and its token
    # is held (refused on node B).
    held = a.mint("novnc", vm.vnc_port)
    live = connect(ws_url(a, "vnc", held["token"]), open_timeout=10)
    init = rfb_client_handshake(live, server_init=None)
    assert frame(live, init)
    [session] = wait_for(lambda: b.admin("GET", "/v1/sessions")[1]["sessions"], "node B never listed the session")
    assert (session["node"], session["jti"]) == ("node-a", held["jti"]), session
    assert b"refused" in refused(ws_url(b, "vnc", held["token"]), 403)
    # A token revoked through node A, refused on node B.
    revoked = a.mint("novnc", vm.vnc_port)
    status, _ = a.admin("POST", "/v1/revocations", {"jti": revoked["jti"], "reason": "leaked"})
    assert status == 200
    assert b"revoked" in refused(ws_url(b, "vnc", revoked["token"]), 403)
    epoch = primary.command("GET", f"{PREFIX}epoch")
    assert epoch, "no epoch in the store"
    # Everything written so far is on the replica: what a failover may lose
    # (docs/scaling.md) is only what the primary acknowledged and had not
    # passed on yet, and none of the above is.
    assert primary.command("WAIT", 1, 5000) == 1, "the replica did not catch up"
    # Each node follows both channels (sessions: commands and events;
    # revocations: events).
    assert subscribers(primary.port) == {"commands": 2, "events": 4}
    marks = [len(n.log()) for n in (a, b)]

    primary.stop()  # SIGKILL
    killed = time.monotonic()
    refused_at, back_at = {}, {}
    promoted = routed = None
    slowest_frame = 0.0
    frames = 0
    while len(back_at) < 2:
        now = time.monotonic() - killed
        assert now < BOUND, (f"admissions not back within {BOUND} s: refused at {refused_at}, back at {back_at}, "
                             f"replica promoted at {promoted}, HAProxy routed at {routed}\n"
                             + "\n".join(store_lines(a, marks[0])[-20:]))
        for name, node in zip(NODES, (a, b)):
            if name not in back_at:
                outcome = admit(node, vm)
                if outcome == "ok":
                    back_at[name] = time.monotonic() - killed
                else:
                    refused_at.setdefault(name, time.monotonic() - killed)
        # The running session goes on.
        started = time.monotonic()
        assert frame(live, init)
        slowest_frame = max(slowest_frame, time.monotonic() - started)
        frames += 1
        if promoted is None and role(replica.port) == "master":
            promoted = time.monotonic() - killed
        if routed is None and role(store.front) == "master":
            routed = time.monotonic() - killed
        time.sleep(0.05)
    # Each node follows the store's channels again once its subscription
    # has reconnected (it backs off on its own, after the admissions): a
    # command published before then would be lost (docs/scaling.md).
    wait_for(lambda: subscribers(replica.port) == {"commands": 2, "events": 4},
             f"the nodes never subscribed again: {subscribers(replica.port)}", within=BOUND)
    subscribed = time.monotonic() - killed
    print(f"\nfailover (s after the kill): first refusal {fmt(refused_at)}; replica promoted {fmt(promoted)}; "
          f"HAProxy routes to it {fmt(routed)}; admissions back {fmt(back_at)}; both nodes subscribed again "
          f"{fmt(subscribed)}. The running session: {frames} frames during the failover, "
          f"the slowest {slowest_frame * 1000:.0f} ms.")
    for name, node, mark in zip(NODES, (a, b), marks):
        print(f"{name}:\n  " + "\n  ".join(store_lines(node, mark)))
    # New sessions were refused while there was no primary (no admission
    # without the store), on both nodes.
    assert set(refused_at) == set(NODES), refused_at
    wait_for(lambda: all(s.primary() == replica.port for s in store.sentinels), "the Sentinels never agreed")

    # The promoted replica has what the primary had: the same epoch, so no
    # node saw a lost store or re-seeded it.
    assert replica.command("GET", f"{PREFIX}epoch") == epoch
    for node, mark in zip((a, b), marks):
        since = node.log()[mark:]
        assert "store unreachable" in since, since[-3000:]
        assert "epoch changed" not in since and "re-seeded" not in since and "lost its data" not in since, \
            since[-3000:]
        assert node.log().count("store ready") == 1, node.log()[-3000:]
    # The running session still runs, and its token is still held.
    assert frame(live, init)
    assert b"refused" in refused(ws_url(b, "vnc", held["token"]), 403)
    # The revocation holds on both nodes.
    for node in (a, b):
        assert b"revoked" in refused(ws_url(node, "vnc", revoked["token"]), 403)
    # Node B lists node A's session (from the store) and ends it: node A
    # hears the command on the store's channel again.
    listed = [s["id"] for s in b.admin("GET", "/v1/sessions")[1]["sessions"]]
    assert session["id"] in listed, listed
    status, answer = b.admin("DELETE", f"/v1/sessions/{session['id']}?reason=failover-test", actor="erin")
    assert status == 200 and answer["terminated"] == [session["id"]], answer
    assert close_code(live) == 4003, "node A never heard node B's command:\n" + a.log()[-3000:]
    wait_for(lambda: any(e["event"] == "session_ended" and e.get("session") == session["id"]
                         and e.get("terminated_by") == "erin" for e in a.audit()), "node A never audited the end")
    wait_for(lambda: b.admin("GET", "/v1/sessions")[1]["sessions"] == [], "the session never left the list")


@pytest.mark.parametrize("store", [15000], indirect=True)
def test_the_nodes_follow_the_store_channels_after_a_long_failover(vm, store, nodes):
    """Sentinel takes 15 s to fail over (down-after-milliseconds 15000, as
    a cautious deployment might set it): admissions come back, and so must
    the subscriptions that carry a terminate to the node running the
    session."""
    a, b = nodes
    held = a.mint("novnc", vm.vnc_port)
    live = connect(ws_url(a, "vnc", held["token"]), open_timeout=10)
    rfb_client_handshake(live, server_init=None)
    [session] = wait_for(lambda: b.admin("GET", "/v1/sessions")[1]["sessions"], "node B never listed the session")
    assert store.primary.command("WAIT", 1, 5000) == 1
    store.primary.stop()
    killed = time.monotonic()
    wait_for(lambda: all(admit(n, vm) == "ok" for n in (a, b)), "admissions never came back", within=60)
    print(f"\nlong failover: admissions back {time.monotonic() - killed:.1f} s after the kill")
    try:
        # After a short failover they are back within about a second of
        # the admissions.
        wait_for(lambda: subscribers(store.replica.port) == {"commands": 2, "events": 4},
                 f"the nodes never subscribed again: {subscribers(store.replica.port)}", within=10)
    finally:
        print(f"subscribers {time.monotonic() - killed:.1f} s after the kill: {subscribers(store.replica.port)}")
    status, answer = b.admin("DELETE", f"/v1/sessions/{session['id']}?reason=failover-test", actor="erin")
    assert status == 200 and answer["terminated"] == [session["id"]], answer
    assert close_code(live) == 4003, "node A never heard node B's command"
