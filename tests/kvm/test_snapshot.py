"""Snapshot and restore on the host's /dev/kvm, with the probe guest.

The probe's ``counter`` prints ``counter: N`` about every 100 ms: a guest
restored in a new process must continue the count (N+1, not 0). ``echo``
waits for a console line, which holds a guest at a known point while it is
snapshotted; the programs after it run only in the restored guest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm.config import DriveConfig, MachineConfig, NetConfig, VsockConfig
from pyvmm.errors import VmStateError
from pyvmm.snapshot import FORMAT_VERSION, SnapshotError, merge_diff, read_state, verify_snapshot
from pyvmm.snapshot.files import TEMP_SUFFIX
from pyvmm.snapshot.memory_file import BLOCK, TRAILER_SIZE
from pyvmm.snapshot.state import HEADER_SIZE, MIN_FORMAT_VERSION
from pyvmm.vmm.machine import Machine, VmState
from tests.conftest import requires_kvm
from tests.kvm.test_probe_virtio import (
    drain,
    probe_socket,
    requires_tap,
    write_pattern_image,
    written_blocks,
)

pytestmark = requires_kvm

MEM = 64 << 20
COUNTER = re.compile(rb"counter: (\d+)\r?\n")

# Restores a snapshot in a fresh interpreter, types a line, prints the console
# until a pattern shows up (or the guest stops), then the stop reason.
CHILD = r"""
import json, os, re, sys, time
from pyvmm.vmm.machine import Machine
state, mem, until, typed, options = sys.argv[1:6]
out = bytearray()
read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
os.write(write_fd, typed.encode())
machine = Machine.restore(
    state, mem, serial_out=out.extend, console_in=read_fd, resume=True, **json.loads(options)
)
deadline = time.monotonic() + 30
while not re.search(until.encode(), bytes(out)) and time.monotonic() < deadline:
    if machine.wait(0.05) is not None:
        break
if machine.config.vsock is not None:
    print("UDS:", os.path.exists(machine.config.vsock.uds_path))
machine.close()
sys.stdout.write(bytes(out).decode(errors="replace"))
print("\nSTOPPED:", machine.stop_reason.kind.name)
"""


class Console:
    """Collects a machine's serial output; safe to read while the vCPU writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data.extend(data)

    def text(self) -> bytes:
        return bytes(self.data)

    def wait_for(self, pattern: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text()[-300:]!r}"
            time.sleep(0.02)


def counters(output: bytes) -> list[int]:
    return [int(n) for n in COUNTER.findall(output)]


def boot(config: MachineConfig, *, track: bool = False) -> tuple[Machine, Console, int]:
    console = Console()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    machine = Machine(
        dataclasses.replace(config, track_dirty_pages=track),
        serial_out=console.write,
        console_in=read_fd,
    )
    machine.start()
    return machine, console, write_fd


def restore_in_child(state: Path, mem: Path, until: str, typed: str = "", **options) -> str:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(state), str(mem), until, typed, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def counter_snapshot(probe_elf: Path, tmp_path_factory: pytest.TempPathFactory):
    """A paused ``counter`` guest's snapshot and the console output before it."""
    directory = tmp_path_factory.mktemp("snap")
    state, mem = directory / "vm.state", directory / "vm.mem"
    config = MachineConfig(kernel=probe_elf, cmdline="counter", mem_size=MEM, vcpus=2)
    machine, console, _ = boot(config)
    try:
        console.wait_for(rb"counter: 3\r?\n")
        machine.pause()
        machine.snapshot(state, mem)
        assert machine.state is VmState.PAUSED
        before = console.text()
    finally:
        machine.close()
    return state, mem, before


def test_counter_continues_in_a_new_process(counter_snapshot) -> None:
    state, mem, before = counter_snapshot
    last = counters(before)[-1]
    output = restore_in_child(state, mem, rf"counter: {last + 3}\r?\n")
    seen = counters(before + output.encode())
    assert seen == list(range(seen[0], seen[-1] + 1)), "the count restarted or skipped"
    assert seen[-1] >= last + 3


def test_files_written_before_are_there_and_the_disk_keeps_working(
    probe_elf: Path, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    write_pattern_image(image, 8 << 20)
    config = MachineConfig(
        kernel=probe_elf,
        cmdline="blkwrite=1 echo blkcheck blkwrite=2",
        mem_size=MEM,
        drives=(DriveConfig(image),),
    )
    machine, console, _ = boot(config)
    try:
        console.wait_for(rb"blkwrite: \d+ requests")
        time.sleep(0.1)  # into echo's wait for a line
        machine.pause()
        machine.snapshot(tmp_path / "vm.state", tmp_path / "vm.mem")
    finally:
        machine.close()
    assert written_blocks(image) == list(range(256)), "the pre-snapshot write is on disk"
    output = restore_in_child(tmp_path / "vm.state", tmp_path / "vm.mem", "PROBE RESULT", "end\n")
    assert "blkcheck: ok" in output, output
    assert "PROBE RESULT: PASS" in output, output
    assert "STOPPED: RESET" in output
    assert written_blocks(image) == list(range(512))


def test_diff_snapshot_merged_onto_its_base_is_the_full_memory(
    probe_elf: Path, tmp_path: Path
) -> None:
    """Guest writes (counter) and device writes (virtio-rng, from Python) both land in the diff."""
    config = MachineConfig(
        kernel=probe_elf, cmdline="echo rngread=65536 counter", mem_size=MEM, rng=True
    )
    machine, console, typing_fd = boot(config, track=True)
    try:
        console.wait_for(rb"probe: cmdline")
        time.sleep(0.1)
        machine.pause()
        with pytest.raises(VmStateError, match="needs a full snapshot"):
            machine.snapshot(tmp_path / "d.state", tmp_path / "d.mem", diff=True)
        machine.snapshot(tmp_path / "base.state", tmp_path / "base.mem")
        machine.resume()
        os.write(typing_fd, b"end\n")
        console.wait_for(rb"counter: 2\r?\n")
        machine.pause()
        machine.snapshot(tmp_path / "diff.state", tmp_path / "diff.mem", diff=True)
        machine.snapshot(tmp_path / "full.state", tmp_path / "full.mem")
        before = console.text()
    finally:
        machine.close()
    assert b"rngread: 65536 bytes" in before
    diff_state = read_state(tmp_path / "diff.state")
    assert diff_state.memory.diff and diff_state.memory.dirty
    dirty_bytes = sum(length for _, length in diff_state.memory.dirty)
    assert 65536 <= dirty_bytes < MEM // 4
    assert os.stat(tmp_path / "diff.mem").st_blocks * 512 < MEM // 4, "the diff is sparse"
    merge_diff(tmp_path / "base.mem", tmp_path / "diff.state", tmp_path / "diff.mem")
    merged, full = (tmp_path / "base.mem").read_bytes(), (tmp_path / "full.mem").read_bytes()
    assert merged[:-TRAILER_SIZE] == full[:-TRAILER_SIZE], "RAM and block checksums alike"
    verify_snapshot(tmp_path / "diff.state", tmp_path / "base.mem")

    # The merged base plus the diff's state is a snapshot of the later moment.
    console = Console()
    restored = Machine.restore(
        tmp_path / "diff.state", tmp_path / "base.mem", serial_out=console.write, resume=True
    )
    try:
        last = counters(before)[-1]
        console.wait_for(rf"counter: {last + 1}\r?\n".encode())
        assert counters(console.text())[0] in (last, last + 1)
        with pytest.raises(SnapshotError, match="is in use: a VM restored from it maps it"):
            merge_diff(tmp_path / "base.mem", tmp_path / "diff.state", tmp_path / "diff.mem")
    finally:
        restored.close()
    merge_diff(tmp_path / "base.mem", tmp_path / "diff.state", tmp_path / "diff.mem")  # merged


@pytest.fixture
def two_taps():
    names = [f"pvs{os.getpid() % 100000}{suffix}" for suffix in "ab"]
    try:
        for name in names:
            subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"], capture_output=True)
            subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
            Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
            subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"], capture_output=True)


@requires_tap
def test_net_reattaches_to_a_renamed_tap_and_vsock_comes_back(
    probe_elf: Path, tmp_path: Path, two_taps: list[str]
) -> None:
    old, new = two_taps
    uds = tmp_path / "v.sock"
    config = MachineConfig(
        kernel=probe_elf,
        cmdline="nettx=10 echo nettx=20 rngread=4096",
        mem_size=MEM,
        nets=(NetConfig(old),),
        rng=True,
        vsock=VsockConfig(3, uds),
    )
    machine, console, _ = boot(config)
    try:
        console.wait_for(rb"nettx: 10 frames")
        time.sleep(0.1)
        machine.pause()
        machine.snapshot(tmp_path / "vm.state", tmp_path / "vm.mem")
    finally:
        machine.close()
    assert not uds.exists()
    sock = probe_socket(new)
    output = restore_in_child(
        tmp_path / "vm.state",
        tmp_path / "vm.mem",
        "PROBE RESULT",
        "end\n",
        net_overrides={old: new},
        vsock_uds=str(tmp_path / "w.sock"),
    )
    assert "PROBE RESULT: PASS" in output, output
    assert "UDS: True" in output
    frames = drain(sock)
    assert sorted(struct.unpack_from("<I", f, 18)[0] for f in frames) == list(range(20))
    assert all(f[6:12] == NetConfig(old).mac_bytes() for f in frames), "the MAC is kept"


# --- refusals ------------------------------------------------------------------------
def test_snapshot_needs_a_paused_vm(probe_elf: Path, tmp_path: Path) -> None:
    config = MachineConfig(kernel=probe_elf, cmdline="counter", mem_size=MEM)
    with pytest.raises(VmStateError, match="cannot snapshot: it is not started"):
        Machine(config).snapshot(tmp_path / "s", tmp_path / "m")
    machine, console, _ = boot(config)
    try:
        console.wait_for(rb"counter: 0")
        with pytest.raises(VmStateError, match="cannot snapshot: it is running; pause it first"):
            machine.snapshot(tmp_path / "s", tmp_path / "m")
        machine.pause()
        with pytest.raises(VmStateError, match="track_dirty_pages"):
            machine.snapshot(tmp_path / "s", tmp_path / "m", diff=True)
    finally:
        machine.close()
    assert sorted(os.listdir(tmp_path)) == [], "no partial files"


def test_a_failed_write_leaves_no_files(probe_elf: Path, tmp_path: Path) -> None:
    config = MachineConfig(kernel=probe_elf, cmdline="counter", mem_size=MEM)
    machine, console, _ = boot(config)
    try:
        console.wait_for(rb"counter: 0")
        machine.pause()
        with pytest.raises(SnapshotError, match=r"cannot write snapshot file .*missing/s: No such"):
            machine.snapshot(tmp_path / "missing" / "s", tmp_path / "m")
    finally:
        machine.close()
    assert os.listdir(tmp_path) == []


def _copy(source: Path, target: Path, edit=None) -> Path:
    data = bytearray(source.read_bytes())
    if edit is not None:
        edit(data)
    target.write_bytes(data)
    return target


def test_corrupt_and_mismatched_files_are_refused(counter_snapshot, tmp_path: Path) -> None:
    state, mem, _ = counter_snapshot

    def flip(data: bytearray) -> None:
        data[HEADER_SIZE + 100] ^= 0x01

    def newer(data: bytearray) -> None:
        struct.pack_into("<I", data, 8, FORMAT_VERSION + 2)

    cases = [
        (_copy(state, tmp_path / "flipped", flip), mem, "is corrupt: its SHA-256 checksum"),
        (_copy(state, tmp_path / "cut", lambda d: d.__delitem__(slice(-10, None))), mem,
         r"is corrupt: .* payload bytes"),
        (_copy(state, tmp_path / "magic", lambda d: d.__setitem__(0, 0)), mem,
         "is not a pyvmm snapshot state file"),
        (mem, mem, "is not a pyvmm snapshot state file"),
        (_copy(state, tmp_path / "newer", newer), mem,
         rf"snapshot format {FORMAT_VERSION + 2} is newer than this pyvmm .* reads "
         rf"\(formats {MIN_FORMAT_VERSION}-{FORMAT_VERSION}\); it was written by pyvmm"),
        (tmp_path / "absent", mem, "cannot open snapshot state file"),
        (Path("/dev/zero"), mem, "state file /dev/zero is not a regular file"),
        (state, Path("/dev/zero"), "memory file /dev/zero is not a regular file"),
    ]  # fmt: skip
    short = tmp_path / "short.mem"
    with open(mem, "rb") as source, open(short, "wb") as target:
        target.write(source.read(MEM // 2))
    cases.append((state, short, rf"memory file .* is {MEM // 2} bytes, .* has {MEM} bytes of RAM"))
    for state_file, mem_file, message in cases:
        with pytest.raises(SnapshotError, match=message):
            Machine.restore(state_file, mem_file)
    with pytest.raises(SnapshotError, match="net override 'tap9' names no saved interface"):
        Machine.restore(state, mem, net_overrides={"tap9": "tap1"})


# --- pairs that must not mix -----------------------------------------------------------
@pytest.fixture(scope="module")
def later_snapshot(probe_elf: Path, tmp_path_factory: pytest.TempPathFactory):
    """Another snapshot of a guest like ``counter_snapshot``'s, later in its count."""
    directory = tmp_path_factory.mktemp("later")
    state, mem = directory / "vm.state", directory / "vm.mem"
    config = MachineConfig(kernel=probe_elf, cmdline="counter", mem_size=MEM, vcpus=2)
    machine, console, _ = boot(config)
    try:
        console.wait_for(rb"counter: 6\r?\n")
        machine.pause()
        machine.snapshot(state, mem)
    finally:
        machine.close()
    return state, mem


def test_a_state_file_with_another_snapshots_memory_file_is_refused(
    counter_snapshot, later_snapshot
) -> None:
    """Same guest, same sizes: before snapshot ids, this pair resumed with mixed state."""
    state, mem, _ = counter_snapshot
    later_state, later_mem = later_snapshot
    assert os.stat(mem).st_size == os.stat(later_mem).st_size
    for state_file, mem_file in ((state, later_mem), (later_state, mem)):
        with pytest.raises(SnapshotError) as caught:
            Machine.restore(state_file, mem_file)
        message = str(caught.value)
        assert f"snapshot state file {state_file} and memory file {mem_file} are not one" in message
        assert "\n" not in message


# Boots the counter guest, pauses it at "counter: 6" and snapshots it over argv[2] and
# argv[3], SIGKILLed by itself just before its Nth rename (argv[4]).
KILLED_WRITER = r"""
import os, re, signal, sys, time
from pathlib import Path
from pyvmm.config import MachineConfig
from pyvmm.vmm.machine import Machine
kernel, state, mem, kill_at, mem_size = sys.argv[1:6]
out = bytearray()
config = MachineConfig(kernel=Path(kernel), cmdline="counter", mem_size=int(mem_size), vcpus=2)
machine = Machine(config, serial_out=out.extend)
machine.start()
deadline = time.monotonic() + 30
while not re.search(rb"counter: 6\r?\n", bytes(out)):
    assert time.monotonic() < deadline, bytes(out)
    time.sleep(0.02)
machine.pause()
real_replace, renames = os.replace, []
def replace(source, target):
    renames.append(target)
    if len(renames) == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
os.replace = replace
machine.snapshot(state, mem)
"""


def temps(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(TEMP_SUFFIX))


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_writer_killed_at_either_rename_leaves_no_silent_mix(
    counter_snapshot, probe_elf: Path, tmp_path: Path, kill_at: int
) -> None:
    """Killed before the first rename: the old pair restores. Between the two: the pair is
    refused, naming both files. Either way the next snapshot in the directory removes the
    killed writer's temporaries."""
    old_state, old_mem, before = counter_snapshot
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    shutil.copyfile(old_state, state)
    shutil.copyfile(old_mem, mem)
    arguments = [probe_elf, state, mem, kill_at, MEM]
    writer = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, *map(str, arguments)],
        capture_output=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert writer.returncode == -9, writer.stderr.decode(errors="replace")
    assert state.read_bytes() == old_state.read_bytes(), "the state file was never replaced"
    assert len(temps(tmp_path)) == 3 - kill_at
    if kill_at == 1:
        assert mem.read_bytes() == old_mem.read_bytes()
        last = counters(before)[-1]
        output = restore_in_child(state, mem, rf"counter: {last + 1}\r?\n")
        assert counters(output.encode())[0] == last + 1, "the old pair restores"
    else:
        assert mem.read_bytes() != old_mem.read_bytes(), "the new memory file is in place"
        with pytest.raises(SnapshotError) as caught:
            Machine.restore(state, mem)
        assert f"snapshot state file {state} and memory file {mem} are not one snapshot" in str(
            caught.value
        )
    config = MachineConfig(kernel=probe_elf, cmdline="counter", mem_size=MEM)
    machine, console, _ = boot(config)
    try:
        console.wait_for(rb"counter: 0")
        machine.pause()
        machine.snapshot(tmp_path / "next.state", tmp_path / "next.mem")
    finally:
        machine.close()
    assert temps(tmp_path) == [], "the killed writer's temporaries are gone"


def test_byte_flips_in_the_memory_file_are_caught_by_the_explicit_check(
    counter_snapshot, tmp_path: Path
) -> None:
    state, mem, _ = counter_snapshot
    verify_snapshot(state, mem)
    content = mem.read_bytes()
    ram = content[:MEM]
    data_block = next(i for i in range(0, MEM, BLOCK) if any(ram[i : i + BLOCK]))
    hole_block = next(i for i in range(MEM - BLOCK, 0, -BLOCK) if not any(ram[i : i + BLOCK]))
    flipped = tmp_path / "flipped.mem"
    for offset in (data_block + 123, hole_block + 4095, MEM - 1, MEM + 17):
        block = offset if offset < MEM else (offset - MEM) // 4 * BLOCK
        block -= block % BLOCK
        edited = bytearray(content)
        edited[offset] ^= 0x04
        flipped.write_bytes(edited)
        with pytest.raises(SnapshotError) as caught:
            verify_snapshot(state, flipped)
        assert str(caught.value) == (
            f"memory file {flipped} is corrupt: bytes {block:#x}-{block + BLOCK - 1:#x} of guest "
            "RAM do not match their checksum"
        )
    edited = bytearray(content)
    edited[-20] ^= 0x01  # the trailer: caught without the explicit check
    flipped.write_bytes(edited)
    with pytest.raises(SnapshotError, match="its trailer checksum does not match"):
        Machine.restore(state, flipped)


@pytest.mark.parametrize("which", ["state", "memory"])
def test_a_fifo_as_a_snapshot_file_is_refused_without_hanging(
    counter_snapshot, tmp_path: Path, which: str
) -> None:
    state, mem, _ = counter_snapshot
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    files = (fifo, mem) if which == "state" else (state, fifo)
    errors: list[BaseException] = []

    def restore() -> None:
        try:
            Machine.restore(*files).close()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=restore, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the stuck open
        thread.join(20)
        pytest.fail("restore waited for a writer on the FIFO")
    assert isinstance(errors[0], SnapshotError), errors
    assert str(errors[0]).endswith(f"file {fifo} is not a regular file (it is a FIFO)")
