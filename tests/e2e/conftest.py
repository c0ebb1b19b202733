"""End-to-end fixtures: a real QEMU per test and a running Porthole."""

import pytest

from support import Porthole
from vm import VM


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
