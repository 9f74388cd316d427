"""The VM generation id on the host's /dev/kvm, seen by the probe guest.

The probe's ``vmgenid=N`` finds the id the way Linux does - the DSDT's
``VGEN`` device gives its address, the ``ACPI0013`` Generic Event Device
its interrupt - prints the 16 bytes, then prints them again after each GED
interrupt. So each check compares what the guest read through ACPI with
what the host's device holds and what is in guest memory.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.config import MachineConfig
from pyvmm.snapshot.files import write_all
from pyvmm.snapshot.state import pack_state, read_state
from pyvmm.vmm.machine import Machine, StopKind
from tests.conftest import requires_kvm
from tests.kvm.test_api_server import Vmm
from tests.kvm.test_snapshot import restore_in_child

pytestmark = requires_kvm

MEM = 32 << 20
GUID = re.compile(rb"vmgenid: (boot|notified \d+) guid ([0-9a-f]{32})\r?\n")


class Console:
    """A machine's serial output, and waits on it."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data.extend(data)

    def wait_for(self, pattern: bytes, machine: Machine, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, bytes(self.data))) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in {bytes(self.data)[-400:]!r}"
            stopped = machine.stop_reason
            assert stopped is None, f"stopped ({stopped}): {bytes(self.data)[-400:]!r}"
            time.sleep(0.02)
        return match

    def guids(self) -> dict[str, str]:
        return {what.decode(): guid.decode() for what, guid in GUID.findall(bytes(self.data))}


def in_memory(machine: Machine) -> str:
    return machine.vmm.memory.read(layout.VMGENID_ADDR, layout.VMGENID_SIZE).hex()


def restore(snapshot: tuple[Path, Path], **options: object) -> tuple[Machine, Console]:
    console = Console()
    machine = Machine.restore(*snapshot, serial_out=console.write, **options)  # type: ignore[arg-type]
    return machine, console


@pytest.fixture(scope="module")
def waiting_guest(probe_elf: Path, tmp_path_factory: pytest.TempPathFactory):
    """A snapshot of the probe waiting for two generation changes; its boot id."""
    directory = tmp_path_factory.mktemp("vmgenid")
    state, mem = directory / "vm.state", directory / "vm.mem"
    console = Console()
    config = MachineConfig(kernel=probe_elf, cmdline="vmgenid=2", mem_size=MEM)
    with Machine(config, serial_out=console.write) as machine:
        machine.start()
        console.wait_for(rb"vmgenid: waiting", machine)
        machine.pause()
        machine.snapshot(state, mem)
        boot = machine.devices.vmgenid.generation.hex()
    assert console.guids() == {"boot": boot}
    return (state, mem), boot


def test_the_guest_reads_the_id_at_the_address_the_dsdt_gives(probe_elf: Path) -> None:
    console = Console()
    config = MachineConfig(kernel=probe_elf, cmdline="vmgenid=0", mem_size=MEM)
    with Machine(config, serial_out=console.write) as machine:
        machine.start()
        reason = machine.wait(20)
        device = machine.devices.vmgenid.generation.hex()
        memory = in_memory(machine)
    output = bytes(console.data).decode()
    assert reason is not None and reason.kind is StopKind.RESET, output
    assert "PROBE RESULT: PASS" in output, output
    assert f"vmgenid: addr {layout.VMGENID_ADDR:#x} gsi {layout.GED_GSI}" in output
    assert console.guids() == {"boot": device}
    assert memory == device
    assert device != "00" * 16


def test_each_restore_is_a_new_generation_the_guest_is_told_about(waiting_guest) -> None:
    snapshot, boot = waiting_guest
    seen = [boot]
    for _ in range(2):
        machine, console = restore(snapshot, resume=True)
        with machine:
            console.wait_for(rb"notified 1 guid [0-9a-f]{32}\r?\n", machine)  # the whole line
            new = machine.devices.vmgenid.generation.hex()
            assert console.guids() == {"notified 1": new}
            assert in_memory(machine) == new
            assert new not in seen
            seen.append(new)
            # A running VM can be given another generation: the guest sees it at once.
            again = machine.devices.new_generation()
            console.wait_for(rb"PROBE RESULT: PASS", machine)
            assert console.guids()["notified 2"] == again.hex()
            assert machine.wait(10) is not None


def test_a_restore_in_a_new_process_is_a_new_generation(waiting_guest) -> None:
    (state, mem), boot = waiting_guest
    output = restore_in_child(state, mem, "notified 1 guid [0-9a-f]{32}")
    match = re.search(r"vmgenid: notified 1 guid ([0-9a-f]{32})", output)
    assert match is not None, output
    assert match[1] != boot


def test_keeping_the_generation_sends_no_notification(waiting_guest) -> None:
    snapshot, boot = waiting_guest
    machine, console = restore(snapshot, resume=True, new_generation=False)
    with machine:
        time.sleep(1.0)  # the probe polls its interrupt count in CPL3: it would have printed
        assert machine.stop_reason is None
        assert console.guids() == {}, bytes(console.data)
        assert machine.devices.vmgenid.generation.hex() == boot
        assert in_memory(machine) == boot


def test_a_notification_pending_at_a_snapshot_is_taken_after_its_restore(
    waiting_guest, tmp_path: Path
) -> None:
    """Restored paused with a new id, snapshotted again before running: the GED edge
    waits in the saved LAPIC state, so the next restore (keeping that id) delivers it."""
    snapshot, _ = waiting_guest
    machine, _ = restore(snapshot)
    with machine:
        new = machine.devices.vmgenid.generation.hex()
        time.sleep(0.05)  # irqfd injection runs on a kernel worker
        machine.snapshot(tmp_path / "again.state", tmp_path / "again.mem")
    machine, console = restore(
        (tmp_path / "again.state", tmp_path / "again.mem"), resume=True, new_generation=False
    )
    with machine:
        console.wait_for(rb"notified 1 guid [0-9a-f]{32}\r?\n", machine)  # the whole line
        assert console.guids() == {"notified 1": new}


def test_a_snapshot_from_before_the_device_restores_without_it(
    waiting_guest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older pyvmm saved no 'vmgenid': the restore keeps that device set, and says
    why the clone keeps its RNG."""
    (state_path, mem), boot = waiting_guest
    state = read_state(state_path)
    legacy = {k: v for k, v in state.devices.legacy.items() if k != "vmgenid"}
    devices = dataclasses.replace(state.devices, legacy=legacy)
    old = tmp_path / "old.state"
    with old.open("wb") as file:
        write_all(file.fileno(), pack_state(dataclasses.replace(state, devices=devices)))
    with caplog.at_level(logging.WARNING):
        machine, console = restore((old, mem), resume=True)
    with machine:
        assert machine.devices.vmgenid is None
        assert "no VM generation id device" in caplog.text
        time.sleep(0.3)
        assert machine.stop_reason is None
        assert console.guids() == {}
        assert in_memory(machine) == boot


def test_snapshot_load_over_the_api_is_a_new_generation(waiting_guest, tmp_path: Path) -> None:
    """Firecracker's PUT /snapshot/load gives the loaded VM a new generation id."""
    (state, mem), boot = waiting_guest
    vmm = Vmm(tmp_path, "--id", "vmgenid")
    try:
        vmm.ok("PUT", "/snapshot/load", {
            "snapshot_path": str(state),
            "mem_backend": {"backend_type": "File", "backend_path": str(mem)},
            "resume_vm": True,
        })  # fmt: skip
        match = vmm.wait_serial(r"vmgenid: notified 1 guid ([0-9a-f]{32})")
        assert match[1] != boot
    finally:
        vmm.close()
