"""Two Porthole nodes on one real redis-server behind one real HAProxy in
round robin, as docs/scaling.md deploys them: HTTP mode (X-Forwarded-For,
/readyz checks) for the public listener, TCP mode with PROXY v2 for the
native SPICE TLS listener. Nothing is sticky, so one user's requests and
one SPICE session's channels spread over both nodes: the tests prove the
pieces still make one console (spicy-screenshot sees the VM, remote-viewer
opens its .vv file), an operator on either node ends a session running on
the other (noVNC in Chromium says so), and the nodes see the client behind
HAProxy, not HAProxy."""

import json
import re
import subprocess
import time
import urllib.parse

import pytest

import leak_check
from harness import free_port, http, metric_value
from peers import HAProxy, RedisServer, Route
from screen import differing_fraction, seabios_screen
from spice_client import remote_viewer_connects, spicy_capture, wait_for_final_spice_screen
from spice_wire import INPUTS, MAIN, Channel
from support import HERE, Porthole, first_line, get_from, wait_for

CLIENT = "127.0.0.5"
NODES = ("node-a", "node-b")


class Cluster:
    """The nodes (each with its name), the balancer's two frontends, the VM."""

    def __init__(self, vm, nodes, public_front, spice_front):
        self.vm, self.nodes = vm, nodes
        self.public_front, self.spice_front = public_front, spice_front

    def node(self, name):
        return self.nodes[NODES.index(name)]

    def other(self, name):
        return self.nodes[1 - NODES.index(name)]


@pytest.fixture
def cluster(spice_vm, tmp_path):
    vm = spice_vm
    redis = RedisServer()
    public_front, spice_front = free_port(), free_port()
    pw = tmp_path / "spice-password"
    pw.write_text(vm.spice_password + "\n")
    nodes = []
    lb = None
    try:
        for name in NODES:
            folder = tmp_path / name
            folder.mkdir()
            first = nodes[0] if nodes else None
            nodes.append(Porthole(
                folder, key=first and first.key, certs_of=first, base_url=f"http://127.0.0.1:{public_front}",
                listen_extra='trusted_proxies = ["127.0.0.1/32"]',
                # Clients are told HAProxy's SPICE port (the host is the base URL's).
                spice=f"proxy_protocol = true\npublic_tls_port = {spice_front}",
                sections=redis.sections(name),
                backend_extra="\n".join(["[backends.spice]", f'password_file = "{pw}"', f'ca = "{vm.spice_ca}"'])))
        lb = HAProxy(tmp_path, {
            "public": Route(public_front, [n.public_port for n in nodes], mode="http", check=True),
            "spice": Route(spice_front, [n.spice_tls_port for n in nodes], check=True),
        })
        yield Cluster(vm, nodes, public_front, spice_front)
    finally:
        if lb is not None:
            lb.stop()
        for n in nodes:
            assert n.gateway.stop() == 0, n.log()[-3000:]
        redis.stop()


def linked(node):
    """(ticket reference, channel, client) of every SPICE channel the node linked."""
    out = []
    for line in node.log().splitlines():
        if "spice channel linked" in line:
            fields = dict(re.findall(r'(\w+)="?([^" ]*)"?', line))
            out.append((fields["ticket_ref"], fields.get("channel"), fields.get("client")))
    return out


def test_one_spice_session_links_its_channels_on_both_nodes(cluster, tmp_path):
    vm, a, b = cluster.vm, *cluster.nodes
    direct = wait_for_final_spice_screen(vm, tmp_path)

    # A client on CLIENT: the exchange through HAProxy's HTTP frontend, then
    # two channels of one session through its TCP frontend. Round robin sends
    # consecutive connections to alternate nodes: main on one, inputs on the other.
    token = a.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
    status, body = get_from(CLIENT, cluster.public_front,
                            f"/spice-direct?format=json&token={urllib.parse.quote(token)}")
    assert status == 200, body
    details = json.loads(body)
    leak_check.remember_ticket(details["ticket"])
    assert (details["host"], details["tls_port"]) == ("127.0.0.1", cluster.spice_front), details
    main = Channel(cluster.spice_front, ca=a.spice_ca, source=CLIENT)
    inputs = Channel(cluster.spice_front, ca=a.spice_ca, source=CLIENT)
    try:
        assert main.open(MAIN, details["ticket"]) == "OK"
        assert inputs.open(INPUTS, details["ticket"], connection_id=main.session_id()) == "OK"
        # Each node linked one of them, and saw the client behind HAProxy.
        per_node = [wait_for(lambda n=n: linked(n), f"{n.log()[-3000:]}") for n in (a, b)]
        assert sorted(c for links in per_node for _, c, _ in links) == ["inputs", "main"], per_node
        assert {t for links in per_node for t, _, _ in links} == {per_node[0][0][0]}, "one ticket on both nodes"
        assert all(client == CLIENT for links in per_node for _, _, client in links), per_node
        # The ticket opened its session: another main channel with it is
        # refused, whichever node the balancer picks (two tries: one each).
        for _ in range(2):
            again = Channel(cluster.spice_front, ca=a.spice_ca, source=CLIENT)
            try:
                assert again.open(MAIN, details["ticket"]) != "OK", "a used ticket opened a second session"
            finally:
                again.close()
        for n in (a, b):
            wait_for(lambda n=n: 'reason="ticket_used"' in n.log() or "reason=ticket_used" in n.log(),
                     f"a used ticket refused on {n.log()[-3000:]}")
        # One session, listed by either node with the client's address.
        for n in (a, b):
            listed = [s for s in n.admin("GET", "/v1/sessions")[1]["sessions"] if s["console"] == "spice-direct"]
            assert [s["client"] for s in listed] == [CLIENT], listed
    finally:
        main.close()
        inputs.close()
    wait_for(lambda: a.admin("GET", "/v1/sessions")[1]["sessions"] == [], "the session leaves the cluster's list")

    # spicy-screenshot through HAProxy, told where by the exchange: its
    # channels land on both nodes, and it sees what a direct client sees.
    before = [len(linked(n)) for n in (a, b)]
    token = a.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
    details = a.spice_details(token)
    shot = spicy_capture(tmp_path / "through.png", details["host"], details["ticket"], tls_port=details["tls_port"],
                         ca_file=a.spice_ca, debug=True)
    seabios_screen(shot)
    diff = differing_fraction(direct, shot)
    assert diff <= 0.01, f"through HAProxy differs from the direct capture in {diff:.2%} of pixels"
    new = [linked(n)[k:] for n, k in zip((a, b), before)]
    assert all(new), f"channels on one node only: {new}"
    assert len({t for links in new for t, _, _ in links}) == 1, new
    assert {c for links in new for _, c, _ in links} >= {"main", "display"}, new

    # remote-viewer with the .vv file the exchange writes, through HAProxy too.
    before = [len(linked(n)) for n in (a, b)]
    status, vv = http("GET", f"{a.base}/spice-direct?token={a.mint('spice-direct', vm.spice_port)['token']}")
    assert status == 200, vv
    assert f"tls-port={cluster.spice_front}" in vv and "host=127.0.0.1" in vv, vv
    leak_check.remember(re.search(r"^password=(.+)$", vv, re.M).group(1))
    (tmp_path / "console.vv").write_text(vv)
    # Round robin puts its channels on both nodes; those after the display's
    # may still be linking when the display is up.
    def new_links():
        return [linked(n)[k:] for n, k in zip((a, b), before)]
    assert remote_viewer_connects(tmp_path / "console.vv", tmp_path, then=lambda: all(new_links())), \
        f"remote-viewer never showed the display with channels on both nodes: {new_links()}"
    new = new_links()
    assert len({t for links in new for t, _, _ in links}) == 1, new
    # HAProxy checked both nodes' SPICE listener all along (connect, PROXY
    # header, close): counted, never logged as a failed handshake.
    for n in (a, b):
        assert metric_value(n.metrics(), "porthole_spice_link_refusals_total", reason="closed_silently",
                            blame="client"), n.metrics()
        assert "spice tls handshake failed" not in n.log(), n.log()[-3000:]


def test_an_operator_on_the_other_node_ends_a_browser_session(cluster):
    vm, a = cluster.vm, cluster.nodes[0]
    # noVNC in Chromium, page and WebSocket through HAProxy's HTTP frontend.
    minted = a.mint("novnc", vm.vnc_port)
    assert minted["url"].startswith(f"http://127.0.0.1:{cluster.public_front}/"), minted["url"]
    page = subprocess.Popen(["node", str(HERE / "browser.mjs"), "until-ended", minted["url"], "60000"],
                            stdout=subprocess.PIPE, text=True, cwd=HERE)
    try:
        assert first_line(page).strip() == "CONNECTED"
        [session] = wait_for(lambda: a.admin("GET", "/v1/sessions")[1]["sessions"], "the session is listed")
        runs_on = session["node"]
        other = cluster.other(runs_on)
        status, answer = other.admin("DELETE", f"/v1/sessions/{session['id']}?reason=maintenance", actor="dave")
        assert status == 200 and answer["terminated"] == [session["id"]], answer
        result = json.loads(page.communicate(timeout=60)[0].strip().splitlines()[-1])
        assert result["state"] == "revoked" and "operator" in result["text"], json.dumps(result, indent=1)
        # Each node's audit says its part: who acted, and where it ended.
        wait_for(lambda: any(e["event"] == "session_ended" and e.get("terminated_by") == "dave"
                             for e in cluster.node(runs_on).audit()), "the running node audits the end")
        assert any(e["event"] == "session_terminated" and e.get("by") == "dave" for e in other.audit()), other.audit()
    finally:
        if page.poll() is None:
            page.terminate()
            page.wait(timeout=10)
