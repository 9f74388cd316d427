"""The guest agent end to end: a real Linux guest, pyvmm-agent on vsock, AgentClient on the host.

The guest is Debian's cloud kernel with the busybox initramfs, the
virtio-mmio and vsock modules, and ``/bin/pyvmm-agent``, which its /init runs
as the command. A driver program (below) runs where Linux guests boot at
usable speed (in the nested host on PVM machines, see
tests/support/nested_fixture.py): it starts the VM with the library, waits
for the agent through the VM's vsock Unix socket, exercises it, measures
round trips and throughput, and prints one JSON line of findings that the
test then checks item by item.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.nested_fixture import run_driver

pytestmark = pytest.mark.linux

RUN_TIMEOUT = 1500  # seconds of wall time for the whole driver inside the nested host
MARKER = "AGENT-E2E "

DRIVER = (
    r'''
"""Runs where Linux guests boot: one VM, its agent, and everything checked against it."""
import hashlib, json, os, stat, statistics, sys, tempfile, threading, time
from pathlib import Path

from pyvmm import MicroVM
from pyvmm.sandbox import AgentClient, UnsafeArchiveError

kernel, initrd, cmdline, uds = sys.argv[1:]
work = Path(tempfile.mkdtemp())  # TMPDIR: an L1 tmpfs in the nested host, so 9p is not measured
os.makedirs(os.path.dirname(uds), exist_ok=True)  # an L1 tmpfs: no sockets on 9p
out = {}


def snapshot(root):
    """Every entry's kind, permission bits, mtime (s) and content hash or link target."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = None
            mode = st.st_mode
            key = str(path.relative_to(root))
            entries[key] = [stat.S_IFMT(mode), stat.S_IMODE(mode), int(st.st_mtime), content]
    return entries


def make_tree(root):
    (root / "src" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o750)
    (root / "src" / "secret").write_bytes(b"s3cret\n")
    (root / "src" / "secret").chmod(0o600)
    (root / "src" / "deep" / "er" / "random.bin").write_bytes(os.urandom(3 << 20))
    (root / "src" / "empty").write_bytes(b"")
    (root / "src" / "link").symlink_to("../run.sh")
    (root / ("n" * 150)).write_bytes(b"a long name")
    (root / "src" / "deep").chmod(0o711)
    os.utime(root / "src" / "secret", (1_000_000_000, 1_000_000_000))
    os.utime(root / "src", (1_100_000_000, 1_100_000_000))
    return root


vm = MicroVM(kernel=kernel, initrd=initrd, cmdline=cmdline, memory=256, vsock=f"cid=3,uds={uds}")
try:
    started = time.monotonic()
    vm.start()
    agent = AgentClient.wait_ready(uds, timeout=900, request_timeout=120,
                                   alive=lambda: vm.wait(0) is None)
    out["ready_s"] = time.monotonic() - started
    agent.timeout = 120
    out["hello"] = agent.hello.agent

    # Exit codes, as a shell gives them.
    codes = {}
    for name, argv in [
        ("true", ["true"]),
        ("seven", ["sh", "-c", "exit 7"]),
        ("sigterm", ["sh", "-c", "kill -TERM $$"]),
        ("not-found", ["pyvmm-no-such-command"]),
        ("cannot-run", ["/etc"]),
    ]:
        r = agent.exec(argv)
        codes[name] = [r.exit_code, r.signal, r.error]
    out["codes"] = codes
    r = agent.exec(["sleep", "30"], timeout=1)
    out["timeout"] = [r.exit_code, r.timed_out, round(r.duration, 2)]

    # stdin piped through.
    r = agent.exec(["cat"], stdin=b"hi through stdin\n")
    out["stdin_cat"] = r.stdout.decode()
    data = os.urandom(1 << 20)
    r = agent.exec(["sha256sum"], stdin=data)
    out["stdin_sha"] = r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()

    # stdout and stderr separate, and streamed as they come.
    chunks = []
    t0 = time.monotonic()
    r = agent.exec(
        ["sh", "-c", "echo first; sleep 2; echo err >&2; sleep 0.5; echo second"],
        on_stdout=lambda d: chunks.append([time.monotonic() - t0, 1, d.decode()]),
        on_stderr=lambda d: chunks.append([time.monotonic() - t0, 2, d.decode()]),
    )
    out["stream"] = {"chunks": chunks, "end": time.monotonic() - t0, "code": r.exit_code}
    r = agent.exec(["sh", "-c", "echo out; echo err >&2"])
    out["separate"] = [r.stdout.decode(), r.stderr.decode()]

    # put a tree, check it in the guest, get it back: bytes, modes and mtimes.
    src = make_tree(work / "tree")
    put = agent.put(src, "/root/work/tree")
    out["put_entries"] = put.entries
    r = agent.exec(["sh", "-c", "cd /root/work/tree && stat -c '%a %n' run.sh src/secret src/deep"
                    " && sha256sum src/deep/er/random.bin && readlink src/link"])
    out["guest_view"] = r.stdout.decode()
    out["host_sha"] = hashlib.sha256((src / "src/deep/er/random.bin").read_bytes()).hexdigest()
    agent.get("/root/work/tree", work / "back")
    out["tree_identical"] = snapshot(work / "back") == snapshot(src)
    if not out["tree_identical"]:
        out["tree_diff"] = [snapshot(src), snapshot(work / "back")]
    agent.get("/root/work/tree/src/secret", work / "secret-back")
    out["file_back"] = [(work / "secret-back").read_bytes().decode(),
                        oct(stat.S_IMODE((work / "secret-back").stat().st_mode))]

    # A guest symlink that leads out of the destination is refused on get.
    agent.exec(["sh", "-c", "mkdir -p /root/esc && ln -s /etc/passwd /root/esc/pw"])
    try:
        agent.get("/root/esc", work / "esc")
        out["escape"] = "accepted"
    except UnsafeArchiveError as exc:
        out["escape"] = str(exc)
    out["closed_after_escape"] = agent.closed  # a hostile stream ends the connection
    agent = AgentClient.connect(uds, timeout=120)
    out["escape_left"] = sorted(n for n in os.listdir(work) if n.startswith(("esc", ".pyvmm")))

    # Two connections run commands at once.
    other = AgentClient.connect(uds, timeout=120)
    t0 = time.monotonic()
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.exec(["sleep", "2"]).exit_code))
               for c in (agent, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent"] = [results, round(time.monotonic() - t0, 2)]
    other.close()

    # Measurements.
    pings = [agent.ping() for _ in range(50)]
    out["ping_ms"] = statistics.median(pings) * 1000
    execs = []
    for _ in range(20):
        t0 = time.monotonic()
        agent.exec(["true"])
        execs.append(time.monotonic() - t0)
    out["exec_true_ms"] = statistics.median(execs) * 1000
    first = []
    t0 = time.monotonic()
    agent.exec(["echo", "x"], on_stdout=lambda d: first.append(time.monotonic() - t0))
    out["first_byte_ms"] = first[0] * 1000
    big = work / "big.bin"
    big.write_bytes(os.urandom(32 << 20))
    t0 = time.monotonic()
    agent.put(big, "/root/big.bin")
    out["put_mib_s"] = 32 / (time.monotonic() - t0)
    t0 = time.monotonic()
    agent.get("/root/big.bin", work / "big-back.bin")
    out["get_mib_s"] = 32 / (time.monotonic() - t0)
    out["big_identical"] = (work / "big-back.bin").read_bytes() == big.read_bytes()
    def stdout_rate(argv):
        total = [0]
        t0 = time.monotonic()
        agent.exec(argv, on_stdout=lambda d: total.__setitem__(0, total[0] + len(d)))
        return total[0] / (1 << 20) / (time.monotonic() - t0)

    out["stdout_mib_s"] = stdout_rate(["head", "-c", str(64 << 20), "/dev/zero"])
    out["cat_mib_s"] = stdout_rate(["cat", "/root/big.bin"])
    small = work / "small"
    small.mkdir()
    for i in range(1000):
        (small / f"f{i:04}").write_bytes(os.urandom(1024))
    t0 = time.monotonic()
    agent.put(small, "/root/small")
    out["put_1000_files_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    agent.get("/root/small", work / "small-back")
    out["get_1000_files_s"] = time.monotonic() - t0
    out["small_identical"] = snapshot(work / "small-back") == snapshot(small)
    agent.close()
except BaseException:
    print("guest console tail:\n" + vm.console.output[-3000:], file=sys.stderr, flush=True)
    raise
finally:
    vm.close()

print("'''
    + MARKER
    + """" + json.dumps(out), flush=True)
"""
)


@pytest.fixture(scope="module")
def agent_guest() -> tuple[Path, Path]:
    """Debian's cloud kernel (ELF vmlinux) and an initramfs with vsock and pyvmm-agent."""
    from pyvmm.guestkit.agent_tool import GUEST_MODULES, GUEST_PATH, build_agent
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.initramfs import build_initramfs
    from pyvmm.guestkit.vmlinux import kernel_vmlinux

    package = fetch_kernel("cloud")
    initramfs = build_initramfs(
        package,
        GUEST_MODULES,
        extra_files={GUEST_PATH: build_agent().read_bytes()},
    )
    return kernel_vmlinux(package), initramfs


def test_agent_in_a_linux_guest(linux_host, agent_guest, tmp_path: Path) -> None:
    from pyvmm.guestkit.initramfs import command_arg

    vmlinux, initramfs = agent_guest
    cmdline = f"console=ttyS0 reboot=k panic=-1 pci=off quiet {command_arg('pyvmm-agent')}"
    uds = f"/run/pyvmm-agent-e2e-{os.getpid()}/v.sock"
    args = (str(vmlinux), str(initramfs), cmdline, uds)
    out = run_driver(linux_host, DRIVER, tmp_path, *args, marker=MARKER, timeout=RUN_TIMEOUT)
    print("agent e2e:", json.dumps({k: v for k, v in out.items() if "_ms" in k or "_s" in k}))

    assert out["hello"].startswith("pyvmm-agent pid ")
    codes = out["codes"]
    assert codes["true"] == [0, None, None]
    assert codes["seven"] == [7, None, None]
    assert codes["sigterm"] == [143, 15, None]
    assert codes["not-found"][:2] == [127, None]
    assert "No such file or directory" in codes["not-found"][2]
    assert codes["cannot-run"][0] == 126 and "Permission denied" in codes["cannot-run"][2]
    assert out["timeout"][:2] == [124, True]

    assert out["stdin_cat"] == "hi through stdin\n"
    assert out["stdin_sha"] is True

    stream = out["stream"]
    assert stream["code"] == 0
    assert [c[1:] for c in stream["chunks"]] == [[1, "first\n"], [2, "err\n"], [1, "second\n"]]
    first_at = stream["chunks"][0][0]
    assert stream["end"] - first_at > 1.5, stream  # the first line came before the command ended
    assert out["separate"] == ["out\n", "err\n"]

    assert out["put_entries"] == 11
    assert out["guest_view"].splitlines() == [
        "750 run.sh",
        "600 src/secret",
        "711 src/deep",
        f"{out['host_sha']}  src/deep/er/random.bin",
        "../run.sh",
    ]
    assert out["tree_identical"] is True, out.get("tree_diff")
    assert out["file_back"] == ["s3cret\n", "0o600"]

    assert "points to the absolute path '/etc/passwd'" in out["escape"]
    assert out["escape_left"] == []
    assert out["closed_after_escape"] is True

    assert out["concurrent"][0] == [0, 0]
    assert out["concurrent"][1] < 3.9  # both 2 s sleeps at once, not one after the other
    assert out["big_identical"] is True
    assert out["small_identical"] is True
