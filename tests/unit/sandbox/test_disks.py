"""Per-sandbox disk copies: holes stay holes, data is exact, nothing is left half-made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError, HostError
from pyvmm.sandbox import disks

MIB = 1 << 20


def sparse_image(path: Path) -> bytes:
    """8 MiB with data at 1 MiB and 5 MiB, holes elsewhere; returns the whole content."""
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(MIB)
        f.write(b"A" * 70_000)
        f.seek(5 * MIB)
        f.write(os.urandom(4096))
    return path.read_bytes()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_copy_is_byte_identical_and_stays_sparse(tmp_path: Path) -> None:
    content = sparse_image(tmp_path / "src.img")
    how = disks.clone_file(tmp_path / "src.img", tmp_path / "dst.img")
    assert how in ("reflink", "copy")
    assert (tmp_path / "dst.img").read_bytes() == content
    assert allocated(tmp_path / "dst.img") < 2 * MIB  # not 8 MiB of zeros
    assert oct(os.stat(tmp_path / "dst.img").st_mode & 0o777) == "0o600"


def test_writing_the_copy_leaves_the_source_alone(tmp_path: Path) -> None:
    content = sparse_image(tmp_path / "src.img")
    disks.clone_file(tmp_path / "src.img", tmp_path / "dst.img")
    with open(tmp_path / "dst.img", "r+b") as f:
        f.write(b"sandbox wrote this")
    assert (tmp_path / "src.img").read_bytes() == content


def test_given_extents_are_all_that_is_copied(tmp_path: Path) -> None:
    sparse_image(tmp_path / "src.img")
    disks.clone_file(tmp_path / "src.img", tmp_path / "dst.img", [(MIB, MIB + 4096)], mode=0o644)
    copy = (tmp_path / "dst.img").read_bytes()
    assert copy[MIB : MIB + 4096] == b"A" * 4096 and copy[MIB + 4096 :] == bytes(7 * MIB - 4096)
    assert oct(os.stat(tmp_path / "dst.img").st_mode & 0o777) == "0o644"


def test_scan_and_seek_agree_on_where_the_data_is(tmp_path: Path) -> None:
    sparse_image(tmp_path / "src.img")
    scanned = disks.scan_extents(tmp_path / "src.img")
    assert scanned == [(MIB, MIB + 2 * disks.SCAN_BLOCK), (5 * MIB, 5 * MIB + disks.SCAN_BLOCK)]
    for start, end in disks.data_extents(tmp_path / "src.img"):  # filesystem granularity
        assert any(s <= start < e or start <= s < end for s, e in scanned)


def test_an_extent_outside_the_file_fails_and_leaves_nothing(tmp_path: Path) -> None:
    sparse_image(tmp_path / "src.img")
    with pytest.raises(HostError, match="cannot copy"):
        disks.clone_file(tmp_path / "src.img", tmp_path / "dst.img", [(0, 100 * MIB)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.img"]


def test_only_regular_files_are_copied(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for source in ("fifo", "dir", "missing"):
        with pytest.raises(ConfigError):
            disks.clone_file(tmp_path / source, tmp_path / "dst.img")
    assert not (tmp_path / "dst.img").exists()
