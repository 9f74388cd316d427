"""``pyvmm nested`` (with the fake QEMU): SIGTERM and SIGINT leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.nested.conftest import work_dirs

DRIVER = """
import sys, tempfile
from pyvmm.nested import host
host.prepare_l1_images = lambda cache_dir=None: ({tmp!r} + "/k", {tmp!r} + "/i")
tempfile.tempdir = {tmp!r}
from pyvmm.cli import main
main(["nested", *sys.argv[1:]])
"""


def start(
    tmp: Path, *command: str, options: tuple[str, ...] = (), plan: str = "ok"
) -> subprocess.Popen[str]:
    env = {**os.environ, "FAKE_QEMU_PLAN": plan, "PYVMM_PROGRESS": "0"}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(tmp=str(tmp)), *options, "--", *command],
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_command_stops_l1_and_removes_its_files(
    fake_l1: Path, sig: signal.Signals, status: int
) -> None:
    marker = fake_l1 / "started"
    proc = start(fake_l1, "sh", "-c", f"touch {marker}; sleep 60")
    wait_for(marker.exists)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert f"received {sig.name}; the nested host was shut down" in err
    assert "Traceback" not in err
    assert work_dirs(fake_l1) == []


def test_a_signal_during_the_boot_removes_the_files_too(fake_l1: Path) -> None:
    proc = start(fake_l1, "true", plan="stall")
    wait_for(lambda: any((d / "console.log").exists() for d in work_dirs(fake_l1)))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert work_dirs(fake_l1) == []


def test_a_command_past_its_timeout_is_killed_and_nothing_is_left(fake_l1: Path) -> None:
    proc = start(fake_l1, "sleep", "60", options=("--timeout", "1"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 124, err
    assert "did not finish within 1 s" in err
    assert work_dirs(fake_l1) == []
