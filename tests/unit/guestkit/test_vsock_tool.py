"""The guest's AF_VSOCK tool: built static, cached by source hash, usage and errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pyvmm.errors import HostError
from pyvmm.guestkit import vsock_tool


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vsock-tool-cache")


@pytest.fixture(scope="module")
def tool(cache: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return vsock_tool.build_vsock_tool(cache_dir=cache)


def test_static_x86_64_executable(tool: Path, cache: Path) -> None:
    assert tool.name == "pyvmm-vsock"
    assert tool.parent.parent == cache / "vsock-tool"
    with tool.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64
        assert elf["e_machine"] == "EM_X86_64"
        kinds = {seg["p_type"] for seg in elf.iter_segments()}
        assert "PT_INTERP" not in kinds  # no dynamic loader: runs in a bare initramfs
        assert "PT_DYNAMIC" not in kinds
    assert tool.stat().st_mode & 0o111


def test_cached_until_the_source_changes(tool: Path, cache: Path, monkeypatch) -> None:
    mtime = tool.stat().st_mtime_ns
    assert vsock_tool.build_vsock_tool(cache_dir=cache) == tool
    assert tool.stat().st_mtime_ns == mtime
    monkeypatch.setattr(vsock_tool, "_cache_key", lambda source: "0" * 16)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(HostError, match="gcc not found"):
        vsock_tool.build_vsock_tool(cache_dir=cache)


def test_usage_and_connect_failure(tool: Path) -> None:
    proc = subprocess.run([str(tool)], capture_output=True, text=True, timeout=10, check=False)
    assert proc.returncode == 2
    assert "usage: pyvmm-vsock listen PORT" in proc.stderr
    proc = subprocess.run(
        [str(tool), "connect", "2", "notaport"], capture_output=True, text=True, timeout=10
    )
    assert proc.returncode == 2
    # Nobody listens on the host's vsock port 1 (or the host has no AF_VSOCK at all).
    proc = subprocess.run(
        [str(tool), "connect", "2", "1"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("pyvmm-vsock: ")
