"""The pytest plugin end to end: a project's tests get real sandboxes.

Where Linux guests boot at usable speed (the nested host on PVM machines, see
tests/support/nested_fixture.py), pytest runs a small test file of a user's
project with the plugin loaded by ``-p pyvmm.sandbox.pytest_plugin`` (the
module the ``pytest11`` entry point names; plugin autoloading is off, so an
install whose metadata has the entry point or not loads it once): its
module-level ``@pytest.mark.pyvmm(...)``
gives both tests one configuration, so the first test's sandbox boots the
default guest and leaves the snapshot the second one is restored from. The
first test runs a command and passes; the second fails on purpose after
writing to the guest's console, and its report must show the console's end
and the last exec (command, status, stdout and stderr).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.linux

RUN_TIMEOUT = 1800

PROJECT_TESTS = """
import pytest

pytestmark = pytest.mark.pyvmm(memory="256M", confine=False)


def test_a_command_in_a_sandbox(sandbox):
    result = sandbox.exec(["sh", "-c", "echo hello from $(uname -s); echo $((6 * 7))"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"hello from Linux\\n42\\n", b"")
    assert sandbox.from_cache is False  # the first sandbox of this configuration booted


def test_fails_on_purpose(sandbox):
    assert sandbox.from_cache is True, "not restored from the first test's snapshot"
    result = sandbox.exec(
        ["sh", "-c", "echo CONSOLE-MARK > /dev/console; echo OUT-MARK; echo ERR-MARK >&2; exit 3"]
    )
    assert result.exit_code == 0, "FAILING-ON-PURPOSE"
"""


def test_sandbox_fixture_in_a_users_project(
    linux_host,  # the session's nested host (tests/conftest.py loads the fixture)
    sandbox_guest,
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text(f"[pytest]\npyvmm_cache_dir = {tmp_path / 'cache'}\n")
    (project / "test_in_sandbox.py").write_text(PROJECT_TESTS)
    argv = [sys.executable, "-m", "pytest", "-p", "pyvmm.sandbox.pytest_plugin"]
    argv += ["-p", "no:cacheprovider", "--durations=0", "-v"]
    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    started = time.monotonic()
    result = linux_host.run(argv, timeout=RUN_TIMEOUT, cwd=project, env=env)
    took = time.monotonic() - started
    out = result.stdout
    print(f"\npytest with the plugin in the linux host: {took:.1f} s\n{out[-2500:]}")
    assert result.returncode == 1, out[-4000:] + result.stderr[-3000:]  # one test failed
    assert "test_in_sandbox.py::test_a_command_in_a_sandbox PASSED" in out, out[-4000:]
    assert "test_in_sandbox.py::test_fails_on_purpose FAILED" in out, out[-4000:]
    assert "FAILING-ON-PURPOSE" in out, out[-4000:]  # failed where meant, restored as meant
    assert "1 failed, 1 passed" in out

    failure = out[out.index("FAILING-ON-PURPOSE") :]
    console = _section(failure, "pyvmm sandbox console (end)")
    assert "CONSOLE-MARK" in console, failure
    last_exec = _section(failure, "pyvmm sandbox last exec")
    assert last_exec.splitlines()[0] == (
        "$ sh -c echo CONSOLE-MARK > /dev/console; echo OUT-MARK; echo ERR-MARK >&2; exit 3"
    ), last_exec
    assert "exit status 3 after " in last_exec
    assert "--- stdout (end) ---\nOUT-MARK" in last_exec
    assert "--- stderr (end) ---\nERR-MARK" in last_exec


def _section(report: str, title: str) -> str:
    """The text of a report section (``--- title ---`` up to the next section line)."""
    start = report.index(f" {title} ")
    body = report[report.index("\n", start) + 1 :]
    lines = []
    for line in body.splitlines():
        if line.startswith(("-----", "=====", "_____")):
            break
        lines.append(line)
    return "\n".join(lines)
