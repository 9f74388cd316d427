"""Identity-mapped page tables for entering a kernel in long mode.

The 64-bit boot protocol needs paging on and the kernel, zero page, command
line (and in practice the initrd) identity-mapped. pyvmm maps the whole
first 4 GiB with 2 MiB pages: one PML4 entry, four PDPT entries and four
page directories (16 KiB of tables). Why 4 GiB rather than 1 GiB: the
initrd sits at the top of low RAM, which can be just under 3 GiB, and the
cost of the extra three page directories is nothing. The kernel replaces
these tables within its first few instructions.
"""

from __future__ import annotations

import struct

from pyvmm import layout
from pyvmm.memory import GuestMemory

PAGE_PRESENT = 1 << 0
PAGE_RW = 1 << 1
PAGE_PS = 1 << 7  # in a PD entry: this entry maps a 2 MiB page
TABLE_FLAGS = PAGE_PRESENT | PAGE_RW
HUGE_FLAGS = PAGE_PRESENT | PAGE_RW | PAGE_PS

ENTRIES_PER_TABLE = 512
HUGE_PAGE_SIZE = 2 << 20
IDENTITY_MAP_SIZE = layout.PDE_PAGES * ENTRIES_PER_TABLE * HUGE_PAGE_SIZE

_TABLE = struct.Struct(f"<{ENTRIES_PER_TABLE}Q")


def _table(entries: list[int]) -> bytes:
    return _TABLE.pack(*entries, *([0] * (ENTRIES_PER_TABLE - len(entries))))


def identity_page_tables() -> list[tuple[int, bytes]]:
    """``(guest_address, page)`` pairs: PML4, PDPT, then each page directory."""
    pml4 = _table([layout.PDPTE_START | TABLE_FLAGS])
    pdpt = _table(
        [(layout.PDE_START + i * layout.PAGE_SIZE) | TABLE_FLAGS for i in range(layout.PDE_PAGES)]
    )
    tables = [(layout.PML4_START, pml4), (layout.PDPTE_START, pdpt)]
    for directory in range(layout.PDE_PAGES):
        first = directory * ENTRIES_PER_TABLE
        entries = [((first + i) * HUGE_PAGE_SIZE) | HUGE_FLAGS for i in range(ENTRIES_PER_TABLE)]
        tables.append((layout.PDE_START + directory * layout.PAGE_SIZE, _table(entries)))
    return tables


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Write the tables; returns the CR3 value (the PML4's address)."""
    for addr, page in identity_page_tables():
        mem.write(addr, page)
    return layout.PML4_START
