"""NestedHost against a fake QEMU (tests/unit/nested/fake_qemu.py) that plays L1.

What is real: the work directory and its clean-up, the agent's files, the
console socket and the relay into it, the stall detection and the retry.
What is fake: QEMU and L1 (the fake serves commands with the host's ``sh``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.host.console_input import EOT
from pyvmm.nested.agent import L1_TMPDIR
from pyvmm.nested.host import (
    NestedBootError,
    NestedHost,
    NestedStallError,
    command_environment,
)
from tests.unit.nested.conftest import work_dirs

READ_UNTIL_EOT = (
    "import sys\n"
    "data = b''\n"
    "while not data.endswith(b'\\x04'):\n"
    "    chunk = sys.stdin.buffer.read1(100)\n"
    "    if not chunk: break\n"
    "    data += chunk\n"
    "sys.stdout.write('got %r\\n' % data)\n"
)


def test_boots_runs_and_removes_its_work_directory(fake_l1: Path) -> None:
    with NestedHost(cwd=fake_l1) as host:
        assert work_dirs(fake_l1) == [host.workdir]
        result = host.run("echo out; echo err >&2; exit 3", 30)
        assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
        assert host.boot_retries == 0
    assert work_dirs(fake_l1) == []
    assert not host.running


def test_a_stalled_boot_is_retried_once_and_said(fake_l1: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_PLAN", "stall,ok")
    notices: list[str] = []
    with NestedHost(cwd=fake_l1, stall_timeout=0.5, notify=notices.append) as host:
        assert host.run(["true"], 30).returncode == 0
        assert host.boot_retries == 1
        assert (host.workdir / "console-1.log").read_text().endswith("X.509 certificates\n")
    assert len(notices) == 1
    assert "stalled while booting" in notices[0]
    assert "Loading compiled-in X.509 certificates" in notices[0]
    assert notices[0].endswith("booting it once more")
    assert work_dirs(fake_l1) == []


def test_two_stalls_fail_with_the_console_and_leave_nothing(fake_l1: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_PLAN", "stall")
    host = NestedHost(cwd=fake_l1, stall_timeout=0.3, notify=lambda message: None)
    with pytest.raises(NestedBootError, match="stalled while booting, 2 times") as error:
        host.start()
    assert "X.509" in str(error.value)
    assert host._process is not None and host._process.poll() is not None  # reaped
    assert work_dirs(fake_l1) == []


def test_an_l1_that_dies_while_booting_is_not_retried(fake_l1: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_PLAN", "die,ok")
    host = NestedHost(cwd=fake_l1, notify=lambda message: None)
    with pytest.raises(NestedBootError, match="exited with status 3"):
        host.start()
    assert work_dirs(fake_l1) == []


def test_an_interrupt_while_booting_cleans_up(fake_l1: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_QEMU_PLAN", "stall")

    def interrupt(stage: str) -> None:
        raise KeyboardInterrupt

    host = NestedHost(cwd=fake_l1, stall_timeout=30)
    monkeypatch.setattr(host, "_wait_until_ready", lambda *args: interrupt(""))
    with pytest.raises(KeyboardInterrupt):
        host.start()
    assert host._process is not None and host._process.poll() is not None
    assert work_dirs(fake_l1) == []


def test_stdin_streams_through_the_console_and_ends_with_eot(fake_l1: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"hello\n")
    os.close(write_fd)
    out = bytearray()
    with NestedHost(cwd=fake_l1) as host:
        result = host.run(
            [sys.executable, "-c", READ_UNTIL_EOT], 30, stdin=read_fd, on_stdout=out.extend
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""  # streamed, not collected
        # The console stays usable for the next command.
        again = bytearray()
        r2, w2 = os.pipe()
        os.close(w2)
        host.run([sys.executable, "-c", READ_UNTIL_EOT], 30, stdin=r2, on_stdout=again.extend)
        os.close(r2)
    os.close(read_fd)
    assert out == b"got " + repr(b"hello\n" + EOT).encode() + b"\n"
    assert again == b"got " + repr(EOT).encode() + b"\n"


def test_ctrl_a_x_on_a_terminal_ends_the_run_at_once(fake_l1: Path) -> None:
    read_fd, write_fd = os.pipe()
    with NestedHost(cwd=fake_l1) as host:
        os.write(write_fd, b"typed\r\x01x")
        started = time.monotonic()
        result = host.run(["sleep", "60"], 120, stdin=read_fd, terminal=True)
        assert result.user_quit and result.returncode == 0
        assert time.monotonic() - started < 10
        assert not host.usable  # the command still runs in L1: stop() is next
    os.close(read_fd)
    os.close(write_fd)
    assert work_dirs(fake_l1) == []


def test_a_lasting_soft_lockup_ends_the_command(fake_l1: Path) -> None:
    with NestedHost(cwd=fake_l1) as host:
        line = "[   95.1] watchdog: BUG: soft lockup - CPU#1 stuck for 75s! [rcu_preempt:15]"
        with pytest.raises(NestedStallError, match="soft lockup of 75 s"):
            host.run(f"echo '{line}' >> {host.console_log}; sleep 60", 120)
        assert not host.usable


def test_a_short_soft_lockup_is_only_noted_in_the_log(fake_l1: Path) -> None:
    with NestedHost(cwd=fake_l1) as host:
        line = "[   30.1] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [kworker:105]"
        result = host.run(f"echo '{line}' >> {host.console_log}; echo fine", 30)
        assert result.stdout == "fine\n"


def test_stale_work_directories_of_killed_runs_are_removed(fake_l1: Path) -> None:
    code = (
        "import os, signal\n"
        "from pyvmm.nested.host import NestedHost\n"
        "from pyvmm.nested import host as h\n"
        f"h.prepare_l1_images = lambda cache_dir=None: ({str(fake_l1)!r} + '/k', '/i')\n"
        "import tempfile\n"
        f"tempfile.tempdir = {str(fake_l1)!r}\n"
        "NestedHost(cwd='/').start()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    left = work_dirs(fake_l1)
    assert len(left) == 1  # SIGKILL: nothing could clean up
    with NestedHost(cwd=fake_l1) as host:
        assert work_dirs(fake_l1) == [host.workdir]  # the dead run's directory is gone


def test_command_environment() -> None:
    env = command_environment({"EXTRA": "1", "TMPDIR": "/elsewhere"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["PYVMM_NESTED"] == "1"
    assert env["EXTRA"] == "1" and env["TMPDIR"] == "/elsewhere"
    assert command_environment()["TMPDIR"] == L1_TMPDIR
    repo = str(Path(__file__).resolve().parents[3])
    assert env["PYTHONPATH"].split(":")[0] == repo
