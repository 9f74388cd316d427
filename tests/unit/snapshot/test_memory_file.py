"""Memory files: layout, the id that pairs them with a state file, checksums, diffs and merging."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pyvmm.memory import GuestMemory
from pyvmm.snapshot import SnapshotError, merge_diff, verify_snapshot
from pyvmm.snapshot.files import atomic_files
from pyvmm.snapshot.memory_file import (
    BLOCK,
    FULL,
    TRAILER_SIZE,
    Blocks,
    open_memory_file,
    page_runs,
    read_trailer,
    write_diff,
    write_full,
)
from pyvmm.snapshot.state import MemoryState, pack_state, read_state
from tests.unit.snapshot.sample import ID_A, MiB, make_state

ROOT = Path(__file__).resolve().parents[3]


def snapshot(
    memory: GuestMemory, directory: Path, name: str, *, pages=None, base: str = ""
) -> tuple[Path, Path, MemoryState]:
    """What Machine.snapshot does with the files: ``name``.state and ``name``.mem."""
    state, mem = directory / f"{name}.state", directory / f"{name}.mem"
    with atomic_files(mem, state) as (mem_fd, state_fd):
        if pages is None:
            saved = write_full(memory, mem_fd)
        else:
            saved = write_diff(memory, pages, mem_fd, base)
        os.write(state_fd, pack_state(make_state(saved)))
    return state, mem, saved


def opens(mem: Path, state: Path, *, verify: bool = False) -> None:
    os.close(open_memory_file(mem, read_state(state).memory, state, verify=verify))


def refusal(mem: Path, state: Path, *, verify: bool = False) -> str:
    with pytest.raises(SnapshotError) as caught:
        opens(mem, state, verify=verify)
    return str(caught.value)


def edited(source: Path, target: Path, offset: int, data: bytes | None = None) -> Path:
    """A copy of ``source`` with ``data`` at ``offset`` (default: one bit of the byte flipped)."""
    content = bytearray(source.read_bytes())
    if offset < 0:
        offset += len(content)
    content[offset : offset + 1 if data is None else offset + len(data)] = (
        bytes([content[offset] ^ 0x10]) if data is None else data
    )
    target.write_bytes(content)
    return target


@pytest.fixture
def ram():
    with GuestMemory([(0, 4 * MiB)]) as memory:
        memory.write(5 * 4096, b"base")
        memory.write(3 * MiB + 17, b"\xff" * 70000)  # spans two blocks
        yield memory


def test_the_file_is_ram_then_block_checksums_then_the_trailer(ram, tmp_path: Path) -> None:
    state, mem, saved = snapshot(ram, tmp_path, "vm")
    blocks = 4 * MiB // BLOCK
    content = mem.read_bytes()
    assert len(content) == 4 * MiB + 4 * blocks + TRAILER_SIZE
    assert content[: 4 * MiB] == ram.read(0, 4 * MiB)
    table = struct.unpack_from(f"<{blocks}I", content, 4 * MiB)
    assert table == tuple(zlib.crc32(ram.read(i * BLOCK, BLOCK)) for i in range(blocks))
    with open(mem, "rb") as file:
        trailer = read_trailer(file.fileno(), mem)
    assert (trailer.kind, trailer.snapshot_id, trailer.base_id) == (FULL, saved.snapshot_id, "")
    assert (trailer.ram_size, trailer.block_count) == (4 * MiB, blocks)
    assert content[-TRAILER_SIZE:].startswith(b"PYVMMMEM")
    assert saved.snapshot_id in state.read_bytes().decode(errors="replace")
    assert os.stat(mem).st_blocks * 512 <= 4 * BLOCK + 64 * 1024, "zero blocks are holes"
    opens(mem, state, verify=True)


def test_each_snapshot_has_its_own_id_and_a_mixed_pair_is_refused(ram, tmp_path: Path) -> None:
    """The same guest saved twice: files of equal size that must still not mix."""
    state1, mem1, saved1 = snapshot(ram, tmp_path, "one")
    state2, mem2, saved2 = snapshot(ram, tmp_path, "two")
    assert saved1.snapshot_id != saved2.snapshot_id
    assert os.stat(mem1).st_size == os.stat(mem2).st_size
    opens(mem1, state1)
    opens(mem2, state2)
    assert refusal(mem2, state1) == (
        f"snapshot state file {state1} and memory file {mem2} are not one snapshot (state "
        f"{saved1.snapshot_id[:12]}, memory {saved2.snapshot_id[:12]}): another snapshot's "
        "memory file, or the remains of an interrupted snapshot"
    )


def test_the_explicit_check_catches_a_flipped_byte_anywhere(ram, tmp_path: Path) -> None:
    state, mem, _ = snapshot(ram, tmp_path, "vm")
    table = 4 * MiB
    cases = {
        "data": (5 * 4096 + 1, "bytes 0x0-0xffff of guest RAM do not match their checksum"),
        "second block of a write": (3 * MiB + BLOCK, "bytes 0x310000-0x31ffff of guest RAM"),
        "hole": (2 * MiB + 7, "bytes 0x200000-0x20ffff of guest RAM do not match"),
        "last byte of RAM": (4 * MiB - 1, "bytes 0x3f0000-0x3fffff of guest RAM"),
        "table": (table + 4 * 9 + 2, "bytes 0x90000-0x9ffff of guest RAM"),
    }
    for name, (offset, message) in cases.items():
        flipped = edited(mem, tmp_path / "flipped.mem", offset)
        opens(flipped, state)  # the default check reads only the trailer
        assert message in refusal(flipped, state, verify=True), name
        with pytest.raises(SnapshotError, match=message):
            verify_snapshot(state, flipped)
    verify_snapshot(state, mem)


@pytest.mark.parametrize("offset", range(-TRAILER_SIZE, 0, 7))
def test_a_flipped_trailer_is_refused_by_the_default_check(ram, tmp_path: Path, offset) -> None:
    state, mem, _ = snapshot(ram, tmp_path, "vm")
    message = refusal(edited(mem, tmp_path / "flipped.mem", offset), state)
    assert "trailer checksum does not match" in message or "does not end in a pyvmm" in message


def test_files_that_are_not_this_snapshots_memory_file(ram, tmp_path: Path) -> None:
    state, mem, _ = snapshot(ram, tmp_path, "vm")
    size = os.stat(mem).st_size
    truncated = tmp_path / "truncated.mem"
    truncated.write_bytes(mem.read_bytes()[: 2 * MiB])
    assert refusal(truncated, state) == (
        f"memory file {truncated} is {2 * MiB} bytes, {state}'s guest has {4 * MiB} bytes of "
        f"RAM and needs a {size}-byte memory file (truncated or appended to)"
    )
    old_format = tmp_path / "raw.mem"  # format 1: raw RAM only
    old_format.write_bytes(ram.read(0, 4 * MiB))
    assert f"raw.mem is {4 * MiB} bytes" in refusal(old_format, state)
    no_trailer = edited(mem, tmp_path / "no-trailer.mem", -TRAILER_SIZE, bytes(TRAILER_SIZE))
    assert refusal(no_trailer, state) == (
        f"memory file {no_trailer} does not end in a pyvmm memory trailer (not a memory file, "
        "truncated, or written by a pyvmm before snapshot format 2)"
    )
    appended = tmp_path / "appended.mem"
    appended.write_bytes(mem.read_bytes() + b"x")
    assert f"appended.mem is {size + 1} bytes" in refusal(appended, state)
    assert refusal(tmp_path / "absent.mem", state) == (
        f"cannot open memory file {tmp_path / 'absent.mem'}: No such file or directory"
    )


def test_a_fifo_or_a_device_is_refused_as_a_memory_file(ram, tmp_path: Path) -> None:
    state, _, _ = snapshot(ram, tmp_path, "vm")
    fifo = tmp_path / "mem.fifo"
    os.mkfifo(fifo)
    assert refusal(fifo, state) == f"memory file {fifo} is not a regular file (it is a FIFO)"
    assert refusal(Path("/dev/zero"), state) == (
        "memory file /dev/zero is not a regular file (it is a character device)"
    )
    diff_state, _, _ = snapshot(ram, tmp_path, "diff", pages=[5], base=ID_A)
    for base, diff in ((fifo, tmp_path / "diff.mem"), (Path("/dev/zero"), fifo)):
        with pytest.raises(SnapshotError, match="is not a regular file"):
            merge_diff(base, diff_state, diff)


# --- diffs ---------------------------------------------------------------------------
def test_a_diff_merged_onto_its_base_is_the_full_snapshot(ram, tmp_path: Path) -> None:
    base_state, base_mem, base = snapshot(ram, tmp_path, "base")
    ram.write(5 * 4096, bytes(4))  # a page written back to zeros must still be copied
    ram.write(3 * MiB + 4096, b"later")
    ram.write(MiB, b"in a hole of the base")
    pages = [5, (3 * MiB + 4096) >> 12, MiB >> 12]
    diff_state, diff_mem, diff = snapshot(ram, tmp_path, "diff", pages=pages, base=base.snapshot_id)
    _, full_mem, _ = snapshot(ram, tmp_path, "full")
    assert diff.dirty == ((5 * 4096, 4096), (MiB, 4096), (3 * MiB + 4096, 4096))
    assert read_state(diff_state).memory == diff
    assert diff.base_id == base.snapshot_id and diff.diff

    assert f"is the diff of {diff_state}" in refusal(diff_mem, diff_state)
    assert refusal(base_mem, diff_state) == (
        f"memory file {base_mem} is the base of diff {diff_state}: merge the diff onto it first "
        "(merge_diff)"
    )
    merge_diff(base_mem, diff_state, diff_mem)
    assert base_mem.read_bytes()[: 4 * MiB] == full_mem.read_bytes()[: 4 * MiB]
    assert (
        base_mem.read_bytes()[4 * MiB : -TRAILER_SIZE]
        == full_mem.read_bytes()[4 * MiB : -TRAILER_SIZE]
    ), "the merged base carries the checksums of the later moment"
    verify_snapshot(diff_state, base_mem)
    assert "are not one snapshot" in refusal(base_mem, base_state), "the old state is not its pair"
    before = base_mem.read_bytes()
    merge_diff(base_mem, diff_state, diff_mem)  # merged already: nothing to do
    assert base_mem.read_bytes() == before


def test_a_diff_merges_only_onto_its_own_base(ram, tmp_path: Path) -> None:
    """A chain full -> d1 -> d2: d2 onto the full snapshot would silently lose d1's pages."""
    _, base_mem, base = snapshot(ram, tmp_path, "base")
    ram.write(0, b"one")
    d1_state, d1_mem, d1 = snapshot(ram, tmp_path, "d1", pages=[0], base=base.snapshot_id)
    ram.write(MiB, b"two")
    d2_state, d2_mem, d2 = snapshot(ram, tmp_path, "d2", pages=[MiB >> 12], base=d1.snapshot_id)
    _, full_mem, _ = snapshot(ram, tmp_path, "full")
    with pytest.raises(SnapshotError) as caught:
        merge_diff(base_mem, d2_state, d2_mem)
    assert str(caught.value) == (
        f"memory file {base_mem} is not the base of diff {d2_state}: it holds snapshot "
        f"{base.snapshot_id[:12]}, the diff applies to {d1.snapshot_id[:12]}"
    )
    with pytest.raises(SnapshotError, match=f"memory file {d2_mem} is not the memory file of diff"):
        merge_diff(base_mem, d1_state, d2_mem)
    with pytest.raises(SnapshotError, match=r"full\.state is a full snapshot, not a diff"):
        merge_diff(base_mem, tmp_path / "full.state", d1_mem)
    merge_diff(base_mem, d1_state, d1_mem)
    merge_diff(base_mem, d2_state, d2_mem)
    assert base_mem.read_bytes()[:-TRAILER_SIZE] == full_mem.read_bytes()[:-TRAILER_SIZE]
    verify_snapshot(d2_state, base_mem)
    assert d2.base_id == d1.snapshot_id


def test_no_merge_under_a_vm_that_maps_the_base(ram, tmp_path: Path) -> None:
    """Pages a restored VM has not touched still come from the file: a merge would change them."""
    base_state, base_mem, base = snapshot(ram, tmp_path, "base")
    ram.write(0, b"later")
    diff_state, diff_mem, _ = snapshot(ram, tmp_path, "diff", pages=[0], base=base.snapshot_id)
    fd = open_memory_file(base_mem, read_state(base_state).memory, base_state)
    try:
        restored = GuestMemory([(0, 4 * MiB)], file=fd)  # as Machine.restore maps it
    finally:
        os.close(fd)
    with pytest.raises(SnapshotError) as caught:
        merge_diff(base_mem, diff_state, diff_mem)
    assert str(caught.value) == (
        f"memory file {base_mem} is in use: a VM restored from it maps it (a merge in place "
        "would change that VM's memory), or another merge_diff is writing it"
    )
    assert restored.read(0, 5) == bytes(5), "the VM still sees the base's page"
    restored.close()
    merge_diff(base_mem, diff_state, diff_mem)
    merging = os.open(base_mem, os.O_RDWR)
    try:
        fcntl.flock(merging, fcntl.LOCK_EX)  # a merge_diff at work
        assert refusal(base_mem, diff_state) == (
            f"memory file {base_mem} is being merged with a diff right now"
        )
    finally:
        os.close(merging)
    opens(base_mem, diff_state)


MERGE_KILLED = r"""
import os, signal, sys
from pyvmm.snapshot import merge_diff
real_pwrite, calls = os.pwrite, []
def pwrite(fd, data, offset):
    calls.append(offset)
    if len(calls) == 3:  # the trailer marked "merging", one range copied, then killed
        os.kill(os.getpid(), signal.SIGKILL)
    return real_pwrite(fd, data, offset)
os.pwrite = pwrite
merge_diff(*sys.argv[1:4])
"""


def test_a_merge_killed_half_way_is_refused_until_it_is_run_again(ram, tmp_path: Path) -> None:
    base_state, base_mem, base = snapshot(ram, tmp_path, "base")
    ram.write(0, b"one")
    ram.write(2 * MiB, b"two")
    diff_state, diff_mem, diff = snapshot(
        ram, tmp_path, "diff", pages=[0, 2 * MiB >> 12], base=base.snapshot_id
    )
    _, full_mem, _ = snapshot(ram, tmp_path, "full")
    child = subprocess.run(
        [sys.executable, "-c", MERGE_KILLED, str(base_mem), str(diff_state), str(diff_mem)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stderr
    assert base_mem.read_bytes()[:3] == b"one" and base_mem.read_bytes()[2 * MiB] == 0
    half = (
        f"memory file {base_mem} was left half-way through merging diff "
        f"{diff.snapshot_id[:12]}; run merge_diff again to finish it"
    )
    assert refusal(base_mem, diff_state) == half
    assert refusal(base_mem, base_state) == half
    merge_diff(base_mem, diff_state, diff_mem)
    assert base_mem.read_bytes()[:-TRAILER_SIZE] == full_mem.read_bytes()[:-TRAILER_SIZE]
    verify_snapshot(diff_state, base_mem)


def test_blocks_restart_at_each_region(tmp_path: Path) -> None:
    """Regions that are not whole blocks (17 and 3 pages): no block straddles two."""
    with GuestMemory([(0, 17 * 4096), (1 << 32, 3 * 4096)]) as ram:
        ram.write(16 * 4096, b"end of the low region")
        base_state, base_mem, base = snapshot(ram, tmp_path, "base")
        assert os.stat(base_mem).st_size == 20 * 4096 + 4 * 3 + TRAILER_SIZE
        ram.write(16 * 4096 + 100, b"low")
        ram.write((1 << 32) + 2 * 4096, b"high")
        pages = [16, ((1 << 32) >> 12) + 2]
        diff_state, diff_mem, _ = snapshot(
            ram, tmp_path, "diff", pages=pages, base=base.snapshot_id
        )
        _, full_mem, _ = snapshot(ram, tmp_path, "full")
    verify_snapshot(base_state, base_mem)
    merge_diff(base_mem, diff_state, diff_mem)
    assert base_mem.read_bytes()[:-TRAILER_SIZE] == full_mem.read_bytes()[:-TRAILER_SIZE]
    verify_snapshot(diff_state, base_mem)


def test_the_blocks_a_diff_touches() -> None:
    memory = MemoryState(
        size=20 * 4096, regions=((0, 17 * 4096), (1 << 32, 3 * 4096)), snapshot_id=ID_A
    )
    blocks = Blocks(memory)
    assert list(blocks.spans()) == [(0, 0, BLOCK), (1, BLOCK, 4096), (2, 17 * 4096, 3 * 4096)]
    assert blocks.covering([(17 * 4096, 4096)]) == [(2, 17 * 4096, 3 * 4096)]
    assert blocks.covering([(BLOCK - 4096, 8192)]) == [(0, 0, BLOCK), (1, BLOCK, 4096)]
    assert blocks.covering([(0, 4096), (8192, 4096)]) == [(0, 0, BLOCK)]
    assert blocks.covering([]) == []


def test_memory_maps_a_file_copy_on_write(tmp_path: Path) -> None:
    path = tmp_path / "mem"
    path.write_bytes(b"\x07" * 8192 + b"\x09" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        mem = GuestMemory([(0, 8192), (1 << 20, 4096)], file=fd)
    finally:
        os.close(fd)
    assert mem.read(8190, 2) == b"\x07\x07" and mem.read(1 << 20, 1) == b"\x09"
    mem.write(0, b"guest")
    assert mem.read(0, 5) == b"guest"
    assert path.read_bytes()[:5] == b"\x07" * 5, "the file is never written"
    mem.close()


def test_page_runs() -> None:
    mem = GuestMemory([(0, 4 * 4096), (1 << 32, 4 * 4096)])
    high = (1 << 32) >> 12
    runs = page_runs(mem, [0, 1, 3, high, high + 1, 99])
    assert runs == ((0, 8192), (3 * 4096, 3 * 4096))  # page 3, then the high region
