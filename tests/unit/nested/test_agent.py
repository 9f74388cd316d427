"""The L1 agent's pure parts: share planning, config.sh, command scripts, /init."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.nested.agent import (
    CONSOLE_PORT_NAME,
    INIT_SCRIPT,
    L1_MODULES,
    Share,
    command_script,
    config_script,
    plan_shares,
)


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


def test_extra_writable_directories_are_shared_unless_already_inside_one() -> None:
    shares = plan_shares(
        Path("/tmp/w"), Path("/work/main"), extra=[Path("/srv/disks"), Path("/tmp/x")]
    )
    assert [(s.tag, str(s.host_path)) for s in shares[2:]] == [
        ("tmp", "/tmp"),
        ("cwd", "/work/main"),
        ("w0", "/srv/disks"),
    ]


def test_the_console_port_is_used_only_when_asked_for() -> None:
    assert "virtio_console" in L1_MODULES
    assert f"= {CONSOLE_PORT_NAME} ]" in INIT_SCRIPT
    # One open for both directions: a virtio-serial port allows one opener.
    assert '0<>"$port" 1>&0' in INIT_SCRIPT
    assert '[ ! -e "$c.console" ]' in INIT_SCRIPT
