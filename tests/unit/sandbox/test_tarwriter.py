"""The PUT side: a host tree as a tar stream, read back with tarfile."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.sandbox.tarsafe import remove_tree
from pyvmm.sandbox.tarwriter import TarWriter


def stream(source: Path, **caps) -> bytes:
    return b"".join(TarWriter(source, **{"max_files": 1000, "max_bytes": 1 << 30, **caps}).chunks())


def make_tree(root: Path) -> Path:
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "a.txt").chmod(0o4751)
    (root / "sub" / "big.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "zero").write_bytes(b"")
    (root / "sub" / "link").symlink_to("../a.txt")
    long_dir = root / ("d" * 120)
    long_dir.mkdir()
    (long_dir / ("f" * 200)).write_bytes(b"deep")
    os.utime(root / "sub" / "big.bin", (981_158_400, 981_158_400))
    return root


def test_tree_as_tarfile_sees_it(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "src")
    with tarfile.open(fileobj=io.BytesIO(stream(root))) as archive:
        members = {m.name: m for m in archive.getmembers()}
        names = list(members)
        assert names[0] == "src"
        assert names.index("src/sub") < names.index("src/sub/big.bin")
        assert set(names) == {
            "src", "src/a.txt", "src/sub", "src/sub/big.bin", "src/sub/empty", "src/sub/link",
            "src/sub/zero", "src/" + "d" * 120, "src/" + "d" * 120 + "/" + "f" * 200,
        }  # fmt: skip
        assert members["src/a.txt"].mode == 0o4751  # the guest keeps setuid bits
        assert members["src/sub/big.bin"].mtime == 981_158_400
        assert members["src/sub/link"].issym() and members["src/sub/link"].linkname == "../a.txt"
        for name, m in members.items():
            if m.isreg():
                assert archive.extractfile(m).read() == (tmp_path / name).read_bytes()


def test_single_file_and_followed_top_symlink(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x" * 1000)
    (tmp_path / "alias").symlink_to("file")
    for source in ("file", "alias"):
        with tarfile.open(fileobj=io.BytesIO(stream(tmp_path / source))) as archive:
            [m] = archive.getmembers()
            assert (m.name, m.isreg(), m.size) == (source, True, 1000)


def test_special_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with pytest.raises(ConfigError, match="fifo: a FIFO"):
        stream(root)
    os.unlink(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        with pytest.raises(ConfigError, match="sock: a socket"):
            stream(root)
    with pytest.raises(ConfigError, match="a character device"):
        stream(Path("/dev/null"))
    with pytest.raises(ConfigError, match="No such file"):
        stream(tmp_path / "missing")


def test_caps(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "src")
    with pytest.raises(ConfigError, match=r"more than 3 entries \(max_files\)"):
        stream(root, max_files=3)
    with pytest.raises(ConfigError, match=r"more than 1000 bytes of files \(max_bytes\)"):
        stream(root, max_bytes=1000)


def test_deep_tree_needs_no_recursion(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    path = deep
    deep.mkdir()
    for _ in range(1200):  # deeper than Python's default recursion limit
        path = path / "d"
        path.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(stream(deep, max_files=2000))) as archive:
            assert len(archive.getmembers()) == 1201
    finally:
        remove_tree(deep)  # pytest's own clean-up recurses, and would fail on it
