"""Kernel and initrd loading, and setup_boot end to end, on crafted images.

The images are built byte by byte here, with offsets written out from the
boot protocol and ELF specifications rather than taken from pyvmm, so a
wrong offset in pyvmm cannot hide behind the same wrong offset in a test.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.boot.configure import setup_boot
from pyvmm.boot.cpu_state import BootMode
from pyvmm.boot.files import open_input
from pyvmm.boot.image import KernelFormat, check_fits, load_segments
from pyvmm.boot.initrd import place_initrd
from pyvmm.boot.kernel import inspect_kernel
from pyvmm.errors import ConfigError, KernelImageError
from pyvmm.memory import GuestMemory

MIB = 1 << 20
GIB = 1 << 30

# --- crafted bzImage ---------------------------------------------------------------


def load_into(mem: GuestMemory, f, path: str):
    """What setup_boot does with a kernel: plan it, check the fit, copy its segments."""
    image = inspect_kernel(f, path)
    check_fits(mem, image)
    load_segments(mem, f, image)
    return image


def load_path(mem: GuestMemory, path: str):
    with open(path, "rb") as f:
        return load_into(mem, f, path)


def make_bzimage(
    *,
    version: int = 0x020F,
    xloadflags: int = 0x01,
    setup_sects: int = 2,
    payload: bytes = bytes(range(256)) * 16,
    init_size: int = 4 * MIB,
    pref_address: int = 0x1000000,
    relocatable: int = 1,
    kernel_alignment: int = 0x200000,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    header_end: int = 0x26C,
) -> bytes:
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    payload = payload.ljust(-(-len(payload) // 16) * 16, b"\0")
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, len(payload) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, header_end - 0x202])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


# --- crafted ELF ---------------------------------------------------------------------


@dataclass
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None


def elf_note(name: bytes, note_type: int, desc: bytes) -> bytes:
    name_z = name + b"\0"

    def pad(b: bytes) -> bytes:
        return b.ljust(-(-len(b) // 4) * 4, b"\0")

    return struct.pack("<III", len(name_z), len(desc), note_type) + pad(name_z) + pad(desc)


def make_elf(
    *,
    machine: int = 62,
    elfclass: int = 64,
    e_type: int = 2,
    entry: int = 0x1000000,
    segments: tuple[Seg, ...] = (Seg(0x1000000, b"\xf4" * 64, 0x3000),),
    notes: bytes | None = None,
    notes_in_section: bool = False,
) -> bytes:
    if elfclass == 32:
        ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
        return ident + struct.pack(
            "<HHIIIIIHHHHHH", e_type, machine, 1, entry, 0, 0, 0, 52, 32, 0, 40, 0, 0
        )
    phdrs = [(1, seg) for seg in segments]
    if notes is not None and not notes_in_section:
        phdrs.append((4, None))
    data_start = 64 + 56 * len(phdrs)
    body = bytearray()
    ph_bytes = bytearray()

    def place(blob: bytes) -> int:
        while (data_start + len(body)) % 16:
            body.append(0)
        offset = data_start + len(body)
        body.extend(blob)
        return offset

    for p_type, seg in phdrs:
        if seg is None:
            assert notes is not None
            offset = place(notes)
            ph_bytes += struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(notes), len(notes), 4)
            continue
        offset = place(seg.data)
        vaddr = seg.paddr if seg.vaddr is None else seg.vaddr
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        ph_bytes += struct.pack(
            "<IIQQQQQQ", p_type, 7, offset, vaddr, seg.paddr, len(seg.data), memsz, 0x1000
        )
    shoff = shnum = shstrndx = 0
    if notes is not None and notes_in_section:
        note_offset = place(notes)
        strtab = b"\0.note.Xen\0.shstrtab\0"
        strtab_offset = place(strtab)
        shoff = place(b"")
        body.extend(bytes(64))  # null section
        body.extend(struct.pack("<IIQQQQIIQQ", 1, 7, 2, 0, note_offset, len(notes), 0, 0, 4, 0))
        body.extend(struct.pack("<IIQQQQIIQQ", 11, 3, 0, 0, strtab_offset, len(strtab), 0, 0, 1, 0))
        shnum, shstrndx = 3, 2
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        e_type,
        machine,
        1,
        entry,
        64,
        shoff,
        0,
        64,
        56,
        len(phdrs),
        64,
        shnum,
        shstrndx,
    )
    return header + bytes(ph_bytes) + bytes(body)


def pvh_note(entry: int, size: int = 4) -> bytes:
    return elf_note(b"Xen", 18, entry.to_bytes(size, "little"))


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(64 * MIB) as memory:
        yield memory


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def inspect(path: str):
    with open_input(path, "kernel image") as f:
        return inspect_kernel(f, path)


# --- detection and file errors ---------------------------------------------------------


def test_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match=r"kernel image .*nope does not exist"):
        inspect(str(tmp_path / "nope"))


def test_kernel_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="is a directory"):
        inspect(str(tmp_path))


def test_kernel_is_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(KernelImageError, match="not a regular file"):
        inspect(str(fifo))


def test_empty_kernel(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="is empty"):
        inspect(write(tmp_path, "empty", b""))


@pytest.mark.parametrize("data", [b"abc", bytes(4096), b"MZ" + bytes(8190)])
def test_not_a_kernel(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(KernelImageError, match=r"is not a kernel \(neither ELF nor bzImage\)$"):
        inspect(write(tmp_path, "junk", data))


def test_unreadable_kernel_reported_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyvmm.boot.files as files

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    path = write(tmp_path, "locked", make_bzimage())
    monkeypatch.setattr(files, "open", refuse, raising=False)
    with pytest.raises(KernelImageError, match=r"^kernel image .*locked is not readable"):
        inspect(path)


# --- bzImage ---------------------------------------------------------------------------


def test_bzimage_header_parsed(tmp_path: Path) -> None:
    data = make_bzimage()
    image = inspect(write(tmp_path, "bzImage", data))
    assert image.format is KernelFormat.BZIMAGE
    assert image.mode is BootMode.LINUX_64
    assert image.entry == 0x100200
    assert image.header is not None
    assert image.header.version == 0x020F
    assert image.header.setup_sects == 2
    assert image.header.init_size == 4 * MIB
    assert image.header.pref_address == 0x1000000
    assert image.setup_header_bytes == data[0x1F1:0x26C]
    (segment,) = image.segments
    assert (segment.file_offset, segment.guest_addr, segment.file_size) == (3 * 512, 0x100000, 4096)
    assert (image.runtime_start, image.runtime_end) == (0x1000000, 0x1400000)
    assert image.cmdline_limit == 2047
    assert image.initrd_addr_max == 0x7FFFFFFF


def test_bzimage_setup_sects_zero_means_four(tmp_path: Path) -> None:
    image = inspect(write(tmp_path, "bzImage", make_bzimage(setup_sects=0)))
    assert image.segments[0].file_offset == 5 * 512


def test_bzimage_short_header_is_copied_to_its_end(tmp_path: Path) -> None:
    data = make_bzimage(version=0x020C, header_end=0x268)
    image = inspect(write(tmp_path, "bzImage", data))
    assert image.setup_header_bytes == data[0x1F1:0x268]
    assert image.header is not None and image.header.kernel_info_offset == 0


def test_bzimage_non_relocatable_runs_at_pref_address(tmp_path: Path) -> None:
    image = inspect(write(tmp_path, "bzImage", make_bzimage(relocatable=0, pref_address=0x2000000)))
    assert image.runtime_start == 0x2000000


def test_bzimage_relocatable_is_aligned_up(tmp_path: Path) -> None:
    data = make_bzimage(pref_address=0x100000, kernel_alignment=0x400000)
    assert inspect(write(tmp_path, "bzImage", data)).runtime_start == 0x400000


def test_bzimage_protocol_too_old(tmp_path: Path) -> None:
    with pytest.raises(
        KernelImageError, match=r"bzImage boot protocol 2\.10 is too old; pyvmm needs >= 2\.12$"
    ):
        inspect(write(tmp_path, "old", make_bzimage(version=0x020A)))


def test_bzimage_without_64_bit_entry(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="no 64-bit entry point"):
        inspect(write(tmp_path, "bz32", make_bzimage(xloadflags=0x02)))


def test_bzimage_truncated_payload(tmp_path: Path) -> None:
    data = make_bzimage()
    with pytest.raises(KernelImageError, match="is truncated"):
        inspect(write(tmp_path, "cut", data[:-100]))


def test_bzimage_truncated_in_header(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="is truncated"):
        inspect(write(tmp_path, "cut", make_bzimage()[:0x240]))


def test_bzimage_load_copies_protected_mode_kernel(tmp_path: Path, mem: GuestMemory) -> None:
    data = make_bzimage()
    mem.fill(0x100000 + 4096, 16, 0xAA)
    path = write(tmp_path, "bzImage", data)
    with open(path, "rb") as f:
        image = load_into(mem, f, path)
    assert image.entry == 0x100200
    assert mem.read(0x100000, 4096) == data[3 * 512 :]
    assert mem.read(0x100000 + 4096, 16) == b"\xaa" * 16  # nothing past the image


def test_bzimage_init_size_must_fit_in_ram(tmp_path: Path, mem: GuestMemory) -> None:
    path = write(tmp_path, "big", make_bzimage(init_size=60 * MIB))
    with pytest.raises(KernelImageError, match=r"needs RAM at 0x1000000-0x4c00000"):
        load_path(mem, path)


# --- ELF -------------------------------------------------------------------------------


def test_elf_without_pvh_note_boots_64_bit(tmp_path: Path, mem: GuestMemory) -> None:
    mem.fill(0x1000000, 0x3000, 0xAA)
    image = load_path(mem, write(tmp_path, "vmlinux", make_elf()))
    assert image.format is KernelFormat.ELF
    assert image.mode is BootMode.LINUX_64
    assert image.entry == 0x1000000
    assert image.header is None and image.setup_header_bytes == b""
    assert mem.read(0x1000000, 64) == b"\xf4" * 64
    assert mem.read(0x1000040, 0x3000 - 64) == bytes(0x3000 - 64)  # .bss zeroed
    assert image.end == 0x1003000
    assert image.cmdline_limit == layout.CMDLINE_MAX_SIZE - 1


def test_elf_load_returns_the_plan(tmp_path: Path, mem: GuestMemory) -> None:
    path = write(tmp_path, "vmlinux", make_elf())
    with open(path, "rb") as f:
        image = load_into(mem, f, path)
    assert (image.entry, image.load_start, image.load_end) == (0x1000000, 0x1000000, 0x1003000)


def test_elf_virtual_entry_is_translated(tmp_path: Path) -> None:
    seg = Seg(0x1000000, b"\x90" * 32, vaddr=0xFFFFFFFF81000000)
    data = make_elf(segments=(seg,), entry=0xFFFFFFFF81000010)
    assert inspect(write(tmp_path, "vmlinux", data)).entry == 0x1000010


def test_elf_physical_entry_wins(tmp_path: Path) -> None:
    seg = Seg(0x1000000, b"\x90" * 32, vaddr=0xFFFFFFFF81000000)
    data = make_elf(segments=(seg,), entry=0x1000004)
    assert inspect(write(tmp_path, "vmlinux", data)).entry == 0x1000004


def test_elf_entry_outside_segments(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="outside every loadable segment"):
        inspect(write(tmp_path, "vmlinux", make_elf(entry=0x5000000)))


@pytest.mark.parametrize("size", [4, 8])
def test_elf_with_pvh_note(tmp_path: Path, size: int) -> None:
    notes = elf_note(b"Linux", 1, b"6.1\0") + pvh_note(0x1000020, size)
    image = inspect(write(tmp_path, "vmlinux", make_elf(notes=notes)))
    assert image.mode is BootMode.PVH_32
    assert image.entry == 0x1000020


def test_elf_with_pvh_note_in_a_section(tmp_path: Path) -> None:
    data = make_elf(notes=pvh_note(0x1000040), notes_in_section=True)
    image = inspect(write(tmp_path, "vmlinux", data))
    assert (image.mode, image.entry) == (BootMode.PVH_32, 0x1000040)


def test_elf_type_18_from_another_owner_is_not_pvh(tmp_path: Path) -> None:
    data = make_elf(notes=elf_note(b"GNU", 18, bytes(4)))
    assert inspect(write(tmp_path, "vmlinux", data)).mode is BootMode.LINUX_64


def test_elf_pvh_entry_must_be_loaded(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="PVH entry point 0x9000000 is outside"):
        inspect(write(tmp_path, "vmlinux", make_elf(notes=pvh_note(0x9000000))))


@pytest.mark.parametrize(
    ("elfclass", "machine", "arch"),
    [(32, 3, "i386"), (32, 40, "ARM"), (64, 183, "AArch64"), (64, 243, "RISC-V")],
)
def test_elf_for_another_arch(tmp_path: Path, elfclass: int, machine: int, arch: str) -> None:
    data = make_elf(elfclass=elfclass, machine=machine)
    with pytest.raises(KernelImageError, match=rf"is an ELF for {arch}, not x86_64$"):
        inspect(write(tmp_path, "vmlinux", data))


def test_elf_x32_rejected(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match=r"32-bit \(x32\) ELF for x86_64"):
        inspect(write(tmp_path, "vmlinux", make_elf(elfclass=32, machine=62)))


def test_elf_big_endian_rejected(tmp_path: Path) -> None:
    data = bytearray(make_elf(elfclass=32, machine=0))
    data[5] = 2  # ELFDATA2MSB
    data[18:20] = (21).to_bytes(2, "big")
    with pytest.raises(KernelImageError, match="big-endian ELF for PowerPC64, not x86_64"):
        inspect(write(tmp_path, "vmlinux", bytes(data)))


def test_elf_relocatable_object_rejected(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="ET_REL, not an executable"):
        inspect(write(tmp_path, "vmlinux.o", make_elf(e_type=1)))


def test_elf_without_load_segments(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="no loadable"):
        inspect(write(tmp_path, "vmlinux", make_elf(segments=())))


def test_elf_segment_below_1_mib(tmp_path: Path) -> None:
    data = make_elf(segments=(Seg(0x7000, b"\x90"),), entry=0x7000)
    with pytest.raises(KernelImageError, match="below 1 MiB"):
        inspect(write(tmp_path, "vmlinux", data))


def test_elf_that_does_not_fit(tmp_path: Path, mem: GuestMemory) -> None:
    data = make_elf(segments=(Seg(0x3F00000, b"\x90", 2 * MIB),), entry=0x3F00000)
    with pytest.raises(KernelImageError, match=r"does not fit in guest RAM.*64 MiB"):
        load_path(mem, write(tmp_path, "vmlinux", data))


@pytest.mark.parametrize("keep", [40, 64 + 30, None])
def test_elf_truncated(tmp_path: Path, keep: int | None) -> None:
    data = make_elf()
    cut = data[:keep] if keep is not None else data[:-16]
    with pytest.raises(KernelImageError, match="truncated"):
        inspect(write(tmp_path, "vmlinux", cut))


# --- initrd ------------------------------------------------------------------------------


def _elf_image(tmp_path: Path):
    return inspect(write(tmp_path, "vmlinux", make_elf()))


def test_initrd_goes_to_the_top_of_low_ram(tmp_path: Path, mem: GuestMemory) -> None:
    addr = place_initrd(mem, 5000, _elf_image(tmp_path), "initrd")
    assert addr == 64 * MIB - 2 * 4096
    assert addr % 4096 == 0


def test_initrd_respects_initrd_addr_max(tmp_path: Path, mem: GuestMemory) -> None:
    image = inspect(write(tmp_path, "bz", make_bzimage(initrd_addr_max=0x1FFFFFF)))
    assert place_initrd(mem, 4096, image, "initrd") == 0x2000000 - 4096


def test_initrd_stays_below_the_mmio_hole(tmp_path: Path) -> None:
    with GuestMemory.with_size(5 * GIB) as big:
        assert place_initrd(big, 4096, _elf_image(tmp_path), "i") == layout.MMIO_HOLE_START - 4096
        bz = inspect(write(tmp_path, "bz", make_bzimage()))
        assert place_initrd(big, 4096, bz, "i") == 0x80000000 - 4096


def test_initrd_too_large(tmp_path: Path, mem: GuestMemory) -> None:
    with pytest.raises(
        KernelImageError, match=r"^initrd big is 60\.0 MiB and does not fit below 0x4000000"
    ):
        place_initrd(mem, 60 * MIB, _elf_image(tmp_path), "big")


def test_initrd_empty(tmp_path: Path, mem: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="initrd e is empty"):
        place_initrd(mem, 0, _elf_image(tmp_path), "e")


# --- setup_boot ----------------------------------------------------------------------------


def _u(mem: GuestMemory, addr: int, fmt: str) -> int:
    return mem.read_struct(struct.Struct("<" + fmt), addr)[0]


def test_setup_boot_bzimage(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, "bzImage", make_bzimage())
    initrd_data = b"070701" + bytes(range(250)) * 40
    initrd = write(tmp_path, "initrd.cpio", initrd_data)
    boot = setup_boot(mem, kernel, initrd, "console=ttyS0 panic=-1", 2)

    assert boot.mode is BootMode.LINUX_64
    assert boot.cpu.rip == 0x100200 and boot.cpu.rsi == layout.ZERO_PAGE_START
    assert boot.initrd_addr == 64 * MIB - 3 * 4096
    assert boot.initrd_size == len(initrd_data)
    assert mem.read(boot.initrd_addr, len(initrd_data)) == initrd_data
    assert mem.read(layout.CMDLINE_START, 24) == b"console=ttyS0 panic=-1\0\0"
    assert boot.cmdline_len == 22

    zp = layout.ZERO_PAGE_START
    assert mem.read(zp + 0x202, 4) == b"HdrS"
    assert _u(mem, zp + 0x206, "H") == 0x020F
    assert _u(mem, zp + 0x260, "I") == 4 * MIB  # init_size, from the image
    assert mem.read_u8(zp + 0x210) == 0xFF
    assert _u(mem, zp + 0x1FA, "H") == 0xFFFF
    assert _u(mem, zp + 0x228, "I") == layout.CMDLINE_START
    assert _u(mem, zp + 0x218, "I") == boot.initrd_addr
    assert _u(mem, zp + 0x21C, "I") == len(initrd_data)
    assert mem.read_u8(zp + 0x1E8) == 3
    assert mem.read_struct(struct.Struct("<QQI"), zp + 0x2D0 + 40) == (0x100000, 63 * MIB, 1)

    assert mem.read(0x100000, 4096) == make_bzimage()[3 * 512 :]
    assert mem.read_u64(layout.BOOT_GDT_START + 8) == 0x00AF9B000000FFFF
    assert mem.read_u64(layout.PML4_START) == 0xA003
    assert mem.read(layout.MPTABLE_START, 4) == b"_MP_"
    assert boot.mptable_addr == layout.MPTABLE_START
    assert boot.num_cpus == 2


def test_setup_boot_pvh(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, "vmlinux", make_elf(notes=pvh_note(0x1000010)))
    initrd = write(tmp_path, "initrd", b"070701" + b"x" * 9994)
    boot = setup_boot(mem, kernel, initrd, "console=hvc0", 1, rsdp_addr=0xE0000)

    assert boot.mode is BootMode.PVH_32
    assert boot.boot_info_addr == layout.PVH_INFO_START
    assert boot.cpu.rip == 0x1000010 and boot.cpu.rbx == layout.PVH_INFO_START
    assert boot.cpu.cr0 == 0x11 and boot.cpu.efer == 0
    info = mem.read_struct(struct.Struct("<IIIIQQQQII"), layout.PVH_INFO_START)
    assert info == (
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
    module = mem.read_struct(struct.Struct("<QQQQ"), layout.PVH_MODLIST_START)
    assert module == (boot.initrd_addr, 10000, 0, 0)
    assert mem.read(layout.CMDLINE_START, 13) == b"console=hvc0\0"
    assert mem.read_u64(layout.BOOT_GDT_START + 8) == 0x00CF9B000000FFFF
    assert mem.read_u64(layout.PML4_START) == 0  # no paging for PVH


def test_setup_boot_elf_64_bit(tmp_path: Path, mem: GuestMemory) -> None:
    boot = setup_boot(mem, write(tmp_path, "vmlinux", make_elf()), None, "", 1)
    assert boot.mode is BootMode.LINUX_64
    assert boot.initrd_addr is None and boot.initrd_size == 0
    zp = layout.ZERO_PAGE_START
    assert _u(mem, zp + 0x1FE, "H") == 0xAA55
    assert mem.read(zp + 0x202, 4) == b"HdrS"
    assert _u(mem, zp + 0x218, "I") == 0 and _u(mem, zp + 0x21C, "I") == 0
    assert mem.read_u8(layout.CMDLINE_START) == 0
    assert boot.cpu.cr3 == layout.PML4_START


def _untouched(mem: GuestMemory) -> bool:
    return (
        mem.read(0x100000, 64) == bytes(64)
        and mem.read(layout.ZERO_PAGE_START, 4096) == bytes(4096)
        and mem.read(layout.CMDLINE_START, 16) == bytes(16)
        and mem.read(layout.MPTABLE_START, 16) == bytes(16)
    )


def test_setup_boot_cmdline_too_long_writes_nothing(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, "bzImage", make_bzimage(cmdline_size=255))
    with pytest.raises(
        KernelImageError, match="kernel command line is 300 bytes; the limit is 255"
    ):
        setup_boot(mem, kernel, None, "x" * 300, 1)
    assert _untouched(mem)


def test_setup_boot_initrd_too_large_writes_nothing(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, "bzImage", make_bzimage())
    initrd = tmp_path / "huge"
    with open(initrd, "wb") as f:
        f.truncate(50 * MIB)  # sparse
    with pytest.raises(KernelImageError, match=r"initrd .*huge is 50\.0 MiB and does not fit"):
        setup_boot(mem, kernel, str(initrd), "", 1)
    assert _untouched(mem)


def test_setup_boot_missing_initrd(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, "bzImage", make_bzimage())
    with pytest.raises(KernelImageError, match=r"^initrd .*gone does not exist$"):
        setup_boot(mem, kernel, str(tmp_path / "gone"), "", 1)
    assert _untouched(mem)


def test_setup_boot_initrd_is_a_directory(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, "bzImage", make_bzimage())
    with pytest.raises(KernelImageError, match=r"initrd .* is a directory"):
        setup_boot(mem, kernel, str(tmp_path), "", 1)


@pytest.mark.parametrize("num_cpus", [0, 33])
def test_setup_boot_bad_cpu_count_writes_nothing(
    tmp_path: Path, mem: GuestMemory, num_cpus: int
) -> None:
    kernel = write(tmp_path, "bzImage", make_bzimage())
    with pytest.raises(ConfigError, match="vCPUs"):
        setup_boot(mem, kernel, None, "", num_cpus)
    assert _untouched(mem)


def test_setup_boot_kernel_too_big_for_ram(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, "bzImage", make_bzimage(init_size=100 * MIB))
    with pytest.raises(KernelImageError, match="needs RAM"):
        setup_boot(mem, kernel, None, "", 1)
    assert _untouched(mem)


def test_check_fits_on_a_large_guest(tmp_path: Path) -> None:
    image = inspect(write(tmp_path, "bz", make_bzimage(init_size=100 * MIB)))
    with GuestMemory.with_size(5 * GIB) as big:
        check_fits(big, image)


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"070701", "cpio (newc)"),
        (b"\x1f\x8b\x08", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x02\x21\x4c\x18", "lz4"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
    ],
)
def test_initrd_formats_recognised(tmp_path: Path, head: bytes, name: str) -> None:
    from pyvmm.boot.initrd import check_initrd_format

    path = write(tmp_path, "initrd", head + bytes(64))
    with open(path, "rb") as f:
        assert check_initrd_format(f, path) == name


def test_corrupt_initrd_rejected(tmp_path: Path, mem: GuestMemory) -> None:
    kernel = write(tmp_path, "bz", make_bzimage())
    initrd = write(tmp_path, "initrd", b"this is not an initramfs" * 100)
    with pytest.raises(KernelImageError, match=r"initrd .* is not an initramfs"):
        setup_boot(mem, kernel, initrd, "console=ttyS0", 1)


def test_elf_with_wrong_program_header_size(tmp_path: Path) -> None:
    data = bytearray(make_elf())
    struct.pack_into("<H", data, 0x36, 32)  # e_phentsize
    with pytest.raises(KernelImageError, match=r"program headers are 32 bytes each.* are 56$"):
        inspect(write(tmp_path, "vmlinux", bytes(data)))


def test_elf_section_headers_past_the_end(tmp_path: Path) -> None:
    data = bytearray(make_elf(notes=elf_note(b"Xen", 18, b"\0" * 4), notes_in_section=True))
    struct.pack_into("<H", data, 0x3C, 500)  # e_shnum
    with pytest.raises(KernelImageError, match=r"truncated: its section headers end at byte"):
        inspect(write(tmp_path, "vmlinux", bytes(data)))


def test_elf_absurd_program_header_count_is_refused_before_reading(tmp_path: Path) -> None:
    data = bytearray(make_elf())
    struct.pack_into("<H", data, 0x38, 0xFFFF)  # e_phnum
    with pytest.raises(KernelImageError, match=r"program headers end at byte 3670024"):
        inspect(write(tmp_path, "vmlinux", bytes(data)))
