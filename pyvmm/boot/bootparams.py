"""The zero page (``struct boot_params``) for the Linux 64-bit boot protocol.

The page is built whole in a buffer and written once. Offsets are those of
Documentation/arch/x86/zero-page.rst; the embedded setup header uses the
table in :mod:`pyvmm.boot.setup_header`.

What is set, and why:

* bzImage: the kernel's own header (file bytes 0x1F1..) is copied in, so
  every field the kernel describes itself with (``init_size``,
  ``kernel_alignment``, ``xloadflags``...) reaches it unchanged.
* ELF vmlinux: there is no header, so a minimal one is made: boot flag,
  "HdrS", a protocol version, ``kernel_alignment`` and ``cmdline_size``.
* ``type_of_loader`` 0xFF (undefined loader), ``vid_mode`` 0xFFFF
  ("normal"), ``cmd_line_ptr``, ``ramdisk_image``/``ramdisk_size`` with the
  ``ext_`` high halves, the e820 table and, if given, ``acpi_rsdp_addr``.
* ``loadflags`` is left as the kernel set it. ``CAN_USE_HEAP`` and
  ``heap_end_ptr`` describe the heap of the real-mode setup code, which the
  64-bit entry skips; ``KEEP_SEGMENTS`` only concerns the 32-bit entry (and
  Linux ignores it since 5.9). Setting them would claim things pyvmm does
  not provide.
* ``sentinel`` (0x1EF) stays 0, or the kernel would think a broken loader
  left stale data and wipe fields.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyvmm.boot.e820 import E820Entry
from pyvmm.boot.image import KernelImage
from pyvmm.boot.setup_header import (
    BOOT_FLAG_MAGIC,
    SETUP_HEADER_MAGIC,
    SETUP_HEADER_START,
    TYPE_OF_LOADER_UNDEFINED,
    put_field,
)
from pyvmm.errors import KernelImageError

ZERO_PAGE_SIZE = 0x1000

# boot_params fields outside the setup header: name -> (offset, format).
FIELDS: dict[str, tuple[int, struct.Struct]] = {
    "acpi_rsdp_addr": (0x070, struct.Struct("<Q")),
    "ext_ramdisk_image": (0x0C0, struct.Struct("<I")),
    "ext_ramdisk_size": (0x0C4, struct.Struct("<I")),
    "ext_cmd_line_ptr": (0x0C8, struct.Struct("<I")),
    "e820_entries": (0x1E8, struct.Struct("<B")),
    "sentinel": (0x1EF, struct.Struct("<B")),
}
E820_TABLE_OFFSET = 0x2D0
E820_MAX_ENTRIES = 128  # E820_MAX_ENTRIES_ZEROPAGE
E820_ENTRY = struct.Struct("<QQI")  # struct boot_e820_entry, packed: 20 bytes

VID_MODE_NORMAL = 0xFFFF
# For a vmlinux there is no header to copy: claim the protocol whose fields
# pyvmm fills (2.12 added xloadflags and the ext_* halves) and the 16 MiB
# alignment a default x86_64 kernel is linked for.
ELF_PROTOCOL_VERSION = 0x020C
ELF_KERNEL_ALIGNMENT = 0x1000000

_LOW32 = 0xFFFFFFFF


def _put(buf: bytearray, name: str, value: int) -> None:
    offset, fmt = FIELDS[name]
    fmt.pack_into(buf, offset, value)


def encode_e820_table(entries: Sequence[E820Entry]) -> bytes:
    """The zero page's e820 table (only the used entries)."""
    if len(entries) > E820_MAX_ENTRIES:
        raise KernelImageError(
            f"memory map has {len(entries)} entries; the zero page holds {E820_MAX_ENTRIES}"
        )
    return b"".join(E820_ENTRY.pack(e.addr, e.size, int(e.type)) for e in entries)


def build_zero_page(
    kernel: KernelImage,
    *,
    cmdline_addr: int,
    initrd_addr: int,
    initrd_size: int,
    memory_map: Sequence[E820Entry],
    rsdp_addr: int = 0,
) -> bytes:
    """The 4096-byte zero page. ``initrd_size`` 0 means no initrd."""
    page = bytearray(ZERO_PAGE_SIZE)
    if kernel.setup_header_bytes:
        header = kernel.setup_header_bytes
        page[SETUP_HEADER_START : SETUP_HEADER_START + len(header)] = header
    else:
        put_field(page, "boot_flag", BOOT_FLAG_MAGIC)
        put_field(page, "header", SETUP_HEADER_MAGIC)
        put_field(page, "version", ELF_PROTOCOL_VERSION)
        put_field(page, "kernel_alignment", ELF_KERNEL_ALIGNMENT)
        # The header field states the kernel's limit (bzImage: its own value).
        put_field(page, "cmdline_size", kernel.cmdline_limit)
    put_field(page, "type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    put_field(page, "vid_mode", VID_MODE_NORMAL)
    put_field(page, "cmd_line_ptr", cmdline_addr & _LOW32)
    _put(page, "ext_cmd_line_ptr", cmdline_addr >> 32)
    put_field(page, "ramdisk_image", initrd_addr & _LOW32 if initrd_size else 0)
    put_field(page, "ramdisk_size", initrd_size & _LOW32)
    _put(page, "ext_ramdisk_image", initrd_addr >> 32 if initrd_size else 0)
    _put(page, "ext_ramdisk_size", initrd_size >> 32)
    _put(page, "acpi_rsdp_addr", rsdp_addr)
    table = encode_e820_table(memory_map)
    _put(page, "e820_entries", len(memory_map))
    page[E820_TABLE_OFFSET : E820_TABLE_OFFSET + len(table)] = table
    return bytes(page)
