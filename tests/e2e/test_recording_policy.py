"""The recordings' disk policy against real peers (QEMU's serial consoles,
SeaBIOS's output): a disk that fills under a recorded session (it goes
on), under a required one (it ends, 4007, and only it), a folder that
cannot be written (a required session is refused), the size cap, retention
at start (by age and total size, never a file another Porthole is writing,
never a file that is not a recording), and two nodes of one cluster sharing
the folder (either lists and plays the other's recording).

The disks are tmpfs mounts of a few pages (the tests run as root); two VMs
with no boot-menu wait (a SeaBIOS boot is ~0.2 s and ~1.5 KiB of asciicast)
serve every test in turn, one serial client at a time."""

import contextlib
import hashlib
import json
import os
import subprocess
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import leak_check
from support import Porthole, close_code, wait_for, ws_url
from vm import VM

END = b"No bootable device"
DAY = 86_400


@pytest.fixture(scope="module")
def vms(tmp_path_factory):
    """Two VMs for the whole file: each test closes its serial sessions
    before it ends, and a boot's output goes only to a connected client."""
    machines = []
    try:
        for name in ("vm1", "vm2"):
            machines.append(VM(tmp_path_factory.mktemp(name), splash_ms=0))
        yield machines
    finally:
        for m in machines:
            m.stop()


@contextlib.contextmanager
def tmpfs(path, size="256k", read_only=False):
    """A tmpfs of `size` mounted at `path` for the block; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} (these tests need root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk, leave):
    """Fills the tmpfs at `disk` with a file that is not a recording, all
    but `leave` bytes."""
    st = os.statvfs(disk)
    with open(disk / "filler.bin", "wb", buffering=0) as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))
    st = os.statvfs(disk)
    assert st.f_bavail * st.f_frsize == leave


def recording(folder, **settings):
    lines = [f'folder = "{folder}"'] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    return "[recording]\n" + "\n".join(lines) + "\n"


def second_network(port):
    """A backend network of its own (first match wins) for one console port:
    neither recorded nor required."""
    return f'\n[[backends]]\nname = "lab2"\nnetworks = ["127.0.0.0/8"]\nports = ["{port}"]\n'


def serial(p, vm, record=False):
    """A serial session through Porthole `p` on `vm`; (socket, jti)."""
    minted = p.mint("serial", vm.serial_port, record=record)
    return connect(ws_url(p, "serial", minted["token"]), subprotocols=["binary"], open_timeout=10), minted["jti"]


def read_until(ws, marker, within=15):
    seen = b""
    deadline = time.monotonic() + within
    while marker not in seen:
        assert time.monotonic() < deadline, f"{marker!r} not seen: {seen[-300:]!r}"
        try:
            seen += ws.recv(timeout=1)
        except TimeoutError:
            pass
    return seen


def boot(vm, ws):
    """Resets `vm`; SeaBIOS's whole output, as the session's client got it."""
    vm.qmp("system_reset")
    seen = read_until(ws, END)
    assert b"SeaBIOS (version" in seen, seen[-300:]
    return seen


def events(p, name, **match):
    return [e for e in p.audit() if e["event"] == name and all(e.get(k) == v for k, v in match.items())]


def session_of(p, jti):
    return wait_for(lambda: events(p, "session_started", jti=jti), f"no session_started for {jti}")[0]["session"]


def boot_until_stopped(p, vm, ws, session, most=60):
    """Boots `vm` until the recording of `session` stops; its stops, and the boots it took."""
    for n in range(1, most + 1):
        boot(vm, ws)
        if stops := events(p, "recording_stopped", session=session):
            return stops, n
    raise AssertionError(f"the recording never stopped after {most} boots: {p.audit()[-5:]}")


def ended(p, session):
    return wait_for(lambda: events(p, "session_ended", session=session), f"{session} never ended")[0]


def finished(p, session):
    return wait_for(lambda: events(p, "recording_finished", session=session),
                    f"{session}'s recording never finished")[0]


def stop(*gateways):
    for p in gateways:
        assert p.gateway.stop() == 0, p.log()[-3000:]


def test_a_recorded_session_whose_disk_fills_goes_on_and_so_does_another_session(tmp_path, vms):
    vm1, vm2 = vms
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk, leave=8192)
        p = Porthole(tmp_path, sections=recording(disk, backends=["loopback"]))
        try:
            ws1, jti1 = serial(p, vm1)
            ws2, jti2 = serial(p, vm2)
            with ws1, ws2:
                s1, s2 = session_of(p, jti1), session_of(p, jti2)
                wait_for(lambda: events(p, "recording_started", session=s1, required=False), "not recorded")
                stops, boots = boot_until_stopped(p, vm1, ws1, s1)
                assert all("the disk refused a write" in s["why"] and "No space left on device" in s["why"]
                           for s in stops), stops
                assert os.statvfs(disk).f_bavail == 0
                # The disk is full: both sessions still relay the console.
                assert END in boot(vm1, ws1)
                assert END in boot(vm2, ws2)
            assert ended(p, s1)["outcome"] == "client_left"
            assert ended(p, s2)["outcome"] == "client_left"
            rec = finished(p, s1)
            assert rec["complete"] is False, rec
            # What reached the disk stays: asciicast's header, then output.
            data = open(rec["path"], "rb").read()
            assert 0 < len(data) <= 8192 and json.loads(data.split(b"\n")[0])["version"] == 2, data[:200]
            assert "porthole_recordings_stopped_total" in p.metrics()
            print(f"disk full after {boots} boots; {len(data)} bytes kept")
        finally:
            stop(p)


def test_a_required_session_whose_disk_fills_is_ended_and_an_unrecorded_one_goes_on(tmp_path, vms):
    vm1, vm2 = vms
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk, leave=8192)
        p = Porthole(tmp_path, sections=recording(disk, required=["loopback"]) + second_network(vm2.serial_port))
        try:
            ws1, jti1 = serial(p, vm1)
            ws2, jti2 = serial(p, vm2)
            with ws1, ws2:
                s1, s2 = session_of(p, jti1), session_of(p, jti2)
                wait_for(lambda: events(p, "recording_started", session=s1, required=True), "not recorded")
                for boots in range(1, 61):
                    try:
                        boot(vm1, ws1)
                    except ConnectionClosed:
                        break
                else:
                    raise AssertionError("the required session outlived its disk")
                assert close_code(ws1) == 4007
                assert ended(p, s1)["outcome"] == "recording_stopped"
                stops = events(p, "recording_stopped", session=s1)
                assert stops and "No space left on device" in stops[0]["why"], stops
                assert finished(p, s1)["complete"] is False
                # The other console's session is not the recording's business.
                assert END in boot(vm2, ws2)
            assert ended(p, s2)["outcome"] == "client_left"
            assert not events(p, "recording_started", session=s2)
            print(f"required session ended after {boots} boots")
        finally:
            stop(p)


def test_a_required_recording_that_cannot_be_made_refuses_its_session(tmp_path, vms):
    """On a read-only folder: required by the network, or by the token's
    `record` on a network that is not; and where Porthole has no
    [recording] at all. A session that need not be recorded opens."""
    vm1, vm2 = vms

    def refused(p, vm, record=False):
        ws, jti = serial(p, vm, record=record)
        with ws:
            assert close_code(ws) == 4007
        assert ended(p, session_of(p, jti))["outcome"] == "recording_unavailable"

    with tmpfs(tmp_path / "disk", size="64k", read_only=True) as disk:
        (tmp_path / "a").mkdir()
        p = Porthole(tmp_path / "a", sections=recording(disk, required=["loopback"]) + second_network(vm2.serial_port))
        try:
            refused(p, vm1)
            refused(p, vm2, record=True)
            stops = events(p, "recording_stopped")
            assert len(stops) == 2 and all("Read-only file system" in s["why"] for s in stops), stops
            ws, _ = serial(p, vm2)
            with ws:
                assert END in boot(vm2, ws)
        finally:
            stop(p)
    (tmp_path / "b").mkdir()
    p = Porthole(tmp_path / "b")
    try:
        refused(p, vm1, record=True)
        assert "records nothing" in p.log()
    finally:
        stop(p)


def test_a_recording_stops_at_its_size_cap_and_the_session_goes_on(tmp_path, vms):
    vm1, _ = vms
    p = Porthole(tmp_path, sections=recording(tmp_path / "recordings", backends=["loopback"], max_bytes=4096))
    try:
        ws, jti = serial(p, vm1)
        with ws:
            session = session_of(p, jti)
            stops, boots = boot_until_stopped(p, vm1, ws, session)
            assert [s["why"] for s in stops] == ["its size cap (4096 bytes)"], stops
            assert END in boot(vm1, ws)
        assert ended(p, session)["outcome"] == "client_left"
        rec = finished(p, session)
        data = open(rec["path"], "rb").read()
        assert rec["complete"] is False and rec["bytes"] == len(data) <= 4096, (rec, len(data))
        assert hashlib.sha256(data).hexdigest() == rec["sha256"]
        print(f"size cap reached after {boots} boots: {len(data)} bytes")
    finally:
        stop(p)


def test_retention_at_start_removes_by_age_then_total_size_never_a_file_being_written(tmp_path, vms):
    """Porthole `writer` (no retention) records a live session into the
    folder; Porthole `sweeper` starts on the same folder with keep_days = 1
    and max_total_bytes = 16384. The live recording is the oldest file and
    locked: it stays, and so does a file that is not a recording."""
    vm1, _ = vms
    folder = tmp_path / "recordings"
    (tmp_path / "writer").mkdir()
    (tmp_path / "sweeper").mkdir()
    writer = Porthole(tmp_path / "writer",
                      sections=recording(folder, backends=["loopback"], keep_days=0, max_total_bytes=0))
    sweeper = None
    try:
        ws, jti = serial(writer, vm1)
        with ws:
            session = session_of(writer, jti)
            boot(vm1, ws)
            live = folder / f"{session}.cast"
            time.sleep(0.3)  # the boot's last output is written: the file's time is set below
            now = time.time()
            ages = {live.name: (None, 10 * DAY),
                    "s-old.cast": (500, 10 * DAY), "s-old2.fbs": (500, 3 * DAY),
                    "s-big.spice.gz": (12_000, 5 * 3600), "s-mid.cast": (3000, 2 * 3600), "s-new.fbs": (3000, 3600),
                    "notes.txt": (50_000, 30 * DAY)}
            for name, (size, age) in ages.items():
                if size is not None:
                    (folder / name).write_bytes(b"x" * size)
                os.utime(folder / name, (now - age, now - age))
            sweeper = Porthole(tmp_path / "sweeper", sections=recording(
                folder, backends=["loopback"], keep_days=1, max_total_bytes=16384, max_bytes=4096))
            removed = wait_for(lambda: (r := events(sweeper, "recording_removed")) and len(r) >= 3 and r,
                               "retention removed nothing at start")
            time.sleep(0.3)  # one sweep: nothing more goes
            assert events(sweeper, "recording_removed") == removed
            assert {e["recording"]: e["why"] for e in removed} == {
                "s-old": "age", "s-old2": "age", "s-big": "total_size"}, removed
            # 18000 bytes and the live one's (one boot, a few KiB) are over
            # 16384; without s-big they fit.
            assert sorted(f.name for f in folder.iterdir()) == sorted(
                [live.name, "s-mid.cast", "s-new.fbs", "notes.txt"])
            assert live.stat().st_mtime < now - 9 * DAY and live.stat().st_size < 10_000, live.stat()
            # The live session records on, to its end.
            assert END in boot(vm1, ws)
        rec = finished(writer, session)
        assert rec["complete"] is True and hashlib.sha256(live.read_bytes()).hexdigest() == rec["sha256"], rec
    finally:
        stop(*[g for g in (writer, sweeper) if g is not None])


@pytest.fixture
def redis():
    from peers import RedisServer
    r = RedisServer()
    yield r
    r.stop()


def test_nodes_sharing_the_folder_list_and_play_each_others_recordings(tmp_path, vms, redis):
    vm1, _ = vms
    shared = tmp_path / "shared"
    rec = recording(shared, backends=["loopback"])
    (tmp_path / "node-a").mkdir()
    (tmp_path / "node-b").mkdir()
    a = Porthole(tmp_path / "node-a", sections=redis.sections("node-a") + rec)
    b = Porthole(tmp_path / "node-b", key=a.key, sections=redis.sections("node-b") + rec)
    try:
        ws, jti = serial(a, vm1)
        with ws:
            session = session_of(a, jti)
            shown = boot(vm1, ws)
        done = finished(a, session)
        assert done["complete"] is True and done["node"] == "node-a", done
        status, listed = b.admin("GET", "/v1/recordings")
        assert status == 200 and listed["node"] == "node-b", listed
        assert [(r["id"], r["bytes"]) for r in listed["recordings"]] == [(session, done["bytes"])], listed
        status, answer = b.admin("POST", f"/v1/recordings/{session}/playback", {}, actor="auditor")
        assert status == 200 and answer["url"].startswith(b.base), answer
        leak_check.remember(answer["token"])
        wait_for(lambda: events(b, "playback_issued", by="auditor"), "the playback link is not audited on node b")
        played = b""
        with connect(ws_url(b, "playback/serial", answer["token"]), subprotocols=["binary"], open_timeout=10) as p:
            try:
                while True:
                    played += p.recv(timeout=10)
            except ConnectionClosed:
                pass
            assert p.close_code == 1000
        assert b"SeaBIOS (version" in played and END in played, played[-300:]
        # The client stopped reading at END; the recording also holds what
        # the console sent after it before the session ended (the rest of
        # that line, when it came in a message of its own).
        assert played[:len(shown)] == shown, (played[-200:], shown[-200:])
        assert len(played) - len(shown) < 64 and b"SeaBIOS" not in played[len(shown):], played[len(shown):]
    finally:
        stop(a, b)


def test_a_recording_the_disk_cut_short_is_described_by_one_stop_and_its_files_size_and_hash(tmp_path, vms):
    """recording_finished's `bytes` and `sha256` are the file's (docs:
    `sha256sum <file>` must match), also when the disk refused a write;
    and the stop is audited once."""
    vm1, _ = vms
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk, leave=8192)
        p = Porthole(tmp_path, sections=recording(disk, backends=["loopback"]))
        try:
            ws, jti = serial(p, vm1)
            with ws:
                session = session_of(p, jti)
                boot_until_stopped(p, vm1, ws, session)
            rec = finished(p, session)
            data = open(rec["path"], "rb").read()
            assert rec["complete"] is False
            assert (rec["bytes"], rec["sha256"]) == (len(data), hashlib.sha256(data).hexdigest()), (
                f"recording_finished says {rec['bytes']} bytes, the file has {len(data)}")
            assert len(events(p, "recording_stopped", session=session)) == 1, events(p, "recording_stopped")
        finally:
            stop(p)


def test_a_required_session_on_a_disk_full_at_its_start_shows_nothing_unrecorded(tmp_path, vms):
    """A full tmpfs still creates an empty file, so the session opens; but
    its recording's first write (the header, at once) fails: the session
    is refused or ended (4007) before it relays any of the console's output,
    and the recording is not called complete."""
    vm1, _ = vms
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk, leave=0)
        p = Porthole(tmp_path, sections=recording(disk, required=["loopback"]))
        try:
            ws, jti = serial(p, vm1)
            got = b""
            with ws:
                session = session_of(p, jti)
                # The disk refused the recording before the console said anything.
                wait_for(lambda: events(p, "recording_stopped", session=session) or events(
                    p, "session_ended", session=session), "the full disk went unnoticed", within=5)
                vm1.qmp("system_reset")
                try:
                    got = read_until(ws, END, within=5)
                except (ConnectionClosed, AssertionError):
                    pass
                code = close_code(ws, within=5)
            end = ended(p, session)
            rec = events(p, "recording_finished", session=session)
            on_disk = [f.stat().st_size for f in disk.glob(f"{session}.*")]
            assert (code, end["outcome"], end["bytes_down"]) in ((4007, "recording_unavailable", 0),
                                                                (4007, "recording_stopped", 0)), (
                f"a required session on a full disk: close {code}, {end}, {len(got)} bytes relayed; "
                f"recording_finished: {rec}; on disk: {on_disk}")
            assert not rec or rec[0]["complete"] is False, rec
        finally:
            stop(p)
