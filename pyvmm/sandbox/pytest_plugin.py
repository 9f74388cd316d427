"""pytest plugin (entry point ``pytest11``): a fresh sandbox for each test that asks for one.

    import pytest

    @pytest.mark.pyvmm(memory="512M", cpus=2)
    def test_build(sandbox):
        sandbox.put("src", "/work/src")
        assert sandbox.exec(["make", "-C", "/work/src"], timeout=300).exit_code == 0

- the ``sandbox`` fixture gives the test a :class:`~pyvmm.sandbox.Sandbox`
  restored from the configuration's cached snapshot (the first test of a
  configuration boots it; the others take milliseconds), thrown away after
  the test;
- its configuration: the ini options below, then the ``pyvmm`` markers of
  the module, class and test (the closest wins), with the keyword
  arguments of :func:`~pyvmm.sandbox.config.sandbox_config`;
- on failure the report gets two sections: the end of the guest's console
  and the last exec (command, exit status, the ends of its stdout and
  stderr).

ini options (``pytest.ini``/``pyproject.toml``): ``pyvmm_kernel``,
``pyvmm_initrd``, ``pyvmm_cmdline``, ``pyvmm_memory``, ``pyvmm_cpus``,
``pyvmm_drives`` (lines), ``pyvmm_cache_dir``, ``pyvmm_confine``
(true/false). ``--pyvmm-fresh-boot`` boots every sandbox instead.

Importing this module costs nothing: the sandbox code is imported by the
fixture, so projects that never use it pay nothing for the plugin.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pyvmm.sandbox.sandbox import Sandbox

_INI_TEXT = ("kernel", "initrd", "cmdline", "memory", "cpus", "cache_dir")
_TAIL_CHARS = 3000
_SANDBOX_KEY = pytest.StashKey["Sandbox"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm sandboxes")
    group.addoption(
        "--pyvmm-fresh-boot",
        action="store_true",
        default=False,
        help="boot every `sandbox` fixture's guest instead of restoring its cached snapshot",
    )
    for name in _INI_TEXT:
        parser.addini(f"pyvmm_{name}", f"sandbox fixture: {name} (as pyvmm exec's --{name})")
    parser.addini("pyvmm_drives", "sandbox fixture: drives, one per line", type="linelist")
    parser.addini("pyvmm_confine", "sandbox fixture: confine the VMM", type="bool", default=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pyvmm(**options): options of the test's `sandbox` fixture (memory='512M', cpus=2, "
        "kernel=..., drives=[...], ...: pyvmm.sandbox.sandbox_config's keywords)",
    )


def sandbox_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The fixture's options: ini values, then markers from the farthest to the closest."""
    config = request.config
    options: dict[str, Any] = {}
    for name in _INI_TEXT:
        value = config.getini(f"pyvmm_{name}")
        if value:
            options[name] = value
    drives = config.getini("pyvmm_drives")
    if drives:
        options["drives"] = list(drives)
    options["confine"] = config.getini("pyvmm_confine")
    if config.getoption("--pyvmm-fresh-boot"):
        options["fresh_boot"] = True
    for marker in reversed(list(request.node.iter_markers("pyvmm"))):
        if marker.args:
            raise pytest.UsageError("@pytest.mark.pyvmm takes keyword arguments only")
        options.update(marker.kwargs)
    return options


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A fresh sandbox for this test (see :mod:`pyvmm.sandbox.pytest_plugin`)."""
    from pyvmm.errors import ConfigError
    from pyvmm.sandbox.config import config_from_options
    from pyvmm.sandbox.sandbox import Sandbox

    try:
        config = config_from_options(sandbox_options(request))
    except ConfigError as exc:
        raise pytest.UsageError(f"pyvmm sandbox options: {exc}") from None
    box = Sandbox(config)
    request.node.stash[_SANDBOX_KEY] = box
    try:
        yield box
    finally:
        box.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that used a sandbox: its console's end and its last exec."""
    outcome = yield
    report = outcome.get_result()
    box = item.stash.get(_SANDBOX_KEY, None)
    if box is None or not report.failed:
        return
    console = box.console_tail(_TAIL_CHARS).strip()
    report.sections.append(("pyvmm sandbox console (end)", console or "(nothing printed)"))
    report.sections.append(("pyvmm sandbox last exec", describe_last_exec(box)))


def describe_last_exec(box: Sandbox) -> str:
    last = box.last_exec
    if last is None:
        return "(no exec)"
    lines = [f"$ {' '.join(last.argv)}"]
    if last.result is None:
        lines.append(f"failed: {last.error}")
        return "\n".join(lines)
    result = last.result
    lines.append(f"exit status {result.exit_code} after {result.duration:.3f} s")
    for name, data in (("stdout", result.stdout), ("stderr", result.stderr)):
        text = data[-_TAIL_CHARS:].decode(errors="replace").rstrip()
        lines.append(f"--- {name} (end) ---\n{text}" if text else f"--- {name}: empty ---")
    return "\n".join(lines)
