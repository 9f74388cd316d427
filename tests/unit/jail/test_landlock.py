"""Landlock on this kernel: a process restricted to a few paths opens those and nothing else.

Each case runs in a fresh interpreter (a restriction cannot be undone, and
must not reach the test runner).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.jail import landlock

pytestmark = pytest.mark.skipif(
    landlock.abi_version() == 0, reason="this kernel has no Landlock (CONFIG_SECURITY_LANDLOCK)"
)

CHILD = r"""
import json, os, sys
from pyvmm.jail import landlock
ro, rw = sys.argv[1], sys.argv[2]
abi = landlock.restrict(read_only=[ro], read_write=[rw], devices=["/dev/null"])
def attempt(action):
    try:
        action()
        return "ok"
    except PermissionError:
        return "denied"
results = {
    "read allowed file": attempt(lambda: open(os.path.join(ro, "kernel")).read()),
    "write read-only file": attempt(lambda: open(os.path.join(ro, "kernel"), "w")),
    "create in rw dir": attempt(lambda: open(os.path.join(rw, "snapshot"), "w").write("x")),
    "remove in rw dir": attempt(lambda: os.unlink(os.path.join(rw, "snapshot"))),
    "read elsewhere": attempt(lambda: open("/etc/hostname").read()),
    "list elsewhere": attempt(lambda: os.listdir("/tmp")),
    "device": attempt(lambda: open("/dev/null", "w").write("x")),
    "other device": attempt(lambda: open("/dev/zero").read(1)),
}
print(json.dumps({"abi": abi, **results}))
"""


def test_only_the_listed_paths_stay_open(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "kernel").write_text("k")
    (tmp_path / "rw").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "ro"), str(tmp_path / "rw")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.pop("abi") >= 1
    assert report == {
        "read allowed file": "ok",
        "write read-only file": "denied",
        "create in rw dir": "ok",
        "remove in rw dir": "ok",
        "read elsewhere": "denied",
        "list elsewhere": "denied",
        "device": "ok",
        "other device": "denied",
    }


def test_a_missing_path_is_a_config_error_before_any_restriction() -> None:
    code = (
        "from pyvmm.jail import landlock\n"
        "from pyvmm.errors import ConfigError\n"
        "try:\n    landlock.restrict(read_only=['/no/such/kernel'])\n"
        "except ConfigError as e:\n    print(e)\n"
        "print(open('/etc/hostname').read() != '')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.stdout.splitlines() == [
        "landlock: cannot allow '/no/such/kernel': No such file or directory",
        "True",
    ]


def test_rights_follow_the_abi() -> None:
    assert landlock.handled_rights(0) == 0
    assert landlock.handled_rights(1) == (1 << 13) - 1
    assert landlock.handled_rights(4) == (1 << 15) - 1  # ABI 4 added network rights only
    assert landlock.handled_rights(7) == (1 << 16) - 1
