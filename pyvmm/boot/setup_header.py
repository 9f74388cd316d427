"""``struct setup_header``: the Linux x86 boot protocol header, declared once.

The header sits at the same offsets in a bzImage file and in the zero page
(``struct boot_params``), so one table serves both the bzImage parser and the
zero-page writer. Offsets and meanings are those of the kernel's
Documentation/arch/x86/boot.rst. The table is checked for gaps at import, so
a typo in a size code cannot silently shift every later field.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

SETUP_HEADER_START = 0x1F1
# Offset of the jump instruction whose second byte gives the header's length.
SETUP_HEADER_JUMP = 0x200
SETUP_HEADER_MAGIC = b"HdrS"
BOOT_FLAG_MAGIC = 0xAA55

# (offset, struct code, name), in order and without gaps.
_LAYOUT: tuple[tuple[int, str, str], ...] = (
    (0x1F1, "B", "setup_sects"),
    (0x1F2, "H", "root_flags"),
    (0x1F4, "I", "syssize"),
    (0x1F8, "H", "ram_size"),
    (0x1FA, "H", "vid_mode"),
    (0x1FC, "H", "root_dev"),
    (0x1FE, "H", "boot_flag"),
    (0x200, "H", "jump"),
    (0x202, "4s", "header"),
    (0x206, "H", "version"),
    (0x208, "I", "realmode_swtch"),
    (0x20C, "H", "start_sys_seg"),
    (0x20E, "H", "kernel_version"),
    (0x210, "B", "type_of_loader"),
    (0x211, "B", "loadflags"),
    (0x212, "H", "setup_move_size"),
    (0x214, "I", "code32_start"),
    (0x218, "I", "ramdisk_image"),
    (0x21C, "I", "ramdisk_size"),
    (0x220, "I", "bootsect_kludge"),
    (0x224, "H", "heap_end_ptr"),
    (0x226, "B", "ext_loader_ver"),
    (0x227, "B", "ext_loader_type"),
    (0x228, "I", "cmd_line_ptr"),
    (0x22C, "I", "initrd_addr_max"),
    (0x230, "I", "kernel_alignment"),
    (0x234, "B", "relocatable_kernel"),
    (0x235, "B", "min_alignment"),
    (0x236, "H", "xloadflags"),
    (0x238, "I", "cmdline_size"),
    (0x23C, "I", "hardware_subarch"),
    (0x240, "Q", "hardware_subarch_data"),
    (0x248, "I", "payload_offset"),
    (0x24C, "I", "payload_length"),
    (0x250, "Q", "setup_data"),
    (0x258, "Q", "pref_address"),
    (0x260, "I", "init_size"),
    (0x264, "I", "handover_offset"),
    (0x268, "I", "kernel_info_offset"),
)
SETUP_HEADER_END = 0x26C  # end of the protocol 2.15 header

# loadflags bits
LOADED_HIGH = 0x01
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80

# xloadflags bits
XLF_KERNEL_64 = 0x01  # has the 64-bit entry point at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

TYPE_OF_LOADER_UNDEFINED = 0xFF  # a boot loader without an assigned id


class SetupHeader(NamedTuple):
    """The parsed header; field order is that of ``_LAYOUT``."""

    setup_sects: int
    root_flags: int
    syssize: int
    ram_size: int
    vid_mode: int
    root_dev: int
    boot_flag: int
    jump: int
    header: bytes
    version: int
    realmode_swtch: int
    start_sys_seg: int
    kernel_version: int
    type_of_loader: int
    loadflags: int
    setup_move_size: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    bootsect_kludge: int
    heap_end_ptr: int
    ext_loader_ver: int
    ext_loader_type: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    hardware_subarch_data: int
    payload_offset: int
    payload_length: int
    setup_data: int
    pref_address: int
    init_size: int
    handover_offset: int
    kernel_info_offset: int


def _check_layout() -> tuple[struct.Struct, dict[str, tuple[int, struct.Struct]]]:
    offset = SETUP_HEADER_START
    fields: dict[str, tuple[int, struct.Struct]] = {}
    for field_offset, code, name in _LAYOUT:
        if field_offset != offset:
            raise AssertionError(f"setup_header.{name} at {field_offset:#x}, expected {offset:#x}")
        fmt = struct.Struct("<" + code)
        fields[name] = (field_offset, fmt)
        offset += fmt.size
    if offset != SETUP_HEADER_END or tuple(fields) != SetupHeader._fields:
        raise AssertionError("setup_header layout and SetupHeader fields disagree")
    return struct.Struct("<" + "".join(code for _, code, _ in _LAYOUT)), fields


_HEADER_STRUCT, FIELDS = _check_layout()


def parse_setup_header(image_start: bytes) -> SetupHeader:
    """Parse the header from the first bytes of a bzImage (or a zero page).

    Bytes missing at the end (an older, shorter header) read as zero, which
    is what the protocol says those fields mean.
    """
    chunk = bytes(image_start[SETUP_HEADER_START:SETUP_HEADER_END])
    chunk = chunk.ljust(_HEADER_STRUCT.size, b"\0")
    return SetupHeader._make(_HEADER_STRUCT.unpack(chunk))


def header_length_end(image_start: bytes) -> int:
    """Where the header ends, per the jump at 0x200: 0x202 + its displacement byte."""
    return SETUP_HEADER_JUMP + 2 + image_start[SETUP_HEADER_JUMP + 1]


def put_field(buf: bytearray, name: str, value: int | bytes) -> None:
    """Write one header field into a zero-page buffer at its boot_params offset."""
    offset, fmt = FIELDS[name]
    fmt.pack_into(buf, offset, value)


def get_field(buf: bytes | bytearray, name: str) -> int | bytes:
    """Read one header field from a zero-page (or bzImage) buffer."""
    offset, fmt = FIELDS[name]
    return fmt.unpack_from(buf, offset)[0]


def protocol_str(version: int) -> str:
    """0x020C -> "2.12": the minor number is written in decimal in the docs."""
    return f"{version >> 8}.{version & 0xFF:02d}"
