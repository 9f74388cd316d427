"""``pyvmm exec``'s parsing: its mistakes are pyvmm's exit status 125, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pyvmm.cli_exec import (
    EXIT_PYVMM,
    exec_command,
    parse_env,
    parse_get,
    parse_put,
)
from pyvmm.errors import ConfigError


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


def test_pyvmm_exec_is_a_pyvmm_command() -> None:
    """``pyvmm exec`` reaches this command, its mistakes still 125 in one line."""
    from pyvmm.cli import main

    result = CliRunner().invoke(main, ["exec", "--bogus", "--", "true"])
    assert result.exit_code == EXIT_PYVMM, result.output
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "No such option" in result.output
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "exec" in help_text


def test_the_default_guest_is_resolved_in_the_front_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No child Python for it (the runtime's way): pyvmm exec may import the guest kit."""
    from pyvmm.cli_exec import with_default_guest
    from pyvmm.guestkit import sandbox_guest
    from pyvmm.sandbox.config import sandbox_config

    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    monkeypatch.setattr(sandbox_guest, "build_sandbox_guest", lambda: (kernel, initrd))
    resolved = with_default_guest(sandbox_config(memory="300M"))
    assert (resolved.kernel, resolved.initrd, resolved.mem_size) == (kernel, initrd, 300 << 20)
    (tmp_path / "mine").write_bytes(b"\x7fELF")
    own = sandbox_config(kernel=tmp_path / "mine", memory="300M")
    assert with_default_guest(own) is own
