"""vmlinux extraction from synthetic bzImages, one per compressor, and its errors."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
from pathlib import Path

import lz4.block
import pytest

from pyvmm.boot.setup_header import put_field
from pyvmm.errors import HostError, KernelImageError
from pyvmm.guestkit.debian import KernelPackage
from pyvmm.guestkit.vmlinux import (
    LZ4_LEGACY_BLOCK_MAX,
    LZ4_LEGACY_MAGIC,
    decompress_payload,
    detect_compression,
    extract_vmlinux,
    find_payload,
    kernel_vmlinux,
    unlz4_legacy,
)

SETUP_SECTS = 4
PM_PREFIX = 0x180  # bytes of "decompressor code" before the payload


def fake_elf(machine: int = 62, body: bytes = b"") -> bytes:
    """An ELF64 little-endian header for ``machine`` followed by ``body``."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, 0x1000000, 64, 0, 0, 64, 56, 0, 64, 0, 0
    )
    assert len(header) == 64
    return header + (body or b"vmlinux body " * 4000)


def size_word(data: bytes) -> bytes:
    return struct.pack("<I", len(data) & 0xFFFFFFFF)


def lz4_legacy(data: bytes, block: int = LZ4_LEGACY_BLOCK_MAX) -> bytes:
    out = bytearray(LZ4_LEGACY_MAGIC)
    for start in range(0, len(data), block):
        chunk = lz4.block.compress(data[start : start + block], store_size=False)
        out += struct.pack("<I", len(chunk)) + chunk
    return bytes(out)


def compress(kind: str, data: bytes) -> bytes:
    """What the kernel's build makes: the stream, plus a size word except for gzip."""
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "xz":
        stream = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif kind == "lzma":
        stream = lzma.compress(data, format=lzma.FORMAT_ALONE)
    elif kind == "bzip2":
        stream = bz2.compress(data)
    elif kind == "lz4":
        stream = lz4_legacy(data)
    elif kind == "zstd":
        zstandard = pytest.importorskip("zstandard")
        stream = zstandard.ZstdCompressor().compress(data)
    else:
        raise AssertionError(kind)
    return stream + size_word(data)


def fake_bzimage(payload: bytes, version: int = 0x020F, setup_sects: int = SETUP_SECTS) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    put_field(setup, "setup_sects", setup_sects)
    put_field(setup, "boot_flag", 0xAA55)
    put_field(setup, "jump", 0x6AEB)  # jmp to 0x26C: the header ends there
    put_field(setup, "header", b"HdrS")
    put_field(setup, "version", version)
    put_field(setup, "payload_offset", PM_PREFIX)
    put_field(setup, "payload_length", len(payload))
    protected = b"\x90" * PM_PREFIX + payload + b"\xcc" * 64
    return bytes(setup) + protected


KINDS = ["gzip", "xz", "lzma", "bzip2", "lz4", "zstd"]


@pytest.mark.parametrize("kind", KINDS)
def test_extracts_each_compression(kind: str, tmp_path: Path) -> None:
    elf = fake_elf()
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage(compress(kind, elf)))
    out = extract_vmlinux(image, tmp_path / "out" / "vmlinux")
    assert out == tmp_path / "out" / "vmlinux"
    assert out.read_bytes() == elf
    assert [p.name for p in out.parent.iterdir()] == ["vmlinux"]  # no temp file left


@pytest.mark.parametrize("kind", KINDS)
def test_detects_compression_by_magic(kind: str) -> None:
    assert detect_compression(compress(kind, b"x" * 100)) == kind


def test_lz4_legacy_with_several_blocks() -> None:
    elf = fake_elf(body=os.urandom(1 << 20) * 9)  # 9 MiB: two 8 MiB blocks
    payload = compress("lz4", elf)
    data, trailer = unlz4_legacy(payload)
    assert data == elf
    assert trailer == size_word(elf)


def test_lz4_legacy_concatenated_frames() -> None:
    first, second = b"A" * 5000, b"B" * 7000
    payload = lz4_legacy(first) + lz4_legacy(second) + size_word(first + second)
    assert unlz4_legacy(payload) == (first + second, size_word(first + second))


def test_lz4_legacy_without_size_word() -> None:
    assert unlz4_legacy(lz4_legacy(b"hello" * 100)) == (b"hello" * 100, b"")


def test_lz4_legacy_bad_block_size() -> None:
    payload = LZ4_LEGACY_MAGIC + struct.pack("<I", 1 << 30) + b"x" * 16
    with pytest.raises(KernelImageError, match="corrupt"):
        decompress_payload(payload)


def test_size_word_mismatch_is_an_error() -> None:
    payload = compress("xz", fake_elf())[:-4] + struct.pack("<I", 12345)
    with pytest.raises(KernelImageError, match="says 12345"):
        decompress_payload(payload)


def test_truncated_stream_is_an_error(tmp_path: Path) -> None:
    full = compress("xz", fake_elf())
    payload = full[: len(full) // 2]
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage(payload))
    with pytest.raises(KernelImageError, match="xz payload is corrupt"):
        extract_vmlinux(image, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_unknown_payload(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage(b"\x00\x01\x02\x03garbage" * 10))
    with pytest.raises(KernelImageError, match="unknown payload compression"):
        extract_vmlinux(image, tmp_path / "vmlinux")


def test_lzo_is_refused_by_name() -> None:
    with pytest.raises(KernelImageError, match="LZO"):
        decompress_payload(b"\x89LZO\x00" + b"x" * 20)


def test_not_x86_64_elf(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage(compress("gzip", fake_elf(machine=183))))
    with pytest.raises(KernelImageError, match="machine 183"):
        extract_vmlinux(image, tmp_path / "vmlinux")


def test_payload_that_is_not_elf(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(fake_bzimage(compress("gzip", b"just text" * 100)))
    with pytest.raises(KernelImageError, match="not an ELF"):
        extract_vmlinux(image, tmp_path / "vmlinux")


def test_not_a_bzimage() -> None:
    with pytest.raises(KernelImageError, match="not a bzImage"):
        find_payload(b"\0" * 4096, "x")
    with pytest.raises(KernelImageError, match="already an ELF"):
        find_payload(fake_elf(), "x")


def test_old_protocol_has_no_payload_fields() -> None:
    with pytest.raises(KernelImageError, match="predates"):
        find_payload(fake_bzimage(compress("gzip", fake_elf()), version=0x0206))


def test_payload_past_end_of_file() -> None:
    image = bytearray(fake_bzimage(compress("gzip", fake_elf())))
    put_field(image, "payload_length", len(image))
    with pytest.raises(KernelImageError, match="outside"):
        find_payload(bytes(image))


def test_setup_sects_zero_means_four() -> None:
    payload = compress("gzip", fake_elf())
    image = bytearray(fake_bzimage(payload, setup_sects=4))
    put_field(image, "setup_sects", 0)
    assert find_payload(bytes(image)) == payload


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="cannot read"):
        extract_vmlinux(tmp_path / "nope", tmp_path / "vmlinux")


def _package(tmp_path: Path, image: bytes) -> KernelPackage:
    root = tmp_path / "pkg"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1.0-9-cloud-amd64").write_bytes(image)
    return KernelPackage(
        flavor="cloud",
        package="linux-image-6.1.0-9-cloud-amd64-unsigned",
        deb_version="6.1.1-1",
        version="6.1.0-9-cloud-amd64",
        root=root,
        vmlinuz=root / "boot" / "vmlinuz-6.1.0-9-cloud-amd64",
        modules_dir=root / "lib" / "modules" / "6.1.0-9-cloud-amd64",
    )


def test_kernel_vmlinux_is_extracted_once(tmp_path: Path) -> None:
    elf = fake_elf()
    pkg = _package(tmp_path, fake_bzimage(compress("lz4", elf)))
    out = kernel_vmlinux(pkg)
    assert out == pkg.root / "boot" / "vmlinux-6.1.0-9-cloud-amd64"
    assert out.read_bytes() == elf
    pkg.vmlinuz.write_bytes(b"broken")  # a second call must not read it again
    assert kernel_vmlinux(pkg) == out


def test_kernel_vmlinux_of_a_broken_package_is_a_host_error(tmp_path: Path) -> None:
    pkg = _package(tmp_path, b"not a kernel" * 100)
    with pytest.raises(HostError, match="cannot extract"):
        kernel_vmlinux(pkg)
