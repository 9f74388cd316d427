"""Shared fixtures: host capability checks and the probe guest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.nested_fixture", "tests.support.sandbox_fixture"]


def kvm_usable() -> str | None:
    """None if /dev/kvm can be used, else the host reason."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no read/write permission on /dev/kvm"
    return None


requires_kvm = pytest.mark.skipif(kvm_usable() is not None, reason=kvm_usable() or "")
requires_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
)


@pytest.fixture(scope="session")
def probe_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe guest, built once per test session."""
    from pyvmm.guestkit.probe import build_probe

    cache = os.environ.get("PYVMM_CACHE")
    return build_probe(Path(cache) if cache else tmp_path_factory.mktemp("cache"))


@pytest.fixture
def group():
    """A bare ``guest`` command group with the guest kit's commands registered."""
    import click

    from pyvmm.guestkit import commands

    @click.group()
    def guest() -> None:
        pass

    commands.register(guest)
    return guest


@pytest.fixture
def mem():
    """8 MiB of guest RAM at 0, for the device tests (files that need other RAM override it)."""
    from pyvmm.memory import GuestMemory

    with GuestMemory([(0, 0x80_0000)]) as memory:
        yield memory
