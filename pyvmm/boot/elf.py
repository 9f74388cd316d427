"""ELF vmlinux: plan the load of an uncompressed x86_64 kernel.

The ELF, program and section headers are read with :mod:`struct`: they are
three fixed little-endian layouts, and a general ELF library costs more to
import (pyelftools: ~30 ms, with its DWARF support) than the rest of a
boot's planning. PT_LOAD segments go to their
physical addresses (``p_paddr``). If the kernel carries the Xen note
``XEN_ELFNOTE_PHYS32_ENTRY`` it supports PVH, which pyvmm prefers: it enters
32-bit protected mode directly, with no zero page and no page tables to get
wrong. Otherwise the ELF entry point is used with the Linux 64-bit boot
protocol.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, NamedTuple

from pyvmm import layout
from pyvmm.boot.cpu_state import BootMode
from pyvmm.boot.files import read_at
from pyvmm.boot.image import (
    KernelFormat,
    KernelImage,
    LoadSegment,
)
from pyvmm.errors import KernelImageError

ELF_MAGIC = b"\x7fELF"
ELF64_HEADER_SIZE = 64
XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18
# Elf64_Nhdr: namesz, descsz, type; name and descriptor follow, each padded.
_NOTE_HEADER = struct.Struct("<III")
_MAX_NOTES_BYTES = 1 << 20  # notes are a few hundred bytes; refuse absurd sizes

# e_ident (magic, class, data encoding, version, padding) and the two
# fields after it, at the same offsets in 32- and 64-bit ELF headers.
_IDENT = struct.Struct("<4sBBB9sHH")
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC, ET_DYN = 2, 3
_TYPE_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
PT_LOAD, PT_NOTE = 1, 4
SHT_NOTE = 7
# Elf64_Ehdr, Elf64_Phdr and Elf64_Shdr, little-endian.
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
# Human names for the machines a wrong image is most likely built for.
_MACHINE_NAMES = {
    3: "i386",
    8: "MIPS",
    20: "PowerPC",
    21: "PowerPC64",
    22: "s390",
    40: "ARM",
    43: "SPARC64",
    62: "x86_64",
    183: "AArch64",
    243: "RISC-V",
    258: "LoongArch",
}


class _Segment(NamedTuple):
    """An ``Elf64_Phdr``, field for field."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


def is_elf(head: bytes) -> bool:
    return head.startswith(ELF_MAGIC)


def parse(f: BinaryIO, path: str, size: int) -> KernelImage:
    """Validate the ELF kernel in ``f`` and plan its load; writes nothing."""
    _check_machine(read_at(f, 0, _IDENT.size), path)
    if size < ELF64_HEADER_SIZE:
        raise KernelImageError(f"kernel image {path} is truncated: its ELF header is incomplete")
    segments, note_ranges, entry = _read_headers(f, path, size)
    loads = [s for s in segments if s.type == PT_LOAD and s.memsz > 0]
    if not loads:
        raise KernelImageError(f"kernel image {path} has no loadable (PT_LOAD) segments")
    plan = tuple(_plan_segment(segment, path, size) for segment in loads)
    pvh_entry = _find_pvh_entry(f, path, size, note_ranges)
    if pvh_entry is not None:
        mode, entry = BootMode.PVH_32, pvh_entry
        if not any(s.paddr <= entry < s.paddr + s.memsz for s in loads):
            raise KernelImageError(
                f"kernel image {path}: PVH entry point {entry:#x} is outside its loaded segments"
            )
    else:
        mode, entry = BootMode.LINUX_64, _physical_entry(entry, loads, path)
    load_start = min(segment.guest_addr for segment in plan)
    load_end = max(segment.guest_end for segment in plan)
    return KernelImage(
        path=path,
        format=KernelFormat.ELF,
        mode=mode,
        entry=entry,
        segments=plan,
        runtime_start=load_start,
        runtime_end=load_end,
        cmdline_limit=layout.CMDLINE_MAX_SIZE - 1,
        # The 64-bit and PVH entries take a 64-bit initrd address: no header limit.
        initrd_addr_max=layout.MMIO_HOLE_START - 1,
    )


def _read_headers(
    f: BinaryIO, path: str, size: int
) -> tuple[list[_Segment], list[tuple[int, int, int]], int]:
    """Program headers, note ranges (offset, size, align) and e_entry, checked."""
    header = read_at(f, 0, _EHDR.size)
    if len(header) < _EHDR.size:
        raise KernelImageError(f"kernel image {path} is truncated: its ELF header is incomplete")
    (_, e_type, _, _, e_entry, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize,
     e_shnum, _) = _EHDR.unpack(header)  # fmt: skip
    if e_type not in (ET_EXEC, ET_DYN):
        name = _TYPE_NAMES.get(e_type, f"{e_type:#x}")
        raise KernelImageError(f"kernel image {path} is an ELF of type {name}, not an executable")
    segments = [
        _Segment._make(_PHDR.unpack(entry))
        for entry in _read_table(f, path, size, "program", e_phoff, e_phnum, e_phentsize, _PHDR)
    ]
    notes = [(s.offset, s.filesz, s.align) for s in segments if s.type == PT_NOTE]
    if not notes:
        for entry in _read_table(f, path, size, "section", e_shoff, e_shnum, e_shentsize, _SHDR):
            _, sh_type, _, _, sh_offset, sh_size, _, _, sh_addralign, _ = _SHDR.unpack(entry)
            if sh_type == SHT_NOTE:
                notes.append((sh_offset, sh_size, sh_addralign))
    return segments, notes, e_entry


def _read_table(
    f: BinaryIO,
    path: str,
    size: int,
    what: str,
    offset: int,
    count: int,
    entry_size: int,
    entry: struct.Struct,
) -> list[bytes]:
    """The ``count`` entries of a header table, each checked to be inside the file."""
    if count == 0:
        return []
    if entry_size != entry.size:
        raise KernelImageError(
            f"kernel image {path} is not a valid ELF file: its {what} headers are "
            f"{entry_size} bytes each, a 64-bit ELF's are {entry.size}"
        )
    end = offset + count * entry_size
    if end > size:
        raise KernelImageError(
            f"kernel image {path} is truncated: its {what} headers end at byte "
            f"{end}, the file has {size}"
        )
    table = read_at(f, offset, end - offset)
    if len(table) < end - offset:
        raise KernelImageError(f"kernel image {path} is truncated: its {what} headers are short")
    return [table[i : i + entry_size] for i in range(0, len(table), entry_size)]


def _check_machine(ident: bytes, path: str) -> None:
    """Reject anything but a little-endian 64-bit x86_64 ELF, naming what it is.

    Done on the identification bytes alone, before the 64-bit header is
    read, so that a 32-bit header (shorter) is reported by architecture.
    """
    if len(ident) < _IDENT.size:
        raise KernelImageError(f"kernel image {path} is truncated: its ELF header is incomplete")
    _, elfclass, encoding, _, _, _, machine = _IDENT.unpack(ident)
    if encoding != ELFDATA2LSB:
        machine = int.from_bytes(machine.to_bytes(2, "little"), "big")
        raise KernelImageError(
            f"kernel image {path} is a big-endian ELF for "
            f"{_MACHINE_NAMES.get(machine, f'machine {machine}')}, not x86_64"
        )
    if machine != EM_X86_64:
        name = _MACHINE_NAMES.get(machine, f"machine {machine}")
        raise KernelImageError(f"kernel image {path} is an ELF for {name}, not x86_64")
    if elfclass != ELFCLASS64:
        raise KernelImageError(
            f"kernel image {path} is a 32-bit (x32) ELF for x86_64; pyvmm needs a 64-bit ELF"
        )


def _plan_segment(segment: _Segment, path: str, size: int) -> LoadSegment:
    if segment.filesz > segment.memsz:
        raise KernelImageError(
            f"kernel image {path}: a segment has more file bytes ({segment.filesz}) than "
            f"memory bytes ({segment.memsz}); the ELF is corrupt"
        )
    if segment.offset + segment.filesz > size:
        raise KernelImageError(
            f"kernel image {path} is truncated: a segment ends at byte "
            f"{segment.offset + segment.filesz}, the file has {size}"
        )
    if segment.paddr < layout.HIMEM_START:
        raise KernelImageError(
            f"kernel image {path} loads a segment at {segment.paddr:#x}, below 1 MiB "
            "where pyvmm keeps its boot structures"
        )
    return LoadSegment(segment.offset, segment.filesz, segment.paddr, segment.memsz)


def _physical_entry(entry: int, loads: list[_Segment], path: str) -> int:
    """The entry point as a physical address.

    Linux's vmlinux has a physical ``e_entry`` (``phys_startup_64``); other
    kernels may give the virtual one. A physical match wins; a virtual match
    is translated through its segment's ``p_vaddr -> p_paddr`` offset.
    """
    for segment in loads:
        if segment.paddr <= entry < segment.paddr + segment.memsz:
            return entry
    for segment in loads:
        if segment.vaddr <= entry < segment.vaddr + segment.memsz:
            return entry - segment.vaddr + segment.paddr
    raise KernelImageError(
        f"kernel image {path}: entry point {entry:#x} is outside every loadable segment"
    )


def _find_pvh_entry(
    f: BinaryIO, path: str, size: int, note_ranges: list[tuple[int, int, int]]
) -> int | None:
    for offset, length, align in note_ranges:
        if length > _MAX_NOTES_BYTES or offset + length > size:
            raise KernelImageError(f"kernel image {path} has a corrupt or truncated note segment")
        data = read_at(f, offset, length)
        for name, note_type, desc in iter_notes(data, 8 if align == 8 else 4):
            if name == XEN_NOTE_NAME and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) == 4:
                    return int.from_bytes(desc, "little")
                if len(desc) == 8:
                    value = int.from_bytes(desc, "little")
                    if value >= 1 << 32:
                        raise KernelImageError(
                            f"kernel image {path}: PVH entry point {value:#x} is not a "
                            "32-bit address"
                        )
                    return value
                raise KernelImageError(
                    f"kernel image {path}: PVH entry note has a {len(desc)}-byte "
                    "descriptor, expected 4 or 8"
                )
    return None


def iter_notes(data: bytes, align: int = 4) -> list[tuple[bytes, int, bytes]]:
    """Split an ELF note area into ``(name without NUL, type, descriptor)``.

    A note cut short by the end of the area ends the walk instead of
    raising: a malformed unrelated note must not stop a boot.
    """
    notes = []
    pos = 0
    while pos + _NOTE_HEADER.size <= len(data):
        namesz, descsz, note_type = _NOTE_HEADER.unpack_from(data, pos)
        name_start = pos + _NOTE_HEADER.size
        desc_start = name_start + _align_up(namesz, align)
        end = desc_start + _align_up(descsz, align)
        if desc_start + descsz > len(data):
            break
        name = data[name_start : name_start + namesz].rstrip(b"\0")
        notes.append((name, note_type, data[desc_start : desc_start + descsz]))
        pos = end
    return notes


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)
