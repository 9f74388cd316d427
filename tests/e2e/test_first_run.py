"""A new user's first commands: ``pyvmm run`` with the default guest, as typed.

Each test runs ``python -m pyvmm run`` the way a user does, so on a PVM host
it takes the same path a user's run takes (pyvmm decides to boot the VM in a
nested host, and connects the console through it), and on a VMX/SVM host it
runs directly. Each test gives pyvmm a private TMPDIR and checks that no
nested host's files are left in it. The last test runs the direct path on
this host too, inside the ``linux_host`` fixture's nested host.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.doctor import virtualization_kind
from pyvmm.guestkit.debian import fetch_kernel
from pyvmm.host.terminal import CTRL_A
from tests.conftest import requires_kvm

pytestmark = [requires_kvm, pytest.mark.linux]

NESTED_HERE = virtualization_kind() not in ("vmx", "svm")
RUN_TIMEOUT_S = 600


@pytest.fixture
def private_tmp(tmp_path: Path) -> Path:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return tmp


def pyvmm_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp), "PYVMM_PROGRESS": "0"}


def leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("pyvmm-nested-*"))


def run_piped(tmp: Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", "run"],
        input=stdin,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        env=pyvmm_env(tmp),
        cwd=tmp,
        check=False,
    )


def test_piped_commands_run_and_the_end_of_input_powers_the_guest_off(private_tmp: Path) -> None:
    version = fetch_kernel("cloud").version
    started = time.monotonic()
    result = run_piped(private_tmp, b'uname -r\necho "sum=$((40 + 2))"\n')
    took = time.monotonic() - started
    out = result.stdout.decode(errors="replace").replace("\r", "").splitlines()
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err + "\n" + "\n".join(out)
    assert version in out, out
    assert "sum=42" in out, out
    assert "PYVMM-INIT-OK" not in out  # batch mode: only what the commands print (and echo)
    assert "reboot: Power down" not in "\n".join(out)
    assert ("running the VM in a nested KVM host" in err) == NESTED_HERE, err
    assert "Traceback" not in err
    assert leftovers(private_tmp) == []
    print(f"\nTIMING printf ... | pyvmm run: {took:.1f} s (nested: {NESTED_HERE})")


def test_stdin_at_end_of_file_ends_the_vm(private_tmp: Path) -> None:
    """The README's old fallback ``< /dev/null`` sat at the prompt forever."""
    with open(os.devnull, "rb") as devnull:
        result = subprocess.run(
            [sys.executable, "-m", "pyvmm", "run"],
            stdin=devnull,
            capture_output=True,
            timeout=RUN_TIMEOUT_S,
            env=pyvmm_env(private_tmp),
            cwd=private_tmp,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert leftovers(private_tmp) == []


class Terminal:
    """pyvmm run on a pseudo-terminal, as a person at a terminal runs it."""

    def __init__(self, tmp: Path) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: pyvmm with the pty as its terminal
            os.chdir(tmp)
            os.execve(sys.executable, [sys.executable, "-m", "pyvmm", "run"], pyvmm_env(tmp))
        self.seen = b""
        self.status: int | None = None

    def expect(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.seen and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:  # the child exited and the pty closed
                    break
        return needle in self.seen

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float) -> int | None:
        """The exit status, once pyvmm exited within ``timeout`` seconds (else None)."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline:
                break
            else:
                self.expect(b"\0never\0", 0.2)  # keep draining the pty meanwhile
        return self.status

    def close(self) -> None:
        if self.wait(0) is None:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.fd)

    def text(self) -> str:
        return self.seen.decode(errors="replace")[-3000:]


def test_a_terminal_reaches_the_guest_shell_and_ctrl_a_x_quits(private_tmp: Path) -> None:
    terminal = Terminal(private_tmp)
    try:
        assert terminal.expect(b"Quit pyvmm with Ctrl-A X", RUN_TIMEOUT_S), terminal.text()
        assert terminal.expect(b"# ", 60), terminal.text()
        # The first screen: no kernel noise about the PCI bus this platform does not have.
        assert b"PCI: Fatal" not in terminal.seen, terminal.text()
        terminal.type(b"echo typed-$((6 * 7))\r")
        assert terminal.expect(b"typed-42", 60), terminal.text()
        started = time.monotonic()
        terminal.type(bytes([CTRL_A]) + b"x")
        assert terminal.wait(60) == 0, terminal.text()
        assert time.monotonic() - started < 20
    finally:
        terminal.close()
    assert leftovers(private_tmp) == []


@pytest.mark.parametrize("keys", [b"poweroff\r", b"\x04"], ids=["poweroff", "ctrl-d"])
def test_the_banners_ways_out_end_pyvmm_with_status_0(private_tmp: Path, keys: bytes) -> None:
    terminal = Terminal(private_tmp)
    try:
        assert terminal.expect(b"# ", RUN_TIMEOUT_S), terminal.text()
        terminal.type(keys)
        assert terminal.wait(120) == 0, terminal.text()
    finally:
        terminal.close()
    assert leftovers(private_tmp) == []


def test_the_direct_path_pipes_and_powers_off_too(linux_host) -> None:
    """The path a VMX/SVM host takes: here, pyvmm run inside the nested host (direct there)."""
    version = fetch_kernel("cloud").version
    result = linux_host.run(
        "printf 'uname -r\\necho \"sum=$((40 + 2))\"' | python3 -m pyvmm run --cpus 2", timeout=600
    )
    out = result.stdout.replace("\r", "").splitlines()
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    assert version in out and "sum=42" in out, out  # the unfinished last line ran too
    assert "nested KVM host" not in result.stderr  # inside L1 it runs directly
