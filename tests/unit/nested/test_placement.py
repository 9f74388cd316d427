"""Where a VM runs: the decision table and the recognition of Linux kernels."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvmm.nested.placement import Where, choose, describe_default, is_linux_kernel


@pytest.mark.parametrize(
    ("mode", "linux", "kind", "where", "notice"),
    [
        ("auto", True, "pvm", Where.NESTED, "cannot run guest kernel code at hardware speed"),
        ("auto", True, "none", Where.NESTED, "cannot run guest kernel code"),
        ("auto", False, "pvm", Where.DIRECT, None),  # the probe: user mode, native speed
        ("auto", True, "vmx", Where.DIRECT, None),
        ("auto", True, "svm", Where.DIRECT, None),
        ("never", True, "pvm", Where.DIRECT, "3,000x slower"),
        ("never", False, "pvm", Where.DIRECT, None),
        ("never", True, "vmx", Where.DIRECT, None),
        ("always", False, "vmx", Where.NESTED, "--nested always"),
    ],
)
def test_decision_table(
    mode: str, linux: bool, kind: str, where: Where, notice: str | None
) -> None:
    placement = choose(mode, linux, kind)
    assert placement.where is where
    if notice is None:
        assert placement.notice is None
    else:
        assert placement.notice is not None and notice in placement.notice
        assert "\n" not in placement.notice


def test_inside_a_nested_host_everything_runs_directly() -> None:
    for mode in ("auto", "always", "never"):
        assert choose(mode, True, "pvm", inside_nested=True).where is Where.DIRECT


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, always, never"):
        choose("sometimes", True, "pvm")


def test_doctor_wording_follows_the_kind() -> None:
    assert "directly" in describe_default("vmx")
    assert "nested" in describe_default("pvm")


def bzimage(tmp_path: Path) -> Path:
    image = bytearray(0x400)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(image))
    return path


def elf_with_notes(tmp_path: Path, owners: list[bytes], name: str = "vmlinux") -> Path:
    """A minimal ELF64 with one PT_NOTE segment holding a note per owner."""
    notes = b""
    for owner in owners:
        owner_z = owner + b"\0"
        padded = owner_z + bytes(-len(owner_z) % 4)
        notes += struct.pack("<III", len(owner_z), 4, 1) + padded + b"\0\0\0\0"
    phoff, phentsize = 64, 56
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, phentsize, 1, 0, 0, 0)
    offset = phoff + phentsize
    phdr = struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(notes), len(notes), 4)
    path = tmp_path / name
    path.write_bytes(header + phdr + notes)
    return path


def test_linux_kernels_are_recognised_by_content(tmp_path: Path) -> None:
    assert is_linux_kernel(bzimage(tmp_path))
    assert is_linux_kernel(elf_with_notes(tmp_path, [b"Xen", b"Linux", b"GNU"]))


def test_other_files_are_not_linux(tmp_path: Path) -> None:
    probe = elf_with_notes(tmp_path, [b"Xen"], name="probe.elf")  # the probe guest's shape
    text = tmp_path / "vmlinuz.txt"
    text.write_text("Linux " * 200)
    assert not is_linux_kernel(probe)
    assert not is_linux_kernel(text)
    assert not is_linux_kernel(tmp_path / "missing")
    assert not is_linux_kernel(tmp_path)  # a directory
    assert not is_linux_kernel("/dev/null")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(elf_with_notes(tmp_path, [b"Linux"]).read_bytes()[:100])
    assert not is_linux_kernel(truncated)
