"""The memory file: guest RAM, region after region, as raw bytes.

A *full* memory file is guest RAM; chunks that are all zeros are left as
holes (the file is sparse), which reads back the same and keeps a mostly
empty guest's snapshot small and quick. A *diff* memory file holds only the
pages written since the previous snapshot, at their offsets, with holes
elsewhere; which ranges those are is recorded in the state file
(:attr:`MemoryState.dirty`), not inferred from holes, since a written page
may be all zeros and not every filesystem reports holes.
:func:`merge_diff` copies those ranges onto the base file, which then equals
a full snapshot taken at the same moment: restore it with the diff's state
file. The diff's own memory file is not restorable.

Dirty pages come from KVM's dirty log (the guest's own writes) plus
:class:`~pyvmm.memory.DirtyTrackingMemory` (the VMM's writes); they are
guest page frame numbers here, file offsets in the state file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pyvmm import layout
from pyvmm.memory import GuestMemory
from pyvmm.snapshot.state import MemoryState, SnapshotError, read_state

PAGE = layout.PAGE_SIZE
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)


def memory_state(memory: GuestMemory) -> MemoryState:
    return MemoryState(
        size=memory.size, regions=tuple((r.guest_addr, r.size) for r in memory.regions)
    )


def write_full(memory: GuestMemory, fd: int) -> None:
    """Write all of guest RAM to ``fd`` (sparse: all-zero 1 MiB chunks are holes)."""
    os.ftruncate(fd, memory.size)
    file_offset = 0
    for region in memory:
        mapping, view = region.mapping, region.view
        for offset in range(0, region.size, _CHUNK):
            end = min(offset + _CHUNK, region.size)
            if mapping[offset:end] != _ZERO_CHUNK[: end - offset]:
                _pwrite_all(fd, view[offset:end], file_offset + offset)
        file_offset += region.size


def write_diff(memory: GuestMemory, pages: Iterable[int], fd: int) -> tuple[tuple[int, int], ...]:
    """Write the guest pages ``pages`` at their file offsets; return the (offset, length) runs."""
    os.ftruncate(fd, memory.size)
    runs = page_runs(memory, pages)
    views = []
    file_offset = 0
    for region in memory:
        views.append((file_offset, file_offset + region.size, region.view))
        file_offset += region.size
    for start, length in runs:
        for first, end, view in views:
            if first <= start < end:
                _pwrite_all(fd, view[start - first : start - first + length], start)
                break
    return runs


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


def bitmap_pages(bitmap: bytes, first_page: int) -> list[int]:
    """Page frame numbers of the set bits of a KVM dirty bitmap (bit n = ``first_page + n``)."""
    pages = []
    value = int.from_bytes(bitmap, "little")
    while value:
        low = value & -value
        pages.append(first_page + low.bit_length() - 1)
        value ^= low
    return pages


def open_memory_file(path: str | Path, state: MemoryState) -> int:
    """Open a memory file for mapping after checking it fits ``state``; returns the fd.

    With a diff snapshot's state, ``path`` must be its base with the diff
    merged in (:func:`merge_diff`); the diff's own memory file is mostly
    holes and cannot be told apart by its size.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot open memory file {path}: {exc.strerror}") from None
    size = os.fstat(fd).st_size
    if size != state.size:
        os.close(fd)
        raise SnapshotError(
            f"memory file {path} is {size} bytes, the snapshot's guest has {state.size} bytes "
            "of RAM (truncated, or not this snapshot's memory file)"
        )
    return fd


def merge_diff(base_mem: str | Path, diff_state: str | Path, diff_mem: str | Path) -> None:
    """Copy a diff snapshot's pages onto its base memory file, in place.

    Afterwards ``base_mem`` with ``diff_state`` is a full snapshot of the
    moment the diff was taken (restore them together). Chains work the
    same: merge each diff onto the result, oldest first.
    """
    state = read_state(diff_state)
    if not state.memory.diff:
        raise SnapshotError(f"{diff_state} is a full snapshot, not a diff")
    with open(base_mem, "r+b") as base, open(diff_mem, "rb") as diff:
        for name, file in ((base_mem, base), (diff_mem, diff)):
            size = os.fstat(file.fileno()).st_size
            if size != state.memory.size:
                raise SnapshotError(
                    f"memory file {name} is {size} bytes, the diff snapshot's guest has "
                    f"{state.memory.size} bytes of RAM"
                )
        for start, length in state.memory.dirty:
            for offset in range(start, start + length, _CHUNK):
                size = min(_CHUNK, start + length - offset)
                data = os.pread(diff.fileno(), size, offset)
                if len(data) != size:
                    raise SnapshotError(f"{diff_mem} is truncated at offset {offset:#x}")
                _pwrite_all(base.fileno(), data, offset)
        os.fsync(base.fileno())


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
