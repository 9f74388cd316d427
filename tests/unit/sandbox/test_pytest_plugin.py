"""The pytest plugin: the fixture's options (ini, then markers, the closest wins) and the
failure report's sections; the sandbox itself is a fake here (real ones: tests/e2e)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest
from pyvmm.sandbox import sandbox as sandbox_module
from pyvmm.sandbox.results import ExecResult
from pyvmm.sandbox.sandbox import LastExec

made = []


class FakeSandbox:
    def __init__(self, config):
        self.config = config
        self.last_exec = None
        self.closed = False
        made.append(self)

    def exec(self, argv):
        result = ExecResult(3, None, b"built\\n", b"make: *** [all] Error 3\\n", 0.25)
        self.last_exec = LastExec(tuple(argv), result)
        return result

    def console_tail(self, chars):
        return "guest console line"

    def close(self):
        self.closed = True


@pytest.fixture(autouse=True)
def fake(monkeypatch):
    monkeypatch.setattr(sandbox_module, "Sandbox", FakeSandbox)
    yield
    assert made and all(box.closed for box in made)
"""

TESTS = """
import pytest

pytestmark = pytest.mark.pyvmm(memory="384M", cpus=2)


@pytest.mark.pyvmm(memory="512M")
def test_options(sandbox):
    assert sandbox.config.mem_size == 512 << 20 and sandbox.config.vcpus == 2
    assert sandbox.config.confine is False and sandbox.config.fresh_boot is True


def test_fails(sandbox):
    assert sandbox.exec(["make"]).exit_code == 0
"""


def test_options_and_the_failure_report(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\npyvmm_memory = 300M\npyvmm_confine = false\n")
    pytester.makepyfile(test_it=TESTS)
    result = pytester.runpytest_inprocess("--pyvmm-fresh-boot", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*pyvmm sandbox console (end)*",
            "guest console line",
            "*pyvmm sandbox last exec*",
            "$ make",
            "exit status 3 after 0.250 s",
            "--- stdout (end) ---",
            "built",
            "--- stderr (end) ---",
            "make: *** [[]all[]] Error 3",
        ]
    )


def test_a_positional_marker_argument_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.replace("    assert made and", "    assert not made or"))
    pytester.makepyfile(
        "import pytest\n\n@pytest.mark.pyvmm('512M')\ndef test_x(sandbox):\n    pass\n"
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert "keyword arguments only" in result.stdout.str() + result.stderr.str()
