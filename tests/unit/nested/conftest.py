"""The fake L1 for NestedHost's tests: tests/unit/nested/fake_qemu.py as QEMU."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from pyvmm.nested import host as host_module

FAKE = Path(__file__).with_name("fake_qemu.py")


@pytest.fixture
def fake_l1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the fake QEMU on PATH and keep every work directory under tmp_path/tmp."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(f"#!{sys.executable}\n{FAKE.read_text()}")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    monkeypatch.setattr(host_module, "prepare_l1_images", lambda cache_dir=None: (kernel, initrd))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def work_dirs(tmp: Path) -> list[Path]:
    """The nested hosts' work directories under ``tmp``."""
    return sorted(tmp.glob("pyvmm-nested-*"))
