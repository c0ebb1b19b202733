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
    assert leak_check.SECRETS and leak_check.FILES, "the leak check saw nothing: it is not wired up"


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
