"""The tar dialect of put/get: headers, numbers, long names, and agreement with tarfile."""

from __future__ import annotations

import io
import tarfile

import pytest

from pyvmm.sandbox import tarformat as t


@pytest.mark.parametrize(
    ("value", "width"), [(0, 8), (0o7777777, 8), (8**7, 8), (8**11 - 1, 12), (2**40, 12)]
)
def test_numbers_round_trip(value: int, width: int) -> None:
    field = t.encode_number(value, width)
    assert len(field) == width
    assert t.decode_number(field) == value
    assert (field[0] == 0x80) == (value >= 8 ** (width - 1))  # base-256 only when octal cannot


@pytest.mark.parametrize(
    "field",
    [b"12x\0\0\0\0\0", b"\xff" * 8, b"1 2\0\0\0\0\0", b"\x81" + bytes(7), b"1\x002\0\0\0\0\0"],
)
def test_malformed_numbers(field: bytes) -> None:
    with pytest.raises(ValueError):
        t.decode_number(field)


def test_header_round_trip_and_checksum() -> None:
    block = t.encode_header(b"top/file", t.REGULAR, 0o4755, 12345, 1_700_000_000)
    header = t.parse_header(block)
    assert header == t.Header(b"top/file", t.REGULAR, 0o4755, 12345, 1_700_000_000, b"", b"")
    corrupt = bytearray(block)
    corrupt[0] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        t.parse_header(bytes(corrupt))
    assert t.parse_header(bytes(t.BLOCK)) is None


def test_long_names_and_links_are_read_by_tarfile() -> None:
    name = b"top/" + b"n" * 300
    link = b"../" * 60
    data = b"hello"
    stream = (
        t.encode_member(b"top", t.DIRECTORY, 0o750, 0, 5)
        + t.encode_member(name, t.REGULAR, 0o640, len(data), 6)
        + data
        + t.padding(len(data))
        + t.encode_member(b"top/l", t.SYMLINK, 0o777, 0, 7, link)
        + t.END_OF_ARCHIVE
    )
    with tarfile.open(fileobj=io.BytesIO(stream)) as archive:
        members = archive.getmembers()
        assert [(m.name, m.type, m.mode, m.mtime) for m in members] == [
            ("top", tarfile.DIRTYPE, 0o750, 5),
            (name.decode(), tarfile.REGTYPE, 0o640, 6),
            ("top/l", tarfile.SYMTYPE, 0o777, 7),
        ]
        assert members[2].linkname == link.decode()
        assert archive.extractfile(members[1]).read() == data


def test_tarfile_gnu_headers_parse() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("x/y")
        info.size, info.mode, info.mtime = 3, 0o600, 99
        archive.addfile(info, io.BytesIO(b"abc"))
    header = t.parse_header(out.getvalue()[: t.BLOCK])
    assert (header.name, header.kind, header.mode, header.size, header.mtime) == (
        b"x/y",
        t.REGULAR,
        0o600,
        3,
        99,
    )


def test_posix_prefix_is_reported() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        archive.addfile(tarfile.TarInfo("p" * 120 + "/name"))
    header = t.parse_header(out.getvalue()[: t.BLOCK])
    assert header.posix_prefix == b"p" * 120
    assert header.name == b"name"
