"""The machine's lifecycle on the host's /dev/kvm, with the probe guest.

These are the bugs the core redesign fixed: a thread that dies stops the VM
with a reason naming it (it used to leave a "Running" VM with dead
devices); live device changes follow into the config and the snapshot
(a PATCHed limiter used to come back as it was at boot).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from pyvmm.config import DriveConfig, MachineConfig, RateLimitSpec, TokenBucketSpec
from pyvmm.devices.rate_limiter import LimiterPatch
from pyvmm.devices.virtio.block import VirtioBlock
from pyvmm.errors import VmStateError
from pyvmm.vmm.machine import Machine, StopKind, VmState
from tests.conftest import requires_kvm
from tests.kvm.test_probe_virtio import write_pattern_image

pytestmark = requires_kvm

MEM = 64 << 20


def started(config: MachineConfig) -> tuple[Machine, bytearray]:
    output = bytearray()
    read_fd, _write_fd = os.pipe2(os.O_CLOEXEC)
    machine = Machine(config, serial_out=output.extend, console_in=read_fd)
    machine.start()
    return machine, output


def wait_for(output: bytearray, pattern: bytes, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, bytes(output)):
        assert time.monotonic() < deadline, f"no {pattern!r} in {bytes(output)[-300:]!r}"
        time.sleep(0.02)


def test_an_exception_on_the_event_loop_stops_the_vm_naming_the_thread(probe_elf: Path) -> None:
    """Bug 1: the loop thread died quietly; the VM stayed Running with dead devices and the
    next pause failed after 5 s with "did not pause"."""
    config = MachineConfig(kernel=probe_elf, cmdline="counter", mem_size=MEM)
    machine, output = started(config)
    try:
        wait_for(output, rb"counter: 1")

        def broken_back_end() -> None:
            raise RuntimeError("back end exploded")

        machine.vmm.loop.call_soon(broken_back_end)
        reason = machine.wait(timeout=10)
        assert reason is not None and reason.kind is StopKind.VMM_ERROR
        assert reason.message == ("thread 'pyvmm-io' (io) failed: RuntimeError: back end exploded")
        assert reason.exit_code == 1
        assert machine.state is VmState.STOPPED
        started_pause = time.monotonic()
        with pytest.raises(VmStateError, match="cannot pause: it is stopped"):
            machine.pause()
        assert time.monotonic() - started_pause < 1
    finally:
        machine.close()


def test_a_patched_limiter_is_in_the_config_and_comes_back_from_a_snapshot(
    probe_elf: Path, tmp_path: Path
) -> None:
    """Bug 2: update_drive applied a new limiter but left the config (and so the
    snapshot) with the old one. Now the config follows, and the running limiter's
    budget is saved and restored with the device."""
    image = tmp_path / "disk.img"
    write_pattern_image(image, 4 << 20)
    boot_limit = RateLimitSpec(ops=TokenBucketSpec(1000, 1000))
    drive = DriveConfig(image, rate_limit=boot_limit, drive_id="data")
    config = MachineConfig(kernel=probe_elf, cmdline="echo", mem_size=MEM, drives=(drive,))
    machine, output = started(config)
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    try:
        wait_for(output, rb"probe: cmdline")
        patch = LimiterPatch(bandwidth=TokenBucketSpec(5 << 20, 10_000))  # 0.5 MiB/s
        machine.update_drive("data", limiter=patch)
        expected = RateLimitSpec(TokenBucketSpec(5 << 20, 10_000), TokenBucketSpec(1000, 1000))
        assert machine.config.drives[0].rate_limit == expected
        device = machine.devices.virtio["data"].device
        assert isinstance(device, VirtioBlock) and device.rate_limiter is not None
        assert device.rate_limiter.consume(1 << 20, 10)  # spend part of the new budget
        machine.pause()
        machine.snapshot(state, mem)
    finally:
        machine.close()
    restored = Machine.restore(state, mem)
    try:
        assert restored.config.drives[0].rate_limit == expected
        limiter = restored.devices.virtio["data"].device.rate_limiter
        assert limiter is not None and limiter.bandwidth is not None and limiter.ops is not None
        assert limiter.bandwidth.size == 5 << 20 and limiter.bandwidth.refill_time_ms == 10_000
        # What was spent stays spent (a full bucket would be 5 MiB; refilling 1 MiB takes 2 s).
        assert limiter.bandwidth.budget < 5 << 20
    finally:
        restored.close()


def test_pause_and_resume_twice_change_nothing_and_a_stopped_vm_refuses_both(
    probe_elf: Path,
) -> None:
    """One transition table: Firecracker answers a repeated pause or resume with success."""
    machine, output = started(MachineConfig(kernel=probe_elf, cmdline="counter", mem_size=MEM))
    try:
        wait_for(output, rb"counter: 0")
        machine.resume()
        machine.pause()
        machine.pause()
        assert machine.state is VmState.PAUSED
        machine.resume()
        wait_for(output, rb"counter: 3")
        machine.stop()
        for action in (machine.pause, machine.resume):
            with pytest.raises(VmStateError, match="it is stopped"):
                action()
    finally:
        machine.close()
    assert machine.state is VmState.STOPPED


def test_a_failed_build_leaves_nothing_open(probe_elf: Path, tmp_path: Path) -> None:
    """A drive image that cannot be opened is found while building: one line, no leak."""
    before = len(os.listdir("/proc/self/fd"))
    drive = DriveConfig(tmp_path / "missing.img")
    machine = Machine(MachineConfig(kernel=probe_elf, mem_size=MEM, drives=(drive,)))
    with pytest.raises(Exception, match=r"cannot open drive image .*missing\.img"):
        machine.start()
    assert machine.state is VmState.STOPPED
    assert len(os.listdir("/proc/self/fd")) == before
