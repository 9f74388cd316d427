"""The ``linux_host`` fixture: somewhere real Linux guests boot at usable speed.

On a host with VMX or SVM that is the host itself: commands run directly.
Elsewhere (a PVM host, or no /dev/kvm) one nested host (Linux under QEMU-TCG
with kvm-amd, :mod:`pyvmm.nested.host`) is booted for the whole session and
commands run in it, with this machine's files at the same paths (read-only,
except the current directory and /tmp). Either way::

    def test_boots_linux(linux_host):
        result = linux_host.run(["python3", "-m", "pyvmm", "run", ...], timeout=300)
        assert result.returncode == 0, result.stderr

``run(command, timeout, *, cwd=None, env=None)`` takes an argv or a string of
``sh`` code and returns a :class:`~pyvmm.nested.host.NestedResult`; it raises
:class:`~pyvmm.nested.host.NestedTimeoutError` when the command overruns. The
mode can be forced with ``PYVMM_LINUX_HOST=direct`` or ``=nested``.

Load it as a plugin from the top-level conftest, ``pytest_plugins =
["tests.support.nested_fixture"]``: then a failing test that used the fixture gets a
report section with the L1 console log's path and tail. (Importing just the
fixture works too, without that section.) The fixture is skipped only when a
nested host is needed and ``qemu-system-x86_64`` is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from pyvmm.nested.host import (
    NestedHost,
    NestedResult,
    NestedStallError,
    NestedTimeoutError,
    describe,
)

MODE_ENV = "PYVMM_LINUX_HOST"


def linux_host_mode() -> str:
    """'direct' where KVM has VMX/SVM (or ``$PYVMM_LINUX_HOST`` says so), else 'nested'."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced in ("direct", "nested"):
        return forced
    from pyvmm.doctor import virtualization_kind

    usable_kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    return "direct" if usable_kvm and virtualization_kind() in ("vmx", "svm") else "nested"


class DirectLinuxHost:
    """Runs commands on this machine (which has VMX/SVM)."""

    mode = "direct"
    console_log: Path | None = None
    boot_seconds = 0.0

    def __init__(self, shared_dir: Path) -> None:
        self.shared_dir = shared_dir

    def run(
        self,
        command: Sequence[str] | str,
        timeout: float,
        *,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> NestedResult:
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        # As in a nested host: `python3` is the interpreter running the tests.
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                cwd=cwd,
                env={**os.environ, "PATH": path, **(env or {})},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NestedTimeoutError(
                f"`{describe(command)}` did not finish within {timeout:g} s and was killed"
            ) from exc
        except OSError as exc:  # as the shell reports it: 127 not found, 126 not runnable
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return NestedResult(code, "", f"{argv[0]}: {exc.strerror}\n", 0.0)
        return NestedResult(
            returncode=proc.returncode,
            stdout=proc.stdout.decode("utf-8", "replace"),
            stderr=proc.stderr.decode("utf-8", "replace"),
            duration=time.monotonic() - started,
        )

    def close(self) -> None:
        pass


class NestedLinuxHost:
    """Runs commands in one nested host, booting a new one if it dies or gets stuck."""

    mode = "nested"

    def __init__(self, workdir: Path) -> None:
        self._root = workdir
        self._boots = 0
        #: L1 boots that stalled and were retried by NestedHost, over the session.
        self.boot_retries = 0
        #: Commands rerun in a new L1 because L1 stalled under them.
        self.stalls = 0
        self._host: NestedHost | None = None
        self.shared_dir = workdir / "shared"
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        self._boot()

    def _boot(self) -> None:
        self._boots += 1
        host = NestedHost(workdir=self._root / f"l1-{self._boots}")
        self._host = host
        try:
            host.start()
        finally:
            self.boot_retries += host.boot_retries

    @property
    def console_log(self) -> Path | None:
        return self._host.console_log if self._host is not None else None

    @property
    def boot_seconds(self) -> float | None:
        return self._host.boot_seconds if self._host is not None else None

    def console_tail(self) -> str:
        return self._host.console_tail() if self._host is not None else ""

    def run(
        self,
        command: Sequence[str] | str,
        timeout: float,
        *,
        cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> NestedResult:
        if self._host is None or not self._host.usable:
            if self._host is not None:
                self._host.stop()
            self._boot()
        assert self._host is not None
        try:
            return self._host.run(command, timeout, cwd=cwd, env=env)
        except NestedStallError as stall:
            # L1 itself stopped (a soft lockup under QEMU-TCG), not the command:
            # run it once more in a new L1, and say so in the test's output.
            print(f"\nnested host stalled; rerunning in a new L1: {str(stall).splitlines()[0]}")
            self.stalls += 1
            self._host.stop()
            self._boot()
            return self._host.run(command, timeout, cwd=cwd, env=env)

    def close(self) -> None:
        if self._host is not None:
            self._host.stop()


@pytest.fixture(scope="session")
def linux_host(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DirectLinuxHost | NestedLinuxHost]:
    """A host where Linux guests boot: this one (VMX/SVM) or a nested one (see module doc)."""
    if linux_host_mode() == "direct":
        yield DirectLinuxHost(tmp_path_factory.mktemp("linux-host"))
        return
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed: it is needed for a nested KVM host")
    host = NestedLinuxHost(tmp_path_factory.mktemp("nested-host"))
    try:
        yield host
    finally:
        host.close()
        print(
            f"\nnested host: L1 console log in {host.console_log}; "
            f"stalled boots retried: {host.boot_retries}; commands rerun after an L1 stall: "
            f"{host.stalls}",
            file=sys.stderr,
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Add the L1 console log (path and tail) to the report of a failed test."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    host = getattr(item, "funcargs", {}).get("linux_host")
    if isinstance(host, NestedLinuxHost) and host.console_log is not None:
        report.sections.append(
            ("nested host L1 console", f"{host.console_log}\n{host.console_tail()}")
        )


def run_driver(
    host: DirectLinuxHost | NestedLinuxHost,
    source: str,
    tmp_path: Path,
    *args: str,
    marker: str,
    timeout: float,
) -> dict:
    """Run the Python script ``source`` with ``args`` in ``host``; the JSON it printed
    after ``marker`` on its last such line (the script's exit status must be 0)."""
    driver = tmp_path / "driver.py"
    driver.write_text(source)
    result = host.run([sys.executable, str(driver), *args], timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-4000:]
    return json.loads(lines[-1][len(marker) :])
