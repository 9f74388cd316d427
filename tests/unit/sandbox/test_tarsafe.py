"""GET's extraction: a tar stream from the agent treated as hostile.

Every refused stream must give a one-line reason, leave nothing behind (no
staging directory, no destination) and write nothing outside the box the
destination lives in.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.errors import ConfigError
from pyvmm.sandbox import tarformat as t
from pyvmm.sandbox.errors import UnsafeArchiveError
from pyvmm.sandbox.tarsafe import (
    MAX_TRAILER,
    SafeExtractor,
    check_destination,
    make_staging,
    remove_tree,
)
from pyvmm.sandbox.tarwriter import TarWriter
from tests.unit.sandbox.hostile_tars import HOSTILE, d, f, s, tar

SENTINEL = b"must stay as it is\n"
TOP = t.encode_member(b"top", t.DIRECTORY, 0o755, 0, 0)


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """The destination's parent, holding one file that nothing may touch."""
    root = tmp_path / "box"
    root.mkdir()
    (root / "outside.txt").write_bytes(SENTINEL)
    return root


def extract(archive: bytes, dest: Path, *, chunk: int = 4096, max_files=1000, max_bytes=1 << 30):
    extractor = SafeExtractor(make_staging(dest), max_files=max_files, max_bytes=max_bytes)
    try:
        for start in range(0, len(archive), chunk):
            extractor.feed(archive[start : start + chunk])
        stats = extractor.finish()
        extractor.place(dest)
        return stats
    finally:
        extractor.close()


def assert_untouched(box: Path) -> None:
    assert sorted(os.listdir(box)) == ["outside.txt"]
    assert (box / "outside.txt").read_bytes() == SENTINEL
    assert not os.path.lexists("/tmp/pyvmm-tarsafe-evil")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_streams_are_refused_whole(box: Path, case: str) -> None:
    archive, reason = HOSTILE[case]
    with pytest.raises(UnsafeArchiveError) as exc:
        extract(archive, box / "dest")
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("refused the guest's tar stream: ")
    assert reason in message
    assert_untouched(box)


def test_refused_one_byte_at_a_time_too(box: Path) -> None:
    archive, _ = HOSTILE["symlink-then-file-through-it"]
    with pytest.raises(UnsafeArchiveError, match="goes through a symlink"):
        extract(archive, box / "dest", chunk=1)
    assert_untouched(box)


def test_round_trip_keeps_bytes_modes_and_mtimes(tmp_path: Path, box: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "empty").mkdir(parents=True)
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o750)
    (src / "sub" / "data").write_bytes(os.urandom(200_000))
    (src / "sub" / "data").chmod(0o600)
    (src / "sub" / "rel").symlink_to("../run.sh")
    (src / "sub" / "dangling").symlink_to("nowhere")
    (src / ("n" * 150)).write_bytes(b"long name")
    (src / "sub").chmod(0o705)
    for path in (src / "sub" / "data", src / "sub", src):
        os.utime(path, (1_234_567_890, 1_234_567_890))
    archive = b"".join(TarWriter(src, max_files=100, max_bytes=1 << 20).chunks())
    stats = extract(archive, box / "dest", chunk=777)
    assert (stats.entries, stats.content_bytes) == (8, 18 + 200_000 + 9)
    dest = box / "dest"
    for rel in ("run.sh", "sub/data", "n" * 150):
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
        assert stat.S_IMODE((dest / rel).stat().st_mode) == stat.S_IMODE((src / rel).stat().st_mode)
    assert os.readlink(dest / "sub" / "rel") == "../run.sh"
    assert os.readlink(dest / "sub" / "dangling") == "nowhere"
    assert stat.S_IMODE((dest / "sub").stat().st_mode) == 0o705
    assert (dest / "sub" / "empty").is_dir()
    for rel in ("sub/data", "sub", "."):
        assert int((dest / rel).stat().st_mtime) == 1_234_567_890
    assert sorted(os.listdir(box)) == ["dest", "outside.txt"]  # the staging directory is gone


def test_setuid_setgid_and_sticky_are_dropped(box: Path) -> None:
    extract(tar(d("top", 0o1777), f("top/suid", b"x", 0o6755)), box / "dest")
    assert stat.S_IMODE((box / "dest" / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((box / "dest").stat().st_mode) == 0o777


def test_single_file_replaces_a_file(box: Path) -> None:
    (box / "dest").write_bytes(b"old")
    extract(tar(f("whatever", b"new", 0o640)), box / "dest")
    assert (box / "dest").read_bytes() == b"new"
    assert stat.S_IMODE((box / "dest").stat().st_mode) == 0o640


def test_a_directory_does_not_replace_anything(box: Path) -> None:
    (box / "dest").write_bytes(b"old")
    with pytest.raises(ConfigError, match=r"cannot get a directory into .*dest: it exists"):
        extract(tar(d("top"), f("top/x", b"1")), box / "dest")
    assert (box / "dest").read_bytes() == b"old"
    assert sorted(os.listdir(box)) == ["dest", "outside.txt"]


def test_destination_checks(box: Path) -> None:
    (box / "dir").mkdir()
    with pytest.raises(ConfigError, match="it is an existing directory"):
        check_destination(box / "dir")
    with pytest.raises(ConfigError, match="is not an existing directory"):
        check_destination(box / "missing" / "x")
    check_destination(box / "new")
    check_destination(box / "outside.txt")


def test_caps_are_checked_before_writing(box: Path) -> None:
    many = tar(d("top"), *(f(f"top/{i}", b"x") for i in range(10)))
    with pytest.raises(UnsafeArchiveError, match=r"more than 5 entries \(max_files\)"):
        extract(many, box / "dest", max_files=5)
    assert_untouched(box)
    big = tar(d("top"), f("top/a", b"x" * 600), f("top/b", b"y" * 600))
    with pytest.raises(UnsafeArchiveError, match=r"'top/b' takes the files over 1000 bytes"):
        extract(big, box / "dest", max_bytes=1000)
    assert_untouched(box)
    # A header that claims 1 TiB is refused from the header alone.
    huge = t.encode_member(b"top", t.DIRECTORY, 0o755, 0, 0) + t.encode_member(
        b"top/x", t.REGULAR, 0o644, 1 << 40, 0
    )
    with pytest.raises(UnsafeArchiveError, match="max_bytes"):
        extract(huge, box / "dest")
    assert_untouched(box)


@pytest.mark.parametrize(
    ("archive", "reason"),
    [
        (tar(d("top"), f("top/x", b"abc"))[:1024], "ended before its end-of-archive"),
        (tar(d("top"))[:512], "ended before its end-of-archive"),
        (b"", "ended before its end-of-archive"),
        (bytes(1024), "holds no member"),
        (tar(d("top")) + b"\1", "data follows the end-of-archive"),
        (tar(d("top")) + bytes(MAX_TRAILER), "follow the end-of-archive"),
        (t.encode_member(b"x" * 5000, t.REGULAR, 0o644, 0, 0), "a long name of 5001 bytes"),
        (t.encode_header(b"top", t.DIRECTORY, 0o755, 10, 0) + bytes(512), "carries 10 bytes"),
        (t.encode_header(b"top", t.LONG_NAME, 0, 0, 0) + bytes(1024), "long name with no member"),
        (b"\1" * 512, "corrupt tar header"),
        (TOP + t.encode_member(b"top/" + b"c" * 300, t.REGULAR, 0, 0, 0), "component over 255"),
    ],
    ids=[
        "truncated-data", "truncated-members", "empty", "no-member", "data-after-end",
        "long-trailer", "huge-long-name", "dir-with-data", "orphan-long-name",
        "corrupt-header", "long-component",
    ],
)  # fmt: skip
def test_malformed_streams(box: Path, archive: bytes, reason: str) -> None:
    with pytest.raises(UnsafeArchiveError) as exc:
        extract(archive, box / "dest")
    assert reason in str(exc.value)
    assert "\n" not in str(exc.value)
    assert_untouched(box)


def test_inside_symlinks_are_kept(box: Path) -> None:
    archive = tar(
        d("top"), d("top/a"), d("top/a/b"), s("top/up", "a/b/.."), s("top/a/b/self", "."),
        s("top/a/b/top", "../.."), f("top/a/f", b"x"), s("top/a/b/via", "top/a/f"),
    )  # fmt: skip
    extract(archive, box / "dest")
    assert (box / "dest" / "a" / "b" / "via").read_bytes() == b"x"


def test_remove_tree_gets_through_read_only_directories(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x")
    (root / "a" / "l").symlink_to(tmp_path)  # never followed
    (tmp_path / "keep").write_bytes(b"k")
    (root / "a" / "b").chmod(0o500)
    (root / "a").chmod(0o000)
    remove_tree(root)
    assert not root.exists()
    assert (tmp_path / "keep").read_bytes() == b"k"


def _valid_stream() -> bytes:
    return tar(
        d("top"), d("top/a"), f("top/a/f", b"x" * 700), s("top/a/l", "f"),
        f("top/" + "n" * 120, b"long"), d("top/a/b", 0o500),
    )  # fmt: skip


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
    chunk=st.integers(1, 3000),
)
def test_corrupted_streams_extract_or_are_refused(
    tmp_path: Path, flips, cut: int, chunk: int
) -> None:
    """Any corruption of a valid stream ends in a clean extraction or an UnsafeArchiveError:
    never another exception, never a file outside the destination, never a leftover."""
    stream = bytearray(_valid_stream())
    for offset, value in flips:
        stream[offset % len(stream)] = value
    stream = stream[: max(cut, len(stream) // 2)]
    box = Path(tempfile.mkdtemp(dir=tmp_path))
    (box / "outside.txt").write_bytes(SENTINEL)
    try:
        extract(bytes(stream), box / "dest", chunk=chunk)
    except UnsafeArchiveError as exc:
        assert "\n" not in str(exc)
        assert sorted(os.listdir(box)) == ["outside.txt"]
    else:
        assert sorted(os.listdir(box)) == ["dest", "outside.txt"]
    assert (box / "outside.txt").read_bytes() == SENTINEL
    remove_tree(box)
