"""The library API on the host's /dev/kvm, with the probe guest.

Pause and resume are checked with the probe's ``counter`` program, which
prints an increasing number about every 100 ms: a paused guest prints
nothing, and a resumed one continues from where it was.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm import ConsoleTimeout, MicroVM
from pyvmm.errors import ConfigError, VmStateError
from pyvmm.vmm.machine import VmState
from pyvmm.vmm.stop_reason import StopKind
from tests.conftest import requires_kvm

pytestmark = requires_kvm

COUNTER = re.compile(rb"counter: (\d+)")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def counters(vm: MicroVM) -> list[int]:
    return [int(n) for n in re.findall(r"counter: (\d+)", vm.console.output)]


def test_wait_for_follows_the_output_in_order(probe_elf: Path) -> None:
    with MicroVM(kernel=probe_elf, cmdline="hello echo") as vm:
        assert vm.state is VmState.NOT_STARTED
        vm.start()
        assert vm.console.wait_for("hello from probe", timeout=20)
        vm.console.write("typed by the library\nend\n")
        match = vm.console.wait_for(r"echo: (.*)\r", timeout=20)
        assert match.group(1) == b"typed by the library"
        vm.console.wait_for("PROBE RESULT: PASS", timeout=20)
        reason = vm.wait(20)
        assert reason is not None and reason.kind is StopKind.RESET
        assert vm.state is VmState.STOPPED
        with pytest.raises(ConsoleTimeout, match="the VM stopped"):
            vm.console.wait_for("never printed", timeout=20)


def test_wait_for_times_out_with_the_output_tail(probe_elf: Path) -> None:
    with MicroVM(kernel=probe_elf, cmdline="echo") as vm:
        vm.start()
        with pytest.raises(ConsoleTimeout, match=r"0.3 s passed.*probe: cmdline"):
            vm.console.wait_for("no such line", timeout=0.3)


def test_pause_stops_the_guest_and_resume_continues_it(probe_elf: Path) -> None:
    with MicroVM(kernel=probe_elf, cmdline="counter", vcpus=2) as vm:
        vm.start()
        vm.console.wait_for(r"counter: 3\b", timeout=20)
        started = time.monotonic()
        vm.pause()
        pause_s = time.monotonic() - started
        assert vm.state is VmState.PAUSED
        before = counters(vm)
        time.sleep(1.0)
        assert counters(vm) == before, "the guest ran while paused"
        vm.resume()
        assert vm.state is VmState.RUNNING
        vm.console.wait_for(rf"counter: {before[-1] + 3}\b", timeout=20)
        seen = counters(vm)
        assert seen == list(range(seen[0], seen[-1] + 1)), "a count was lost or repeated"
        assert pause_s < 1.0


def test_state_rules(probe_elf: Path) -> None:
    with MicroVM(kernel=probe_elf, cmdline="counter") as vm:
        with pytest.raises(VmStateError, match="cannot pause: it is not started"):
            vm.pause()
        vm.start()
        with pytest.raises(VmStateError, match="cannot start"):
            vm.start()
        vm.resume()  # running already: nothing to do (Firecracker answers 204 too)
        assert vm.state is VmState.RUNNING
        with pytest.raises(VmStateError, match="cannot snapshot: it is running; pause it first"):
            vm.snapshot("/nonexistent/s", "/nonexistent/m")
        vm.pause()
        vm.pause()  # paused already: nothing to do
        assert vm.state is VmState.PAUSED
        vm.machine.stop()
        with pytest.raises(VmStateError, match="cannot resume: it is stopped"):
            vm.resume()
    assert vm.state is VmState.STOPPED


def test_closing_a_paused_vm_tears_everything_down(probe_elf: Path) -> None:
    fds = open_fds()
    threads = threading.active_count()
    vm = MicroVM(kernel=probe_elf, cmdline="counter", vcpus=2)
    vm.start()
    vm.console.wait_for("counter: 1", timeout=20)
    vm.pause()
    vm.close()
    assert vm.state is VmState.STOPPED
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads
    assert open_fds() == fds


def test_two_vms_in_one_process_are_independent(probe_elf: Path) -> None:
    with (
        MicroVM(kernel=probe_elf, cmdline="counter") as first,
        MicroVM(kernel=probe_elf, cmdline="counter") as second,
    ):
        first.start()
        second.start()
        first.console.wait_for("counter: 2", timeout=20)
        second.console.wait_for("counter: 2", timeout=20)
        first.pause()
        paused_at = counters(first)
        second.console.wait_for(rf"counter: {counters(second)[-1] + 3}\b", timeout=20)
        assert counters(first) == paused_at
        first.resume()
        first.console.wait_for(rf"counter: {paused_at[-1] + 1}\b", timeout=20)


def test_bad_keyword_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="memory size"):
        MicroVM(kernel=tmp_path / "k", memory="lots")
    with pytest.raises(ConfigError, match="no path=IMG"):
        MicroVM(kernel=tmp_path / "k", drives=["ro"])
    with pytest.raises(TypeError, match="kernel="):
        MicroVM()
    fds = open_fds()
    with pytest.raises(ConfigError, match="cpus must be between 1 and"):
        MicroVM(kernel=tmp_path / "k", vcpus=999)
    assert open_fds() == fds, "a refused config left the console pipe open"


def test_pause_and_resume_under_disk_load_lose_no_io(probe_elf: Path, tmp_path: Path) -> None:
    """The probe reads random blocks (each one verified in the guest) and then
    writes 16 MiB while the VM is paused and resumed again and again: every
    request completes, every read is right, every written block lands."""
    from tests.kvm.test_probe_virtio import BLOCK, write_pattern_image, written_blocks

    image = tmp_path / "disk.img"
    write_pattern_image(image, 32 << 20)
    with MicroVM(
        kernel=probe_elf, cmdline="qd=32 blkrand=150000 blkwrite=16", drives=[f"path={image}"]
    ) as vm:
        vm.start()
        vm.console.wait_for("probe: cmdline", timeout=20)
        pauses = 0
        while vm.state is VmState.RUNNING and "PROBE RESULT" not in vm.console.output:
            vm.pause()
            pauses += 1
            time.sleep(0.005)
            vm.resume()
            time.sleep(0.02)
        vm.console.wait_for("PROBE RESULT: PASS", timeout=60)
        assert vm.wait(20) is not None
    assert pauses >= 10, f"only {pauses} pauses: the load ended too soon to test anything"
    assert written_blocks(image) == list(range((16 << 20) // BLOCK))


RESTORE_SCRIPT = """
import re, sys
from pyvmm import MicroVM
with MicroVM.restore(sys.argv[1], sys.argv[2], seccomp=True) as vm:  # filtered threads too
    match = vm.console.wait_for(r"counter: (\\d+)", timeout=20)
    print("first after restore:", int(match.group(1)))
"""


def test_snapshot_and_restore_in_a_new_process(probe_elf: Path, tmp_path: Path) -> None:
    state, memory = tmp_path / "vm.state", tmp_path / "vm.mem"
    with MicroVM(kernel=probe_elf, cmdline="counter", vcpus=2) as vm:
        vm.start()
        vm.console.wait_for(r"counter: 4\b", timeout=20)
        vm.pause()
        vm.snapshot(state, memory)
        last = counters(vm)[-1]
    result = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, str(state), str(memory)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"first after restore: {last + 1}"


def test_snapshot_needs_a_paused_vm(probe_elf: Path, tmp_path: Path) -> None:
    with MicroVM(kernel=probe_elf, cmdline="counter") as vm:
        vm.start()
        with pytest.raises(VmStateError, match="running"):
            vm.snapshot(tmp_path / "s", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_a_running_drive_gets_a_new_image_and_loses_its_limit(
    probe_elf: Path, tmp_path: Path
) -> None:
    """What PATCH /drives does: while the guest waits in `echo`, the drive is
    pointed at a bigger image and its 20-requests-a-second limit is removed;
    the guest's next programs see the new capacity and run unthrottled."""
    from pyvmm.config import DriveConfig, parse_rate_limit
    from pyvmm.devices.rate_limiter import LimiterPatch
    from tests.kvm.test_probe_virtio import write_pattern_image

    small, big = tmp_path / "small.img", tmp_path / "big.img"
    write_pattern_image(small, 4 << 20)
    write_pattern_image(big, 32 << 20)
    drive = DriveConfig(small, rate_limit=parse_rate_limit("ops=20/1s"), drive_id="rootfs")
    with MicroVM(kernel=probe_elf, cmdline="echo blkcheck blkrand=2000", drives=[drive]) as vm:
        vm.start()
        vm.console.wait_for("probe: cmdline", timeout=20)
        with pytest.raises(ConfigError, match=r"no drive 'data' \(known: 'rootfs'\)"):
            vm.machine.update_drive("data", big)
        with pytest.raises(ConfigError, match="cannot open drive image"):
            vm.machine.update_drive("rootfs", tmp_path / "missing.img")
        vm.machine.update_drive("rootfs", big, LimiterPatch(ops=None))
        vm.console.write("end\n")
        vm.console.wait_for(rf"capacity {(32 << 20) // 512} sectors", timeout=20)
        vm.console.wait_for("PROBE RESULT: PASS", timeout=30)  # 2000 reads: 100 s if limited
        assert vm.machine.config.drives[0].path == big
        assert vm.machine.config.drives[0].rate_limit is None  # the config follows the PATCH


def _seccomp_modes() -> dict[str, int]:
    """This process's threads: "name/tid" -> seccomp mode (0 none, 2 filter)."""
    modes = {}
    for task in Path("/proc/self/task").iterdir():
        fields = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines())
        modes[f"{fields['Name']}/{task.name}"] = int(fields["Seccomp"])
    return modes


def test_seccomp_filters_the_vms_threads_and_not_the_callers(probe_elf: Path) -> None:
    with MicroVM(kernel=probe_elf, cmdline="hello echo", seccomp=True) as vm:
        vm.start()
        vm.console.wait_for("hello from probe", timeout=20)
        modes = _seccomp_modes()
        vm.console.write("through the filtered threads\nend\n")
        match = vm.console.wait_for(r"echo: (.*)\r", timeout=20)
        reason = vm.wait(20)
    by_name = {key.split("/")[0]: mode for key, mode in modes.items()}
    assert by_name["vcpu0"] == 2 and by_name["pyvmm-io"] == 2, modes
    me = f"/{threading.get_native_id()}"
    caller = next(mode for key, mode in modes.items() if key.endswith(me))
    assert caller == 0, modes  # the test's own thread: never filtered by a library VM
    assert match.group(1) == b"through the filtered threads"
    assert reason is not None and reason.kind is StopKind.RESET


def test_seccomp_and_thread_setup_exclude_each_other(probe_elf: Path) -> None:
    from pyvmm.jail.seccomp import FaultPolicy, make_setup

    setup = make_setup(None, FaultPolicy.STOP_VM)
    with pytest.raises(ConfigError, match="seccomp= or thread_setup=, not both"):
        MicroVM(kernel=probe_elf, seccomp=True, thread_setup=setup)
