"""Kernel detection: is this file an ELF vmlinux, a bzImage, or neither?

The format is decided by content, never by file name: "\\x7fELF" at offset
0 means ELF, "HdrS" at 0x202 means bzImage. ``inspect_kernel`` only reads;
``load_kernel`` is the one-call convenience that also checks the fit and
writes the kernel into guest RAM.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from pyvmm.boot import bzimage, elf
from pyvmm.boot.files import file_size, open_input, read_at
from pyvmm.boot.image import KernelImage, check_fits, load_segments
from pyvmm.errors import KernelImageError
from pyvmm.memory import GuestMemory

_DETECT_BYTES = 0x206  # enough for both magics


def inspect_kernel(f: BinaryIO, path: str) -> KernelImage:
    """Parse the kernel in the open file ``f`` and plan its load; writes nothing."""
    size = file_size(f)
    if size == 0:
        raise KernelImageError(f"kernel image {path} is empty")
    head = read_at(f, 0, _DETECT_BYTES)
    if elf.is_elf(head):
        return elf.parse(f, path, size)  # imports pyelftools only now
    if bzimage.is_bzimage(head):
        return bzimage.parse(f, path, size)
    raise KernelImageError(f"kernel image {path} is not a kernel (neither ELF nor bzImage)")


def load_kernel(mem: GuestMemory, path: str | os.PathLike[str]) -> KernelImage:
    """Open, parse, check and load the kernel at ``path`` into ``mem``."""
    name = os.fspath(path)
    with open_input(name, "kernel image") as f:
        image = inspect_kernel(f, name)
        check_fits(mem, image)
        load_segments(mem, f, image)
    return image
