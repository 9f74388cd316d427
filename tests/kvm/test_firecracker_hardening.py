"""No input freezes, hangs or tracebacks ``pyvmm-firecracker``: the issue's bad inputs.

- queries are answered while a long action (a 4 GiB snapshot) runs;
- SIGTERM ends the process during that action, leaving no snapshot files;
- 32 idle keep-alive clients plus 32 slowloris senders do not lock out a
  new client;
- FIFOs and ``/dev/zero`` as the config file, snapshot state or memory
  file are refused in one line, before anything is read.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import requires_kvm
from tests.kvm.test_api_server import UnixHTTPConnection, Vmm

pytestmark = requires_kvm

MAIN = [sys.executable, "-c", "from pyvmm.firecracker_cli import main; main()"]
BIG_MIB = 4096  # untouched guest RAM: no host memory, but 4 GiB for a snapshot to scan


def big_paused_vm(tmp_path: Path, probe_elf: Path) -> Vmm:
    vmm = Vmm(tmp_path)
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "counter"})
    vmm.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": BIG_MIB})
    vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    vmm.wait_serial(r"counter: 1\b")
    vmm.ok("PATCH", "/vm", {"state": "Paused"})
    return vmm


class Snapshotter(threading.Thread):
    """PUT /snapshot/create on its own connection; ``status`` is its answer (None: none)."""

    def __init__(self, sock: Path, directory: Path) -> None:
        super().__init__()
        self.sock, self.directory = sock, directory
        self.status: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        import json

        conn = UnixHTTPConnection(self.sock)
        body = {"snapshot_path": str(self.directory / "s"),
                "mem_file_path": str(self.directory / "m")}  # fmt: skip
        try:
            conn.request("PUT", "/snapshot/create", body=json.dumps(body))
            self.status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            self.status = None
        finally:
            conn.close()
            self.done.set()


def test_queries_are_answered_while_a_long_action_runs(tmp_path: Path, probe_elf: Path) -> None:
    vmm = big_paused_vm(tmp_path, probe_elf)
    try:
        query = UnixHTTPConnection(vmm.sock)
        snapshotter = Snapshotter(vmm.sock, tmp_path)
        snapshotter.start()
        answered_during = 0
        while not snapshotter.done.is_set():
            for path in ("/", "/vm/config", "/machine-config"):
                query.request("GET", path)
                response = query.getresponse()
                response.read()
                assert response.status == 200
                answered_during += not snapshotter.done.is_set()
        snapshotter.join()
        query.close()
        assert snapshotter.status == 204
        assert answered_during >= 3, "no query was answered while the snapshot was written"
    finally:
        vmm.close()


def test_sigterm_cancels_a_long_action_and_leaves_no_files(tmp_path: Path, probe_elf: Path) -> None:
    vmm = big_paused_vm(tmp_path, probe_elf)
    out = tmp_path / "out"
    out.mkdir()
    snapshotter = Snapshotter(vmm.sock, out)
    try:
        snapshotter.start()
        deadline = time.monotonic() + 10
        while not list(out.iterdir()):  # the snapshot's temporary files are being written
            assert time.monotonic() < deadline and not snapshotter.done.is_set()
            time.sleep(0.005)
        vmm.process.send_signal(signal.SIGTERM)
        assert vmm.process.wait(10) == 143  # not after the 4 GiB are written: now
        snapshotter.join(10)
        assert snapshotter.status in (503, None)  # 503 "cancelled", or the connection closed
        assert list(out.iterdir()) == [], "a cancelled snapshot left files behind"
        assert "Traceback" not in vmm.process.stderr.read().decode(errors="replace")
    finally:
        vmm.close()


def test_idle_and_slowloris_clients_never_lock_out_a_new_one(
    tmp_path: Path, probe_elf: Path
) -> None:
    vmm = Vmm(tmp_path)
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(32):  # keep-alive clients that asked once and then sit there
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(vmm.sock))
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
            idle.append(client)
        for _ in range(32):  # slowloris: a request that never ends
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(vmm.sock))
            client.sendall(b"PUT /machine-config HTTP/1.1\r\n")
            slow.append(client)

        def trickle() -> None:
            while not stop.wait(1.0):
                for client in slow:
                    with contextlib.suppress(OSError):  # the server cut it: as it should
                        client.sendall(b"X")

        trickler = threading.Thread(target=trickle)
        trickler.start()
        for _ in range(10):
            assert vmm.ok("GET", "/")["state"] == "Not started"
            vmm.conn.close()  # a new connection each time
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "hello"})
        stop.set()
        trickler.join()
    finally:
        stop.set()
        for client in idle + slow:
            client.close()
        vmm.close()


def test_fifos_and_dev_zero_are_refused_before_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "api.sock"
    for bad in (fifo, Path("/dev/zero")):
        result = subprocess.run(
            [*MAIN, "--api-sock", str(sock), "--config-file", str(bad)],
            capture_output=True, text=True, timeout=20, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr == f"pyvmm: error: config file {bad} is not a regular file\n"
        assert not sock.exists()
    vmm = Vmm(tmp_path)
    try:
        for state, memory in ((fifo, fifo), (Path("/dev/zero"), Path("/dev/zero"))):
            status, reply = vmm.request("PUT", "/snapshot/load", {
                "snapshot_path": str(state),
                "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
            })  # fmt: skip
            assert status == 400 and "Load snapshot error" in reply["fault_message"]
            assert "not a regular file" in reply["fault_message"]
        assert vmm.ok("GET", "/")["state"] == "Not started"  # nothing froze
    finally:
        vmm.close()
