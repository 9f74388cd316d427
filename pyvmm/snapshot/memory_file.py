"""The memory file: guest RAM, a checksum per block of it, and a trailer naming its snapshot.

Layout (integers little-endian)::

    guest RAM, region after region        MemoryState.size bytes, mapped at restore
    u32 CRC-32 per block of RAM           blocks of 64 KiB, restarting at each region
    trailer (68 bytes)                    magic "PYVMMMEM" | u32 version | u32 kind |
                                          16-byte snapshot id | 16-byte base id |
                                          u64 RAM size | u32 block size | u32 block count |
                                          u32 CRC-32 of the trailer's first 64 bytes

Guest RAM stays at offset 0 so restore can map it ``MAP_PRIVATE`` directly;
what is added goes after it. The **trailer** ties the file to its state
file: both carry the snapshot's random 128-bit id
(:attr:`~pyvmm.snapshot.state.MemoryState.snapshot_id`), and
:func:`open_memory_file` refuses a pair whose ids differ, naming both
files: another snapshot's memory file, or the half-replaced pair a writer
killed between its two renames leaves behind. Checking it reads 68 bytes,
so restore costs the same for any guest size; a random id, unlike a digest
of the content, needs no pass over the file. The trailer sits at the very
end, so a mismatched file is named as such even when its size differs.

The **block table** makes corruption detectable: :func:`verify_snapshot`
(or ``open_memory_file(..., verify=True)``) reads the whole file and
compares each block's CRC-32, an explicit check since it reads every byte.
CRC-32 suits damage by accident (bit rot, a bad copy: btrfs checksums its
blocks the same way) and costs ~0.26 s/GiB to compute where SHA-256 costs
~0.7; nothing here is keyed, so a cryptographic hash would not stop a
deliberate edit either (the editor can rewrite the table). Holes (sparse
parts, which read as zeros) are checked without being read. The table
lives in the memory file, not the state file, so that :func:`merge_diff`
can update the entries of the blocks a diff touched: the merged base then
carries correct checksums without rereading it or rewriting a state file.

A *full* memory file (kind 1) is guest RAM; all-zero blocks are left as
holes (the file is sparse), which keeps a mostly empty guest's snapshot
small and quick. A *diff* memory file (kind 2) holds only the pages written
since the previous snapshot, at their offsets, with holes elsewhere; which
ranges those are is recorded in the state file (:attr:`MemoryState.dirty`),
not inferred from holes, since a written page may be all zeros and not
every filesystem reports holes. Its table holds the checksums of the blocks
those pages fall in (taken from RAM, whole blocks) and its trailer names
the snapshot it is a diff of (the base id). :func:`merge_diff` copies the
ranges onto the base file, which then equals a full snapshot taken at the
same moment and carries the diff's id: restore it with the diff's state
file. The diff's own memory file is not restorable, and a diff merges only
onto the memory file of its base. A merge first marks the base "merging"
(kind 3, refused by restore) and marks it full again only when done, so a
merge killed half-way leaves a file that is refused until
:func:`merge_diff` is run again to finish it. A restored VM holds a shared
``flock`` on its memory file for as long as it maps it, and a merge needs
it exclusively: pages the VM has not touched yet still come from the file,
so a merge in place under it would change its memory.

Dirty pages come from KVM's dirty log (the guest's own writes) plus
:class:`~pyvmm.memory.DirtyTrackingMemory` (the VMM's writes); they are
guest page frame numbers here, file offsets in the state file.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import secrets
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from pyvmm import layout
from pyvmm.memory import GuestMemory
from pyvmm.snapshot.files import SnapshotError, open_regular, pread_exact
from pyvmm.snapshot.state import MemoryState, read_state

PAGE = layout.PAGE_SIZE
BLOCK = 1 << 16
TRAILER_MAGIC = b"PYVMMMEM"
TRAILER_VERSION = 1
FULL, DIFF, MERGING = 1, 2, 3
_TRAILER = struct.Struct("<8sII16s16sQII")
TRAILER_SIZE = _TRAILER.size + 4  # the fields, then their CRC-32
_CRC = struct.Struct("<I")
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CRC = zlib.crc32(_ZERO_BLOCK)
_COPY = 1 << 20


@dataclasses.dataclass(frozen=True)
class Trailer:
    """The last bytes of a memory file: which snapshot it is, and of what kind."""

    kind: int
    snapshot_id: str
    base_id: str
    ram_size: int
    block_count: int

    def pack(self) -> bytes:
        fields = _TRAILER.pack(
            TRAILER_MAGIC,
            TRAILER_VERSION,
            self.kind,
            bytes.fromhex(self.snapshot_id),
            bytes.fromhex(self.base_id or "00" * 16),
            self.ram_size,
            BLOCK,
            self.block_count,
        )
        return fields + _CRC.pack(zlib.crc32(fields))


def read_trailer(fd: int, path: str | Path) -> Trailer:
    """Parse and check the trailer at the end of the memory file open at ``fd``."""
    size = os.fstat(fd).st_size
    raw = b""
    if size >= TRAILER_SIZE:
        raw = pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE, f"memory file {path}")
    if raw[: len(TRAILER_MAGIC)] != TRAILER_MAGIC:
        raise SnapshotError(
            f"memory file {path} does not end in a pyvmm memory trailer (not a memory file, "
            "truncated, or written by a pyvmm before snapshot format 2)"
        )
    if zlib.crc32(raw[: _TRAILER.size]) != _CRC.unpack_from(raw, _TRAILER.size)[0]:
        raise SnapshotError(f"memory file {path} is corrupt: its trailer checksum does not match")
    _, version, kind, snapshot_id, base_id, ram_size, block, count = _TRAILER.unpack_from(raw)
    if version != TRAILER_VERSION or block != BLOCK or kind not in (FULL, DIFF, MERGING):
        raise SnapshotError(
            f"memory file {path} has a trailer this pyvmm cannot read "
            f"(version {version}, kind {kind}, block size {block})"
        )
    return Trailer(kind, snapshot_id.hex(), base_id.hex() if any(base_id) else "", ram_size, count)


class Blocks:
    """The checksummed blocks of a memory file: ``BLOCK`` bytes each, restarting at each region.

    Restarting keeps every block inside one region, so a block's bytes are
    always one contiguous view of guest RAM.
    """

    def __init__(self, memory: MemoryState) -> None:
        self.regions: list[tuple[int, int, int]] = []  # file offset, size, first block index
        file_offset = count = 0
        for _, size in memory.regions:
            self.regions.append((file_offset, size, count))
            file_offset += size
            count += -(-size // BLOCK)
        self.count = count
        self.ram_size = memory.size

    @property
    def file_size(self) -> int:
        """The memory file's exact size: RAM, table and trailer."""
        return self.ram_size + 4 * self.count + TRAILER_SIZE

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """(block index, file offset, length) of every block, in order."""
        for file_offset, size, first in self.regions:
            for index, start in enumerate(range(0, size, BLOCK), first):
                yield index, file_offset + start, min(BLOCK, size - start)

    def covering(self, runs: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """The spans of the blocks that the (file offset, length) ``runs`` touch, in order."""
        spans: dict[int, tuple[int, int, int]] = {}
        for start, length in runs:
            for file_offset, size, first in self.regions:
                low, high = max(start, file_offset), min(start + length, file_offset + size)
                if low >= high:
                    continue
                for block in range(
                    (low - file_offset) // BLOCK, (high - 1 - file_offset) // BLOCK + 1
                ):
                    offset = block * BLOCK
                    spans[first + block] = (
                        first + block,
                        file_offset + offset,
                        min(BLOCK, size - offset),
                    )
        return sorted(spans.values())


def _new_id() -> str:
    return secrets.token_hex(16)


def _ram_view(memory: GuestMemory, file_offset: int, length: int) -> memoryview:
    """The bytes of guest RAM at memory-file offset ``file_offset`` (within one region)."""
    first = 0
    for region in memory:
        if first <= file_offset < first + region.size:
            return region.view[file_offset - first : file_offset - first + length]
        first += region.size
    raise ValueError(f"file offset {file_offset:#x} is past guest RAM")


def write_full(memory: GuestMemory, fd: int) -> MemoryState:
    """Write all of guest RAM, its block table and trailer to ``fd``; returns the state's half.

    All-zero blocks are holes. Every block is read once for the zero test;
    only the others are written and checksummed.
    """
    state = MemoryState(
        size=memory.size,
        regions=tuple((r.guest_addr, r.size) for r in memory.regions),
        snapshot_id=_new_id(),
    )
    blocks = Blocks(state)
    table = bytearray(4 * blocks.count)
    os.ftruncate(fd, blocks.file_size)
    index = file_offset = 0
    for region in memory:  # the order of Blocks.spans()
        mapping = region.mapping
        for start in range(0, region.size, BLOCK):
            data = mapping[start : start + BLOCK]
            if data == _ZERO_BLOCK[: len(data)]:
                crc = _ZERO_CRC if len(data) == BLOCK else zlib.crc32(data)
            else:
                _pwrite_all(fd, data, file_offset + start)
                crc = zlib.crc32(data)
            _CRC.pack_into(table, 4 * index, crc)
            index += 1
        file_offset += region.size
    _write_tail(fd, state, table, Trailer(FULL, state.snapshot_id, "", state.size, blocks.count))
    return state


def write_diff(memory: GuestMemory, pages: Iterable[int], fd: int, base_id: str) -> MemoryState:
    """Write the guest pages ``pages`` at their file offsets, a diff of snapshot ``base_id``.

    The table gets the checksums of the whole blocks the pages fall in, read
    from RAM: what those blocks of the base hold once the diff is merged.
    """
    runs = page_runs(memory, pages)
    state = MemoryState(
        size=memory.size,
        regions=tuple((r.guest_addr, r.size) for r in memory.regions),
        snapshot_id=_new_id(),
        diff=True,
        dirty=runs,
        base_id=base_id,
    )
    blocks = Blocks(state)
    os.ftruncate(fd, blocks.file_size)
    for start, length in runs:
        _pwrite_all(fd, _ram_view(memory, start, length), start)
    table = bytearray(4 * blocks.count)
    for index, file_offset, length in blocks.covering(runs):
        _CRC.pack_into(table, 4 * index, zlib.crc32(_ram_view(memory, file_offset, length)))
    _write_tail(
        fd, state, table, Trailer(DIFF, state.snapshot_id, base_id, state.size, blocks.count)
    )
    return state


def _write_tail(fd: int, state: MemoryState, table: bytes | bytearray, trailer: Trailer) -> None:
    _pwrite_all(fd, table, state.size)
    _pwrite_all(fd, trailer.pack(), state.size + len(table))


def page_runs(memory: GuestMemory, pages: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Guest page frame numbers as sorted (file offset, length) runs, outside RAM dropped."""
    runs: list[list[int]] = []
    file_offset = 0
    ordered = sorted(set(pages))
    for region in memory:
        first_page = region.guest_addr // PAGE
        end_page = first_page + region.size // PAGE
        for page in ordered:
            if not first_page <= page < end_page:
                continue
            offset = file_offset + (page - first_page) * PAGE
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1][1] += PAGE
            else:
                runs.append([offset, PAGE])
        file_offset += region.size
    return tuple((start, length) for start, length in runs)


def open_memory_file(
    path: str | Path, memory: MemoryState, state_path: str | Path, *, verify: bool = False
) -> int:
    """Open the memory file at ``path`` for mapping, if it is the one of ``state_path``; the fd.

    ``memory`` is that state file's :class:`MemoryState`. Checks the file
    type, the trailer, the ids and the exact size: a few syscalls, whatever
    the guest's size. ``verify=True`` also reads every block and compares
    its checksum (see :func:`verify_snapshot` for what that costs).
    With a diff snapshot's state, ``path`` must be its base with the diff
    merged in (:func:`merge_diff`).
    """
    fd = open_regular(path, "memory file")
    try:
        if not _lock(fd, fcntl.LOCK_SH):
            raise SnapshotError(f"memory file {path} is being merged with a diff right now")
        blocks = Blocks(memory)
        trailer = _read_trailer_sized(fd, path, blocks, state_path)
        _check_pair(trailer, memory, path, state_path)
        _check_size(fd, path, blocks, trailer, state_path)
        if verify:
            check_blocks(fd, path, blocks)
    except BaseException:
        os.close(fd)
        raise
    return fd


def verify_snapshot(state_path: str | Path, mem_path: str | Path) -> None:
    """Raise :class:`SnapshotError` unless the two files are one intact snapshot.

    Reads the whole memory file (the holes excepted) and checks every
    block's CRC-32: the explicit content check that restore leaves out.
    Measured on the development host: 0.38 s per GiB of written guest
    memory from the page cache, 0.68 s from disk; holes cost nothing
    (a 1 GiB probe guest's file: 10 ms).
    """
    state = read_state(state_path)
    os.close(open_memory_file(mem_path, state.memory, state_path, verify=True))


def _read_trailer_sized(
    fd: int, path: str | Path, blocks: Blocks, state_path: str | Path
) -> Trailer:
    """The trailer; if there is none and the size is wrong too, say that (more telling)."""
    try:
        return read_trailer(fd, path)
    except SnapshotError:
        size = os.fstat(fd).st_size
        if size != blocks.file_size:
            raise _size_error(path, size, blocks, state_path) from None
        raise


def _check_pair(
    trailer: Trailer, memory: MemoryState, path: str | Path, state_path: str | Path
) -> None:
    if trailer.kind == MERGING:
        raise SnapshotError(
            f"memory file {path} was left half-way through merging diff "
            f"{trailer.snapshot_id[:12]}; run merge_diff again to finish it"
        )
    if trailer.snapshot_id == memory.snapshot_id and trailer.kind == DIFF:
        raise SnapshotError(
            f"memory file {path} is the diff of {state_path}: merge it onto its base with "
            f"merge_diff, then restore {state_path} with the base's memory file"
        )
    if trailer.snapshot_id == memory.base_id:
        raise SnapshotError(
            f"memory file {path} is the base of diff {state_path}: merge the diff onto it "
            "first (merge_diff)"
        )
    if trailer.snapshot_id != memory.snapshot_id:
        raise SnapshotError(
            f"snapshot state file {state_path} and memory file {path} are not one snapshot "
            f"(state {memory.snapshot_id[:12]}, memory {trailer.snapshot_id[:12]}): another "
            "snapshot's memory file, or the remains of an interrupted snapshot"
        )


def _check_size(
    fd: int, path: str | Path, blocks: Blocks, trailer: Trailer, state_path: str | Path
) -> None:
    size = os.fstat(fd).st_size
    if size != blocks.file_size or (trailer.ram_size, trailer.block_count) != (
        blocks.ram_size,
        blocks.count,
    ):
        raise _size_error(path, size, blocks, state_path)


def _size_error(
    path: str | Path, size: int, blocks: Blocks, state_path: str | Path
) -> SnapshotError:
    return SnapshotError(
        f"memory file {path} is {size} bytes, {state_path}'s guest has {blocks.ram_size} bytes "
        f"of RAM and needs a {blocks.file_size}-byte memory file (truncated or appended to)"
    )


def check_blocks(fd: int, path: str | Path, blocks: Blocks) -> None:
    """Compare every block of RAM in the file with its CRC-32; holes are zeros, never read."""
    table = pread_exact(fd, 4 * blocks.count, blocks.ram_size, f"memory file {path}")
    extents = iter(_data_extents(fd, blocks.ram_size))
    data_start, data_end = next(extents, (blocks.ram_size, blocks.ram_size))
    for index, offset, length in blocks.spans():
        while data_end <= offset:
            data_start, data_end = next(extents, (blocks.ram_size, blocks.ram_size))
        if data_start < offset + length:
            crc = zlib.crc32(pread_exact(fd, length, offset, f"memory file {path}"))
        else:
            crc = _ZERO_CRC if length == BLOCK else zlib.crc32(bytes(length))
        if crc != _CRC.unpack_from(table, 4 * index)[0]:
            raise SnapshotError(
                f"memory file {path} is corrupt: bytes {offset:#x}-{offset + length - 1:#x} "
                "of guest RAM do not match their checksum"
            )


def _data_extents(fd: int, end: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``[0, end)`` that may hold data; the rest are holes.

    Filesystems that cannot tell report everything as data, which is
    still right, only slower.
    """
    extents = []
    offset = 0
    try:
        while offset < end:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            if start >= end:
                break
            offset = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            extents.append((start, offset))
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no data after offset
            return [(0, end)]
    return extents


def merge_diff(base_mem: str | Path, diff_state: str | Path, diff_mem: str | Path) -> None:
    """Copy a diff snapshot's pages onto its base memory file, in place.

    Afterwards ``base_mem`` with ``diff_state`` is a full snapshot of the
    moment the diff was taken (restore them together); the base's old
    state file no longer pairs with it. Chains work the same: merge each
    diff onto the result, oldest first; a diff refuses any base but its
    own. Merging a diff that is already merged does nothing; a merge that
    was interrupted is finished by running it again.
    """
    memory = read_state(diff_state).memory
    if not memory.diff:
        raise SnapshotError(f"{diff_state} is a full snapshot, not a diff")
    blocks = Blocks(memory)
    diff_fd = open_regular(diff_mem, "memory file")
    try:
        base_fd = open_regular(base_mem, "memory file", writable=True)
        try:
            _merge(base_fd, diff_fd, memory, blocks, (base_mem, diff_state, diff_mem))
        finally:
            os.close(base_fd)
    finally:
        os.close(diff_fd)


def _merge(
    base_fd: int,
    diff_fd: int,
    memory: MemoryState,
    blocks: Blocks,
    names: tuple[str | Path, str | Path, str | Path],
) -> None:
    base_mem, diff_state, diff_mem = names
    diff = _read_trailer_sized(diff_fd, diff_mem, blocks, diff_state)
    if diff.kind != DIFF or diff.snapshot_id != memory.snapshot_id:
        raise SnapshotError(
            f"memory file {diff_mem} is not the memory file of diff {diff_state} (it is "
            f"snapshot {diff.snapshot_id[:12]}, the diff is {memory.snapshot_id[:12]})"
        )
    _check_size(diff_fd, diff_mem, blocks, diff, diff_state)
    if not _lock(base_fd, fcntl.LOCK_EX):
        raise SnapshotError(
            f"memory file {base_mem} is in use: a VM restored from it maps it (a merge in place "
            "would change that VM's memory), or another merge_diff is writing it"
        )
    base = _read_trailer_sized(base_fd, base_mem, blocks, diff_state)
    if base.kind == FULL and base.snapshot_id == memory.snapshot_id:
        return  # merged already
    resuming = base.kind == MERGING and base.snapshot_id == memory.snapshot_id
    if not resuming and not (base.kind == FULL and base.snapshot_id == memory.base_id):
        raise SnapshotError(
            f"memory file {base_mem} is not the base of diff {diff_state}: it holds snapshot "
            f"{base.snapshot_id[:12]}, the diff applies to {memory.base_id[:12]}"
        )
    _check_size(base_fd, base_mem, blocks, base, diff_state)
    tail = memory.size + 4 * blocks.count
    marked = dataclasses.replace(
        base, kind=MERGING, snapshot_id=memory.snapshot_id, base_id=memory.base_id
    )
    _pwrite_all(base_fd, marked.pack(), tail)
    os.fsync(base_fd)
    for start, length in memory.dirty:
        for offset in range(start, start + length, _COPY):
            size = min(_COPY, start + length - offset)
            data = pread_exact(diff_fd, size, offset, f"memory file {diff_mem}")
            _pwrite_all(base_fd, data, offset)
    table = bytearray(pread_exact(base_fd, 4 * blocks.count, memory.size, f"{base_mem}"))
    diff_table = pread_exact(diff_fd, 4 * blocks.count, memory.size, f"{diff_mem}")
    for index, _, _ in blocks.covering(memory.dirty):
        table[4 * index : 4 * index + 4] = diff_table[4 * index : 4 * index + 4]
    _pwrite_all(base_fd, table, memory.size)
    os.fsync(base_fd)
    _pwrite_all(base_fd, dataclasses.replace(marked, kind=FULL, base_id="").pack(), tail)
    os.fsync(base_fd)


def _lock(fd: int, operation: int) -> bool:
    """``flock`` without waiting; False if another holder conflicts.

    A mapping keeps its file's lock: the shared lock that
    :func:`open_memory_file` takes lasts as long as the restored VM maps
    the file, so :func:`merge_diff` (exclusive) cannot rewrite the pages
    under it. Filesystems without ``flock`` go unprotected, not refused.
    """
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
