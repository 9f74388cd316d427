"""The guest's memory map, as both boot protocols hand it to the kernel.

One function computes it from the RAM regions; the zero page (e820 table)
and PVH (hvm_memmap_table) only encode it. The map mirrors what a PC
firmware reports:

* usable RAM from 0 up to the EBDA (``layout.EBDA_START``, 639 KiB);
* the EBDA itself, reserved, up to 640 KiB: pyvmm's MP table lives there
  and the kernel must not reuse it as free memory;
* nothing for 640 KiB - 1 MiB (VGA window and BIOS ROM area): not RAM,
  and the kernel reserves it on its own;
* usable RAM from 1 MiB to the end of each RAM region, so the 32-bit MMIO
  hole between 3 GiB and 4 GiB is simply absent and RAM resumes at 4 GiB.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import NamedTuple

from pyvmm import layout
from pyvmm.memory import GuestMemory


class E820Type(enum.IntEnum):
    """Memory types, shared by e820 and the PVH memory map."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


# Windows of the address space and what RAM inside them is reported as.
_WINDOWS: tuple[tuple[int, int, E820Type], ...] = (
    (0, layout.EBDA_START, E820Type.RAM),
    (layout.EBDA_START, layout.LOW_RAM_END, E820Type.RESERVED),
    (layout.HIMEM_START, 1 << 64, E820Type.RAM),
)


def build_memory_map(ram: Iterable[tuple[int, int]]) -> tuple[E820Entry, ...]:
    """The memory map for RAM regions given as ``(guest_addr, size)`` pairs.

    Pass ``layout.ram_regions(mem_size)`` or ``((r.guest_addr, r.size) for r
    in mem)``. Entries come out in address order (regions and windows are
    both walked in order); adjacent entries of the same type are merged.
    """
    entries: list[E820Entry] = []
    for addr, size in sorted(ram):
        for start, end, kind in _WINDOWS:
            lo, hi = max(addr, start), min(addr + size, end)
            if lo >= hi:
                continue
            if entries and entries[-1].end == lo and entries[-1].type == kind:
                last = entries.pop()
                lo = last.addr
            entries.append(E820Entry(lo, hi - lo, kind))
    return tuple(entries)


def memory_map_of(mem: GuestMemory) -> tuple[E820Entry, ...]:
    """:func:`build_memory_map` for the RAM of ``mem``."""
    return build_memory_map((region.guest_addr, region.size) for region in mem)
