"""End to end on the host's /dev/kvm: `pyvmm run` boots the probe guest.

The probe runs its programs in CPL3, which is native speed even on PVM
hosts, so these tests take seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.config import MachineConfig
from pyvmm.vmm.machine import Machine
from pyvmm.vmm.stop_reason import StopKind
from tests.conftest import requires_kvm

pytestmark = requires_kvm


def run_probe(
    probe: Path, cmdline: str, *extra: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pyvmm",
            "run",
            "--kernel",
            str(probe),
            "--cmdline",
            cmdline,
            *extra,
        ],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def lines(output: str) -> list[str]:
    return [line.rstrip("\r") for line in output.splitlines()]


def test_hello_prints_and_exits_zero_on_reset(probe_elf: Path) -> None:
    result = run_probe(probe_elf, "hello")
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert "hello from probe" in out
    assert out[-1] == "PROBE RESULT: PASS"


def test_serial_input_is_echoed(probe_elf: Path) -> None:
    result = run_probe(probe_elf, "echo", stdin="first line\nsecond\nend\n")
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert out.index("echo: first line") < out.index("echo: second") < out.index("echo: end")
    assert out[-1] == "PROBE RESULT: PASS"


def test_long_input_is_not_lost(probe_elf: Path) -> None:
    # More than the UART FIFO holds: pyvmm must hold back, not drop bytes.
    payload = [f"line {i:04d} " + "x" * 60 for i in range(200)]
    result = run_probe(probe_elf, "echo", stdin="\n".join([*payload, "end", ""]))
    assert result.returncode == 0, result.stderr
    echoed = [line[len("echo: ") :] for line in lines(result.stdout) if line.startswith("echo: ")]
    assert echoed == [*payload, "end"]


@pytest.mark.parametrize("cpus", [1, 4])
def test_selftest_on_n_vcpus(probe_elf: Path, cpus: int) -> None:
    result = run_probe(probe_elf, "", "--cpus", str(cpus))
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert f"cpus: {cpus}" in out
    assert f"cpus online: {cpus}" in out
    assert "apic ids: " + " ".join(str(i) for i in range(cpus)) in out
    assert out[-1] == "PROBE RESULT: PASS"


def test_interrupts(probe_elf: Path) -> None:
    result = run_probe(probe_elf, "irq")
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert "irq: int80 ok" in out
    assert "irq: uart 3 interrupts" in out
    assert out[-1] == "PROBE RESULT: PASS"


def test_triple_fault_exits_nonzero_with_reason(probe_elf: Path) -> None:
    result = run_probe(probe_elf, "fault")
    assert result.returncode == 1
    assert "triple-fault" in result.stderr
    assert "Traceback" not in result.stderr


def test_serial_out_file(probe_elf: Path, tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    result = run_probe(probe_elf, "hello", "--serial-out", str(log))
    assert result.returncode == 0, result.stderr
    assert "hello from probe" in log.read_text()
    assert "hello from probe" not in result.stdout


def test_boot_timer_is_logged(probe_elf: Path) -> None:
    result = run_probe(probe_elf, "boottimer")
    assert result.returncode == 0
    assert "Guest-boot-time" in result.stderr


def test_timeout_stops_a_guest_that_never_ends(probe_elf: Path) -> None:
    start = time.monotonic()
    result = run_probe(probe_elf, "echo", "--timeout", "2", stdin="")  # waits for input forever
    assert time.monotonic() - start < 30
    assert result.returncode == 1
    assert "timeout" in result.stderr


def test_library_machine_teardown(probe_elf: Path) -> None:
    output = bytearray()
    config = MachineConfig(kernel=probe_elf, cmdline="hello", vcpus=2, mem_size=32 << 20)
    import threading

    before = threading.active_count()
    with Machine(config, serial_out=output.extend) as machine:
        machine.start()
        reason = machine.wait(timeout=60)
    assert reason is not None and reason.kind is StopKind.RESET
    assert b"hello from probe" in output
    assert threading.active_count() == before


def test_stop_from_another_thread(probe_elf: Path) -> None:
    config = MachineConfig(kernel=probe_elf, cmdline="echo", mem_size=32 << 20)
    with Machine(config) as machine:
        machine.start()
        assert machine.wait(timeout=0.5) is None  # waiting for input
        machine.stop()
        reason = machine.wait(timeout=10)
    assert reason is not None and reason.kind is StopKind.USER_QUIT


def test_sigterm_stops_cleanly(probe_elf: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", "--kernel", str(probe_elf), "--cmdline", "echo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until the guest runs (so pyvmm's handlers are installed), then signal.
    assert process.stdout is not None
    for line in process.stdout:
        if "probe: cmdline" in line:
            break
    process.terminate()
    _, err = process.communicate(timeout=30)
    assert process.returncode == 143
    assert "received SIGTERM" in err
    assert "Traceback" not in err


def test_ctrl_a_x_on_a_tty_quits(probe_elf: Path) -> None:
    import os
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: pyvmm with its console on the pty
        os.execv(
            sys.executable,
            [sys.executable, "-m", "pyvmm", "run", "--kernel", str(probe_elf), "--cmdline", "echo"],
        )
    seen = b""
    deadline = time.monotonic() + 60
    while b"cmdline" not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 1024)
    os.write(fd, b"typed\r")  # raw mode: CR reaches the guest as-is
    time.sleep(0.5)
    os.write(fd, b"\x01x")
    _, status = os.waitpid(pid, 0)
    with_rest = seen
    try:
        while select.select([fd], [], [], 0.2)[0]:
            with_rest += os.read(fd, 1024)
    except OSError:
        pass
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, with_rest


class ExplodingDevice:
    """A device with a bug: the VM must stop with the error, not hang or crash."""

    def read(self, offset: int, data: memoryview) -> None:
        raise RuntimeError("device bug on read")

    def write(self, offset: int, data: memoryview) -> None:
        raise RuntimeError("device bug on write")


def test_exception_in_a_device_stops_the_vm(probe_elf: Path) -> None:
    import threading

    before = threading.active_count()
    config = MachineConfig(kernel=probe_elf, cmdline="spin3=1000", vcpus=2, mem_size=32 << 20)
    with Machine(config) as machine:
        machine.add_pio_device(0x80, 1, ExplodingDevice(), "exploding")
        machine.start()
        reason = machine.wait(timeout=60)
    assert reason is not None and reason.kind is StopKind.VMM_ERROR
    assert "device bug on write" in reason.message
    assert re.search(r"thread 'vcpu\d' \(vcpu\) failed: RuntimeError", reason.message)
    assert reason.exit_code == 1
    assert threading.active_count() == before


@pytest.mark.parametrize("cpus", [1, 3, 32])
def test_acpi_madt_and_mp_table_agree(probe_elf: Path, cpus: int) -> None:
    """Each table on its own lists every vCPU (Debian's kernels lack MP-table
    support, so the probe is what checks the MP table)."""
    result = run_probe(probe_elf, "tables", "--cpus", str(cpus))
    assert result.returncode == 0, result.stderr
    ids = " ".join(str(i) for i in range(cpus))
    out = lines(result.stdout)
    assert f"tables: acpi {cpus}: {ids}" in out
    assert f"tables: mptable {cpus}: {ids}" in out


def test_32_vcpus_come_online(probe_elf: Path) -> None:
    result = run_probe(probe_elf, "cpus", "--cpus", "32")
    assert result.returncode == 0, result.stderr
    assert "cpus online: 32" in lines(result.stdout)
