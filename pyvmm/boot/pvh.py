"""PVH boot information: ``struct hvm_start_info`` and what it points to.

A PVH kernel is entered in 32-bit protected mode with ``ebx`` pointing at
this structure (Xen's xen/include/public/arch-x86/hvm/start_info.h, version
1). It replaces the zero page: it carries the command line address, the
initrd as module 0, the ACPI RSDP address (0 lets the kernel scan for it)
and the memory map, in the same types as e820.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyvmm import layout
from pyvmm.boot.e820 import E820Entry
from pyvmm.errors import KernelImageError

XEN_HVM_START_MAGIC = 0x336EC578
START_INFO_VERSION = 1  # version 1 added memmap_paddr/memmap_entries

# hvm_start_info: magic, version, flags, nr_modules, modlist_paddr,
# cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved.
START_INFO = struct.Struct("<IIIIQQQQII")
# hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
MODLIST_ENTRY = struct.Struct("<QQQQ")
# hvm_memmap_table_entry: addr, size, type, reserved.
MEMMAP_ENTRY = struct.Struct("<QQII")

MAX_MODULES = (layout.PVH_MEMMAP_START - layout.PVH_MODLIST_START) // MODLIST_ENTRY.size


def build_pvh_info(
    *,
    cmdline_addr: int,
    modules: Sequence[tuple[int, int]],
    memory_map: Sequence[E820Entry],
    rsdp_addr: int = 0,
) -> list[tuple[int, bytes]]:
    """``(guest_address, bytes)`` to write: start info, module list, memory map.

    ``modules`` are ``(address, size)`` pairs; the initrd, if any, is the
    only one Linux looks at (module 0).
    """
    if len(modules) > MAX_MODULES:
        raise KernelImageError(f"{len(modules)} PVH modules; room for {MAX_MODULES}")
    if len(memory_map) > layout.PVH_MEMMAP_MAX_ENTRIES:
        raise KernelImageError(
            f"memory map has {len(memory_map)} entries; PVH room for "
            f"{layout.PVH_MEMMAP_MAX_ENTRIES}"
        )
    start_info = START_INFO.pack(
        XEN_HVM_START_MAGIC,
        START_INFO_VERSION,
        0,  # flags
        len(modules),
        layout.PVH_MODLIST_START if modules else 0,
        cmdline_addr,
        rsdp_addr,
        layout.PVH_MEMMAP_START,
        len(memory_map),
        0,
    )
    modlist = b"".join(MODLIST_ENTRY.pack(addr, size, 0, 0) for addr, size in modules)
    memmap = b"".join(MEMMAP_ENTRY.pack(e.addr, e.size, int(e.type), 0) for e in memory_map)
    chunks = [(layout.PVH_INFO_START, start_info), (layout.PVH_MEMMAP_START, memmap)]
    if modlist:
        chunks.insert(1, (layout.PVH_MODLIST_START, modlist))
    return chunks
