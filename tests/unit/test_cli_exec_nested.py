"""``pyvmm exec`` through a nested host: the inner command is explicit and self-contained."""

from __future__ import annotations

from pathlib import Path

from pyvmm.cli_exec import ExecPlan
from pyvmm.cli_exec_nested import inner_argv, writable_dirs
from pyvmm.sandbox.config import sandbox_config


def test_the_nested_command_is_explicit(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    (tmp_path / "in").mkdir()
    config = sandbox_config(kernel=kernel, cmdline="console=ttyS0", memory="300M", confine=False)
    plan = ExecPlan(argv=("sh", "-c", "echo hi"), puts=((tmp_path / "in", "/in"),),
                    gets=(("/out", tmp_path / "got" / "out"),), env={"A": "1"}, cwd="/tmp",
                    timeout=5.0)  # fmt: skip
    argv = inner_argv(config, plan, tmp_path / "cache")
    assert argv[1:4] == ["-m", "pyvmm.cli_exec", "--nested"] and "never" in argv
    joined = " ".join(argv)
    for part in ("--stdin-frames", f"--kernel {kernel}", "--memory 300M", "--no-confine",
                 f"--put {tmp_path}/in:/in", f"--get /out:{tmp_path}/got/out", "--env A=1",
                 "--cwd /tmp", "--timeout 5.0", f"--cache-dir {tmp_path}/cache"):  # fmt: skip
        assert part in joined, part
    assert argv[-4:] == ["--", "sh", "-c", "echo hi"]
    assert writable_dirs(plan, tmp_path / "cache") == [tmp_path / "cache", tmp_path / "got"]
