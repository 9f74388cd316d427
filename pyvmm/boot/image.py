"""What a kernel loader found, and the generic copy of it into guest RAM.

Both formats reduce to the same plan: a few file ranges to copy to fixed
guest addresses (zero-filling the rest), an entry point, and the memory the
kernel will use early. Parsing produces that plan without touching guest
memory, so boot setup can check everything (RAM size, initrd room, command
line) before the first byte is written.
"""

from __future__ import annotations

import enum
from typing import BinaryIO, NamedTuple

from pyvmm.boot.cpu_state import BootMode
from pyvmm.boot.files import copy_to_guest
from pyvmm.boot.setup_header import SetupHeader
from pyvmm.errors import KernelImageError
from pyvmm.memory import GuestMemory

MIB = 1 << 20


class KernelFormat(enum.Enum):
    BZIMAGE = "bzImage"
    ELF = "ELF"


class LoadSegment(NamedTuple):
    """``file_size`` file bytes at ``file_offset`` go to ``guest_addr``; the
    rest, up to ``mem_size``, is zero-filled (an ELF .bss)."""

    file_offset: int
    file_size: int
    guest_addr: int
    mem_size: int

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.mem_size


class KernelImage(NamedTuple):
    """A parsed kernel: where it goes, how to enter it, and what it needs.

    ``runtime_start``/``runtime_end`` is the RAM the kernel uses before it
    reads the memory map (a bzImage decompresses into it); it must be RAM
    and is kept clear of the initrd. ``end`` is the first byte after both
    the loaded bytes and that area.
    """

    path: str
    format: KernelFormat
    mode: BootMode
    entry: int
    segments: tuple[LoadSegment, ...]
    runtime_start: int
    runtime_end: int
    # Longest command line the kernel accepts, in bytes without the NUL.
    cmdline_limit: int
    # Highest address the initrd may occupy (its last byte).
    initrd_addr_max: int
    # bzImage only: the header as parsed and its raw bytes 0x1F1.. for the zero page.
    header: SetupHeader | None = None
    setup_header_bytes: bytes = b""

    @property
    def load_start(self) -> int:
        return min(segment.guest_addr for segment in self.segments)

    @property
    def load_end(self) -> int:
        return max(segment.guest_end for segment in self.segments)

    @property
    def end(self) -> int:
        return max(self.load_end, self.runtime_end)


def check_fits(mem: GuestMemory, image: KernelImage) -> None:
    """Raise :class:`KernelImageError` unless every byte the kernel needs is RAM."""
    for segment in image.segments:
        if not mem.is_valid(segment.guest_addr, segment.mem_size):
            raise KernelImageError(
                f"kernel image {image.path} does not fit in guest RAM: it loads at "
                f"{segment.guest_addr:#x}-{segment.guest_end:#x} and the guest has "
                f"{_describe_ram(mem)}"
            )
    size = image.runtime_end - image.runtime_start
    if size > 0 and not mem.is_valid(image.runtime_start, size):
        raise KernelImageError(
            f"kernel image {image.path} needs RAM at {image.runtime_start:#x}-"
            f"{image.runtime_end:#x} to start (its init_size is {size / MIB:.1f} MiB) "
            f"and the guest has {_describe_ram(mem)}"
        )


def load_segments(mem: GuestMemory, f: BinaryIO, image: KernelImage) -> None:
    """Copy the kernel into guest RAM (call :func:`check_fits` first)."""
    for segment in image.segments:
        with mem.view(segment.guest_addr, segment.mem_size) as dest:
            copied = copy_to_guest(f, segment.file_offset, segment.file_size, dest)
            if copied != segment.file_size:
                raise KernelImageError(
                    f"kernel image {image.path} is truncated: expected "
                    f"{segment.file_offset + segment.file_size} bytes, the file ended at "
                    f"{segment.file_offset + copied}"
                )
            _zero(dest[segment.file_size :])


def _zero(dest: memoryview) -> None:
    """Zero-fill ``dest`` in 1 MiB steps (a .bss can be tens of MiB)."""
    chunk = bytes(min(len(dest), MIB))
    for start in range(0, len(dest), MIB):
        piece = dest[start : start + MIB]
        piece[:] = chunk[: len(piece)]


def _describe_ram(mem: GuestMemory) -> str:
    ranges = ", ".join(f"{region.guest_addr:#x}-{region.end:#x}" for region in mem)
    return f"{mem.size // MIB} MiB of RAM ({ranges})"
