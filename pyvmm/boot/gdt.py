"""Segment descriptors: encode GDT entries, decode them into :class:`Segment`.

The boot GDT exists so that the segment registers KVM is given match real
descriptors: the kernel may reload a selector before it installs its own
GDT, and what it then loads must be what it already had. Each boot mode's
segments are therefore *derived* from its GDT by :func:`segment_from_entry`,
never written down twice.

``flags`` is the 16-bit form Linux's ``GDT_ENTRY`` uses: bits 0-7 are the
access byte (type, S, DPL, P) and bits 12-15 are AVL, L, D/B and G.
"""

from __future__ import annotations

import struct

from pyvmm import layout
from pyvmm.boot.cpu_state import BootMode, DescriptorTable, Segment
from pyvmm.memory import GuestMemory

# Access byte + flags nibble, as GDT_ENTRY takes them.
CODE64_FLAGS = 0xA09B  # P, S, type 0xb (code, read, accessed); L, G
CODE32_FLAGS = 0xC09B  # P, S, type 0xb; D/B (32-bit), G
DATA_FLAGS = 0xC093  # P, S, type 0x3 (data, write, accessed); D/B, G
TSS_FLAGS = 0x008B  # P, type 0xb (busy 32/64-bit TSS), byte-granular

FLAT_LIMIT = 0xFFFFF  # in 4 KiB units with G=1: the whole 4 GiB
TSS_LIMIT = 0x67  # a 104-byte TSS, the minimum a 32/64-bit TSS may be

# Selectors (index * 8, GDT, RPL 0): the same slots in both boot modes.
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18

_ENTRY = struct.Struct("<Q")


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode one 8-byte segment descriptor."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (flags & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | ((flags >> 12) & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


def segment_from_entry(entry: int, selector: int) -> Segment:
    """Decode a descriptor into the ``kvm_segment`` it stands for.

    KVM takes the limit in bytes, so a page-granular limit is scaled up
    (0xfffff with G=1 becomes 0xffffffff).
    """
    base = ((entry >> 16) & 0xFFFFFF) | ((entry >> 56) & 0xFF) << 24
    raw_limit = (entry & 0xFFFF) | ((entry >> 48) & 0xF) << 16
    access = (entry >> 40) & 0xFF
    granular = (entry >> 55) & 1
    present = (access >> 7) & 1
    return Segment(
        base=base,
        limit=(raw_limit << 12) | 0xFFF if granular else raw_limit,
        selector=selector,
        type=access & 0xF,
        present=present,
        dpl=(access >> 5) & 0x3,
        db=(entry >> 54) & 1,
        s=(access >> 4) & 1,
        l=(entry >> 53) & 1,
        g=granular,
        avl=(entry >> 52) & 1,
        unusable=0 if present else 1,
    )


def boot_gdt(mode: BootMode) -> tuple[int, ...]:
    """The four GDT entries for ``mode``: null, code, data, TSS."""
    code = CODE64_FLAGS if mode is BootMode.LINUX_64 else CODE32_FLAGS
    return (
        0,
        gdt_entry(code, 0, FLAT_LIMIT),
        gdt_entry(DATA_FLAGS, 0, FLAT_LIMIT),
        gdt_entry(TSS_FLAGS, 0, TSS_LIMIT),
    )


def gdt_register(entries: tuple[int, ...]) -> DescriptorTable:
    return DescriptorTable(layout.BOOT_GDT_START, len(entries) * _ENTRY.size - 1)


def idt_register() -> DescriptorTable:
    """An empty IDT: any exception before the kernel sets its own is fatal (by design)."""
    return DescriptorTable(layout.BOOT_IDT_START, 0)


def write_gdt(mem: GuestMemory, entries: tuple[int, ...]) -> None:
    """Write the GDT at ``layout.BOOT_GDT_START`` and zero the IDT slot after it."""
    if len(entries) > layout.BOOT_GDT_MAX_ENTRIES:
        raise ValueError(f"{len(entries)} GDT entries, room for {layout.BOOT_GDT_MAX_ENTRIES}")
    mem.write(layout.BOOT_GDT_START, b"".join(_ENTRY.pack(entry) for entry in entries))
    mem.write_u64(layout.BOOT_IDT_START, 0)
