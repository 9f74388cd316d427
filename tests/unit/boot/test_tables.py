"""GDT encoding, identity page tables, boot registers and the MP table."""

from __future__ import annotations

import struct

import pytest

from pyvmm import layout
from pyvmm.boot import gdt, mptable, paging
from pyvmm.boot.cpu_state import BootMode, DescriptorTable, Segment
from pyvmm.boot.regs import boot_cpu_state
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory

# --- GDT ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "base", "limit", "expected"),
    [
        (0xA09B, 0, 0xFFFFF, 0x00AF9B000000FFFF),  # 64-bit code
        (0xC093, 0, 0xFFFFF, 0x00CF93000000FFFF),  # flat data
        (0xC09B, 0, 0xFFFFF, 0x00CF9B000000FFFF),  # 32-bit code
        (0x008B, 0, 0x67, 0x00008B0000000067),  # busy TSS
        (0x808B, 0x12345678, 0xABCDE, 0x128A8B345678BCDE),
    ],
)
def test_gdt_entry_known_encodings(flags: int, base: int, limit: int, expected: int) -> None:
    assert gdt.gdt_entry(flags, base, limit) == expected


def test_code64_decodes_to_long_mode_segment() -> None:
    segment = gdt.segment_from_entry(0x00AF9B000000FFFF, 0x08)
    assert segment == Segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=0x08,
        type=0xB,
        present=1,
        dpl=0,
        db=0,
        s=1,
        l=1,
        g=1,
        avl=0,
        unusable=0,
    )


def test_data_decodes_to_flat_segment() -> None:
    segment = gdt.segment_from_entry(0x00CF93000000FFFF, 0x10)
    assert (segment.type, segment.db, segment.l, segment.g, segment.s) == (3, 1, 0, 1, 1)
    assert (segment.base, segment.limit, segment.selector) == (0, 0xFFFFFFFF, 0x10)


def test_decode_round_trips_base_and_byte_granular_limit() -> None:
    segment = gdt.segment_from_entry(gdt.gdt_entry(0x008B, 0x12345678, 0x67), 0x18)
    assert (segment.base, segment.limit, segment.g, segment.s, segment.type) == (
        0x12345678,
        0x67,
        0,
        0,
        0xB,
    )


def test_not_present_descriptor_is_unusable() -> None:
    assert gdt.segment_from_entry(gdt.gdt_entry(0x0013, 0, 0xFFFF), 0x10).unusable == 1


def test_write_gdt_puts_four_entries_and_an_empty_idt() -> None:
    with GuestMemory.with_size(16 << 20) as mem:
        mem.fill(layout.BOOT_IDT_START, 8, 0xAA)
        gdt.write_gdt(mem, gdt.boot_gdt(BootMode.LINUX_64))
        entries = struct.unpack("<4Q", mem.read(layout.BOOT_GDT_START, 32))
        assert entries == (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00008B0000000067)
        assert mem.read_u64(layout.BOOT_IDT_START) == 0


def test_pvh_gdt_has_32_bit_code() -> None:
    assert gdt.boot_gdt(BootMode.PVH_32)[1] == 0x00CF9B000000FFFF


# --- page tables ---------------------------------------------------------------


def test_identity_page_tables_map_4_gib_with_2_mib_pages() -> None:
    with GuestMemory.with_size(16 << 20) as mem:
        assert paging.write_identity_page_tables(mem) == layout.PML4_START
        assert mem.read_u64(layout.PML4_START) == layout.PDPTE_START | 0x03
        assert mem.read_u64(layout.PML4_START + 8) == 0
        for i in range(4):
            assert mem.read_u64(layout.PDPTE_START + 8 * i) == (0xB000 + 0x1000 * i) | 0x03
        assert mem.read_u64(layout.PDPTE_START + 32) == 0
        assert mem.read_u64(layout.PDE_START) == 0x83
        assert mem.read_u64(layout.PDE_START + 8) == 0x200083
        assert mem.read_u64(layout.PDE_START + 0x1000) == 0x40000083  # 1 GiB
        last = layout.PDE_START + 4 * 0x1000 - 8
        assert mem.read_u64(last) == 0xFFE00083  # 4 GiB - 2 MiB


def test_page_tables_stay_in_their_reserved_pages() -> None:
    tables = paging.identity_page_tables()
    assert [addr for addr, _ in tables] == [0x9000, 0xA000, 0xB000, 0xC000, 0xD000, 0xE000]
    assert all(len(page) == layout.PAGE_SIZE for _, page in tables)
    assert paging.IDENTITY_MAP_SIZE == 1 << 32


# --- boot registers ------------------------------------------------------------


def test_linux64_cpu_state() -> None:
    cpu = boot_cpu_state(BootMode.LINUX_64, 0x100200, layout.ZERO_PAGE_START)
    assert cpu.mode is BootMode.LINUX_64
    assert (cpu.rip, cpu.rsi, cpu.rsp, cpu.rflags) == (
        0x100200,
        layout.ZERO_PAGE_START,
        layout.BOOT_STACK_POINTER,
        2,
    )
    assert cpu.cr0 == 0x80000011  # PG | ET | PE
    assert cpu.cr3 == layout.PML4_START
    assert cpu.cr4 == 0x20  # PAE
    assert cpu.efer == 0x500  # LMA | LME
    assert (cpu.cs.selector, cpu.cs.l, cpu.cs.db, cpu.cs.type) == (0x08, 1, 0, 0xB)
    for seg in (cpu.ds, cpu.es, cpu.fs, cpu.gs, cpu.ss):
        assert (seg.selector, seg.type, seg.limit) == (0x10, 3, 0xFFFFFFFF)
    assert (cpu.tr.selector, cpu.tr.type, cpu.tr.s, cpu.tr.limit) == (0x18, 0xB, 0, 0x67)
    assert (cpu.ldt.type, cpu.ldt.s, cpu.ldt.present) == (2, 0, 1)
    assert cpu.gdt == DescriptorTable(layout.BOOT_GDT_START, 31)
    assert cpu.idt == DescriptorTable(layout.BOOT_IDT_START, 0)


def test_pvh32_cpu_state() -> None:
    cpu = boot_cpu_state(BootMode.PVH_32, 0x1000850, layout.PVH_INFO_START)
    assert (cpu.rip, cpu.rbx, cpu.rsi) == (0x1000850, layout.PVH_INFO_START, 0)
    assert cpu.cr0 == 0x11  # PE | ET, paging off
    assert (cpu.cr3, cpu.cr4, cpu.efer) == (0, 0, 0)
    assert cpu.cs == Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=0xB, db=1, s=1, l=0, g=1)
    assert (cpu.ss.selector, cpu.ss.type, cpu.ss.db) == (0x10, 3, 1)
    assert (cpu.tr.type, cpu.tr.base, cpu.tr.limit, cpu.tr.s) == (0xB, 0, 0x67, 0)


# --- MP table ------------------------------------------------------------------


def _parse_mptable(table: bytes, base: int = layout.MPTABLE_START) -> dict:
    assert table[:4] == b"_MP_"
    config_addr = struct.unpack_from("<I", table, 4)[0]
    assert table[8] == 1 and table[9] == 4  # 16 bytes, spec 1.4
    config = config_addr - base
    assert table[config : config + 4] == b"PCMP"
    length, rev = struct.unpack_from("<HB", table, config + 4)
    entry_count = struct.unpack_from("<H", table, config + 34)[0]
    lapic = struct.unpack_from("<I", table, config + 36)[0]
    entries = []
    pos = config + 44
    for _ in range(entry_count):
        kind = table[pos]
        size = 20 if kind == 0 else 8
        entries.append(table[pos : pos + size])
        pos += size
    assert pos == config + length
    return {
        "pointer": table[:16],
        "config": table[config : config + length],
        "rev": rev,
        "lapic": lapic,
        "entries": entries,
    }


@pytest.mark.parametrize("num_cpus", [1, 4, 32])
def test_mptable_checksums_and_counts(num_cpus: int) -> None:
    table = mptable.build_mptable(num_cpus)
    parsed = _parse_mptable(table)
    assert sum(parsed["pointer"]) % 256 == 0
    assert sum(parsed["config"]) % 256 == 0
    assert parsed["lapic"] == layout.LAPIC_ADDR
    kinds = [entry[0] for entry in parsed["entries"]]
    assert kinds.count(0) == num_cpus
    assert kinds.count(1) == 1
    assert kinds.count(2) == 1
    assert kinds.count(3) == 15  # ISA IRQs 0-15 except the cascade
    assert kinds.count(4) == 2
    assert layout.MPTABLE_START + len(table) <= layout.LOW_RAM_END
    assert len(table) == mptable.table_size(num_cpus)


def test_mptable_processor_entries() -> None:
    parsed = _parse_mptable(mptable.build_mptable(4))
    cpus = [struct.unpack("<BBBBII8s", e) for e in parsed["entries"] if e[0] == 0]
    assert [cpu[1] for cpu in cpus] == [0, 1, 2, 3]  # APIC id = vCPU index
    assert [cpu[3] for cpu in cpus] == [0x03, 0x01, 0x01, 0x01]  # enabled, BSP on 0
    assert all(cpu[5] & (1 << 9) for cpu in cpus)  # APIC feature flag


def test_mptable_ioapic_and_interrupts() -> None:
    parsed = _parse_mptable(mptable.build_mptable(4))
    bus = next(e for e in parsed["entries"] if e[0] == 1)
    assert bus[2:8] == b"ISA   "
    ioapic = struct.unpack("<BBBBI", next(e for e in parsed["entries"] if e[0] == 2))
    assert ioapic == (2, 4, 0x11, 1, layout.IOAPIC_ADDR)
    routes = {
        e[5]: (e[6], e[7])
        for e in parsed["entries"]
        if e[0] == 3  # src irq -> (ioapic id, pin)
    }
    assert routes[0] == (4, layout.PIT_IOAPIC_PIN)  # PIT as KVM routes it
    assert 2 not in routes
    assert all(routes[irq] == (4, irq) for irq in range(1, 16) if irq != 2)
    local = [struct.unpack("<BBHBBBB", e) for e in parsed["entries"] if e[0] == 4]
    assert [(e[1], e[5], e[6]) for e in local] == [(3, 0xFF, 0), (1, 0xFF, 1)]


@pytest.mark.parametrize("num_cpus", [0, 33])
def test_mptable_rejects_cpu_counts(num_cpus: int) -> None:
    with pytest.raises(ConfigError, match="vCPUs"):
        mptable.build_mptable(num_cpus)


def test_write_mptable() -> None:
    with GuestMemory.with_size(16 << 20) as mem:
        table = mptable.build_mptable(2)
        mptable.write_mptable(mem, table)
        assert mem.read(layout.MPTABLE_START, len(table)) == table
