"""Chaos: issue #10's floods at a small scale (hundreds), one after another
against one Porthole with small caps, while another user's console (noVNC
on a real QEMU VM, from 127.0.0.2) is probed several times a second
throughout. Bytes must flow during and after every flood, and each flood
must be refused for its own reason (metrics and log). scripts/attack runs
the same attacks (tests/e2e/attacks.py) at full scale and prints figures.

Caps: 64 connections not yet admitted, 16 per address; the upgrade (and
header) deadline 3 s, so held connections go quickly; pings every second,
so an unresponsive client is cut within seconds. Bounds on time are
generous; nothing asserts speed."""

import os
import signal
import time

from websockets.sync.client import connect

from attacks import (Flood, NativeVnc, Prober, ProcWatch, VncConsole, connect_from, exchange_many, exchange_once,
                     guess_tickets, healthz, listener_queue, metric_sum, tls_context, unauthenticated_bodies,
                     unsolicited_pongs)
from support import EchoBackend, Porthole
from vm import free_port

PENDING, PER_ADDRESS, DEADLINE = 64, 16, 3
ADMIN_CAP = 256  # app::ADMIN_MAX_CONNECTIONS
VICTIM = "127.0.0.2"


def test_floods_leave_another_users_console_working(tmp_path, vm):
    echo = EchoBackend(rfb=True)  # where the ticketed native VNC sessions go
    vnc_port = free_port()
    p = Porthole(tmp_path,
                 listen_extra=f"max_pending_connections = {PENDING}\nmax_pending_per_address = {PER_ADDRESS}",
                 websocket=f"ping_interval_secs = 1\nupgrade_timeout_secs = {DEADLINE}",
                 vnc=f'listen = "127.0.0.1:{vnc_port}"\nhandshake_timeout_secs = 5')
    p.vnc_port = vnc_port
    victim = prober = None
    try:
        victim = VncConsole(p, vm.vnc_port, src=VICTIM)
        victim.probe()
        prober = Prober(victim)
        half_open_flood(p, prober, vm)
        admin_hold(p, prober, vm)
        ticket_floods(p, prober, echo)
        pong_holder(p, prober, vm)

        assert prober.error is None, f"the victim's console failed: {prober.error!r}"
        assert prober.wait_for_probe_after(time.monotonic()), "the victim's console stopped after the floods"
        assert victim.received > 10_000, victim.received
        # What the floods left in the log: no accept failure, no panic, and
        # refusals rate-limited (their counters have them all).
        log = p.log()
        assert "accept failed" not in log and "panicked" not in log, log[-3000:]
        assert "refusal log lines suppressed under a flood" in log, log[-3000:]
        refused_lines = log.count("this address holds its most connections not yet admitted")
        assert 1 <= refused_lines <= 100, refused_lines
        # Every attacker's session is gone (ends are processed asynchronously).
        deadline = time.monotonic() + 10
        while True:
            listed = p.admin("GET", "/v1/sessions")[1]["sessions"]
            if [s["console"] for s in listed] == ["novnc"]:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.1)
    finally:
        if prober:
            prober.stop()
        if victim:
            victim.close()
        echo.close()
        assert p.gateway.stop() == 0, p.log()[-3000:]


def another_console_opens(vm):
    """A fresh console from the victim's address opens and moves bytes."""
    def check(p):
        other = VncConsole(p, vm.vnc_port, src=VICTIM, timeout=20)
        other.probe()
        other.close()
    return check


def half_open_flood(p, prober, vm):
    """300 connections from one address that never send a request, made in
    one burst while Porthole is stopped (SIGSTOP), as a burst meets a busy
    Porthole: the kernel holds every one in the listener's queue (larger
    than the 128 a listener gets by default, which dropped the rest's SYNs
    and let them in seconds later, past the held ones' deadline). Once
    Porthole runs again, 16 are held (until the header deadline), the rest
    closed at once; another address opens a console meanwhile."""
    started = time.monotonic()
    flood = Flood(p.public_port, 300, ["127.0.0.3"], start=False)

    def refused():
        return metric_sum(p.metrics(), "porthole_limits_hit_total", limit="pending_per_address")

    def why():
        # Enough to tell a slow accept (more than 16 let in, one deadline
        # after another) from connections the kernel holds but Porthole
        # never accepted (the listener's queue), and Porthole's side of it.
        lines = [ln for ln in p.log().splitlines() if "refused" in ln or "accept" in ln]
        return (f"refused per address: {refused()}; flood: {flood.report()}; {listener_queue(p.public_port)}; "
                f"Porthole's last refusal or accept lines: {lines[-5:]}")

    pid = p.gateway.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        flood.start()
        # Short: the victim's pongs wait too, and three ping intervals (3 s)
        # without a sign of life would cut it.
        queued = flood.wait(lambda f: f.connected == 300, timeout=2)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        assert queued, f"the kernel did not hold the whole burst for a stopped Porthole: {why()}"
        # Exactly the ones past the cap are refused at once, and said so.
        deadline = time.monotonic() + 30
        while refused() < 300 - PER_ADDRESS:
            assert time.monotonic() < deadline, why()
            time.sleep(0.1)
        assert flood.wait(lambda f: f.connected == 300 and f.open <= PER_ADDRESS, timeout=10), why()
        assert prober.wait_for_probe_after(time.monotonic()), "no bytes during the half-open flood"
        another_console_opens(vm)(p)
        # The held ones are cut at the header deadline.
        assert flood.wait(lambda f: f.open == 0, timeout=30), why()
        s = flood.summary()
        assert s["failed"] == 0 and min(s["lives"][-PER_ADDRESS:]) >= DEADLINE - 0.5, s
    finally:
        flood.stop()
    assert prober.flowed(started, time.monotonic())
    m = p.metrics()
    assert metric_sum(m, "porthole_limits_hit_total", limit="pending_per_address") == 300 - PER_ADDRESS
    assert metric_sum(m, "porthole_accept_failures_total") == 0


def admin_hold(p, prober, vm):
    """300 idle admin connections from one address: Porthole holds 256 of
    them (the rest are closed at once), each until the header deadline;
    /healthz from another address is answered while the flood holds every
    place, in the place of the flood's oldest connection; the public
    listener is untouched. Then 100 unauthenticated POSTs that announce
    2 MiB each are answered 401 without their bodies."""
    evicted = lambda: metric_sum(p.metrics(), "porthole_limits_hit_total", limit="admin_pending_evicted")
    refused = lambda: metric_sum(p.metrics(), "porthole_limits_hit_total", limit="admin_pending_per_address")
    evicted_before, refused_before = evicted(), refused()
    watch = ProcWatch(p.gateway.proc.pid)
    started = time.monotonic()
    flood = Flood(p.admin_port, 300, ["127.0.0.4"])
    try:
        assert flood.wait(lambda f: f.connected == 300, timeout=30), flood.summary()
        # Every place is the flood's: its other connections were closed at once.
        assert flood.wait(lambda f: f.closed >= 300 - ADMIN_CAP, timeout=30), flood.summary()
        # No other admin call until the flood is over: each would take a
        # place of it too, and be counted below.
        status, _ = healthz(p.admin_port, src="127.0.0.5", timeout=30)
        assert status == 200
        assert prober.wait_for_probe_after(time.monotonic()), "no bytes during the admin hold"
        another_console_opens(vm)(p)
        assert flood.wait(lambda f: f.open == 0, timeout=30), flood.summary()
    finally:
        flood.stop()
        watch.stop()
    # /healthz came while the flood held every place (its connections live
    # the header deadline, 3 s), and took the oldest's.
    assert evicted() == evicted_before + 1, "/healthz did not take a flood connection's place"
    assert refused() == refused_before + 300 - ADMIN_CAP
    held = watch.fds_peak - watch.fds_start
    assert ADMIN_CAP - 20 <= held <= ADMIN_CAP + 20, (watch.fds_start, watch.fds_peak)
    assert prober.flowed(started, time.monotonic())

    watch = ProcWatch(p.gateway.proc.pid)
    statuses, socks = unauthenticated_bodies(p.admin_port, 100, "127.0.0.4")
    for s in socks:
        s.close()
    watch.stop()
    assert statuses.count(401) == 100, statuses
    assert watch.rss_peak - watch.rss_start < 50 * 1024, "100 unread 2 MiB bodies grew memory"
    assert metric_sum(p.metrics(), "porthole_accept_failures_total") == 0


def ticket_floods(p, prober, echo):
    """One token exchanged 300 times (for 1 s at least): each exchange replaces its unused
    ticket (the first is dead, the last opens), another token is
    unaffected, and while the session runs the token gets 403. Then 200
    made-up tickets (for 1.5 s at least) from one address: ten are looked at for free, then
    backoff, and the guesser's good ticket is refused while another
    address's opens."""
    context = tls_context(p.spice_ca)
    token = p.mint("vnc-direct", echo.port)["token"]
    other = p.mint("vnc-direct", echo.port)["token"]
    started = time.monotonic()
    statuses, tickets = exchange_many(p, token, 300, "127.0.0.6", min_secs=1)
    assert list(statuses) == [200] and len(set(tickets)) == len(tickets) >= 300, statuses
    status, other_ticket = exchange_once(p, other, "127.0.0.6")
    assert status == 200
    assert prober.flowed(started, time.monotonic()), "no bytes during the exchanges"
    assert not NativeVnc(p.vnc_port, context, tickets[0], "127.0.0.7").ok, "a replaced ticket still opens"
    session = NativeVnc(p.vnc_port, context, tickets[-1], "127.0.0.7")
    assert session.ok, p.log()[-3000:]
    try:
        assert exchange_once(p, token, "127.0.0.6")[0] == 403, "a second ticket for a token whose session runs"
    finally:
        session.close()
    m = p.metrics()
    assert metric_sum(m, "porthole_handshake_failures_total", protocol="rfb", reason="ticket_unknown") == 1

    started = time.monotonic()
    let_in, guesses = guess_tickets(p.vnc_port, p.spice_ca, 200, "127.0.0.8", min_secs=1.5)
    assert let_in == 0 and guesses >= 200, (let_in, guesses)
    assert prober.flowed(started, time.monotonic()), "no bytes during the guesses"
    m = p.metrics()
    looked_at = metric_sum(m, "porthole_handshake_failures_total", protocol="rfb", reason="ticket_unknown") - 1
    backoff = metric_sum(m, "porthole_limits_hit_total", limit="failed_tickets")
    assert looked_at + backoff == guesses, (looked_at, backoff, guesses)
    # Ten free, then one per wait (0.5 s doubling): at most a handful more.
    assert 10 <= looked_at <= 20, looked_at
    assert metric_sum(m, "porthole_handshake_failures_total", protocol="rfb", reason="ticket_backoff") == backoff
    # Until a guess is looked at, the wait in force may be about to end: one
    # more guess until it is, and the next wait (seconds) has just begun.
    deadline = time.monotonic() + 60
    while metric_sum(p.metrics(), "porthole_handshake_failures_total", reason="ticket_unknown") == looked_at + 1:
        assert time.monotonic() < deadline
        assert guess_tickets(p.vnc_port, p.spice_ca, 1, "127.0.0.8", workers=1) == (0, 1)
    assert not NativeVnc(p.vnc_port, context, other_ticket, "127.0.0.8").ok, "the guesser's ticket was looked at"
    good = NativeVnc(p.vnc_port, context, other_ticket, "127.0.0.9")
    assert good.ok, "another address's good ticket was held up"
    good.close()


def pong_holder(p, prober, vm):
    """A serial client that never reads but sends unsolicited pongs is cut
    after three ping intervals, and QEMU's serial console (exclusive) is
    free for the next user."""
    started = time.monotonic()
    cut_after = unsolicited_pongs(p, p.mint("serial", vm.serial_port)["token"], "127.0.0.10", timeout=30)
    assert cut_after is not None and cut_after >= 2.5, cut_after
    assert prober.flowed(started, time.monotonic())
    m = p.metrics()
    assert metric_sum(m, "porthole_sessions_ended_total", console="serial", reason="client_unresponsive") == 1
    sock = connect_from(VICTIM, p.public_port)
    token = p.mint("serial", vm.serial_port)["token"]
    deadline = time.monotonic() + 10
    while True:
        try:
            with connect(f"ws://127.0.0.1:{p.public_port}/serial?token={token}", sock=sock, open_timeout=10):
                break
        except Exception:
            # The holder's end is processed asynchronously; a fresh connection each try.
            assert time.monotonic() < deadline, p.log()[-3000:]
            time.sleep(0.2)
            sock = connect_from(VICTIM, p.public_port)


def test_a_flood_spread_over_many_addresses_cannot_keep_a_fresh_address_out(tmp_path, vm):
    """Eight addresses hold every place not yet admitted (and more wait in
    the backlog), none past its per-address cap, and the header deadline is
    a minute away: a fresh address's console still opens, well before any of
    them expires, because the gate closes the oldest connection of the
    address holding the most to make room."""
    spread = [f"127.0.0.{i}" for i in range(10, 18)]
    p = Porthole(tmp_path,
                 listen_extra=f"max_pending_connections = {PENDING}\nmax_pending_per_address = {PER_ADDRESS}",
                 websocket="upgrade_timeout_secs = 60")
    flood = None
    try:
        flood = Flood(p.public_port, len(spread) * PER_ADDRESS, spread)
        # Past the cap, the flood's own newcomers are closed at once (no
        # address holds more than they would): it keeps the gate full.
        total = len(spread) * PER_ADDRESS
        assert flood.wait(lambda f: f.connected == total and f.closed >= total - PENDING, timeout=30), \
            flood.summary()
        assert PENDING - len(spread) <= flood.summary()["open"] <= PENDING, flood.summary()
        m = p.metrics()
        assert metric_sum(m, "porthole_limits_hit_total", limit="pending_full") >= 1, flood.summary()
        evicted = metric_sum(m, "porthole_limits_hit_total", limit="pending_evicted")
        # The fresh address (its console's connections wait 20 s at most,
        # the flood's for a minute) takes a flooder's place.
        another_console_opens(vm)(p)
        assert metric_sum(p.metrics(), "porthole_limits_hit_total", limit="pending_evicted") > evicted
        assert flood.wait(lambda f: f.open < PENDING, timeout=10), flood.summary()
    finally:
        if flood:
            flood.stop()
        assert p.gateway.stop() == 0, p.log()[-3000:]
