"""Kata Containers' Firecracker driver, replayed step by step against pyvmm.

Kata cannot be installed here, so this test is its sequence, taken from
``src/runtime/virtcontainers/fc.go`` (kata-containers, commit 7c6ba40c, 2026-08-22;
line numbers below are that file's) and its agent dialer
(``src/runtime/virtcontainers/pkg/agent/protocols/client/client.go``), run
against ``pyvmm-jailer`` + ``pyvmm-firecracker`` as a Kata operator would
configure them (``configuration.toml``: ``path`` = pyvmm-firecracker,
``jailer_path`` = pyvmm-jailer). The probe guest stands in for Kata's guest
kernel and agent: ``vsockecho=1024`` listens where the agent listens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import requires_kvm
from tests.kvm.test_api_server import UnixHTTPConnection
from tests.kvm.test_jailer import Jailed, gone, netns  # noqa: F401 - netns is a fixture

pytestmark = requires_kvm

KATA_ID = "0123456789abcdef0123456789abcdef"  # fc.go truncateID: at most 32 characters
AGENT_VSOCK_PORT = 1024  # client.go: the agent's hybrid vsock port


def kata_boot_args() -> str:
    """fc.go:747-766: root params, fcKernelParams (fc.go:92-104), console=ttyS0 in debug;
    configuration.toml's kernel_params come first (here the probe's program)."""
    root = "root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4"
    common = "pci=off reboot=k panic=1 iommu=off net.ifnames=0 random.trust_cpu=on acpi=off"
    return f"vsockecho={AGENT_VSOCK_PORT} {root} {common} console=ttyS0"


def semver_at_least(version: str, minimum: tuple[int, int, int]) -> bool:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    assert match, version
    return tuple(int(part) for part in match.groups()) >= minimum


def api(root: Path, method: str, path: str, body: object = None) -> tuple[int, dict | None]:
    conn = UnixHTTPConnection(root / "run" / "firecracker.socket")
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data)
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def hybrid_vsock_dial(uds: Path, port: int, timeout: float = 10.0) -> socket.socket:
    """client.go HybridVSockDialer: connect, ``CONNECT <port>\\n``, a reply line with OK."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(str(uds))
    sock.sendall(b"CONNECT %d\n" % port)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, f"closed during the handshake after {reply!r}"
        reply += chunk
    assert b"OK" in reply, reply
    return sock


def test_kata_containers_firecracker_driver(
    tmp_path: Path,
    probe_elf: Path,
    netns: Path,  # noqa: F811 - the fixture
) -> None:
    jail = Jailed(tmp_path, KATA_ID)
    root = jail.root  # fc.go:235-249: <chroot_base>/<basename(hypervisor)>/<id>/root
    log_fifo = metrics_fifo = None
    try:
        # fc.go:289-327 getVersionNumber/parseVersion/checkVersion: `<path> --version`,
        # the first line's second word without "v", a semver >= 0.21.1 (fc.go:90).
        out = subprocess.run([str(jail.exec_file), "--version"], capture_output=True,
                             text=True, check=True, timeout=30).stdout  # fmt: skip
        version = out.split("\n")[0].split(" ")[1].strip().removeprefix("v")
        assert semver_at_least(version, (0, 21, 1)), out

        # fc.go:728 fcInitConfiguration: <root>/run exists before the VMM starts.
        (root / "run").mkdir(parents=True, exist_ok=True)
        # fc.go:567-581 fcSetBootSource: the kernel at <root>/vmlinux (fc.go:68).
        kernel = jail.provide(probe_elf, "vmlinux")
        # fc.go:584-608 fcSetVMRootfs: the image as drive "rootfs", read-only, not root.
        (root / "rootfs").write_bytes(bytes(1 << 20))
        drives = [{"drive_id": "rootfs", "is_read_only": True, "is_root_device": False,
                   "path_on_host": "/rootfs"}]  # fmt: skip
        # fc.go:863-900 createDiskPool: 8 empty placeholder files drive_0..drive_7.
        for index in range(8):
            (root / f"drive_{index}").touch()
            drives.append({"drive_id": f"drive_{index}", "is_read_only": False,
                           "is_root_device": False, "path_on_host": f"/drive_{index}"})  # fmt: skip
        # fc.go:632-700 fcSetLogger/fcSetMetrics: FIFOs opened O_RDONLY|O_NONBLOCK by Kata
        # (fc.go:684), then given to the VMM inside the jail.
        for name in ("logs.fifo", "metrics.fifo"):
            os.mkfifo(root / name)
        log_fifo = os.open(root / "logs.fifo", os.O_RDONLY | os.O_NONBLOCK)
        metrics_fifo = os.open(root / "metrics.fifo", os.O_RDONLY | os.O_NONBLOCK)
        config = {
            # fc.go:614-628 fcSetVMBaseConfig: memory, vCPUs, smt false.
            "machine-config": {"mem_size_mib": 64, "vcpu_count": 1, "smt": False},
            "boot-source": {"kernel_image_path": kernel, "boot_args": kata_boot_args()},
            "drives": drives,
            "logger": {"level": "Error", "log_path": "/logs.fifo"},
            "metrics": {"metrics_path": "/metrics.fifo"},
            # fc.go:955-970 fcAddVsock: CID 3 (fc.go:80), /kata.hvsock (fc.go:76), id "root".
            "vsock": {"guest_cid": 3, "uds_path": "/kata.hvsock", "vsock_id": "root"},
        }
        # fc.go:800-806 StartVM: the config as fcConfig.json (fc.go:86) in the jail, 0640.
        (root / "fcConfig.json").write_text(json.dumps(config, indent="\t"))
        (root / "fcConfig.json").chmod(0o640)

        # fc.go:379-392 fcInit: the jailer's command line, uid and gid 0, --daemonize, the
        # pod's netns, then the VMM's own: --config-file with the jailed path.
        command = [sys.executable, "-m", "pyvmm.jail.jailer",
                   "--id", KATA_ID, "--exec-file", str(jail.exec_file),
                   "--uid", "0", "--gid", "0", "--chroot-base-dir", str(jail.base),
                   "--daemonize", "--netns", str(netns),
                   "--", "--config-file", "/fcConfig.json"]  # fmt: skip
        started = time.monotonic()
        jail.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=jail.out.open("wb"),
            stderr=jail.err.open("wb"),
        )

        # fc.go:277-287 + 330-351 waitVMMRunning: GET / every 10 ms until "Running",
        # within fcTimeout (fc.go:64: 10 s).
        state = None
        while state != "Running":
            assert time.monotonic() - started < 10, f"not running in 10 s: {jail.err.read_text()}"
            with contextlib.suppress(OSError):
                status, reply = api(root, "GET", "/")
                state = reply.get("state") if status == 200 and reply else None
            time.sleep(0.01)

        # fc.go:813-818 StartVM: the hybrid vsock socket made 0640.
        hvsock = root / "kata.hvsock"
        os.chmod(hvsock, 0o640)
        assert stat.S_ISSOCK(os.stat(hvsock).st_mode)

        # client.go HybridVSockDialer: the agent connection through /kata.hvsock.
        conn = hybrid_vsock_dial(hvsock, AGENT_VSOCK_PORT)
        conn.sendall(b"ttrpc stands in here")
        echoed = b""
        while len(echoed) < len(b"ttrpc stands in here"):
            echoed += conn.recv(64)
        assert echoed == b"ttrpc stands in here"
        conn.close()

        # fc.go:1137-1160 hotplugBlockDevice + fc.go:1070-1088 fcUpdateBlockDrive: the
        # container's disk appears at the placeholder's jailed path (Kata bind-mounts it
        # there), then PATCH /drives/drive_0 with that same path.
        disk = root / "drive_0.new"
        disk.write_bytes(bytes(2 << 20))
        os.replace(disk, root / "drive_0")
        status, reply = api(root, "PATCH", "/drives/drive_0",
                            {"drive_id": "drive_0", "path_on_host": "/drive_0"})  # fmt: skip
        assert status == 204, reply
        status, reply = api(root, "GET", "/vm/config")
        assert [d["drive_id"] for d in reply["drives"]][:2] == ["rootfs", "drive_0"]

        # fc.go:480-497 fcEnd: SIGTERM, then up to fcStopSandboxTimeout (fc.go:70: 15 s).
        pid = jail.pid()
        os.kill(pid, signal.SIGTERM)
        assert gone(pid, timeout=15)
        # fc.go:702-723 updateMetrics: each metrics line is JSON Kata decodes.
        lines = _read_fifo(metrics_fifo).splitlines()
        assert lines, "no metrics line reached the FIFO"
        last = json.loads(lines[-1])
        assert "put_api_requests" in last and "vcpu" in last and "block_drive_0" in last
    finally:
        for fd in (log_fifo, metrics_fifo):
            if fd is not None:
                os.close(fd)
        jail.close()


def _read_fifo(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
