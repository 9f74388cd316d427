"""Kernel detection: is this file an ELF vmlinux, a bzImage, or neither?

The format is decided by content, never by file name: "\\x7fELF" at offset
0 means ELF, "HdrS" at 0x202 means bzImage. ``inspect_kernel`` only reads;
:func:`pyvmm.boot.configure.setup_boot` checks the fit and writes it.
"""

from __future__ import annotations

from typing import BinaryIO

from pyvmm.boot import bzimage, elf
from pyvmm.boot.files import file_size, read_at
from pyvmm.boot.image import KernelImage
from pyvmm.errors import KernelImageError

_DETECT_BYTES = 0x206  # enough for both magics


def inspect_kernel(f: BinaryIO, path: str) -> KernelImage:
    """Parse the kernel in the open file ``f`` and plan its load; writes nothing."""
    size = file_size(f)
    if size == 0:
        raise KernelImageError(f"kernel image {path} is empty")
    head = read_at(f, 0, _DETECT_BYTES)
    if elf.is_elf(head):
        return elf.parse(f, path, size)
    if bzimage.is_bzimage(head):
        return bzimage.parse(f, path, size)
    raise KernelImageError(f"kernel image {path} is not a kernel (neither ELF nor bzImage)")
