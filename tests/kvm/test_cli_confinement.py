"""``pyvmm run``'s confinement: seccomp by default, and the jailer's flags, on the real host.

Each test runs ``pyvmm run`` with the probe guest and looks at the running
process from outside (``/proc/<pid>``): the seccomp mode of every thread,
its root directory, limits and cgroup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import requires_kvm
from tests.kvm.test_cli import assert_one_line_error, pyvmm

pytestmark = requires_kvm


@contextmanager
def running(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``pyvmm run ARGS`` with the probe idling after 'hello'; stopped with SIGTERM at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", *args, "--cmdline", "hello idle"],
        stdin=subprocess.PIPE,  # piped: the console relay thread runs too
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        seen = b""
        deadline = time.monotonic() + 30
        while b"hello from probe" not in seen:
            assert time.monotonic() < deadline and process.poll() is None, (
                seen + process.stderr.read() if process.poll() is not None else seen
            )
            seen += os.read(process.stdout.fileno(), 4096)
        yield process
    finally:
        process.terminate()
        process.communicate(timeout=30)


def threads(pid: int) -> dict[str, int]:
    """Each thread's name and seccomp mode (0 none, 2 filter).

    KVM's own kernel thread in the process (``kvm-nx-lpage-recovery``) is not pyvmm's.
    """
    modes = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines())
        if not status["Name"].startswith("kvm-"):
            modes[f"{status['Name']}/{task.name}"] = int(status["Seccomp"])
    return modes


def test_every_thread_runs_under_a_filter_by_default(probe_elf: Path) -> None:
    with running("--kernel", str(probe_elf), "--memory", "32") as process:
        modes = threads(process.pid)
    names = {name.split("/")[0] for name in modes}
    assert {"python3", "vcpu0", "pyvmm-io", "console-relay"} <= names, names
    assert set(modes.values()) == {2}, modes
    assert process.returncode == 143  # SIGTERM: the VM stopped, as without filters


def test_no_seccomp_leaves_every_thread_unfiltered(probe_elf: Path) -> None:
    with running("--kernel", str(probe_elf), "--memory", "32", "--no-seccomp") as process:
        modes = threads(process.pid)
    assert set(modes.values()) == {0}, modes


def test_resource_limit_reaches_the_process(probe_elf: Path) -> None:
    args = ("--kernel", str(probe_elf), "--memory", "32", "--resource-limit", "no-file=4096")
    with running(*args) as process:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line


def test_jail_pivots_into_the_directory_and_finds_its_files_there(
    probe_elf: Path, tmp_path: Path
) -> None:
    jail = tmp_path / "jail"
    jail.mkdir()
    shutil.copy(probe_elf, jail / "probe.elf")
    (jail / "disk.img").write_bytes(bytes(1 << 20))
    args = ("--kernel", str(jail / "probe.elf"), "--drive", f"path={jail / 'disk.img'}")
    with running(*args, "--memory", "32", "--jail", str(jail)) as process:
        root = Path(f"/proc/{process.pid}/root")  # the process's own / (pivoted: no path)
        inside = sorted(p.name for p in root.iterdir())
        modes = threads(process.pid)
    assert inside == ["dev", "disk.img", "probe.elf", "run"]
    assert set(modes.values()) == {2}


def test_landlock_boots_with_a_drive(probe_elf: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    result = pyvmm(
        "run", "--kernel", str(probe_elf), "--memory", "32", "--cmdline", "hello",
        "--drive", f"path={disk}", "--rng", "--landlock",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "hello from probe" in result.stdout


def test_ids_are_dropped_before_dev_kvm_is_opened(probe_elf: Path) -> None:
    result = pyvmm("run", "--kernel", str(probe_elf), "--uid", "65534", "--gid", "65534")
    assert_one_line_error(result, "no permission", "/dev/kvm")


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--no-seccomp", "--seccomp-filter", "f.json"], ("exclude each other",)),
        (["--resource-limit", "no-file=lots"], ("--resource-limit", "no-file=lots")),
        (["--resource-limit", "cores=1"], ("unknown resource", "cores")),
        (["--uid", "1000"], ("--uid and --gid go together",)),
        (["--jail", "/nonexistent-jail"], ("--jail", "not a directory")),
        (["--seccomp-filter", "/nonexistent.json"], ("/nonexistent.json",)),
    ],
)
def test_bad_confinement_flags_are_one_line(
    probe_elf: Path, flags: list[str], needles: tuple[str, ...]
) -> None:
    result = pyvmm("run", "--kernel", str(probe_elf), *flags)
    assert_one_line_error(result, *needles)


def test_files_outside_the_jail_are_refused(probe_elf: Path, tmp_path: Path) -> None:
    result = pyvmm("run", "--kernel", str(probe_elf), "--jail", str(tmp_path))
    assert_one_line_error(result, "--kernel", "outside the jail")


def _cgroup_setting() -> tuple[str, Path]:
    """A setting this host's cgroup hierarchy has, and the directory pyvmm's cgroups go in."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "cpu.weight=50", Path("/sys/fs/cgroup/pyvmm-firecracker")
    return "cpu.shares=512", Path("/sys/fs/cgroup/cpu/pyvmm-firecracker")


def test_cgroup_is_made_joined_and_set(probe_elf: Path) -> None:
    setting, parent = _cgroup_setting()
    file, value = setting.split("=")
    with running("--kernel", str(probe_elf), "--memory", "32", "--cgroup", setting) as process:
        cgroup = parent / f"pyvmm-{process.pid}"
        try:
            assert str(process.pid) in (cgroup / "cgroup.procs").read_text().split()
            assert (cgroup / file).read_text().strip() == value
        finally:
            process.terminate()
            process.wait(30)
            cgroup.rmdir()


def test_a_refused_cgroup_setting_leaves_no_cgroup_behind(probe_elf: Path) -> None:
    _, parent = _cgroup_setting()
    before = set(parent.iterdir()) if parent.exists() else set()
    result = pyvmm("run", "--kernel", str(probe_elf), "--cgroup", "cpu.no_such_file=1")
    assert_one_line_error(result, "cpu.no_such_file")
    after = set(parent.iterdir()) if parent.exists() else set()
    assert {p for p in after - before if p.name.startswith("pyvmm-")} == set()
