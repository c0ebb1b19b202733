"""Two Porthole nodes on one real redis-server behave as one gateway: a
token runs one session across both, an operator on either node lists and
ends sessions on both, a revocation made on one holds on the other, a node
that dies frees its tokens within the lease, and a Redis that goes away
makes the nodes refuse (unavailable, /readyz 503), never admit, until it is
back (empty), with no node restarted. The console is QEMU's VNC display."""

import json
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from harness import http
from peers import RedisServer
from support import EchoBackend, Porthole, close_code, refused, rfb_client_handshake, ws_url

LEASE = 3


@pytest.fixture
def redis():
    r = RedisServer()
    yield r
    r.stop()


def node(tmp_path, name, redis, key=None):
    folder = tmp_path / name
    folder.mkdir()
    return Porthole(folder, key=key, sections=redis.sections(name, lease_secs=LEASE))


def until(what, check, within=15):
    deadline = time.monotonic() + within
    while not (got := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return got


def watched(p, token):
    status, body = http("GET", f"http://127.0.0.1:{p.public_port}/watched?token={token}")
    return status, (json.loads(body) if status == 200 else body)


def listed(p, jti, node=None):
    """The sessions of token `jti` that node `p` lists (those `node` runs, if given)."""
    sessions = p.admin("GET", "/v1/sessions")[1]["sessions"]
    return [s for s in sessions if s["jti"] == jti and node in (None, s["node"])]


def readyz(p):
    return http("GET", f"http://127.0.0.1:{p.admin_port}/readyz")[0]


def test_two_nodes_are_one_gateway(tmp_path, vm, redis):
    a = node(tmp_path, "node-a", redis)
    b = node(tmp_path, "node-b", redis, key=a.key)
    try:
        # One token, one session, across both nodes.
        minted = a.mint("novnc", vm.vnc_port)
        ws = connect(ws_url(a, "vnc", minted["token"]), open_timeout=10)
        rfb_client_handshake(ws, server_init=None)
        body = refused(ws_url(b, "vnc", minted["token"]), 403)
        assert b"refused" in body, body
        # Either node lists it, with the node that runs it.
        status, listed = b.admin("GET", "/v1/sessions")
        assert status == 200 and [(s["node"], s["jti"]) for s in listed["sessions"]] == [("node-a", minted["jti"])], listed
        # Ended through node b: node a's session closes with the operator's code.
        sid = listed["sessions"][0]["id"]
        status, answer = b.admin("DELETE", f"/v1/sessions/{sid}?reason=leaked", actor="erin")
        assert status == 200 and answer["terminated"] == [sid], answer
        assert close_code(ws) == 4003
        until("node a's session leaves the list", lambda: b.admin("GET", "/v1/sessions")[1]["sessions"] == [])
        # The audit trail is written by its own thread: wait for the line.
        until("node a audits the end, by erin", lambda: any(
            e["event"] == "session_ended" and e.get("session") == sid and e.get("terminated_by") == "erin"
            for e in a.audit()))

        # After a session ends, its token opens on the other node (reconnect).
        again = a.mint("novnc", vm.vnc_port)
        with connect(ws_url(a, "vnc", again["token"]), open_timeout=10) as ws:
            rfb_client_handshake(ws, server_init=None)
        until("the token is released", lambda: b.admin("GET", "/v1/sessions")[1]["sessions"] == [])
        with connect(ws_url(b, "vnc", again["token"]), open_timeout=10) as ws:
            rfb_client_handshake(ws, server_init=None)

        # Revoked through node a: refused on node b.
        third = a.mint("novnc", vm.vnc_port)
        status, _ = a.admin("POST", "/v1/revocations", {"jti": third["jti"], "reason": "leaked"})
        assert status == 200
        assert b"revoked" in refused(ws_url(b, "vnc", third["token"]), 403)
    finally:
        for p in (a, b):
            assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_node_that_dies_frees_its_tokens_and_leaves_the_list(tmp_path, redis):
    backend = EchoBackend()
    a = node(tmp_path, "node-a", redis)
    b = node(tmp_path, "node-b", redis, key=a.key)
    try:
        minted = a.mint("serial", backend.port)
        ws = connect(ws_url(a, "serial", minted["token"]), open_timeout=10)
        ws.send(b"x")
        assert ws.recv(timeout=10) == b"x"
        refused(ws_url(b, "serial", minted["token"]), 403)
        a.gateway.proc.kill()
        a.gateway.proc.wait()
        ws.close()
        # Within the lease (3 s; bounds are generous): gone from the list,
        # and the token opens on node b.
        until("the dead node's session leaves the list",
              lambda: b.admin("GET", "/v1/sessions")[1]["sessions"] == [], within=LEASE * 10)

        def opens():
            try:
                with connect(ws_url(b, "serial", minted["token"]), open_timeout=10) as w:
                    w.send(b"y")
                    return w.recv(timeout=10) == b"y"
            except InvalidStatus:
                return False
        until("the dead node's token is free again", opens, within=LEASE * 10)
    finally:
        backend.close()
        assert b.gateway.stop() == 0, b.log()[-3000:]


def test_without_its_store_a_node_refuses_and_recovers_by_itself(tmp_path, redis):
    backend, other = EchoBackend(), EchoBackend()  # a serial console serves one client
    a = node(tmp_path, "node-a", redis)
    try:
        live_token = a.mint("serial", backend.port)["token"]
        live = connect(ws_url(a, "serial", live_token), open_timeout=10)
        live.send(b"1")
        assert live.recv(timeout=10) == b"1"
        revoked = a.mint("serial", other.port)
        status, _ = a.admin("POST", "/v1/revocations", {"jti": revoked["jti"], "reason": "leaked"})
        assert status == 200
        redis.stop()
        until("/readyz says the node cannot admit", lambda: readyz(a) == 503)
        body = refused(ws_url(a, "serial", a.mint("serial", other.port)["token"]), 503)
        assert b"unavailable" in body, body
        # A page asking whether it is watched: its session here is known;
        # one that may run on another node is not answered "no" (503: the
        # page keeps what it showed).
        assert watched(a, live_token) == (200, {"told": True, "watched": False, "recorded": False})
        assert watched(a, a.mint("serial", other.port)["token"])[0] == 503
        # A running session goes on (documented: it is admitted already).
        live.send(b"2")
        assert live.recv(timeout=10) == b"2"
        assert "store unreachable" in a.log()
        # Redis back, empty: the node reconnects by itself.
        back = RedisServer(redis.port)
        try:
            until("/readyz again", lambda: readyz(a) == 200)
            # Redis came back empty; the node re-seeded what it remembers.
            assert b"revoked" in refused(ws_url(a, "serial", revoked["token"]), 403)
            assert "re-seeded" in a.log()
            with connect(ws_url(a, "serial", a.mint("serial", other.port)["token"]), open_timeout=10) as w:
                w.send(b"3")
                assert w.recv(timeout=10) == b"3"
            assert "store reachable" in a.log()
            live.close()
        finally:
            assert a.gateway.stop() == 0, a.log()[-3000:]
            back.stop()
    finally:
        # A failure before Redis came back must not leave the node running
        # (stop is idempotent: after the inner stop it returns the code).
        a.gateway.stop()
        backend.close()
        other.close()


def test_a_revocation_that_keeps_sessions_keeps_them_on_every_node(tmp_path, redis):
    """`POST /v1/revocations` with keep_sessions through node b: the token
    opens nothing more on either node, and its session on node a runs on
    through node a's renewals, which end the sessions of a terminate's
    revoked token; a terminate later still ends it."""
    backend = EchoBackend()
    a = node(tmp_path, "node-a", redis)
    b = node(tmp_path, "node-b", redis, key=a.key)
    try:
        minted = a.mint("serial", backend.port)
        ws = connect(ws_url(a, "serial", minted["token"]), open_timeout=10)
        ws.send(b"1")
        assert ws.recv(timeout=10) == b"1"

        def on_b():
            return listed(b, minted["jti"])

        until("node b lists it", on_b)
        status, answer = b.admin("POST", "/v1/revocations",
                                 {"jti": minted["jti"], "reason": "rotating keys", "keep_sessions": True},
                                 actor="gina")
        assert status == 200 and answer["terminated"] == [], answer
        for p in (a, b):
            assert b"revoked" in refused(ws_url(p, "serial", minted["token"]), 403)
        # Two of node a's renewals after the revocation, each seen by the
        # bytes it publishes: the renewal reads the revocation as it
        # publishes, and would end the session right after.
        for sent in (b"2", b"3"):
            ws.send(sent)
            assert ws.recv(timeout=10) == sent
            until("node a's renewal publishes the session's bytes",
                  lambda: on_b() and on_b()[0]["bytes_up"] >= int(sent))
        ws.send(b"4")
        assert ws.recv(timeout=10) == b"4", "the kept session still runs"
        assert not [e for e in a.audit() if e.get("event") == "session_ended"], a.audit()

        (session,) = on_b()
        status, answer = b.admin("DELETE", f"/v1/sessions/{session['id']}?reason=done", actor="erin")
        assert status == 200 and answer["terminated"] == [session["id"]], answer
        assert close_code(ws) == 4003
    finally:
        for p in (a, b):
            assert p.gateway.stop() == 0, p.log()[-3000:]
        backend.close()


def test_after_redis_comes_back_empty_the_other_node_lists_ends_and_revokes_a_running_session(tmp_path, redis):
    """Redis restarted empty under a running session: within one renewal
    the session is whole in Redis again, so the other node lists it, ends
    it, and a revocation through it ends it too."""
    backends = [EchoBackend(), EchoBackend()]  # a serial console serves one client
    a = node(tmp_path, "node-a", redis)
    b = node(tmp_path, "node-b", redis, key=a.key)
    back = None
    try:
        def restart_empty():
            nonlocal back
            reseeds = [p.log().count("the store lost its data") for p in (a, b)]
            (back or redis).stop()
            back = RedisServer(redis.port)
            # Each node finds the epoch gone (its probe, once a second) and re-seeds.
            for p, before in zip((a, b), reseeds):
                until("a node re-seeds", lambda: p.log().count("the store lost its data") > before, within=30)
                until("the node is ready again", lambda: readyz(p) == 200, within=30)

        def listed_on_b(jti):
            return listed(b, jti, node="node-a")

        # Ended through node b.
        first = a.mint("serial", backends[0].port)
        ws = connect(ws_url(a, "serial", first["token"]), open_timeout=10)
        ws.send(b"1")
        assert ws.recv(timeout=10) == b"1"
        until("node b lists it", lambda: listed_on_b(first["jti"]))
        restart_empty()
        (session,) = until("node b lists it again after Redis came back empty", lambda: listed_on_b(first["jti"]))
        status, answer = b.admin("DELETE", f"/v1/sessions/{session['id']}?reason=audit", actor="erin")
        assert status == 200 and answer["terminated"] == [session["id"]], answer
        assert close_code(ws) == 4003

        # Revoked through node b: the running session ends.
        second = a.mint("serial", backends[1].port)
        ws = connect(ws_url(a, "serial", second["token"]), open_timeout=10)
        ws.send(b"2")
        assert ws.recv(timeout=10) == b"2"
        restart_empty()
        (session,) = until("listed again", lambda: listed_on_b(second["jti"]))
        status, answer = b.admin("POST", "/v1/revocations", {"jti": second["jti"], "reason": "leaked"},
                                 actor="frank")
        assert status == 200 and answer["terminated"] == [session["id"]], answer
        assert close_code(ws) == 4003
        # In frank's name on node a, whether node b's command or node a's
        # renewal (the revocation read first) ended it: node b says who ends
        # it before it revokes.
        until("node a audits the end, by frank", lambda: any(
            e["event"] == "session_ended" and e.get("session") == session["id"]
            and e.get("terminated_by") == "frank" for e in a.audit()))
    finally:
        for p in (a, b):
            assert p.gateway.stop() == 0, p.log()[-3000:]
        if back is not None:
            back.stop()
        for e in backends:
            e.close()
