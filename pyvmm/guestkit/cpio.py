"""A cpio "newc" archive writer (and a small reader), for initramfs images.

Why our own: the kernel unpacks an initramfs from the "newc" format
(magic ``070701``), and writing it in Python lets us put device nodes such as
``/dev/console`` in the image without being root and without the ``cpio``
tool, and makes the output a pure function of its inputs: entries are sorted
by path, inode numbers are assigned in that order, and every timestamp is the
archive's fixed ``mtime`` (0 by default). Two builds from the same inputs are
byte-identical, which is what lets the initramfs cache key on content.

Format (one entry): a 110-byte ASCII header, ``070701`` then 13 fields of
8 hex digits (ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
devminor, rdevmajor, rdevminor, namesize, check), then the NUL-terminated
name padded to a multiple of 4 bytes (counted from the header's start), then
the data padded to 4. A symlink's data is its target. The archive ends with
an entry named ``TRAILER!!!``. Hard links are never written: every file has
``nlink == 1``, so the kernel never tries to link entries together.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

NEWC_MAGIC = b"070701"
NEWC_CRC_MAGIC = b"070702"  # same layout plus a checksum; read, never written
TRAILER_NAME = "TRAILER!!!"
HEADER_SIZE = 110
ALIGN = 4
_FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)
_MAX_FIELD = 0xFFFFFFFF


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` is a full ``st_mode`` (type bits included)."""

    name: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    rdevmajor: int = 0
    rdevminor: int = 0
    ino: int = 0
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_device(self) -> bool:
        return stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode)

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)


def normalize_name(path: str) -> str:
    """``/bin/sh`` -> ``bin/sh``; rejects empty, ``.`` and ``..`` components."""
    parts = PurePosixPath(path.lstrip("/")).parts
    if not parts or any(p in (".", "..") for p in parts) or "\0" in path:
        raise ValueError(f"invalid archive path {path!r}")
    return "/".join(parts)


class CpioWriter:
    """Collects entries, then :meth:`to_bytes` writes them sorted and padded.

    Parent directories that were not added explicitly are created with mode
    0755, so ``add_file("lib/modules/x.ko", ...)`` alone gives a loadable
    tree (the kernel does not create missing parents while unpacking).
    """

    def __init__(self, mtime: int = 0) -> None:
        self.mtime = mtime
        self._entries: dict[str, CpioEntry] = {}

    def __contains__(self, path: str) -> bool:
        return normalize_name(path) in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries, key=_sort_key)

    def add_file(
        self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> None:
        self._add(path, stat.S_IFREG | _perm(mode), uid, gid, bytes(data))

    def add_dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        name = normalize_name(path)
        existing = self._entries.get(name)
        if existing is not None and not existing.is_dir:
            raise ValueError(f"archive path {name!r} already exists and is not a directory")
        self._entries.pop(name, None)  # a directory may be re-added with new attributes
        self._add(name, stat.S_IFDIR | _perm(mode), uid, gid, b"")

    def add_symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> None:
        if not target or "\0" in target:
            raise ValueError(f"invalid symlink target {target!r} for {path!r}")
        self._add(path, stat.S_IFLNK | 0o777, uid, gid, target.encode())

    def add_device(
        self,
        path: str,
        kind: str,
        major: int,
        minor: int,
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        """A device node; ``kind`` is ``"c"`` (character) or ``"b"`` (block)."""
        if kind not in ("c", "b"):
            raise ValueError(f"device kind must be 'c' or 'b', not {kind!r}")
        file_type = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self._add(path, file_type | _perm(mode), uid, gid, b"", major, minor)

    def _add(
        self,
        path: str,
        mode: int,
        uid: int,
        gid: int,
        data: bytes,
        rdevmajor: int = 0,
        rdevminor: int = 0,
    ) -> None:
        name = normalize_name(path)
        if name in self._entries:
            raise ValueError(f"archive path {name!r} added twice")
        for value in (uid, gid, rdevmajor, rdevminor, len(data)):
            _check_field(value, name)
        self._entries[name] = CpioEntry(
            name, mode, uid, gid, self.mtime, data, rdevmajor, rdevminor
        )

    def entries(self) -> list[CpioEntry]:
        """Every entry in archive order, implied parent directories included."""
        entries = dict(self._entries)
        for name in list(entries):
            parent = PurePosixPath(name).parent
            while str(parent) != ".":
                key = str(parent)
                if key not in entries:
                    entries[key] = CpioEntry(key, stat.S_IFDIR | 0o755, mtime=self.mtime)
                elif not entries[key].is_dir:
                    raise ValueError(
                        f"archive path {key!r} is a parent of {name!r} but no directory"
                    )
                parent = parent.parent
        ordered = sorted(entries.values(), key=lambda e: _sort_key(e.name))
        return [
            CpioEntry(
                e.name,
                e.mode,
                e.uid,
                e.gid,
                e.mtime,
                e.data,
                e.rdevmajor,
                e.rdevminor,
                ino=index,
                nlink=2 if e.is_dir else 1,
            )
            for index, e in enumerate(ordered, start=1)
        ]

    def to_bytes(self) -> bytes:
        out = bytearray()
        for entry in self.entries():
            out += encode_entry(entry)
        out += encode_entry(CpioEntry(TRAILER_NAME, 0, nlink=1))
        return bytes(out)


def encode_entry(entry: CpioEntry) -> bytes:
    """One newc header, name and data, each padded to 4 bytes."""
    name = entry.name.encode() + b"\0"
    values = {
        "ino": entry.ino,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "nlink": entry.nlink,
        "mtime": entry.mtime,
        "filesize": len(entry.data),
        "devmajor": 0,
        "devminor": 0,
        "rdevmajor": entry.rdevmajor,
        "rdevminor": entry.rdevminor,
        "namesize": len(name),
        "check": 0,
    }
    for field, value in values.items():
        _check_field(value, f"{entry.name} ({field})")
    header = NEWC_MAGIC + b"".join(b"%08X" % values[field] for field in _FIELDS)
    out = bytearray(header + name)
    out += b"\0" * _pad(len(out))
    out += entry.data
    out += b"\0" * _pad(len(entry.data))
    return bytes(out)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive up to its trailer (for tests and inspection).

    Raises ValueError on a bad magic, a truncated entry or a missing trailer.
    """
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(data):
            raise ValueError(f"cpio archive truncated at offset {pos}: no trailer")
        magic = data[pos : pos + 6]
        if magic not in (NEWC_MAGIC, NEWC_CRC_MAGIC):
            raise ValueError(f"bad cpio magic {magic!r} at offset {pos}")
        try:
            fields = {
                field: int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16)
                for i, field in enumerate(_FIELDS)
            }
        except ValueError:
            raise ValueError(f"bad hex field in the cpio header at offset {pos}") from None
        name_start = pos + HEADER_SIZE
        name_end = name_start + fields["namesize"]
        if fields["namesize"] == 0 or name_end > len(data):
            raise ValueError(f"cpio entry at offset {pos} has a truncated name")
        name = data[name_start : name_end - 1].decode("utf-8", "surrogateescape")
        data_start = name_end + _pad(name_end - pos)
        data_end = data_start + fields["filesize"]
        if data_end > len(data):
            raise ValueError(f"cpio entry {name!r} is truncated")
        if name == TRAILER_NAME:
            return entries
        entries.append(
            CpioEntry(
                name=name,
                mode=fields["mode"],
                uid=fields["uid"],
                gid=fields["gid"],
                mtime=fields["mtime"],
                data=data[data_start:data_end],
                rdevmajor=fields["rdevmajor"],
                rdevminor=fields["rdevminor"],
                ino=fields["ino"],
                nlink=fields["nlink"],
            )
        )
        pos = data_end + _pad(data_end - pos)


def _pad(length: int) -> int:
    return -length % ALIGN


def _perm(mode: int) -> int:
    if mode & ~0o7777:
        raise ValueError(f"permission bits {mode:#o} carry a file type; pass only 0o7777 bits")
    return mode


def _check_field(value: int, what: str) -> None:
    if not 0 <= value <= _MAX_FIELD:
        raise ValueError(f"cpio field for {what} out of range: {value}")


def _sort_key(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))
