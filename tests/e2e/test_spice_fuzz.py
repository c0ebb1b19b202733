"""A seeded, time-bounded fuzz against real QEMU 7.2 for the claim "client
messages that kill QEMU when sent straight to it never kill it through
Porthole".

One fixed list of client messages per seed (spice_fuzz.generate: the known
killers, valid types with hostile fields, random types, bodies of 0 to 2048
bytes, mini and full headers, on every channel kind the VM offers: main,
display, inputs, cursor, playback, record, usbredir, port, webdav,
smartcard). Each message goes on a fresh session of its own:

1. directly to QEMU, for PORTHOLE_FUZZ_SECS (default 6; longer runs find more) over a few VMs
   (PORTHOLE_FUZZ_LANES, default 3) that each restart when they die: the
   messages sent in that time, and which killed QEMU;
2. the same messages through Porthole, once through its native TLS SPICE
   listener and once through spice-html5's /spice WebSocket, each with a
   fresh ticket: QEMU must never die.

The seed (PORTHOLE_FUZZ_SEED) is printed with the figures; the direct phase
must kill QEMU at least once, or the fuzz proves nothing."""

import json
import os
import re
import signal
import threading
import time

import leak_check
from harness import http
from spice_fuzz import FUZZ_DEVICES, deliver, generate, tally, wait_dead
from spice_wire import Channel, WsChannel
from support import Porthole, wait_for
from vm import VM, make_spice_certs

SEED = int(os.environ.get("PORTHOLE_FUZZ_SEED", "0x5eed"), 0)
SECS = float(os.environ.get("PORTHOLE_FUZZ_SECS", "6"))
LANES = int(os.environ.get("PORTHOLE_FUZZ_LANES", "3"))
# More than any run gets through: the direct phase takes a prefix.
LIST = 5000


class Lane:
    """One VM that one worker thread sends messages to; a fresh VM (same CA,
    same password) replaces it when it dies. Stopped by PID."""

    # VMs start one at a time: each picks a free VNC display and ports that
    # are free until it binds them.
    starting = threading.Lock()

    def __init__(self, folder, certs, password):
        self.folder, self.certs, self.password = folder, certs, password
        self.n = 0
        self.vm = None
        self.last = None  # the outcome of the lane's last message
        self.sent = []  # the indexes of the items the current VM got
        self.start()

    def start(self):
        self.n += 1
        folder = self.folder / f"vm{self.n}"
        folder.mkdir(parents=True)
        with Lane.starting:
            self.vm = VM(folder, spice=True, extra_args=FUZZ_DEVICES, splash_ms=0, spice_certs=self.certs)
        self.vm.qmp("set_password", protocol="spice", password=self.password)
        self.vm.spice_password = self.password
        self.sent = []

    def alive(self):
        return self.vm.proc.poll() is None

    def ready(self):
        """Restarts the VM if it died since the last message, which is then
        counted as a kill (a death after its window)."""
        if self.alive():
            return
        if self.last is not None and not self.last.died:
            self.last.died, self.last.when = True, "later"
            self.last.returncode = self.vm.proc.returncode
            self.last.why = self.why()
        self.restart()

    def why(self):
        """QEMU's last words (spice-server's failed assertion, as a rule)."""
        self.vm.log.flush()
        lines = (self.vm.dir / "qemu.log").read_text(errors="replace").splitlines()
        fatal = [line for line in lines if "Spice:" in line and "warning" not in line]
        last = [line for line in lines if "fw_cfg" not in line and "terminating on signal" not in line]
        return (fatal or last or [""])[-1].split("Spice: ", 1)[-1]

    def restart(self):
        self.vm.stop()
        self.start()

    def stop(self):
        if self.vm is not None:
            self.vm.stop()


def run_lanes(lanes, items, work, stop_at):
    """Each lane's thread takes the next item in order and runs work(lane,
    item) until the items or the time (stop_at, monotonic) run out; the
    outcomes by item position (None: not sent)."""
    out = [None] * len(items)
    lock = threading.Lock()
    nxt = [0]
    errors = []

    def worker(lane):
        while True:
            with lock:
                if nxt[0] >= len(items) or time.monotonic() >= stop_at:
                    return
                i = nxt[0]
                nxt[0] += 1
            try:
                lane.ready()
                o = work(lane, items[i])
                o.vm = f"{lane.vm.dir.parent.name}/{lane.vm.dir.name}"
                o.before = lane.sent[-3:]
                lane.sent.append(i)
                lane.last = out[i] = o
                if o.died:
                    o.returncode, o.why = lane.vm.proc.returncode, lane.why()
                    lane.restart()
            except Exception as e:  # noqa: BLE001 (reported below, with the item)
                errors.append((i, repr(e)))
                return

    threads = [threading.Thread(target=worker, args=(lane,), daemon=True) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        # Each item is bounded (deliver's deadline, VM start's 30 s).
        t.join(timeout=max(1.0, stop_at - time.monotonic()) + 60)
        assert not t.is_alive(), "a fuzz lane hung"
    assert not errors, f"fuzz lanes failed: {errors[:5]}"
    # The lanes' last messages may kill late.
    for lane in lanes:
        lane.ready()
    return out


def refused_total(p):
    return sum(int(v) for v in re.findall(r"^porthole_spice_messages_refused_total\{[^}]*\} (\d+)$",
                                          p.metrics(), re.M))


def gauge(p, name):
    """A gauge's sum over its labels."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", p.metrics(), re.M))


def died_how(o):
    rc = o.returncode
    if rc is not None and rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            pass
    return f"exit {rc}"


def test_client_messages_that_kill_qemu_directly_never_kill_it_through_porthole(tmp_path, capsys):
    started = time.monotonic()
    messages = generate(SEED, LIST)
    certs = tmp_path / "vm-spice-certs"
    make_spice_certs(certs)
    password = "fuzz-" + os.urandom(8).hex()
    lanes = []
    p = None
    try:
        for k in range(LANES):
            lanes.append(Lane(tmp_path / f"lane{k}", certs, password))  # each stopped below, even if the next fails

        # 1. Directly: the plain SPICE port, the password as the ticket.
        def direct(lane, msg):
            vm = lane.vm
            return deliver(msg, lambda: Channel(vm.spice_port), vm.spice_password, lane.alive)

        outcomes = run_lanes(lanes, messages, direct, time.monotonic() + SECS)
        n = sum(o is not None for o in outcomes)
        sent = messages[:n]
        direct_out = outcomes[:n]
        assert all(o is not None for o in direct_out), "the direct phase sent a prefix of the list"
        unlinked = [(m.label(), o.error) for m, o in zip(sent, direct_out) if not o.linked and not o.died]
        assert not unlinked, f"messages that never reached QEMU: {unlinked[:5]}"
        direct_kills = [m for m, o in zip(sent, direct_out) if o.died]
        direct_secs = time.monotonic() - started

        # 2. Through Porthole: its TLS to each lane's VM, one CA and password for all.
        pw = tmp_path / "spice-password"
        pw.write_text(password)
        p = Porthole(tmp_path, backend_extra=f'[backends.spice]\npassword_file = "{pw}"\n'
                                             f'ca = "{certs / "ca-cert.pem"}"')

        def native(lane, msg):
            vm = lane.vm
            token = p.mint("spice-direct", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
            ticket = p.spice_details(token)["ticket"]
            return deliver(msg, lambda: Channel(p.spice_tls_port, ca=p.spice_ca), ticket, lane.alive)

        def html5(lane, msg):
            vm = lane.vm
            token = p.mint("spice-html5", vm.spice_port, tls_port=vm.spice_tls_port)["token"]
            status, body = http("POST", f"{p.base}/spice-ticket?token={token}")[:2]
            assert status == 200, body
            ticket = json.loads(body)["ticket"]
            leak_check.remember(ticket)
            return deliver(msg, lambda: WsChannel(p, token), ticket, lane.alive)

        results = {}
        for path, work in (("native", native), ("websocket", html5)):
            for lane in lanes:
                lane.last = None
            before = refused_total(p)
            t0 = time.monotonic()
            # Bounded: every message must go through; far more time than the direct phase took.
            out = run_lanes(lanes, sent, work, time.monotonic() + 3 * SECS + 30)
            results[path] = (out, refused_total(p) - before, time.monotonic() - t0)
        assert p.gateway.proc.poll() is None, "Porthole died"
        # Every session and display drain over, the VMs still live.
        wait_for(lambda: gauge(p, "porthole_sessions_active") == 0 == gauge(p, "porthole_spice_display_drains_active"),
                 f"Porthole's sessions did not end: {p.log()[-2000:]}", within=15)
        late = [lane.vm.dir for lane in lanes if wait_dead(lane.alive, 0.3)]

        total = time.monotonic() - started
        figures = [f"spice fuzz seed={SEED:#x}: {n} messages ({sum(m.family == 'known' for m in sent)} known"
                   f" killers), lanes={LANES}; direct: {len(direct_kills)} killed QEMU in {direct_secs:.0f} s"]
        failures = []
        for path, (out, refused, secs) in results.items():
            kills = [o for o in out if o is not None and o.died]
            missing = sum(o is None for o in out)
            unlinked = [(m.label(), o.error) for m, o in zip(sent, out) if o is not None and not o.linked
                        and not o.died]
            by_kind = {}
            for m, o in zip(sent, out):
                if o is not None and o.died:
                    by_kind[f"{m.channel} {m.kind}"] = by_kind.get(f"{m.channel} {m.kind}", 0) + 1
            killers = ", ".join(f"{k} x{v}" for k, v in sorted(by_kind.items()))
            figures.append(f"through Porthole {path}: {len(kills)} killed QEMU"
                           f"{f' ({killers})' if killers else ''}, {refused} refused, "
                           f"{sum(o is not None and o.channel_closed for o in out)} channels ended, "
                           f"{missing} not sent, {len(unlinked)} not linked, {secs:.0f} s")
            failures += [f"{path}: {m.label()} killed QEMU ({died_how(o)}, {o.when}: {o.why or '-'}; directly it "
                         f"{'killed' if d.died else 'did not'}; {o.vm} after #{o.before})"
                         for m, o, d in zip(sent, out, direct_out) if o is not None and o.died]
            if missing:
                failures.append(f"{path}: {missing} messages not sent in time")
            failures += [f"{path}: {label} not linked: {err}" for label, err in unlinked[:5]]
        if late:
            failures.append(f"QEMU died after Porthole's sessions ended: {late}")
        figures.append(f"total {total:.0f} s (rerun: PORTHOLE_FUZZ_SEED={SEED:#x} PORTHOLE_FUZZ_SECS={SECS:g} "
                       f"PORTHOLE_FUZZ_LANES={LANES})")
        line = "; ".join(figures)
        kinds = tally(sent, direct_out)
        with capsys.disabled():
            print("\n" + line)
            print("  killed directly: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
            for f in failures:
                print("  " + f)
        assert direct_kills, f"no message killed QEMU directly: the fuzz proves nothing ({line})"
        assert not failures, line + "\n" + "\n".join(failures)
    finally:
        for lane in lanes:
            lane.stop()
        if p is not None:
            assert p.gateway.stop() == 0, p.log()[-3000:]
