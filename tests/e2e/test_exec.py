"""``pyvmm exec`` end to end, on a real Linux guest.

Two ways in:

- where Linux guests boot at usable speed (the nested host on PVM machines, see
  tests/support/nested_fixture.py) a driver runs the command many times and reports
  what it saw: exit statuses (0, 7, a signal, 124, 125 with the console's end, 126,
  127), stdin, streamed and separate stdout/stderr, --put/--get of trees and files,
  refused escapes, and that one exec's files are gone in the next;
- on this host, the command itself, which (on a PVM host) runs the sandbox in a nested
  host exactly as ``pyvmm run`` does: binary stdin (with the console's end-of-file
  byte in it) arrives intact, the command's status comes back.

The command is run as ``python -m pyvmm.cli_exec`` (what ``pyvmm exec``
runs).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.nested_fixture import run_driver

pytestmark = pytest.mark.linux

RUN_TIMEOUT = 2400
MARKER = "EXEC-E2E "

DRIVER = (
    r'''
import hashlib, json, os, stat, subprocess, sys, threading, time
from pathlib import Path

cache, work = sys.argv[1], Path(sys.argv[2])
EXEC = [sys.executable, "-m", "pyvmm.cli_exec", "--cache-dir", cache]
out = {}


def run(args, stdin=b"", confine=False):
    started = time.monotonic()
    proc = subprocess.run(EXEC + ([] if confine else ["--no-confine"]) + args, input=stdin,
                          capture_output=True, timeout=900)
    return [proc.returncode, proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"), round(time.monotonic() - started, 3)]


def tree(root):
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            regular = stat.S_ISREG(st.st_mode)
            data = hashlib.sha256(path.read_bytes()).hexdigest() if regular else None
            entries[str(path.relative_to(root))] = [stat.S_IFMT(st.st_mode),
                                                    stat.S_IMODE(st.st_mode), data]
    return entries


out["first"] = run(["--", "true"])  # builds the snapshot cache
out["true"] = run(["--", "true"])
out["seven"] = run(["--", "sh", "-c", "exit 7"])
out["signal"] = run(["--", "sh", "-c", "kill -KILL $$"])
out["timeout"] = run(["--timeout", "1", "--", "sleep", "60"])
out["not_found"] = run(["--", "no-such-command"])
out["cannot_run"] = run(["--", "/etc"])
out["crash"] = run(["--", "sh", "-c", "echo o > /proc/sysrq-trigger; sleep 30"])
out["stdin"] = run(["--", "cat"], stdin=b"hi\n")
out["separate"] = run(["--env", "A=1", "--cwd", "/tmp", "--",
                       "sh", "-c", "echo out; echo err >&2; echo $A; pwd"])

proc = subprocess.Popen(EXEC + ["--no-confine", "--", "sh", "-c",
                                "echo first; sleep 3; echo second"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
killer = threading.Timer(900, proc.kill)  # bounded, like run()'s steps
killer.start()
started, lines = time.monotonic(), []
for line in proc.stdout:
    lines.append([round(time.monotonic() - started, 3), line.decode()])
proc.wait()
killer.cancel()
out["stream"] = [lines, round(time.monotonic() - started, 3), proc.returncode]

src = work / "src"
(src / "a" / "b").mkdir(parents=True)
(src / "tool.sh").write_bytes(b"#!/bin/sh\necho tool\n")
(src / "tool.sh").chmod(0o755)
(src / "a" / "data.bin").write_bytes(os.urandom(300_000))
(src / "a" / "data.bin").chmod(0o640)
(src / "a" / "b" / "note").write_bytes(b"note\n")
out["putget"] = run(["--put", f"{src}:/work/src", "--get", f"/work/src:{work}/back",
                     "--get", f"/work/src/a/data.bin:{work}/data.bin", "--",
                     "sh", "-c", "/work/src/tool.sh && ls /work/src/a"])
out["tree_same"] = tree(work / "back") == tree(src)
out["file_same"] = [(work / "data.bin").read_bytes() == (src / "a" / "data.bin").read_bytes(),
                    oct(stat.S_IMODE((work / "data.bin").stat().st_mode))]
out["escape"] = run(["--get", f"/esc:{work}/esc", "--",
                     "sh", "-c", "mkdir /esc && ln -s /etc/passwd /esc/pw"])
out["escape_left"] = sorted(n for n in os.listdir(work) if n.startswith(("esc", ".")))
out["dotdot"] = run(["--put", f"{src}:/work/../x", "--", "true"])
out["write"] = run(["--", "sh", "-c", "echo secret > /root/left-behind"])
out["fresh"] = run(["--", "test", "-e", "/root/left-behind"])
out["jailed"] = run(["--", "sh", "-c", "echo confined"], confine=True)
print("'''
    + MARKER
    + r"""" + json.dumps(out), flush=True)
"""
)


def test_exec_statuses_streams_and_files(linux_host, sandbox_guest, tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    args = (str(tmp_path / "cache"), str(tmp_path / "work"))
    out = run_driver(linux_host, DRIVER, tmp_path, *args, marker=MARKER, timeout=RUN_TIMEOUT)
    print("exec e2e seconds:", {k: v[3] for k, v in out.items() if isinstance(v, list) and
                                len(v) == 4 and isinstance(v[3], float)})  # fmt: skip

    def status(name: str) -> int:
        return out[name][0]

    assert [status(n) for n in ("first", "true", "seven", "signal", "timeout")] == [
        0,
        0,
        7,
        137,
        124,
    ]
    assert status("not_found") == 127 and "No such file or directory" in out["not_found"][2]
    assert status("cannot_run") == 126
    crash = out["crash"]
    assert status("crash") == 125, crash
    error_lines = [line for line in crash[2].splitlines() if line.startswith("pyvmm: error:")]
    assert len(error_lines) == 1 and "the VM stopped" in crash[2], crash[2]
    assert "guest console (end)" in crash[2]
    assert out["stdin"][:2] == [0, "hi\n"]
    assert out["separate"][:3] == [0, "out\n1\n/tmp\n", "err\n"]
    lines, end, code = out["stream"]
    assert code == 0 and [text for _, text in lines] == ["first\n", "second\n"]
    assert end - lines[0][0] > 2, lines  # seen before the command ended
    assert out["putget"][:2] == [0, "tool\nb\ndata.bin\n"], out["putget"]
    assert out["tree_same"] is True and out["file_same"] == [True, "0o640"]
    assert status("escape") == 125 and "absolute path '/etc/passwd'" in out["escape"][2]
    assert out["escape_left"] == []
    assert status("dotdot") == 125 and "'..'" in out["dotdot"][2]
    assert status("write") == 0 and status("fresh") == 1  # the next exec starts fresh
    assert out["jailed"][:2] == [0, "confined\n"], out["jailed"]


def test_exec_on_this_host_goes_through_the_nested_host_when_needed(
    sandbox_guest, tmp_path: Path
) -> None:
    """What a user types: on a PVM host the sandbox runs in a nested host, stdin and
    status relayed; elsewhere it runs here. Either way the bytes and the status are
    the command's."""
    from tests.support.nested_fixture import linux_host_mode

    if linux_host_mode() == "nested" and not Path("/usr/bin/qemu-system-x86_64").exists():
        pytest.skip("qemu-system-x86_64 is not installed: it is needed for a nested KVM host")
    payload = b"line\x04with the console EOF byte\x00and NUL\n" * 3
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm.cli_exec", "--no-confine",
         "--cache-dir", str(tmp_path / "cache"), "--", "sh", "-c", "cat; exit 7"],
        input=payload, capture_output=True, timeout=1800, cwd=tmp_path,
    )  # fmt: skip
    print(f"pyvmm exec from this host: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 7, proc.stderr.decode(errors="replace")[-3000:]
    assert proc.stdout == payload
