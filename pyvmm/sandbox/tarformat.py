"""The tar dialect of PUT and GET: one 512-byte header at a time (pure functions).

``guest/agent/PROTOCOL.md`` ("Tar streams") defines it: ustar headers with
GNU magic, GNU long names (type ``L``) and long link targets (``K``), numbers
in octal or GNU base-256, and only regular files, directories and symlinks
as members. It is what GNU tar and Python's ``tarfile`` (GNU format) write,
so both ends can be checked against independent implementations; it is
written here rather than with ``tarfile`` because the reading side must cap
every buffer it keeps for a hostile peer (``tarfile`` reads a whole long-name
or pax member into memory, whatever size its header claims).
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 512
NAME_FIELD = 100
PREFIX_FIELD = 155
LONG_LINK_NAME = b"././@LongLink"
GNU_MAGIC = b"ustar  \0"
POSIX_MAGIC = b"ustar\0"
#: Two zero blocks end an archive.
END_OF_ARCHIVE = bytes(2 * BLOCK)

REGULAR = b"0"
DIRECTORY = b"5"
SYMLINK = b"2"
LONG_NAME = b"L"
LONG_LINK = b"K"

_MODE, _UID, _GID, _SIZE, _MTIME, _CHKSUM, _TYPE, _LINK, _MAGIC, _PREFIX = (
    (100, 8),
    (108, 8),
    (116, 8),
    (124, 12),
    (136, 12),
    (148, 8),
    (156, 1),
    (157, 100),
    (257, 8),
    (345, 155),
)


@dataclass(frozen=True)
class Header:
    """One parsed header block (a long name or link is still a separate member here)."""

    name: bytes
    kind: bytes
    mode: int
    size: int
    mtime: int
    link: bytes
    posix_prefix: bytes


def padding(size: int) -> bytes:
    """Zeros that round ``size`` bytes of member data up to whole blocks."""
    return bytes(-size % BLOCK)


def encode_number(value: int, width: int) -> bytes:
    """Octal with a NUL when it fits in ``width - 1`` digits, else GNU base-256."""
    if value < 0:
        raise ValueError(f"tar numbers are not negative here ({value})")
    if value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if value >= 256 ** (width - 1):
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return b"\x80" + value.to_bytes(width - 1, "big")


def decode_number(field: bytes) -> int:
    """An octal or positive base-256 number field; ValueError if it is neither."""
    if field[0] & 0x80:
        if field[0] != 0x80:
            raise ValueError("negative or malformed base-256 number")
        return int.from_bytes(field[1:], "big")
    text = field.strip(b" \0")
    if text and not all(0x30 <= c <= 0x37 for c in text):
        raise ValueError(f"malformed octal number {field!r}")
    if b"\0" in field.rstrip(b" \0") or b" " in text:
        raise ValueError(f"malformed octal number {field!r}")
    return int(text, 8) if text else 0


def encode_header(
    name: bytes, kind: bytes, mode: int, size: int, mtime: int, link: bytes = b""
) -> bytes:
    """One header block; ``name`` and ``link`` are cut at 100 bytes (see :func:`encode_member`)."""
    block = bytearray(BLOCK)
    block[0 : len(name[:NAME_FIELD])] = name[:NAME_FIELD]
    for (offset, width), value in (
        (_MODE, mode & 0o7777),
        (_UID, 0),
        (_GID, 0),
        (_SIZE, size),
        (_MTIME, max(0, mtime)),
    ):
        block[offset : offset + width] = encode_number(value, width)
    block[_TYPE[0]] = kind[0]
    block[_LINK[0] : _LINK[0] + len(link[:NAME_FIELD])] = link[:NAME_FIELD]
    block[_MAGIC[0] : _MAGIC[0] + 8] = GNU_MAGIC
    block[_CHKSUM[0] : _CHKSUM[0] + 8] = b" " * 8
    block[_CHKSUM[0] : _CHKSUM[0] + 8] = b"%06o\0 " % sum(block)
    return bytes(block)


def encode_member(
    name: bytes, kind: bytes, mode: int, size: int, mtime: int, link: bytes = b""
) -> bytes:
    """A member's header(s): GNU long-name and long-link members first when needed."""
    out = b""
    for long_kind, text in ((LONG_NAME, name), (LONG_LINK, link)):
        if len(text) > NAME_FIELD:
            data = text + b"\0"
            out += encode_header(LONG_LINK_NAME, long_kind, 0, len(data), 0) + data
            out += padding(len(data))
    return out + encode_header(name, kind, mode, size, mtime, link)


def parse_header(block: bytes) -> Header | None:
    """A header block, or None for a zero block; ValueError if it is corrupt."""
    if len(block) != BLOCK:
        raise ValueError(f"a tar header is {BLOCK} bytes, not {len(block)}")
    if not any(block):
        return None
    offset, width = _CHKSUM
    stored = decode_number(block[offset : offset + width])
    computed = sum(block[:offset]) + 8 * 0x20 + sum(block[offset + width :])
    if stored != computed:
        raise ValueError("bad header checksum")

    def number(field: tuple[int, int]) -> int:
        return decode_number(block[field[0] : field[0] + field[1]])

    def text(field: tuple[int, int]) -> bytes:
        return block[field[0] : field[0] + field[1]].split(b"\0", 1)[0]

    magic = block[_MAGIC[0] : _MAGIC[0] + 6]
    return Header(
        name=block[:NAME_FIELD].split(b"\0", 1)[0],
        kind=block[_TYPE[0] : _TYPE[0] + 1],
        mode=number(_MODE),
        size=number(_SIZE),
        mtime=number(_MTIME),
        link=text(_LINK),
        posix_prefix=text(_PREFIX) if magic == POSIX_MAGIC else b"",
    )
