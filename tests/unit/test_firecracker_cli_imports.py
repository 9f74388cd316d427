"""``pyvmm-firecracker`` binds its API socket, and answers ``GET /``, before importing
anything heavy.

Firecracker's clients connect right after spawning the VMM; a socket that
exists early lets the kernel queue them while Python imports the rest. An
audit hook records which modules were loaded at the first ``bind``: only
the front end, the socket code and the standard library's socket modules;
and, held before it imports click, which were loaded once ``GET /`` was
answered: those and the early responder's. Nothing here is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

#: Run pyvmm-firecracker's main; at the first bind, write the loaded modules to OUT.
AT_FIRST_BIND = """
import json, sys
out, sock = sys.argv[1], sys.argv[2]
def hook(event, args):
    if event == "socket.bind" and not hook.done:
        hook.done = True
        with open(out + ".tmp", "w") as f:
            json.dump(sorted(sys.modules), f)
        import os
        os.rename(out + ".tmp", out)
hook.done = False
sys.addaudithook(hook)
sys.argv = ["pyvmm-firecracker", "--api-sock", sock]
from pyvmm.firecracker_cli import main
main()
"""


#: The standard library modules the front end and the socket code import at the top.
SOCKET_CODE_NEEDS = "__future__, json, sys, contextlib, errno, os, socket, select, stat, pathlib"
#: What the early responder, the version it reports and its SIGTERM handler add to them.
RESPONDER_NEEDS = "functools, re, signal, threading, time"
SOCKET_CODE = {
    "pyvmm", "pyvmm.errors", "pyvmm.firecracker_cli",
    "pyvmm.api", "pyvmm.api.early_socket", "pyvmm.host", "pyvmm.host.unix_socket",
}  # fmt: skip


def modules_of(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(result.stdout))


def test_the_api_socket_is_bound_before_anything_heavy_is_imported(tmp_path: Path) -> None:
    listing, sock = tmp_path / "modules.json", tmp_path / "api.sock"
    process = subprocess.Popen(
        [sys.executable, "-c", AT_FIRST_BIND, str(listing), str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not listing.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        process.terminate()
        process.wait(30)
    loaded = set(json.loads(listing.read_text()))
    # The interpreter's own start-up (which differs between installs: an editable
    # finder, a venv) and what the socket code imports, with everything they pull in.
    allowed = modules_of(f"import {SOCKET_CODE_NEEDS}; print(json.dumps(sorted(sys.modules)))")
    extra = loaded - allowed
    ours = {m for m in extra if m.startswith("pyvmm")}
    assert ours == SOCKET_CODE
    assert extra - ours == set(), extra - ours


def test_get_root_is_answered_before_anything_heavy_is_imported(tmp_path: Path) -> None:
    from tests.unit.api.test_early_responder import GET_ROOT, Held, read_response

    held = Held(tmp_path)
    try:
        client = held.connect()
        client.sendall(GET_ROOT)
        assert read_response(client)[0] == 200
        loaded = set(held.release())  # what it had loaded while held before click
        client.close()
    finally:
        held.close()
    allowed = modules_of(
        f"import {SOCKET_CODE_NEEDS}, {RESPONDER_NEEDS}; print(json.dumps(sorted(sys.modules)))"
    )
    extra = loaded - allowed
    ours = {m for m in extra if m.startswith("pyvmm")}
    assert ours == SOCKET_CODE | {"pyvmm.api.early_responder", "pyvmm.api.version"}
    assert extra - ours == set(), extra - ours
