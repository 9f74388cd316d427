"""Tests of the probe guest build: ELF layout, PVH note, cache behaviour, errors."""

from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from pyvmm.errors import HostError
from pyvmm.guestkit import probe

XEN_ELFNOTE_PHYS32_ENTRY = 18
HIMEM_START = 0x100000

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture(scope="module")
def elf_path(cache: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return probe.build_probe(cache_dir=cache)


def _load_segments(elf: ELFFile) -> list:
    return [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


def _pvh_entry(elf: ELFFile) -> int | None:
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_NOTE":
            continue
        for note in seg.iter_notes():
            if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                desc = note["n_descdata"]
                return struct.unpack_from("<Q" if len(desc) >= 8 else "<I", desc)[0]
    return None


def test_image_is_in_the_cache_layout(elf_path: Path, cache: Path) -> None:
    assert elf_path.name == "probe.elf"
    assert elf_path.parent.parent == cache / "probe"
    assert len(elf_path.parent.name) == 16
    assert not [p for p in (cache / "probe").iterdir() if p.name.startswith(".")]


def test_elf_header(elf_path: Path) -> None:
    with elf_path.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64
        assert elf.little_endian
        assert elf["e_machine"] == "EM_X86_64"
        assert elf["e_type"] == "ET_EXEC"


def test_load_segments_at_1mib(elf_path: Path) -> None:
    with elf_path.open("rb") as f:
        segs = _load_segments(ELFFile(f))
        assert segs
        for seg in segs:
            assert seg["p_paddr"] >= HIMEM_START
            assert seg["p_paddr"] == seg["p_vaddr"]
            assert seg["p_filesz"] <= seg["p_memsz"]
            # Must fit comfortably in the smallest guest (16 MiB).
            assert seg["p_paddr"] + seg["p_memsz"] <= 8 << 20


def test_pvh_note_points_into_executable_load_segment(elf_path: Path) -> None:
    with elf_path.open("rb") as f:
        elf = ELFFile(f)
        entry = _pvh_entry(elf)
        assert entry is not None, "no XEN_ELFNOTE_PHYS32_ENTRY note"
        assert entry == elf["e_entry"]
        hits = [
            s for s in _load_segments(elf) if s["p_paddr"] <= entry < s["p_paddr"] + s["p_filesz"]
        ]
        assert len(hits) == 1
        assert hits[0]["p_flags"] & P_FLAGS.PF_X


def test_cache_is_reused_without_gcc(
    elf_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mtime = elf_path.stat().st_mtime_ns
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc: a rebuild would fail
    start = time.monotonic()
    again = probe.build_probe(cache_dir=cache)
    assert time.monotonic() - start < 0.5
    assert again == elf_path
    assert again.stat().st_mtime_ns == mtime


@needs_gcc
def test_force_rebuilds_in_place(elf_path: Path, cache: Path) -> None:
    before = elf_path.read_bytes()
    mtime = elf_path.stat().st_mtime_ns
    again = probe.build_probe(cache_dir=cache, force=True)
    assert again == elf_path
    assert again.stat().st_mtime_ns != mtime
    assert again.read_bytes() == before  # the build is deterministic
    assert not [p for p in (cache / "probe").iterdir() if p.name.startswith(".")]


def test_missing_gcc_is_a_clear_host_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HostError, match="gcc not found"):
        probe.build_probe(cache_dir=tmp_path / "cache")


def _copy_sources(dst: Path) -> Path:
    shutil.copytree(probe.probe_source_dir(), dst)
    return dst


@needs_gcc
def test_source_change_gives_a_new_cache_entry(
    elf_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = _copy_sources(tmp_path / "src")
    main_c = src / "main.c"
    main_c.write_text(main_c.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(probe, "probe_source_dir", lambda: src)
    other = probe.build_probe(cache_dir=cache)
    assert other != elf_path
    assert other.is_file()


@needs_gcc
def test_compile_error_reports_gcc_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = _copy_sources(tmp_path / "src")
    (src / "main.c").write_text("this is not C;\n")
    monkeypatch.setattr(probe, "probe_source_dir", lambda: src)
    with pytest.raises(HostError, match=r"(?s)building the probe guest failed.*main\.c"):
        probe.build_probe(cache_dir=tmp_path / "cache")
    # Nothing half-built is left for a later call to pick up.
    leftovers = list((tmp_path / "cache" / "probe").iterdir())
    assert leftovers == []


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "c"))
    assert probe.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PYVMM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert probe.default_cache_dir() == tmp_path / ".cache" / "pyvmm"


def test_source_dir_holds_the_sources() -> None:
    src = probe.probe_source_dir()
    assert (src / "probe.ld").is_file()
    assert (src / "entry.S").is_file()
