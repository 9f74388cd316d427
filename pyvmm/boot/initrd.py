"""The initrd: placed at the top of low RAM, then copied in.

Why the top: it keeps the initrd as far as possible from the kernel, which
decompresses and grows upward from its load address, and it is where
boot loaders conventionally put it. It must end below the kernel's
``initrd_addr_max``, below the 32-bit MMIO hole and inside the RAM region
that starts at 0, and it must start above everything the kernel uses early
(``KernelImage.end``). The address is page-aligned, as the kernel frees the
initrd's pages after unpacking it.
"""

from __future__ import annotations

from typing import BinaryIO

from pyvmm import layout
from pyvmm.boot.files import copy_to_guest
from pyvmm.boot.image import MIB, KernelImage
from pyvmm.errors import KernelImageError
from pyvmm.memory import GuestMemory


def _align_down(value: int, align: int) -> int:
    return value & ~(align - 1)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def low_ram_end(mem: GuestMemory) -> int:
    """End of the RAM region that starts at address 0 (0 if there is none)."""
    for region in mem:
        if region.guest_addr == 0:
            return region.end
    return 0


def place_initrd(mem: GuestMemory, size: int, kernel: KernelImage, path: str) -> int:
    """Guest address for an initrd of ``size`` bytes; raises if it cannot fit."""
    if size == 0:
        raise KernelImageError(f"initrd {path} is empty")
    top = min(low_ram_end(mem), kernel.initrd_addr_max + 1, layout.MMIO_HOLE_START)
    floor = _align_up(kernel.end, layout.PAGE_SIZE)
    addr = _align_down(top - size, layout.PAGE_SIZE)
    if addr < floor:
        room = max(top - floor, 0)
        raise KernelImageError(
            f"initrd {path} is {size / MIB:.1f} MiB and does not fit below {top:#x}: "
            f"only {room / MIB:.1f} MiB are free above the kernel's end at {floor:#x}"
        )
    return addr


# What Linux's initramfs unpacker accepts at the start of an image: a cpio
# archive (newc, with or without CRC) or one of the compressors it supports.
_INITRD_MAGICS = {
    b"070701": "cpio (newc)",
    b"070702": "cpio (newc with CRC)",
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x02\x21\x4c\x18": "lz4",
    b"BZh": "bzip2",
    b"\x89LZO": "lzo",
    b"\x5d\x00\x00": "lzma",
}


def check_initrd_format(f: BinaryIO, path: str) -> str:
    """Name the initrd's format; reject a file Linux would not unpack.

    Only the first bytes are checked: a corrupt compressed stream can only be
    found by decompressing it, which is the guest's job.
    """
    f.seek(0)
    head = f.read(8)
    f.seek(0)
    for magic, name in _INITRD_MAGICS.items():
        if head.startswith(magic):
            return name
    raise KernelImageError(
        f"initrd {path} is not an initramfs: neither a cpio archive nor compressed with "
        "gzip, xz, zstd, lz4, bzip2, lzo or lzma"
    )


def load_initrd(mem: GuestMemory, f: BinaryIO, addr: int, size: int, path: str) -> None:
    """Copy ``size`` bytes of the open initrd file to ``addr``."""
    with mem.view(addr, size) as dest:
        copied = copy_to_guest(f, 0, size, dest)
    if copied != size:
        raise KernelImageError(
            f"initrd {path} shrank while loading: expected {size} bytes, read {copied}"
        )
