"""The nested KVM host: its pure parts, the CLI, and L1 running pyvmm for real.

The first group needs nothing. The ``linux_host`` group boots one L1 under
QEMU-TCG for the session (or runs directly on a VMX/SVM host) and proves that
/dev/kvm in L1 works for pyvmm: a real-mode KVM loop, ``pyvmm doctor``, and
the probe guest booted by ``pyvmm run``. Timings are printed (run with -s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyvmm.nested.agent import (
    INIT_SCRIPT,
    L1_TMPDIR,
    Share,
    command_script,
    config_script,
    plan_shares,
)
from pyvmm.nested.command import nested
from pyvmm.nested.host import (
    NestedError,
    NestedTimeoutError,
    command_environment,
    qemu_argv,
    tsc_arguments,
)
from tests.support.nested_fixture import NestedLinuxHost, linux_host  # noqa: F401

# --- the pure parts ---------------------------------------------------------------


def test_shares_put_tmp_and_cwd_writable_at_their_paths() -> None:
    shares = plan_shares(Path("/tmp/w"), Path("/work/main"))
    assert shares == [
        Share("host", Path("/"), readonly=True),
        Share("work", Path("/tmp/w")),
        Share("tmp", Path("/tmp")),
        Share("cwd", Path("/work/main")),
    ]


def test_a_share_inside_another_writable_one_is_left_out() -> None:
    tags = [s.tag for s in plan_shares(Path("/tmp/w"), Path("/tmp/project"))]
    assert tags == ["host", "work", "tmp"]
    tags = [s.tag for s in plan_shares(Path("/srv/w"), Path("/"), tmp=None)]
    assert tags == ["host", "work"]  # / is never shared writable


def test_config_mounts_outer_paths_first_and_binds_work_only_if_uncovered() -> None:
    covered = config_script(Path("/tmp/w"), plan_shares(Path("/tmp/w"), Path("/a b/c")))
    assert "WORK_PATH=/tmp/w\nHOST_CACHE=loose\n" in covered
    assert "share tmp /tmp\n    share cwd '/a b/c'\n" in covered
    assert "bind_work" not in covered
    uncovered = config_script(
        Path("/var/w"), plan_shares(Path("/var/w"), Path("/srv/x/y"), tmp=None), "none"
    )
    assert "HOST_CACHE=none" in uncovered
    assert uncovered.index("bind_work /var/w") < uncovered.index("share cwd /srv/x/y")
    inside = config_script(Path("/srv/w"), plan_shares(Path("/srv/w"), Path("/srv"), tmp=None))
    assert "share cwd /srv" in inside and "bind_work" not in inside
    with pytest.raises(ValueError, match="host_cache"):
        config_script(Path("/tmp/w"), [], "bogus")


def test_command_script_quotes_argv_and_env() -> None:
    script = command_script(
        ["printf", "%s|", "a b", "it's"], Path("/x y"), {"A": "1 2", "B": "$HOME"}
    )
    assert script.splitlines()[1:] == [
        "export A='1 2'",
        "export B='$HOME'",
        "cd '/x y' || exit 125",
        "exec printf '%s|' 'a b' 'it'\"'\"'s'",
    ]
    out = subprocess.run(["sh", "-c", script.replace("/x y", "/")], capture_output=True)
    assert out.stdout == b"a b|it's|"
    assert command_script("echo $A; exit 3", Path("/"), {}).endswith("echo $A; exit 3\n")
    with pytest.raises(ValueError):
        command_script([], Path("/"), {})
    with pytest.raises(ValueError):
        command_script(["true"], Path("/"), {"NOT-A-NAME": "x"})


def test_init_script_is_valid_shell() -> None:
    sh = shutil.which("busybox")
    argv = [sh, "sh", "-n"] if sh else ["sh", "-n"]
    proc = subprocess.run(argv, input=INIT_SCRIPT.encode(), capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_qemu_argv_has_tcg_svm_and_one_9p_device_per_share() -> None:
    shares = [Share("host", Path("/"), readonly=True), Share("work", Path("/tmp/a,b"))]
    argv = qemu_argv(Path("/k"), Path("/i"), shares, Path("/tmp/c.log"), memory_mib=1024)
    line = " ".join(argv)
    for piece in (
        "-M microvm,acpi=on -accel tcg -cpu EPYC,+svm,+npt -m 1024 -smp 2",
        "-serial file:/tmp/c.log",
        "-kernel /k -initrd /i",
        "-fsdev local,id=fs0,path=/,security_model=none,multidevs=remap,readonly=on",
        "-device virtio-9p-device,fsdev=fs0,mount_tag=host",
        "path=/tmp/a,,b,security_model=none,multidevs=remap -device",
        "mount_tag=work",
    ):
        assert piece in line


def test_tsc_arguments_come_from_cpu_mhz() -> None:
    cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2445.412\nflags\t\t: fpu\n"
    assert tsc_arguments(cpuinfo) == "tsc_early_khz=2445412 tsc=reliable"
    assert tsc_arguments("processor : 0\n") == ""


def test_command_environment() -> None:
    env = command_environment({"EXTRA": "1", "TMPDIR": "/elsewhere"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["PYVMM_NESTED"] == "1"
    assert env["EXTRA"] == "1" and env["TMPDIR"] == "/elsewhere"
    assert command_environment()["TMPDIR"] == L1_TMPDIR
    repo = str(Path(__file__).resolve().parents[2])
    assert env["PYTHONPATH"].split(":")[0] == repo


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


def test_host_boots_and_runs_commands(linux_host) -> None:  # noqa: F811
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


def test_exit_status_passes_through(linux_host) -> None:  # noqa: F811
    assert linux_host.run(["sh", "-c", "exit 7"], timeout=60).returncode == 7
    result = linux_host.run("echo out; echo err >&2; exit 3", timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert linux_host.run(["/nonexistent/command"], timeout=60).returncode == 127


def test_files_written_in_l1_are_visible_on_the_host(linux_host, tmp_path: Path) -> None:  # noqa: F811
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


def test_timeout_is_reported_and_the_host_stays_usable(linux_host) -> None:  # noqa: F811
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
    vcpu.set_sregs(replace(sregs, cs=replace(sregs.cs, base=0, selector=0)))
    vcpu.set_regs(replace(vcpu.get_regs(), rip=0x1000, rflags=2))
    outs, start = 0, time.perf_counter()
    while isinstance(out := vcpu.run(), exits.IoOut) and out.port == 0x80:
        outs += 1
    elapsed = time.perf_counter() - start
    print(f"outs={outs} end={type(out).__name__} us_per_exit={elapsed / outs * 1e6:.1f}")
    vcpu.close()
    vm.close()
"""


def test_pyvmm_drives_kvm_in_the_host(linux_host, tmp_path: Path) -> None:  # noqa: F811
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


def test_probe_guest_passes_in_the_host(linux_host) -> None:  # noqa: F811
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


def test_a_dead_l1_is_reported_and_replaced(linux_host) -> None:  # noqa: F811
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
