"""Memory map, zero page, PVH start info and command line encoding."""

from __future__ import annotations

import struct

import pytest

from pyvmm import layout
from pyvmm.boot import bootparams, pvh
from pyvmm.boot.cmdline import encode_cmdline, write_cmdline
from pyvmm.boot.cpu_state import BootMode
from pyvmm.boot.e820 import E820Entry, E820Type, build_memory_map, memory_map_of
from pyvmm.boot.image import KernelFormat, KernelImage, LoadSegment
from pyvmm.errors import KernelImageError
from pyvmm.memory import GuestMemory

MIB = 1 << 20
GIB = 1 << 30
RAM, RESERVED = E820Type.RAM, E820Type.RESERVED

# --- e820 ------------------------------------------------------------------------


def test_memory_map_64_mib() -> None:
    assert build_memory_map(layout.ram_regions(64 * MIB)) == (
        E820Entry(0, 0x9FC00, RAM),
        E820Entry(0x9FC00, 0x400, RESERVED),
        E820Entry(0x100000, 64 * MIB - 0x100000, RAM),
    )


def test_memory_map_skips_the_mmio_hole() -> None:
    assert build_memory_map(layout.ram_regions(5 * GIB)) == (
        E820Entry(0, 0x9FC00, RAM),
        E820Entry(0x9FC00, 0x400, RESERVED),
        E820Entry(0x100000, 3 * GIB - 0x100000, RAM),
        E820Entry(4 * GIB, 2 * GIB, RAM),
    )


def test_memory_map_exactly_at_the_hole() -> None:
    entries = build_memory_map(layout.ram_regions(3 * GIB))
    assert entries[-1] == E820Entry(0x100000, 3 * GIB - 0x100000, RAM)
    assert len(entries) == 3


def test_memory_map_of_guest_memory() -> None:
    with GuestMemory.with_size(16 * MIB) as mem:
        assert memory_map_of(mem) == build_memory_map([(0, 16 * MIB)])


def test_memory_map_merges_adjacent_regions() -> None:
    entries = build_memory_map([(0, 2 * MIB), (2 * MIB, 2 * MIB)])
    assert entries[-1] == E820Entry(0x100000, 3 * MIB, RAM)


# --- zero page -------------------------------------------------------------------


def _elf_image() -> KernelImage:
    return KernelImage(
        path="vmlinux",
        format=KernelFormat.ELF,
        mode=BootMode.LINUX_64,
        entry=0x1000000,
        segments=(LoadSegment(0x1000, 0x1000, 0x1000000, 0x2000),),
        runtime_start=0x1000000,
        runtime_end=0x1002000,
        cmdline_limit=2047,
        initrd_addr_max=layout.MMIO_HOLE_START - 1,
    )


def _u(page: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, page, offset)[0]


def test_zero_page_for_elf_has_a_minimal_header() -> None:
    memory_map = build_memory_map(layout.ram_regions(64 * MIB))
    page = bootparams.build_zero_page(
        _elf_image(),
        cmdline_addr=layout.CMDLINE_START,
        initrd_addr=0x3000000,
        initrd_size=0x12345,
        memory_map=memory_map,
    )
    assert len(page) == 4096
    assert _u(page, 0x1FE, "H") == 0xAA55
    assert page[0x202:0x206] == b"HdrS"
    assert _u(page, 0x206, "H") >= 0x020C
    assert page[0x210] == 0xFF  # type_of_loader
    assert _u(page, 0x1FA, "H") == 0xFFFF  # vid_mode
    assert _u(page, 0x230, "I") == 0x1000000  # kernel_alignment
    assert _u(page, 0x238, "I") == 2047  # cmdline_size
    assert _u(page, 0x228, "I") == layout.CMDLINE_START
    assert _u(page, 0x0C8, "I") == 0  # ext_cmd_line_ptr
    assert _u(page, 0x218, "I") == 0x3000000
    assert _u(page, 0x21C, "I") == 0x12345
    assert page[0x1EF] == 0  # sentinel
    assert page[0x1E8] == 3
    entries = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(3)]
    assert entries == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0x100000, 63 * MIB, 1)]
    assert page[0x2D0 + 60 : 0x2D0 + 80] == bytes(20)


def test_zero_page_splits_addresses_above_4_gib() -> None:
    page = bootparams.build_zero_page(
        _elf_image(),
        cmdline_addr=0x1_0002_0000,
        initrd_addr=0x1_2345_6000,
        initrd_size=0x1_0000_0010,
        memory_map=(),
        rsdp_addr=0xE0000,
    )
    assert (_u(page, 0x228, "I"), _u(page, 0x0C8, "I")) == (0x20000, 1)
    assert (_u(page, 0x218, "I"), _u(page, 0x0C0, "I")) == (0x23456000, 1)
    assert (_u(page, 0x21C, "I"), _u(page, 0x0C4, "I")) == (0x10, 1)
    assert _u(page, 0x070, "Q") == 0xE0000  # acpi_rsdp_addr


def test_zero_page_without_initrd_has_no_ramdisk() -> None:
    page = bootparams.build_zero_page(
        _elf_image(), cmdline_addr=0x20000, initrd_addr=0, initrd_size=0, memory_map=()
    )
    assert page[0x218:0x220] == bytes(8)
    assert page[0x0C0:0x0C8] == bytes(8)


def test_zero_page_copies_a_bzimage_header() -> None:
    header = bytearray(0x26C - 0x1F1)
    header[0x202 - 0x1F1 : 0x206 - 0x1F1] = b"HdrS"
    struct.pack_into("<I", header, 0x260 - 0x1F1, 0x3378000)  # init_size
    struct.pack_into("<I", header, 0x238 - 0x1F1, 2047)  # cmdline_size
    header[0x211 - 0x1F1] = 0x01  # loadflags: LOADED_HIGH
    image = KernelImage(
        path="bzImage",
        format=KernelFormat.BZIMAGE,
        mode=BootMode.LINUX_64,
        entry=0x100200,
        segments=(LoadSegment(0x5000, 0x1000, 0x100000, 0x1000),),
        runtime_start=0x1000000,
        runtime_end=0x4378000,
        cmdline_limit=2047,
        initrd_addr_max=0x7FFFFFFF,
        setup_header_bytes=bytes(header),
    )
    page = bootparams.build_zero_page(
        image, cmdline_addr=0x20000, initrd_addr=0, initrd_size=0, memory_map=()
    )
    assert _u(page, 0x260, "I") == 0x3378000
    assert _u(page, 0x238, "I") == 2047
    assert page[0x211] == 0x01
    assert page[0x210] == 0xFF
    assert page[0x1F0] == 0 and page[0x1EF] == 0


def test_zero_page_rejects_oversized_memory_map() -> None:
    entries = [E820Entry(i * 2 * MIB, MIB, RAM) for i in range(129)]
    with pytest.raises(KernelImageError, match="129 entries"):
        bootparams.build_zero_page(
            _elf_image(), cmdline_addr=0x20000, initrd_addr=0, initrd_size=0, memory_map=entries
        )


# --- PVH -------------------------------------------------------------------------


def test_pvh_start_info_fields() -> None:
    memory_map = build_memory_map(layout.ram_regions(64 * MIB))
    chunks = dict(
        pvh.build_pvh_info(
            cmdline_addr=layout.CMDLINE_START,
            modules=[(0x3F00000, 0x1234)],
            memory_map=memory_map,
            rsdp_addr=0xE0000,
        )
    )
    info = chunks[layout.PVH_INFO_START]
    assert len(info) == 56
    fields = struct.unpack("<IIIIQQQQII", info)
    assert fields == (
        0x336EC578,
        1,
        0,
        1,
        layout.PVH_MODLIST_START,
        layout.CMDLINE_START,
        0xE0000,
        layout.PVH_MEMMAP_START,
        3,
        0,
    )
    assert struct.unpack("<QQQQ", chunks[layout.PVH_MODLIST_START]) == (0x3F00000, 0x1234, 0, 0)
    memmap = chunks[layout.PVH_MEMMAP_START]
    assert [struct.unpack_from("<QQII", memmap, 24 * i) for i in range(3)] == [
        (0, 0x9FC00, 1, 0),
        (0x9FC00, 0x400, 2, 0),
        (0x100000, 63 * MIB, 1, 0),
    ]


def test_pvh_start_info_without_initrd() -> None:
    chunks = dict(pvh.build_pvh_info(cmdline_addr=0x20000, modules=[], memory_map=()))
    nr_modules, modlist_paddr = struct.unpack_from("<IQ", chunks[layout.PVH_INFO_START], 12)
    assert (nr_modules, modlist_paddr) == (0, 0)
    assert layout.PVH_MODLIST_START not in chunks


def test_pvh_layout_has_room() -> None:
    assert pvh.START_INFO.size <= layout.PVH_MODLIST_START - layout.PVH_INFO_START
    end = layout.PVH_MEMMAP_START + layout.PVH_MEMMAP_MAX_ENTRIES * pvh.MEMMAP_ENTRY.size
    assert end <= layout.ZERO_PAGE_START
    assert pvh.MAX_MODULES >= 1


def test_pvh_rejects_oversized_memory_map() -> None:
    entries = [E820Entry(i * 2 * MIB, MIB, RAM) for i in range(129)]
    with pytest.raises(KernelImageError, match="129 entries"):
        pvh.build_pvh_info(cmdline_addr=0x20000, modules=[], memory_map=entries)


# --- command line ------------------------------------------------------------------


def test_cmdline_is_nul_terminated() -> None:
    assert encode_cmdline("console=ttyS0", 2047) == b"console=ttyS0\0"
    with GuestMemory.with_size(16 * MIB) as mem:
        write_cmdline(mem, encode_cmdline("a b", 2047))
        assert mem.read(layout.CMDLINE_START, 4) == b"a b\0"


def test_cmdline_at_the_limit_is_accepted() -> None:
    assert len(encode_cmdline("x" * 2047, 2047)) == 2048


def test_cmdline_too_long() -> None:
    with pytest.raises(
        KernelImageError, match=r"^kernel command line is 2048 bytes; the limit is 2047$"
    ):
        encode_cmdline("x" * 2048, 2047)


def test_cmdline_counts_utf8_bytes() -> None:
    assert encode_cmdline("name=é", 10) == "name=é".encode() + b"\0"
    with pytest.raises(KernelImageError, match="is 7 bytes; the limit is 6"):
        encode_cmdline("name=é", 6)


def test_cmdline_rejects_nul() -> None:
    with pytest.raises(KernelImageError, match="NUL"):
        encode_cmdline("a\0b", 2047)


def test_cmdline_rejects_unencodable_text() -> None:
    with pytest.raises(KernelImageError, match="not valid text"):
        encode_cmdline("root=\udcff", 2047)


def test_cmdline_capped_by_reserved_area() -> None:
    with pytest.raises(KernelImageError, match=f"the limit is {layout.CMDLINE_AREA_SIZE - 1}"):
        encode_cmdline("x" * layout.CMDLINE_AREA_SIZE, 1 << 20)
