"""The nested KVM host: its pure parts, the CLI, and L1 running pyvmm for real.

The first group needs nothing. The ``linux_host`` group boots one L1 under
QEMU-TCG for the session (or runs directly on a VMX/SVM host) and proves that
/dev/kvm in L1 works for pyvmm: a real-mode KVM loop, ``pyvmm doctor``, and
the probe guest booted by ``pyvmm run``. Timings are printed (run with -s).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyvmm.nested.command import nested
from pyvmm.nested.host import NestedError, NestedTimeoutError
from tests.support.nested_fixture import NestedLinuxHost

# --- the CLI ----------------------------------------------------------------------------


def test_cli_needs_a_command() -> None:
    result = CliRunner().invoke(nested, [])
    assert result.exit_code == 2


def test_cli_runs_directly_on_a_vmx_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pyvmm.doctor.virtualization_kind", lambda: "vmx")
    result = CliRunner().invoke(nested, ["--", "sh", "-c", "exit 7"])
    assert result.exit_code == 7
    assert "hardware virtualization (vmx): running the command directly" in result.output
    result = CliRunner().invoke(nested, ["--timeout", "0.5", "--", "sleep", "5"])
    assert result.exit_code == 124
    result = CliRunner().invoke(nested, ["--", "/nonexistent/command"])
    assert result.exit_code == 127


# --- L1 for real ------------------------------------------------------------------------


def _timing(name: str, seconds: float | None) -> None:
    if seconds is not None:
        print(f"\nTIMING {name}: {seconds:.2f} s", flush=True)


def test_host_boots_and_runs_commands(linux_host) -> None:
    _timing(f"L1 boot to agent ready ({linux_host.mode})", linux_host.boot_seconds)
    uname = linux_host.run(["uname", "-r"], timeout=60)
    assert uname.returncode == 0 and uname.stdout.strip(), uname.stderr
    print(f"\nkernel: {uname.stdout.strip()} ({uname.duration:.2f} s)")
    kvm = linux_host.run(["ls", "-l", "/dev/kvm"], timeout=60)
    assert kvm.returncode == 0, kvm.stderr
    assert kvm.stdout.startswith("c"), kvm.stdout  # a character device
    python = linux_host.run(
        ["python3", "-c", "import pyvmm, sys; print(sys.version); print(pyvmm.__file__)"],
        timeout=180,
    )
    assert python.returncode == 0, python.stderr
    assert sys.version.split()[0] in python.stdout
    assert python.stdout.splitlines()[-1] == str(Path(__import__("pyvmm").__file__).resolve())
    _timing("python3 start + import pyvmm", python.duration)


def test_exit_status_passes_through(linux_host) -> None:
    assert linux_host.run(["sh", "-c", "exit 7"], timeout=60).returncode == 7
    result = linux_host.run("echo out; echo err >&2; exit 3", timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert linux_host.run(["/nonexistent/command"], timeout=60).returncode == 127


def test_files_written_in_l1_are_visible_on_the_host(linux_host, tmp_path: Path) -> None:
    here = Path(tempfile.mkdtemp(prefix=".pyvmm-nested-test-", dir=os.getcwd()))
    try:
        (tmp_path / "from-host.txt").write_text("host wrote this\n")
        result = linux_host.run(
            [
                "sh",
                "-c",
                'echo from-cwd > "$1/in-cwd.txt" && echo from-tmp > "$2/in-tmp.txt" '
                '&& cat "$2/from-host.txt" && pwd',
                "sh",
                str(here),
                str(tmp_path),
            ],
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["host wrote this", os.getcwd()]
        assert (here / "in-cwd.txt").read_text() == "from-cwd\n"
        assert (tmp_path / "in-tmp.txt").read_text() == "from-tmp\n"
    finally:
        shutil.rmtree(here, ignore_errors=True)


def test_timeout_is_reported_and_the_host_stays_usable(linux_host) -> None:
    with pytest.raises(NestedTimeoutError, match=r"`sleep 120` did not finish within 3 s"):
        linux_host.run(["sleep", "120"], timeout=3)
    after = linux_host.run(["echo", "still here"], timeout=60)
    assert (after.returncode, after.stdout) == (0, "still here\n")


# A real-mode guest: mov cx, N; l: out 0x80, al; loop l; hlt
KVM_LOOP = """
import mmap, sys, time
from dataclasses import replace
from pyvmm.kvm import Kvm, exits
n = int(sys.argv[1])
code = bytes([0xB9, n & 0xFF, n >> 8, 0xE6, 0x80, 0xE2, 0xFC, 0xF4])
with Kvm() as kvm:
    vm = kvm.create_vm()
    memory = mmap.mmap(-1, 0x10000)
    memory[0x1000 : 0x1000 + len(code)] = code
    vm.set_user_memory_region(0, 0, memory)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    vcpu.set_sregs(sregs._replace(cs=sregs.cs._replace(base=0, selector=0)))
    vcpu.set_regs(vcpu.get_regs()._replace(rip=0x1000, rflags=2))
    outs, start = 0, time.perf_counter()
    while isinstance(out := vcpu.run(), exits.IoOut) and out.port == 0x80:
        outs += 1
    elapsed = time.perf_counter() - start
    print(f"outs={outs} end={type(out).__name__} us_per_exit={elapsed / outs * 1e6:.1f}")
    vcpu.close()
    vm.close()
"""


def test_pyvmm_drives_kvm_in_the_host(linux_host, tmp_path: Path) -> None:
    script = tmp_path / "kvm_loop.py"
    script.write_text(KVM_LOOP)
    result = linux_host.run(["python3", str(script), "1000"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert "outs=1000 end=Halt" in result.stdout, result.stdout
    print(f"\nreal-mode KVM loop in {linux_host.mode}: {result.stdout.strip()}")
    _timing("real-mode KVM loop script (1000 port-I/O exits)", result.duration)

    doctor = linux_host.run(["python3", "-m", "pyvmm", "doctor"], timeout=300)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "kvm device:        ok (read/write)" in doctor.stdout
    assert "virtualization:    vmx" in doctor.stdout or "virtualization:    svm" in doctor.stdout
    speed = [line for line in doctor.stdout.splitlines() if line.startswith("guest speed")]
    print(f"\n{speed[0] if speed else 'no speed line'}")
    assert speed and "runs at hardware speed" in speed[0], doctor.stdout
    _timing("pyvmm doctor", doctor.duration)


def test_probe_guest_passes_in_the_host(linux_host) -> None:
    from pyvmm.guestkit.probe import build_probe

    # The shared directory is at the same path on the host and in L1.
    probe = build_probe(cache_dir=linux_host.shared_dir / "cache")
    result = linux_host.run(
        ["python3", "-m", "pyvmm", "run", "--kernel", str(probe), "--cmdline", "hello"],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.rstrip("\r") for line in result.stdout.splitlines()]
    assert "hello from probe" in lines
    assert lines[-1] == "PROBE RESULT: PASS"
    _timing("pyvmm run probe (hello)", result.duration)


def test_a_dead_l1_is_reported_and_replaced(linux_host) -> None:
    if not isinstance(linux_host, NestedLinuxHost):
        pytest.skip("only a nested host can die")
    host = linux_host._host
    assert host is not None and host._process is not None
    host._process.kill()
    host._process.wait(10)
    with pytest.raises(NestedError, match="not running"):
        host.run(["true"], timeout=10)
    result = linux_host.run(["echo", "rebooted"], timeout=60)  # the fixture boots a new L1
    assert result.stdout == "rebooted\n"
    assert linux_host._host is not host
    _timing("second L1 boot to agent ready", linux_host.boot_seconds)
