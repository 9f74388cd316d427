"""What a VM in the nested host may use: writable directories, refusals, pre-checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyvmm.errors import KernelImageError
from pyvmm.nested.run import check_boot_files, unreachable_from_host, writable_dirs


@dataclass
class Drive:
    path: Path
    read_only: bool = False


@dataclass
class Config:
    serial_out: Path | None = None
    drives: list[Drive] = field(default_factory=list)
    nets: list[object] = field(default_factory=list)
    vsock: object | None = None


def test_the_directories_of_written_files_are_shared(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    config = Config(
        serial_out=tmp_path / "log" / "serial.txt",
        drives=[Drive(tmp_path / "a" / "rw.img"), Drive(Path("/srv/ro.img"), read_only=True)],
    )
    assert writable_dirs(config) == [tmp_path / "log", tmp_path / "a"]
    assert writable_dirs(Config()) == []


def test_a_written_file_directly_in_root_is_refused() -> None:
    with pytest.raises(ValueError, match=r"drive 0: /disk.img is directly in /"):
        writable_dirs(Config(drives=[Drive(Path("/disk.img"))]))


def test_tap_and_vsock_are_refused_with_one_line() -> None:
    assert unreachable_from_host(Config()) is None
    net = unreachable_from_host(Config(nets=[object()]))
    vsock = unreachable_from_host(Config(vsock=object()))
    assert net is not None and net.startswith("--net:") and "--nested never" in net
    assert vsock is not None and vsock.startswith("--vsock:") and "\n" not in vsock


def test_bad_boot_files_are_found_before_l1_boots(tmp_path: Path) -> None:
    bad = tmp_path / "kernel"
    bad.write_bytes(b"not a kernel" * 100)
    with pytest.raises(KernelImageError, match="not a kernel"):
        check_boot_files(bad, None, "console=ttyS0")
    with pytest.raises(KernelImageError, match="does not exist"):
        check_boot_files(tmp_path / "missing", None, "")
