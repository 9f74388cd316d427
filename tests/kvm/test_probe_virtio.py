"""The probe guest's virtio drivers against pyvmm's devices, on the host's /dev/kvm.

Each test boots the probe (``guest/probe``, programs in CPL3 at native
speed) with a virtio-blk drive, a virtio-net interface on a host TAP, or
virtio-rng, and checks what the guest reports and what the host sees: image
bytes, frames on the TAP. These are the probe-guest tests of each device's
queue handling. Where QEMU is installed, the same tests also run against
QEMU's microvm devices, which checks the probe's driver against a reference.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.probe_vm import Drive, command
from tests.conftest import requires_kvm, requires_qemu

pytestmark = requires_kvm

BLOCK = 4096
WRITE_MAGIC = 0x5752495445000000
U64 = (1 << 64) - 1
ETH_P_PROBE = 0x88B5
SO_RCVBUFFORCE = 33
QEMU_EXIT_PASS = (0x31 << 1) | 1
TIMEOUT_S = 60

RESULT_RE = re.compile(
    r"^(blkread|blkwrite|blkrand): (\d+) requests, (\d+) bytes, qd (\d+), (\d+) us"
)


# --- running the probe under pyvmm or QEMU ---------------------------------------------
@dataclass
class Result:
    vmm: str
    returncode: int
    lines: list[str]
    stderr: str

    @property
    def passed(self) -> bool:
        ok_code = 0 if self.vmm == "pyvmm" else QEMU_EXIT_PASS
        return (
            self.returncode == ok_code
            and bool(self.lines)
            and self.lines[-1] == "PROBE RESULT: PASS"
        )

    def starting(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]

    def __str__(self) -> str:
        return f"{self.vmm} rc={self.returncode}\n" + "\n".join(self.lines) + "\n" + self.stderr


def _result(vmm: str, returncode: int, stdout: str, stderr: str) -> Result:
    lines = [line.rstrip("\r") for line in stdout.splitlines()]
    # QEMU prints no newline after the last line; pyvmm's log may follow it.
    lines = [line.split("pyvmm:")[0] if line.startswith("PROBE RESULT") else line for line in lines]
    return Result(vmm, returncode, lines, stderr)


def run_probe(vmm: str, probe: Path, cmdline: str, **devices) -> Result:
    proc = subprocess.run(
        command(vmm, probe, cmdline, **devices),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    return _result(vmm, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(
    params=[
        "pyvmm",
        pytest.param("qemu", marks=[pytest.mark.qemu, requires_qemu]),
    ]
)
def vmm(request: pytest.FixtureRequest) -> str:
    return request.param


# --- disk images ---------------------------------------------------------------------
def write_pattern_image(path: Path, size: int) -> None:
    """Every 4 KiB block b starts with b and ends with ~b (the probe's read pattern)."""
    data = bytearray(size)
    for block in range(size // BLOCK):
        struct.pack_into("<Q", data, block * BLOCK, block)
        struct.pack_into("<Q", data, block * BLOCK + BLOCK - 8, ~block & U64)
    path.write_bytes(data)


def written_blocks(path: Path) -> list[int]:
    """Blocks of ``path`` that hold blkwrite's pattern."""
    data = path.read_bytes()
    good = []
    for block in range(len(data) // BLOCK):
        (head,) = struct.unpack_from("<Q", data, block * BLOCK)
        (tail,) = struct.unpack_from("<Q", data, block * BLOCK + BLOCK - 8)
        value = block ^ WRITE_MAGIC
        if head == value and tail == ~value & U64:
            good.append(block)
    return good


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_result(result: Result, name: str) -> list[tuple[int, int, int, int]]:
    """(requests, bytes, qd, us) of every ``name`` result line."""
    found = []
    for line in result.lines:
        match = RESULT_RE.match(line)
        if match and match.group(1) == name:
            found.append(tuple(int(group) for group in match.groups()[1:]))
    return found


# --- virtio-blk ------------------------------------------------------------------------
@pytest.fixture
def pattern_image(tmp_path: Path) -> Path:
    image = tmp_path / "pattern.img"
    write_pattern_image(image, 16 << 20)
    return image


def test_blk_sequential_reads_are_verified(vmm: str, probe_elf: Path, pattern_image: Path):
    result = run_probe(
        vmm, probe_elf, "blkread=8 qd=32 blkread=24", drives=(Drive(pattern_image, True),)
    )
    assert result.passed, str(result)
    # 24 MiB on a 16 MiB drive: the reads wrap around, still checked block by block.
    assert [r[:3] for r in parse_result(result, "blkread")] == [
        (128, 8 << 20, 1),
        (384, 24 << 20, 32),
    ]


def test_blk_random_reads_are_verified(vmm: str, probe_elf: Path, pattern_image: Path):
    result = run_probe(
        vmm, probe_elf, "blkrand=300 qd=16 blkrand=3000", drives=(Drive(pattern_image),)
    )
    assert result.passed, str(result)
    assert [r[:3] for r in parse_result(result, "blkrand")] == [
        (300, 300 * BLOCK, 1),
        (3000, 3000 * BLOCK, 16),
    ]


def test_blk_reads_see_a_corrupted_block(probe_elf: Path, pattern_image: Path):
    with pattern_image.open("r+b") as f:
        f.seek(37 * BLOCK)
        f.write(struct.pack("<Q", 12345))
    result = run_probe("pyvmm", probe_elf, "qd=4 blkread=1", drives=(Drive(pattern_image),))
    assert not result.passed
    assert result.lines[-1].startswith("PROBE RESULT: FAIL blkread: block 37 holds 0x3039/"), str(
        result
    )


def test_blk_writes_land_in_the_image(vmm: str, probe_elf: Path, tmp_path: Path):
    image = tmp_path / "write.img"
    image.write_bytes(bytes(8 << 20))
    result = run_probe(vmm, probe_elf, "blkwrite=2 qd=8 blkwrite=8", drives=(Drive(image),))
    assert result.passed, str(result)
    assert [r[:3] for r in parse_result(result, "blkwrite")] == [
        (32, 2 << 20, 1),
        (128, 8 << 20, 8),
    ]
    assert "(flush " in result.starting("blkwrite:")[0]
    assert written_blocks(image) == list(range((8 << 20) // BLOCK))


def test_blkcheck_read_write_drive(vmm: str, probe_elf: Path, pattern_image: Path):
    before = sha256(pattern_image)
    result = run_probe(vmm, probe_elf, "blkcheck", drives=(Drive(pattern_image),))
    assert result.passed, str(result)
    serial = "pyvmm-vda" if vmm == "pyvmm" else "qemu-vda"
    for line in (
        f"blkcheck: serial '{serial}'",
        "blkcheck: read beyond capacity: IOERR",
        "blkcheck: read across the end: IOERR",
        "blkcheck: unknown request type: UNSUPP",
        "blkcheck: write and read back ok",
        "blkcheck: flush: OK",
        "blkcheck: ok",
    ):
        assert line in result.lines, str(result)
    assert result.starting("blkcheck: 0x")[0].endswith(
        f"capacity {(16 << 20) // 512} sectors, features 0x100000200, read-write"
    )
    assert sha256(pattern_image) == before  # the written block was restored


def test_blkcheck_read_only_drive(vmm: str, probe_elf: Path, pattern_image: Path):
    before = sha256(pattern_image)
    result = run_probe(vmm, probe_elf, "blkcheck", drives=(Drive(pattern_image, True),))
    assert result.passed, str(result)
    assert result.starting("blkcheck: 0x")[0].endswith("read-only")
    assert "blkcheck: write to read-only drive: IOERR" in result.lines
    assert "blkcheck: read-only ok" in result.lines
    assert sha256(pattern_image) == before


def test_blkwrite_on_a_read_only_drive_fails(probe_elf: Path, pattern_image: Path):
    result = run_probe("pyvmm", probe_elf, "blkwrite=1", drives=(Drive(pattern_image, True),))
    assert result.lines[-1] == "PROBE RESULT: FAIL blkwrite: the drive is read-only", str(result)


def test_program_without_its_device_fails_clearly(probe_elf: Path):
    result = run_probe("pyvmm", probe_elf, "rngread=16 blkread=1", rng=True)
    assert result.lines[-1].startswith("PROBE RESULT: FAIL no virtio-blk device"), str(result)


def test_bad_queue_depth_is_refused_before_anything_runs(probe_elf: Path):
    result = run_probe("pyvmm", probe_elf, "hello qd=0")
    assert result.lines[-1] == "PROBE RESULT: FAIL qd=0: out of range 1..32", str(result)
    assert "hello from probe" not in result.lines


# --- discovery and virtio-rng ----------------------------------------------------------------
def test_devices_are_found_in_pyvmms_order(probe_elf: Path, tmp_path: Path):
    """Drives first, then nets, then rng, in 4 KiB windows from 0xd0001000, IRQ 5 up."""
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    for image in images:
        image.write_bytes(bytes(1 << 20))
    result = run_probe(
        "pyvmm", probe_elf, "virtio", drives=(Drive(images[0]), Drive(images[1], True)), rng=True
    )
    assert result.passed, str(result)
    assert result.starting("virtio: ") == [
        "virtio: 0xd0001000 irq 5 version 2 device 2 (virtio-blk)",
        "virtio: 0xd0002000 irq 6 version 2 device 2 (virtio-blk)",
        "virtio: 0xd0003000 irq 7 version 2 device 4 (virtio-rng)",
        "virtio: 3 windows (command line)",
    ]


@requires_qemu
@pytest.mark.qemu
def test_qemu_devices_are_found_by_scanning(probe_elf: Path):
    result = run_probe("qemu", probe_elf, "virtio rngread=64", rng=True)
    assert result.passed, str(result)
    found = result.starting("virtio: 0xfeb0")
    assert next(line for line in found if "(empty)" not in line).endswith("device 4 (virtio-rng)")
    assert result.starting("virtio: ")[-1].endswith("windows (scan)")


def test_rng_bytes_vary(vmm: str, probe_elf: Path):
    result = run_probe(vmm, probe_elf, "rngread=3 rngread=100000", rng=True)
    assert result.passed, str(result)
    lines = result.starting("rngread: ")
    assert lines[0].startswith("rngread: 3 bytes in 1 requests")
    match = re.match(r"rngread: 100000 bytes in (\d+) requests, \d+ us, (\d+) distinct", lines[1])
    assert match, lines
    assert int(match.group(1)) >= 100000 // BLOCK
    assert int(match.group(2)) >= 250


# --- virtio-net ---------------------------------------------------------------------------
def _can_make_taps() -> str | None:
    if os.geteuid() != 0:
        return "needs root for TAP devices"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("ip") is None:
        return "no ip command"
    return None


requires_tap = pytest.mark.skipif(_can_make_taps() is not None, reason=_can_make_taps() or "")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def tap():
    """A persistent TAP, up, without IPv6 chatter, with room for queued frames."""
    name = f"pvt{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"], capture_output=True)
    _ip("tuntap", "add", "dev", name, "mode", "tap")
    try:
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        _ip("link", "set", name, "txqueuelen", "4096", "up")
        yield name
    finally:
        subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"], capture_output=True)


def probe_socket(tap: str) -> socket.socket:
    """An AF_PACKET socket on ``tap`` for probe frames (only incoming ones are seen)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_PROBE))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    sock.bind((tap, ETH_P_PROBE))
    return sock


def probe_frame(seq: int, length: int = 1514) -> bytes:
    head = b"\xff" * 6 + bytes.fromhex("020000000099") + struct.pack(">H", ETH_P_PROBE)
    head += b"PRBE" + struct.pack("<I", seq)
    return head + bytes(i & 0xFF for i in range(length - len(head)))


def drain(sock: socket.socket) -> list[bytes]:
    frames = []
    sock.setblocking(False)
    while True:
        try:
            frames.append(sock.recv(65536))
        except BlockingIOError:
            return frames


@requires_tap
@pytest.mark.parametrize("length", [1514, 60])
def test_nettx_frames_reach_the_host(vmm: str, probe_elf: Path, tap: str, length: int):
    count = 1000
    sock = probe_socket(tap)
    result = run_probe(vmm, probe_elf, f"len={length} nettx={count}", tap=tap)
    assert result.passed, str(result)
    assert result.starting("nettx: ")[0].startswith(
        f"nettx: {count} frames of {length}, {count * length} bytes, "
    )
    mac = bytes.fromhex(result.starting("net: ")[0].split("mac ")[1].split(",")[0].replace(":", ""))
    frames = drain(sock)
    assert len(frames) == count
    assert sorted(struct.unpack_from("<I", f, 18)[0] for f in frames) == list(range(count))
    for frame in frames:
        assert len(frame) == length
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[14:18] == b"PRBE"


def _wait_for(path: Path, value: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text().strip() != value:
        assert time.monotonic() < deadline, f"{path} is not {value!r}"
        time.sleep(0.01)


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 30.0) -> list[str]:
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    buffer = b""
    while not any(marker in line for line in seen):
        assert time.monotonic() < deadline, f"no {marker!r} in {seen}"
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if not ready:
            assert proc.poll() is None, f"VMM exited: {seen} {buffer!r}"
            continue
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"VMM closed its output: {seen} {buffer!r}"
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        seen += [line.decode().rstrip("\r") for line in complete]
    return seen


@requires_tap
def test_netrx_frames_from_the_host(vmm: str, probe_elf: Path, tap: str):
    count = 2000
    sock = probe_socket(tap)
    proc = subprocess.Popen(
        command(vmm, probe_elf, f"netrx={count}", tap=tap),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        head = _read_until(proc, "netrx: ready")
        _wait_for(Path(f"/sys/class/net/{tap}/operstate"), "up")
        # Queued on the TAP until the guest posts its buffers (on our "go").
        for seq in range(count):
            sock.send(probe_frame(seq, 1000 + seq % 500))
        dropped = Path(f"/sys/class/net/{tap}/statistics/tx_dropped").read_text().strip()
        assert dropped == "0"
        stdout, stderr = proc.communicate(b"go\n", timeout=TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait()
    result = _result(
        vmm, proc.returncode, "\n".join(head) + "\n" + stdout.decode(), stderr.decode()
    )
    assert result.passed, str(result)
    total = sum(1000 + seq % 500 for seq in range(count))
    assert result.starting("netrx: 2000 ")[0].startswith(
        f"netrx: {count} of {count} frames, {total} bytes, "
    )
    assert ", lost 0, other 0," in result.starting("netrx: 2000 ")[0]
