"""Shared by the virtio benchmarks: the probe guest under pyvmm or QEMU microvm.

Both VMMs boot the same probe ELF with the same devices; the probe times
its own work with the TSC and prints result lines, so boot time and process
start-up never enter a figure. This module builds the two command lines,
runs them, parses the probe's result lines, and provides the host side of
the devices: pattern disk images and TAP interfaces with AF_PACKET sockets.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
QEMU_EXIT_PASS = (0x31 << 1) | 1
TIMEOUT_S = 300
MEMORY_MIB = 128

BLOCK = 4096
WRITE_MAGIC = 0x5752495445000000
U64 = (1 << 64) - 1
ETH_P_PROBE = 0x88B5
SO_RCVBUFFORCE = 33


def vmms() -> list[str]:
    """pyvmm, and QEMU when it is installed."""
    if shutil.which(QEMU):
        return ["pyvmm", "qemu"]
    print(f"{QEMU} not installed: QEMU column left out", file=sys.stderr)
    return ["pyvmm"]


@dataclass(frozen=True)
class Drive:
    path: Path
    read_only: bool = False


def command(
    vmm: str,
    probe: Path,
    cmdline: str,
    drives: tuple[Drive, ...] = (),
    tap: str | None = None,
    rng: bool = False,
    qemu_cache: str = "writeback",
) -> list[str]:
    """The command that boots ``probe`` with ``cmdline`` and these devices."""
    if vmm == "pyvmm":
        cmd = [sys.executable, "-m", "pyvmm", "run", "--kernel", str(probe)]
        cmd += ["--cmdline", cmdline, "--memory", str(MEMORY_MIB)]
        for drive in drives:
            cmd += ["--drive", f"path={drive.path}" + (",ro" if drive.read_only else "")]
        if tap:
            cmd += ["--net", f"tap={tap}"]
        if rng:
            cmd.append("--rng")
        return cmd
    cmd = [
        QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-global", "virtio-mmio.force-legacy=false", "-kernel", str(probe), "-append", cmdline,
    ]  # fmt: skip
    for index, drive in enumerate(drives):
        ro = ",readonly=on" if drive.read_only else ""
        cmd += [
            "-drive", f"id=d{index},file={drive.path},format=raw,if=none,cache={qemu_cache}{ro}",
            "-device", f"virtio-blk-device,drive=d{index},serial=qemu-vd{chr(97 + index)}",
        ]  # fmt: skip
    if tap:
        cmd += [
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", "virtio-net-device,netdev=n0",
        ]  # fmt: skip
    if rng:
        cmd += [
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=rng0",
        ]  # fmt: skip
    return cmd


@dataclass
class GuestRun:
    """One probe run as a child process, with its console on pipes."""

    vmm: str
    cmd: list[str]
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    _partial: bytes = b""

    def start(self) -> GuestRun:
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return self

    def read_until(self, marker: str, timeout: float = 60.0) -> None:
        """Collect console lines until one contains ``marker``."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not any(marker in line for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.vmm}: no {marker!r} on the console: {self.lines}")
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                self._feed(os.read(self.proc.stdout.fileno(), 4096))

    def _feed(self, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        self.lines += [line.decode(errors="replace").rstrip("\r") for line in complete]

    def finish(self, stdin: bytes = b"", timeout: float = TIMEOUT_S) -> list[str]:
        """Feed ``stdin``, wait for the end; the console lines, or RuntimeError unless PASS."""
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(stdin, timeout=timeout)
        finally:
            self.proc.kill()
            self.proc.wait()
        self._feed(out + b"\n")
        ok = 0 if self.vmm == "pyvmm" else QEMU_EXIT_PASS
        passed = any(line.startswith("PROBE RESULT: PASS") for line in self.lines)
        if self.proc.returncode != ok or not passed:
            tail = "\n".join(self.lines[-15:])
            raise RuntimeError(
                f"{self.vmm} exit status {self.proc.returncode}:\n{tail}\n{err.decode()[-800:]}"
            )
        return self.lines


def run(vmm: str, probe: Path, cmdline: str, **devices) -> list[str]:
    """Boot, wait, return the console lines (RuntimeError unless the probe passed)."""
    return GuestRun(vmm, command(vmm, probe, cmdline, **devices)).start().finish()


def tsc_line(lines: list[str]) -> str:
    """The probe's ``tsc:`` line (how it turned TSC cycles into microseconds)."""
    return next((line for line in lines if line.startswith("tsc: ")), "")


def fields(line: str) -> dict[str, float]:
    """``12 requests, 3 bytes, qd 4, 5 us, 6.5 MiB/s`` -> {"requests": 12, ...}."""
    found: dict[str, float] = {}
    for number, name in re.findall(r"(\d+(?:\.\d+)?) ([A-Za-z/]+)", line):
        found.setdefault(name, float(number))
    for name, number in re.findall(r"\b(qd|lost|other) (\d+)", line):
        found[name] = float(number)
    return found


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


def filesystem_of(path: Path) -> str:
    """The file system type ``path`` lives on (from /proc/mounts)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            mount = parts[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


def print_table(title: str, rows: list[tuple[str, str]], results: dict[str, dict[str, float]]):
    """One row per (metric key, label): each VMM's median and pyvmm/QEMU."""
    names = list(results)
    print(f"\n{title}")
    header = f"{'':<36}" + "".join(f"{name:>12}" for name in names)
    print(header + (f"{'pyvmm/qemu':>12}" if "qemu" in results else ""))
    for key, label in rows:
        row = f"{label:<36}" + "".join(f"{results[name][key]:>12.1f}" for name in names)
        if "qemu" in results and results["qemu"][key]:
            row += f"{results['pyvmm'][key] / results['qemu'][key]:>12.2f}"
        print(row)


# --- disk images -------------------------------------------------------------------
def write_pattern_image(path: Path, size: int) -> None:
    """Every 4 KiB block b starts with b and ends with ~b (the probe's read pattern)."""
    data = bytearray(size)
    pack = struct.Struct("<Q").pack_into
    for block in range(size // BLOCK):
        pack(data, block * BLOCK, block)
        pack(data, block * BLOCK + BLOCK - 8, ~block & U64)
    with path.open("wb") as f:
        f.write(data)
        os.fsync(f.fileno())  # no write-back under the measurements


def count_written_blocks(path: Path, blocks: int) -> int:
    """How many of the first ``blocks`` blocks hold blkwrite's pattern."""
    unpack = struct.Struct("<Q").unpack_from
    good = 0
    with path.open("rb") as f:
        data = f.read(blocks * BLOCK)
    for block in range(len(data) // BLOCK):
        value = block ^ WRITE_MAGIC
        head = unpack(data, block * BLOCK)[0]
        tail = unpack(data, block * BLOCK + BLOCK - 8)[0]
        good += head == value and tail == ~value & U64
    return good


# --- TAP interfaces --------------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


class HostTap:
    """A persistent TAP: up, no IPv6 chatter, ``txqueuelen`` frames of queue."""

    def __init__(self, name: str, txqueuelen: int = 1000) -> None:
        self.name = name
        _ip("tuntap", "del", "dev", name, "mode", "tap", check=False)
        _ip("tuntap", "add", "dev", name, "mode", "tap")
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        _ip("link", "set", name, "txqueuelen", str(txqueuelen), "up")

    def socket(self) -> socket.socket:
        """AF_PACKET for probe frames; sees frames from the guest, sends frames to it."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_PROBE))
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        sock.bind((self.name, ETH_P_PROBE))
        return sock

    def stat(self, name: str) -> int:
        return int(Path(f"/sys/class/net/{self.name}/statistics/{name}").read_text())

    def wait_up(self, timeout: float = 5.0) -> None:
        """Until the VMM holds the TAP and the kernel activated its queue."""
        path = Path(f"/sys/class/net/{self.name}/operstate")
        deadline = time.monotonic() + timeout
        while path.read_text().strip() != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"TAP {self.name} did not come up")
            time.sleep(0.01)

    def close(self) -> None:
        _ip("tuntap", "del", "dev", self.name, "mode", "tap", check=False)

    def __enter__(self) -> HostTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_frame(seq: int, length: int) -> bytes:
    """A probe frame (guest/probe/README.md) from a made-up host MAC."""
    head = b"\xff" * 6 + bytes.fromhex("020000000099") + struct.pack(">H", ETH_P_PROBE)
    head += b"PRBE" + struct.pack("<I", seq)
    return head + bytes(length - len(head))


def count_probe_frames(sock: socket.socket) -> int:
    """Drain ``sock``; the number of probe frames in it."""
    sock.setblocking(False)
    count = 0
    while True:
        try:
            frame = sock.recv(65536)
        except BlockingIOError:
            return count
        count += frame[14:18] == b"PRBE"
