"""The newc cpio writer and reader: exact headers, padding, order, round trips."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest

from pyvmm.guestkit.cpio import (
    HEADER_SIZE,
    CpioEntry,
    CpioWriter,
    encode_entry,
    normalize_name,
    read_cpio,
)


def _fields(header: bytes) -> list[int]:
    return [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]


def test_single_file_header_is_byte_exact() -> None:
    entry = CpioEntry("init", stat.S_IFREG | 0o755, uid=0, gid=0, mtime=0, data=b"abc", ino=1)
    raw = encode_entry(entry)
    # magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    # rdevmajor, rdevminor, namesize ("init\0" = 5), check
    expected_header = (
        b"070701"
        b"00000001"
        b"000081ED"
        b"00000000"
        b"00000000"
        b"00000001"
        b"00000000"
        b"00000003"
        b"00000000"
        b"00000000"
        b"00000000"
        b"00000000"
        b"00000005"
        b"00000000"
    )
    assert raw[:HEADER_SIZE] == expected_header
    # 110 + 5 = 115 -> name padded to 116, then 3 data bytes padded to 4.
    assert raw[HEADER_SIZE:116] == b"init\0\0"
    assert raw[116:] == b"abc\0"
    assert len(raw) % 4 == 0


def test_archive_ends_with_the_trailer() -> None:
    data = CpioWriter().to_bytes()
    assert data.startswith(b"070701")
    assert b"TRAILER!!!\0" in data
    fields = _fields(data[:HEADER_SIZE])
    assert fields[4] == 1  # nlink
    assert fields[11] == len("TRAILER!!!") + 1
    assert len(data) % 4 == 0
    assert read_cpio(data) == []


def test_round_trip_of_every_entry_kind() -> None:
    w = CpioWriter(mtime=1234)
    w.add_file("/bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, mode=0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_dir("tmp", mode=0o1777)
    w.add_device("dev/console", "c", 5, 1)
    w.add_device("dev/vda", "b", 254, 0, mode=0o660, gid=6)
    w.add_file("etc/hello", b"hi\n", uid=1000, gid=1000)
    entries = {e.name: e for e in read_cpio(w.to_bytes())}

    assert set(entries) == {
        "bin",
        "bin/busybox",
        "bin/sh",
        "dev",
        "dev/console",
        "dev/vda",
        "etc",
        "etc/hello",
        "tmp",
    }
    busybox = entries["bin/busybox"]
    assert busybox.is_file and busybox.permissions == 0o755
    assert busybox.data == b"\x7fELF" + bytes(range(256)) * 3
    assert busybox.mtime == 1234
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"busybox"
    assert entries["bin"].is_dir and entries["bin"].permissions == 0o755  # implied parent
    assert entries["tmp"].permissions == 0o1777
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)
    assert console.permissions == 0o600
    vda = entries["dev/vda"]
    assert stat.S_ISBLK(vda.mode) and (vda.rdevmajor, vda.rdevminor) == (254, 0)
    assert vda.gid == 6
    assert (entries["etc/hello"].uid, entries["etc/hello"].gid) == (1000, 1000)


def test_output_is_sorted_parents_first_with_sequential_inodes() -> None:
    w = CpioWriter()
    w.add_file("z/file", b"1")
    w.add_file("a/b/c", b"2")
    w.add_file("a-b", b"3")
    names = [e.name for e in read_cpio(w.to_bytes())]
    assert names == ["a", "a/b", "a/b/c", "a-b", "z", "z/file"]
    assert [e.ino for e in read_cpio(w.to_bytes())] == [1, 2, 3, 4, 5, 6]


def test_output_is_independent_of_insertion_order() -> None:
    first = CpioWriter()
    first.add_file("b", b"x")
    first.add_symlink("a", "b")
    second = CpioWriter()
    second.add_symlink("a", "b")
    second.add_file("b", b"x")
    assert first.to_bytes() == second.to_bytes()


def test_directories_have_two_links_and_files_one() -> None:
    w = CpioWriter()
    w.add_file("d/f", b"")
    entries = {e.name: e for e in read_cpio(w.to_bytes())}
    assert entries["d"].nlink == 2
    assert entries["d/f"].nlink == 1


def test_duplicate_paths_and_bad_names_are_rejected() -> None:
    w = CpioWriter()
    w.add_file("x", b"")
    with pytest.raises(ValueError, match="added twice"):
        w.add_file("/x", b"")
    with pytest.raises(ValueError):
        w.add_dir("x")
    for bad in ("", "/", "a/../b", "a/..", "."):
        with pytest.raises(ValueError):
            normalize_name(bad)
    with pytest.raises(ValueError):
        w.add_device("dev/x", "p", 1, 1)
    with pytest.raises(ValueError):
        w.add_file("y", b"", mode=stat.S_IFREG | 0o644)


def test_a_file_cannot_be_a_parent() -> None:
    w = CpioWriter()
    w.add_symlink("sbin", "bin")
    w.add_file("sbin/x", b"")
    with pytest.raises(ValueError, match="no directory"):
        w.to_bytes()


def test_re_adding_a_directory_updates_its_mode() -> None:
    w = CpioWriter()
    w.add_dir("root")
    w.add_dir("root", mode=0o700)
    (entry,) = read_cpio(w.to_bytes())
    assert entry.permissions == 0o700


def test_reader_rejects_garbage_and_truncation() -> None:
    data = CpioWriter().to_bytes()
    with pytest.raises(ValueError, match="magic"):
        read_cpio(b"x" * 200)
    with pytest.raises(ValueError, match="truncated"):
        read_cpio(data[:50])
    w = CpioWriter()
    w.add_file("f", b"12345678")
    with pytest.raises(ValueError):
        read_cpio(w.to_bytes()[:-130])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is not installed")
def test_gnu_cpio_lists_our_archive(tmp_path) -> None:
    w = CpioWriter()
    w.add_file("bin/tool", b"#!/bin/sh\n", mode=0o755)
    w.add_symlink("bin/sh", "tool")
    w.add_device("dev/console", "c", 5, 1)
    proc = subprocess.run(
        ["cpio", "-t", "--quiet"], input=w.to_bytes(), capture_output=True, check=True
    )
    assert proc.stdout.decode().split() == ["bin", "bin/sh", "bin/tool", "dev", "dev/console"]
