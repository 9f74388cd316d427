"""bzImage: parse the setup header and plan the 64-bit boot protocol load.

pyvmm skips the real-mode setup code entirely: it copies the protected-mode
part of the image (everything after the ``(setup_sects + 1) * 512`` setup
bytes) to 1 MiB and enters it at the 64-bit entry point, load address +
0x200, with a zero page it built itself. That needs boot protocol 2.12
(``xloadflags``, which says the 64-bit entry exists) and ``XLF_KERNEL_64``.
"""

from __future__ import annotations

from typing import BinaryIO

from pyvmm import layout
from pyvmm.boot.cpu_state import BootMode
from pyvmm.boot.files import read_at
from pyvmm.boot.image import (
    KernelFormat,
    KernelImage,
    LoadSegment,
)
from pyvmm.boot.setup_header import (
    SETUP_HEADER_MAGIC,
    SETUP_HEADER_START,
    XLF_KERNEL_64,
    SetupHeader,
    header_length_end,
    parse_setup_header,
    protocol_str,
)
from pyvmm.errors import KernelImageError

MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, hence a declared 64-bit entry point
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects == 0 means 4, for ancient compatibility
ENTRY_64_OFFSET = 0x200  # startup_64 relative to the protected-mode load address
SYSSIZE_UNIT = 16  # syssize counts 16-byte paragraphs
# The header must end before boot_params.edd_mbr_sig_buffer (0x290).
MAX_HEADER_END = 0x290
# boot.rst: the initrd limit when a header does not give one.
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF
_HEAD_BYTES = 0x400  # the header always lies in the first two sectors


def is_bzimage(head: bytes) -> bool:
    """True if ``head`` (the file's first bytes) carries the "HdrS" magic at 0x202."""
    return head[0x202:0x206] == SETUP_HEADER_MAGIC


def parse(f: BinaryIO, path: str, size: int) -> KernelImage:
    """Validate the bzImage in ``f`` and plan its load; writes nothing."""
    head = read_at(f, 0, _HEAD_BYTES)
    header_end = header_length_end(head)
    if header_end > MAX_HEADER_END:
        raise KernelImageError(
            f"kernel image {path}: setup header claims to end at {header_end:#x}, "
            f"past {MAX_HEADER_END:#x}; the image is corrupt"
        )
    if size < header_end:
        raise KernelImageError(
            f"kernel image {path} is truncated: {size} bytes, shorter than its setup header"
        )
    header = parse_setup_header(head[:header_end])
    if header.version < MIN_PROTOCOL:
        raise KernelImageError(
            f"kernel image {path}: bzImage boot protocol {protocol_str(header.version)} is "
            f"too old; pyvmm needs >= {protocol_str(MIN_PROTOCOL)}"
        )
    if not header.xloadflags & XLF_KERNEL_64:
        raise KernelImageError(
            f"kernel image {path} has no 64-bit entry point (XLF_KERNEL_64 is not set "
            "in xloadflags); pyvmm boots only x86_64 kernels"
        )
    setup_size = ((header.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE
    # syssize 0 (never seen in a real image) would mean "the rest of the file".
    payload_size = header.syssize * SYSSIZE_UNIT if header.syssize else size - setup_size
    needed = setup_size + max(payload_size, 1)
    if size < needed:
        raise KernelImageError(
            f"kernel image {path} is truncated: its header describes at least "
            f"{needed} bytes, the file has {size}"
        )
    alignment = header.kernel_alignment
    if header.relocatable_kernel and (alignment == 0 or alignment & (alignment - 1)):
        raise KernelImageError(
            f"kernel image {path}: kernel_alignment {alignment:#x} is not a power of two"
        )
    load_addr = layout.HIMEM_START
    runtime_start = runtime_start_address(header, load_addr)
    init_size = header.init_size or payload_size
    return KernelImage(
        path=path,
        format=KernelFormat.BZIMAGE,
        mode=BootMode.LINUX_64,
        entry=load_addr + ENTRY_64_OFFSET,
        segments=(LoadSegment(setup_size, payload_size, load_addr, payload_size),),
        runtime_start=runtime_start,
        runtime_end=runtime_start + init_size,
        cmdline_limit=header.cmdline_size,
        initrd_addr_max=header.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX,
        header=header,
        setup_header_bytes=bytes(head[SETUP_HEADER_START:header_end]),
    )


def runtime_start_address(header: SetupHeader, load_addr: int) -> int:
    """Where the kernel will decompress and run (boot.rst, "init_size").

    A relocatable kernel runs at its load address raised to at least
    ``pref_address`` and aligned up to ``kernel_alignment``; any other runs at
    ``pref_address``. From there it needs ``init_size`` bytes of RAM before
    it has read the memory map.
    """
    if not header.relocatable_kernel:
        return header.pref_address
    start = max(load_addr, header.pref_address)
    alignment = header.kernel_alignment
    return (start + alignment - 1) & ~(alignment - 1)
