"""Sandboxes end to end: the library on a real Linux guest (nested host on PVM machines).

A driver (below) runs where Linux guests boot at usable speed (tests/support/
nested_fixture.py): it makes sandboxes of the default guest (Debian's cloud kernel and
the busybox initramfs with pyvmm-agent) through :class:`pyvmm.sandbox.Sandbox`, the
first one building the snapshot cache, and prints one JSON line of findings, which the
tests check item by item: exit codes, stdin, streaming, files in and out, refused
escapes, isolation between sandboxes, forks (8 clones running at once with distinct VM
generation ids, /dev/urandom output and host names), a saved and restored sandbox,
pause/resume, the warm pool, and a sandbox confined the default way (jailed, as root).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.nested_fixture import run_driver

pytestmark = pytest.mark.linux

RUN_TIMEOUT = 2400
MARKER = "SANDBOX-E2E "

DRIVER = (
    r'''
import hashlib, json, os, stat, sys, threading, time
from pathlib import Path
from pyvmm import layout
from pyvmm.errors import ConfigError
from pyvmm.sandbox import Sandbox, SandboxError, SandboxPool, UnsafeArchiveError

cache = sys.argv[1]
work = Path(sys.argv[2])
out = {}
VMGENID = f"dd if=/dev/mem bs=16 skip={layout.VMGENID_ADDR // 16} count=1 2>/dev/null | xxd -p"


def tree(root):
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            content = (os.readlink(path) if stat.S_ISLNK(st.st_mode) else
                       hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode)
                       else None)
            entries[str(path.relative_to(root))] = [stat.S_IFMT(st.st_mode),
                                                    stat.S_IMODE(st.st_mode), int(st.st_mtime),
                                                    content]
    return entries


def timed(fn):
    started = time.monotonic()
    value = fn()
    return value, round(time.monotonic() - started, 3)


a, out["first_s"] = timed(lambda: Sandbox(cache_dir=cache, confine=False))
out["first_from_cache"] = a.from_cache
out["first_timings"] = {k: round(v, 3) for k, v in a.timings.items()}
try:
    codes = {}
    for name, argv, kw in [
        ("true", ["true"], {}), ("seven", ["sh", "-c", "exit 7"], {}),
        ("sigterm", ["sh", "-c", "kill -TERM $$"], {}),
        ("timeout", ["sleep", "30"], {"timeout": 1}),
        ("not-found", ["no-such-command"], {}), ("cannot-run", ["/etc"], {}),
    ]:
        r = a.exec(argv, **kw)
        codes[name] = [r.exit_code, r.signal, r.timed_out]
    out["codes"] = codes
    out["stdin"] = a.exec(["cat"], stdin=b"hi\n").stdout.decode()
    r = a.exec(["sh", "-c", "echo out; echo err >&2; echo $GREETING; pwd"],
               env={"GREETING": "hello"}, cwd="/tmp")
    out["separate"] = [r.stdout.decode(), r.stderr.decode()]
    chunks, t0 = [], time.monotonic()
    a.exec(["sh", "-c", "echo first; sleep 2; echo second"],
           on_stdout=lambda d: chunks.append([round(time.monotonic() - t0, 3), d.decode()]))
    out["stream"] = [chunks, round(time.monotonic() - t0, 3)]

    src = work / "tree"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho ran\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub" / "secret").write_bytes(os.urandom(70000))
    (src / "sub" / "secret").chmod(0o600)
    (src / "sub" / "deep" / "empty").write_bytes(b"")
    (src / "sub" / "link").symlink_to("secret")
    os.utime(src / "sub" / "secret", (1_000_000_000, 1_000_000_000))
    a.put(src, "/root/tree")
    out["ran"] = a.exec(["/root/tree/run.sh"]).stdout.decode()
    a.get("/root/tree", work / "back")
    a.get("/root/tree/sub/secret", work / "secret")
    out["tree_same"] = tree(work / "back") == tree(src)
    out["file_same"] = [(work / "secret").read_bytes() == (src / "sub" / "secret").read_bytes(),
                        oct(stat.S_IMODE((work / "secret").stat().st_mode))]
    a.exec(["sh", "-c", "mkdir /root/esc && ln -s /etc/passwd /root/esc/pw"])
    escapes = {}
    try:
        a.get("/root/esc", work / "esc")
        escapes["symlink"] = "accepted"
    except UnsafeArchiveError as exc:
        escapes["symlink"] = str(exc)
    for name, call in [("dotdot", lambda: a.put(src, "/root/../../x")),
                       ("relative", lambda: a.get("root/tree", work / "rel"))]:
        try:
            call()
            escapes[name] = "accepted"
        except ConfigError as exc:
            escapes[name] = str(exc)
    out["escapes"] = escapes
    out["left_behind"] = sorted(n for n in os.listdir(work) if n.startswith(("esc", "rel", ".")))

    a.exec(["touch", "/root/marker"])
    b, out["second_s"] = timed(lambda: Sandbox(cache_dir=cache, confine=False))
    out["second_from_cache"] = b.from_cache
    out["second_timings"] = {k: round(v, 3) for k, v in b.timings.items()}
    out["isolated"] = b.exec(["test", "-e", "/root/marker"]).exit_code
    out["exec_true_s"] = timed(lambda: b.exec(["true"]))[1]
    b.close()

    a.pause()
    try:
        a.exec(["true"])
        out["paused_exec"] = "ran"
    except SandboxError as exc:
        out["paused_exec"] = str(exc)
    a.resume()
    out["resumed"] = a.exec(["true"]).exit_code

    saved = work / "saved"
    a.snapshot(saved)
    c, out["restore_saved_s"] = timed(lambda: Sandbox.restore(saved, a.config))
    out["restored_marker"] = c.exec(["test", "-e", "/root/marker"]).exit_code
    c.close()

    clones, out["fork8_s"] = timed(lambda: a.fork(8))
    try:
        results = [None] * len(clones)
        def run(i):
            results[i] = clones[i].exec(["sh", "-c", "sleep 2; hostname; head -c 32 /dev/urandom"
                                         " | xxd -p | tr -d '\\n'; echo; " + VMGENID
                                         + "; test -e /root/marker && echo marker"])
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clones))]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["clones_concurrent_s"] = round(time.monotonic() - t0, 3)
        out["clones"] = [r.stdout.decode().split() for r in results]
        out["clone_cids"] = [cl.cid for cl in clones]
        out["parent_genid"] = a.exec(["sh", "-c", VMGENID]).stdout.decode().strip()
    finally:
        for cl in clones:
            cl.close()
finally:
    print("parent console tail:\n" + a.console_tail(), file=sys.stderr)
    a.close()

with SandboxPool(2, cache_dir=cache, confine=False) as pool:
    _, out["pool_fill_s"] = timed(lambda: pool.wait_ready(timeout=600))
    acquires = []
    for _ in range(2):
        box, seconds = timed(lambda: pool.acquire(timeout=600))
        acquires.append(seconds)
        out.setdefault("pool_exec", []).append(box.exec(["hostname"]).stdout.decode().strip())
        box.close()
    out["pool_acquire_s"] = acquires

jailed, out["jailed_first_s"] = timed(lambda: Sandbox(cache_dir=cache))
try:
    out["jailed_exec"] = jailed.exec(["sh", "-c", "echo jailed; hostname"]).stdout.decode().split()
    out["jailed_timings"] = {k: round(v, 3) for k, v in jailed.timings.items()}
finally:
    jailed.close()
jailed2, out["jailed_second_s"] = timed(lambda: Sandbox(cache_dir=cache))
jailed2.close()
print("'''
    + MARKER
    + r"""" + json.dumps(out), flush=True)
"""
)


def test_sandboxes_on_a_linux_guest(linux_host, sandbox_guest, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = (str(tmp_path / "cache"), str(work))
    out = run_driver(linux_host, DRIVER, tmp_path, *args, marker=MARKER, timeout=RUN_TIMEOUT)
    shown = {k: v for k, v in out.items() if k.endswith(("_s", "timings"))}
    print("sandbox e2e:", json.dumps(shown))

    assert out["first_from_cache"] is False and out["second_from_cache"] is True
    assert out["codes"] == {
        "true": [0, None, False], "seven": [7, None, False], "sigterm": [143, 15, False],
        "timeout": [124, 9, True], "not-found": [127, None, False],
        "cannot-run": [126, None, False],
    }  # fmt: skip
    assert out["stdin"] == "hi\n"
    assert out["separate"] == ["out\nhello\n/tmp\n", "err\n"]
    chunks, end = out["stream"]
    assert [text for _, text in chunks] == ["first\n", "second\n"]
    assert end - chunks[0][0] > 1.5  # the first line came before the command ended
    assert out["ran"] == "ran\n"
    assert out["tree_same"] is True and out["file_same"] == [True, "0o600"]
    assert "points to the absolute path '/etc/passwd'" in out["escapes"]["symlink"]
    assert "'..'" in out["escapes"]["dotdot"] and "absolute" in out["escapes"]["relative"]
    assert out["left_behind"] == []
    assert out["isolated"] == 1  # the second sandbox does not see the first one's file
    assert "paused" in out["paused_exec"] and out["resumed"] == 0
    assert out["restored_marker"] == 0

    clones = out["clones"]
    assert len(clones) == 8 and all(len(c) == 4 and c[3] == "marker" for c in clones), clones
    for column, what in ((0, "host names"), (1, "urandom output"), (2, "VM generation ids")):
        values = [c[column] for c in clones]
        assert len(set(values)) == 8, (what, values)
    assert out["parent_genid"] not in {c[2] for c in clones}
    assert len(set(out["clone_cids"])) == 8
    assert out["clones_concurrent_s"] < 8 * 2  # eight 2 s sleeps at once, not in a row

    assert out["pool_exec"][0] != out["pool_exec"][1]
    assert out["jailed_exec"][0] == "jailed"
