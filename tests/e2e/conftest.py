"""End-to-end fixtures: a real QEMU per test and a running Porthole."""

import pytest

import leak_check
from support import Porthole
from vm import VM


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log():
    """After the whole run: none of the tokens, tickets and passwords the
    suite issued or configured is in any log or audit file Porthole wrote."""
    yield
    found = leak_check.leaks()
    assert not found, f"secrets in Porthole's logs: {found[:10]}"
    # Under pytest-xdist each worker checks what its own tests wrote; one
    # that ran no Porthole (interop files only) has nothing to check.
    if leak_check.FILES:
        assert leak_check.SECRETS, "the leak check saw no secret: it is not wired up"
    else:
        import os
        assert "PYTEST_XDIST_WORKER" in os.environ, "the leak check saw no file: it is not wired up"


@pytest.fixture
def porthole(tmp_path):
    p = Porthole(tmp_path)
    yield p
    assert p.gateway.stop() == 0, p.log()


@pytest.fixture
def vm(tmp_path):
    folder = tmp_path / "vm"
    folder.mkdir()
    machine = VM(folder)
    yield machine
    machine.stop()


@pytest.fixture
def spice_vm(tmp_path):
    """A VM with a SPICE server (plain and TLS ports, a password set over QMP)."""
    folder = tmp_path / "vm"
    folder.mkdir()
    machine = VM(folder, spice=True)
    yield machine
    machine.stop()


# The longest files first (measured: `scripts/test` prints --durations), so
# that under pytest-xdist's --dist loadfile the last file to start is a
# short one and the two workers finish together.
SLOW_FIRST = [
    "test_nova.py",
    "test_failover.py",
    "test_spice_fuzz.py",
    "test_chaos.py",
    "test_spice_drain.py",
    "test_view_only.py",
    "test_browser_consoles.py",
    "test_spice_html5.py",
    "test_shadow.py",
    "test_cluster_haproxy.py",
    "test_spice_peers.py",
]


def pytest_collection_modifyitems(session, config, items):
    def weight(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=weight)
