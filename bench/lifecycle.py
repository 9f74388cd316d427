"""Lifecycle latencies over each VMM's control API: pyvmm-firecracker vs QEMU (QMP).

For each VMM, ROUNDS times: spawn the process and time until its API socket
answers; configure the probe guest (``counter``), wait SETTLE_S, and time from
the start request to the guest's first console line; then time PAUSES pause and
resume round trips while the guest runs. pyvmm runs as ``pyvmm-firecracker``, driven through its
Firecracker API (``PUT /actions InstanceStart``, ``PATCH /vm``); QEMU
through QMP (started with ``-S``, then ``cont``; ``stop``/``cont``).

Prints medians and writes bench/results/lifecycle.json. Needs /dev/kvm and
the probe guest (gcc); QEMU optional.

    PYTHONPATH=. python3 bench/lifecycle.py
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import write_report
from pyvmm.guestkit.probe import build_probe

ROUNDS = 5
PAUSES = 20
#: Idle time between configuring and starting, so "start to first output" is
#: the start itself and not pyvmm's import of its VM code racing it (that
#: import begins when the API socket is up).
SETTLE_S = 0.5
FIRST_LINE = b"probe: start"
QEMU = "qemu-system-x86_64"


def _wait_socket(path: Path, process: subprocess.Popen, timeout: float = 20.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the VMM exited with {process.returncode} before its socket")
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} never accepted a connection") from None
            time.sleep(0.001)


def _wait_output(path: Path, needle: bytes, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in path.read_bytes():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{needle!r} never appeared in {path}")
        time.sleep(0.0005)


class Http:
    """Minimal HTTP/1.1 keep-alive client on a connected Unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def call(self, method: str, path: str, body: dict | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
        self.sock.sendall(head.encode() + b"Content-Type: application/json\r\n\r\n" + data)
        status = int(self.file.readline().split()[1])
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        reply = self.file.read(length)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {status} {reply.decode(errors='replace')}")
        return status


class Qmp:
    """Minimal QMP client: greeting, capabilities, commands."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self._read()  # greeting
        self.call("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            message = json.loads(self.file.readline())
            if "event" not in message:
                return message

    def call(self, command: str) -> None:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")


def _figures(
    ready: float, first: float, pause: Callable[[], object], resume: Callable[[], object]
) -> dict[str, float]:
    """One round's figures: ``PAUSES`` timed pause/resume round trips added."""
    pauses, resumes = [], []
    for _ in range(PAUSES):
        t = time.perf_counter()
        pause()
        pauses.append(time.perf_counter() - t)
        t = time.perf_counter()
        resume()
        resumes.append(time.perf_counter() - t)
    return {
        "api_ready_ms": ready * 1e3,
        "start_to_first_output_ms": first * 1e3,
        "pause_ms": statistics.median(pauses) * 1e3,
        "resume_ms": statistics.median(resumes) * 1e3,
    }


def round_pyvmm(probe: Path, work: Path) -> dict[str, float]:
    sock_path, out = work / "api.sock", work / "serial.out"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", "from pyvmm.firecracker_cli import main; main()",
         "--api-sock", str(sock_path)],
        stdin=subprocess.DEVNULL, stdout=out.open("wb"), stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        http = Http(_wait_socket(sock_path, process))
        ready = time.perf_counter() - started
        http.call("PUT", "/boot-source", {"kernel_image_path": str(probe), "boot_args": "counter"})
        http.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        time.sleep(SETTLE_S)  # let the background import of the VM machinery finish
        t0 = time.perf_counter()
        http.call("PUT", "/actions", {"action_type": "InstanceStart"})
        _wait_output(out, FIRST_LINE)
        first = time.perf_counter() - t0
        _wait_output(out, b"counter: 1")
        return _figures(
            ready,
            first,
            lambda: http.call("PATCH", "/vm", {"state": "Paused"}),
            lambda: http.call("PATCH", "/vm", {"state": "Resumed"}),
        )
    finally:
        process.terminate()
        process.wait(20)


def round_qemu(probe: Path, work: Path) -> dict[str, float]:
    sock_path, out = work / "qmp.sock", work / "serial.out"
    started = time.perf_counter()
    process = subprocess.Popen(
        [QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128",
         "-nodefaults", "-no-user-config", "-nographic", "-serial", f"file:{out}", "-S",
         "-qmp", f"unix:{sock_path},server=on,wait=off", "-kernel", str(probe),
         "-append", "counter"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        qmp = Qmp(_wait_socket(sock_path, process))
        ready = time.perf_counter() - started
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        qmp.call("cont")
        _wait_output(out, FIRST_LINE)
        first = time.perf_counter() - t0
        _wait_output(out, b"counter: 1")
        return _figures(ready, first, lambda: qmp.call("stop"), lambda: qmp.call("cont"))
    finally:
        process.terminate()
        process.wait(20)


def main() -> None:
    probe = build_probe()
    runners = {"pyvmm": round_pyvmm}
    if shutil.which(QEMU):
        runners["qemu"] = round_qemu
    results: dict[str, dict[str, float]] = {}
    for name, runner in runners.items():
        rounds = []
        for _ in range(ROUNDS):
            with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as work:
                rounds.append(runner(probe, Path(work)))
        results[name] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    title = f"measure (ms, median of {ROUNDS})"
    print(f"{title:<34}{'pyvmm':>10}{'qemu':>10}{'ratio':>8}")
    for key in results["pyvmm"]:
        ours = results["pyvmm"][key]
        theirs = results.get("qemu", {}).get(key)
        ratio = f"{ours / theirs:8.2f}" if theirs else ""
        qemu = f"{theirs:10.2f}" if theirs is not None else f"{'-':>10}"
        print(f"{key:<34}{ours:10.2f}{qemu}{ratio}")
    write_report(
        Path(__file__).parent / "results" / "lifecycle.json",
        "lifecycle",
        results,
        rounds=ROUNDS,
        pauses_per_round=PAUSES,
        pyvmm_api="Firecracker REST over a Unix socket",
        qemu_api="QMP over a Unix socket",
    )


if __name__ == "__main__":
    main()
