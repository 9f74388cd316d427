"""``pyvmm exec``'s parsing: its mistakes are pyvmm's exit status 125, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pyvmm.errors import ConfigError
from pyvmm.sandbox.config import sandbox_config
from pyvmm.sandbox.exec_command import (
    EXIT_PYVMM,
    ExecPlan,
    exec_command,
    parse_env,
    parse_get,
    parse_put,
)
from pyvmm.sandbox.exec_nested import inner_argv, writable_dirs


def test_put_and_get_split_where_the_guest_path_allows() -> None:
    assert parse_put("a:b/src:/work/src") == (Path("a:b/src"), "/work/src")
    assert parse_get("/work/out:c:d/out") == ("/work/out", Path("c:d/out"))
    for bad in ("src", "src:relative", ":/x"):
        with pytest.raises(ConfigError, match="HOST:GUEST"):
            parse_put(bad)
    for bad in ("out", "relative:out", "/x:"):
        with pytest.raises(ConfigError, match="GUEST:HOST"):
            parse_get(bad)


def test_env_needs_a_name() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in ("A", "=1", "1A=x"):
        with pytest.raises(ConfigError, match="NAME=VALUE"):
            parse_env([bad])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus", "--", "true"], "No such option"),
        (["--timeout", "soon", "--", "true"], "soon"),
        ([], "Missing argument"),
        (["--memory", "lots", "--", "true"], "memory"),
        (["--put", "/no/such/dir:/x", "--", "true"], "no such file"),
        (["--timeout", "-1", "--", "true"], "--timeout must be a positive"),
        (["--env", "=x", "--", "true"], "NAME=VALUE"),
    ],
)
def test_a_bad_option_is_125_and_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(exec_command, args)
    assert result.exit_code == EXIT_PYVMM, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error: "), result.output
    assert message in lines[0]


def test_the_nested_command_is_explicit(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    (tmp_path / "in").mkdir()
    config = sandbox_config(kernel=kernel, cmdline="console=ttyS0", memory="300M", confine=False)
    plan = ExecPlan(argv=("sh", "-c", "echo hi"), puts=((tmp_path / "in", "/in"),),
                    gets=(("/out", tmp_path / "got" / "out"),), env={"A": "1"}, cwd="/tmp",
                    timeout=5.0)  # fmt: skip
    argv = inner_argv(config, plan, tmp_path / "cache")
    assert argv[1:4] == ["-m", "pyvmm.sandbox.exec_command", "--nested"] and "never" in argv
    joined = " ".join(argv)
    for part in ("--stdin-frames", f"--kernel {kernel}", "--memory 300M", "--no-confine",
                 f"--put {tmp_path}/in:/in", f"--get /out:{tmp_path}/got/out", "--env A=1",
                 "--cwd /tmp", "--timeout 5.0", f"--cache-dir {tmp_path}/cache"):  # fmt: skip
        assert part in joined, part
    assert argv[-4:] == ["--", "sh", "-c", "echo hi"]
    assert writable_dirs(plan, tmp_path / "cache") == [tmp_path / "cache", tmp_path / "got"]
