"""Extract the ELF ``vmlinux`` from a bzImage, in Python.

Why: a bzImage is a self-decompressing wrapper; the ELF inside carries the
PVH note (``XEN_ELFNOTE_PHYS32_ENTRY``), so booting the ELF lets pyvmm use
the simple PVH entry instead of the 64-bit boot protocol, and tests can load
a real kernel's segments directly.

How: since boot protocol 2.08 the setup header says where the compressed
kernel is: ``payload_offset`` (counted from the start of the protected-mode
code, i.e. after the ``setup_sects + 1`` real-mode sectors) and
``payload_length``. The payload's first bytes name the compressor; the
kernel's build appends the decompressed size as a 32-bit little-endian word
at its end, which we use as a check. Supported: gzip, xz, bzip2, lzma
(stdlib), LZ4 in the kernel's *legacy* framing (the ``lz4`` package, as
Debian's kernels use), and zstd (the optional ``zstandard`` package).

LZ4 legacy framing: the magic 0x184C2102 (little-endian), then blocks, each
a 4-byte little-endian compressed size followed by an LZ4 block that
decompresses to at most 8 MiB; the magic may appear again where a size is
expected (concatenated frames).
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.boot.bzimage import DEFAULT_SETUP_SECTS, SECTOR_SIZE, is_bzimage
from pyvmm.boot.setup_header import header_length_end, parse_setup_header, protocol_str
from pyvmm.errors import HostError, KernelImageError
from pyvmm.guestkit.cache import write_atomic
from pyvmm.guestkit.progress import task

if TYPE_CHECKING:
    from pyvmm.guestkit.debian import KernelPackage

MIN_PAYLOAD_PROTOCOL = 0x0208  # payload_offset/payload_length appeared in 2.08

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"  # 0x184C2102, little-endian
BZIP2_MAGIC = b"BZh"
LZMA_MAGIC = b"\x5d\x00\x00"  # lc=3 lp=0 pb=2 properties, then a dictionary size
LZO_MAGIC = b"\x89LZO"

LZ4_LEGACY_BLOCK_MAX = 8 << 20
# LZ4_COMPRESSBOUND(8 MiB): the most an incompressible block can grow to.
LZ4_LEGACY_BLOCK_BOUND = LZ4_LEGACY_BLOCK_MAX + LZ4_LEGACY_BLOCK_MAX // 255 + 16
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_EM_X86_64 = 62
_SIZE_WORD = struct.Struct("<I")


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """Decompress the ELF kernel inside ``bzimage`` and write it to ``out``.

    ``out`` is written atomically (a temporary file renamed into place).
    Raises :class:`KernelImageError` when the file is not a bzImage this
    can read, or what it holds is not an x86_64 ELF.
    """
    bzimage, out = Path(bzimage), Path(out)
    try:
        image = bzimage.read_bytes()
    except OSError as exc:
        raise KernelImageError(f"cannot read kernel image {bzimage}: {exc.strerror}") from None
    payload = find_payload(image, str(bzimage))
    elf = decompress_payload(payload, str(bzimage))
    check_x86_64_elf(elf, str(bzimage))
    return write_atomic(out, elf)


def kernel_vmlinux(pkg: KernelPackage) -> Path:
    """The ELF vmlinux of a fetched kernel, extracted once and cached beside it.

    The result is ``<pkg.root>/boot/vmlinux-<version>``.
    """
    out = pkg.root / "boot" / f"vmlinux-{pkg.version}"
    if out.is_file():
        return out
    try:
        with task(f"extracting the vmlinux of {pkg.package}"):
            return extract_vmlinux(pkg.vmlinuz, out)
    except KernelImageError as exc:
        raise HostError(f"cannot extract the vmlinux of {pkg.package}: {exc}") from exc


def find_payload(image: bytes, name: str = "kernel image") -> bytes:
    """The compressed kernel, located by the setup header's payload fields."""
    if image.startswith(_ELF_MAGIC):
        raise KernelImageError(f"{name} is already an ELF file, not a bzImage")
    if len(image) < 0x400 or not is_bzimage(image):
        raise KernelImageError(f"{name} is not a bzImage (no 'HdrS' setup header magic)")
    header = parse_setup_header(image[: header_length_end(image)])
    if header.version < MIN_PAYLOAD_PROTOCOL:
        raise KernelImageError(
            f"{name}: boot protocol {protocol_str(header.version)} predates the payload "
            f"fields (needs >= {protocol_str(MIN_PAYLOAD_PROTOCOL)})"
        )
    setup_size = ((header.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE
    start = setup_size + header.payload_offset
    end = start + header.payload_length
    if header.payload_length == 0 or end > len(image):
        raise KernelImageError(
            f"{name}: the payload ({header.payload_length} bytes at {start:#x}) lies "
            f"outside the {len(image)}-byte file"
        )
    return image[start:end]


def detect_compression(payload: bytes) -> str | None:
    """The compressor's name from the payload's magic, or None if unknown."""
    for magic, kind in _MAGICS:
        if payload.startswith(magic):
            return kind
    return None


def decompress_payload(payload: bytes, name: str = "kernel image") -> bytes:
    """Decompress a bzImage payload; check the size word the kernel build appends.

    The kernel's build ends every payload with the decompressed size as a
    32-bit little-endian word (gzip's own ISIZE field, or a word appended
    after the other compressors' streams). When those 4 bytes are there,
    the output length must match them.
    """
    kind = detect_compression(payload)
    if kind is None:
        raise KernelImageError(
            f"{name}: unknown payload compression (first bytes {payload[:6].hex()}); "
            "supported: gzip, xz, lzma, bzip2, lz4, zstd"
        )
    try:
        data, trailer = _DECOMPRESSORS[kind](payload)
    except (OSError, EOFError, ValueError, RuntimeError, lzma.LZMAError, zlib.error) as exc:
        raise KernelImageError(f"{name}: the {kind} payload is corrupt: {exc}") from None
    if kind == "gzip":
        trailer = payload[-4:]
    if len(trailer) == 4:
        (expected,) = _SIZE_WORD.unpack(trailer)
        if len(data) & 0xFFFFFFFF != expected:
            raise KernelImageError(
                f"{name}: the {kind} payload decompressed to {len(data)} bytes, "
                f"but the image says {expected}"
            )
    return data


def check_x86_64_elf(data: bytes, name: str = "kernel image") -> None:
    """Raise KernelImageError unless ``data`` starts with a 64-bit LE x86_64 ELF header."""
    if len(data) < 64 or not data.startswith(_ELF_MAGIC):
        raise KernelImageError(f"{name}: the decompressed payload is not an ELF file")
    (machine,) = struct.unpack_from("<H", data, 18)
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB or machine != _EM_X86_64:
        raise KernelImageError(
            f"{name}: the decompressed payload is an ELF for machine {machine}, class "
            f"{data[4]}, not a 64-bit little-endian x86_64 kernel"
        )


# --- decompressors: each returns (data, the bytes after the stream) ---------


def _gunzip(payload: bytes) -> tuple[bytes, bytes]:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # one gzip member
    data = d.decompress(payload) + d.flush()
    if not d.eof:
        raise EOFError("the gzip stream ends early")
    return data, d.unused_data


def _unxz(payload: bytes) -> tuple[bytes, bytes]:
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_XZ), payload, "xz")


def _unlzma(payload: bytes) -> tuple[bytes, bytes]:
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), payload, "lzma")


def _bunzip2(payload: bytes) -> tuple[bytes, bytes]:
    return _stream(bz2.BZ2Decompressor(), payload, "bzip2")


def _stream(
    decompressor: lzma.LZMADecompressor | bz2.BZ2Decompressor, payload: bytes, kind: str
) -> tuple[bytes, bytes]:
    data = decompressor.decompress(payload)
    if not decompressor.eof:
        raise EOFError(f"the {kind} stream ends early")
    return data, decompressor.unused_data


def _unzstd(payload: bytes) -> tuple[bytes, bytes]:
    try:
        import zstandard
    except ImportError:
        raise KernelImageError(
            "the kernel is zstd-compressed and the zstandard package is not installed "
            "(pip install zstandard)"
        ) from None
    d = zstandard.ZstdDecompressor().decompressobj()
    try:
        data = d.decompress(payload)
    except zstandard.ZstdError as exc:
        raise ValueError(str(exc)) from None
    if not d.eof:
        raise EOFError("the zstd stream ends early")
    return data, d.unused_data


def _unlzo(payload: bytes) -> tuple[bytes, bytes]:
    raise KernelImageError("LZO-compressed kernels are not supported; use gzip, xz, lz4 or zstd")


def unlz4_legacy(payload: bytes) -> tuple[bytes, bytes]:
    """Decompress LZ4 legacy frames, the kernel's LZ4 format.

    Returns the data and what follows the last block: the kernel's 4-byte
    size word when the walk ends with exactly 4 bytes left, else nothing.
    """
    import lz4.block

    if not payload.startswith(LZ4_LEGACY_MAGIC):
        raise ValueError("not an LZ4 legacy frame")
    out = []
    pos = len(LZ4_LEGACY_MAGIC)
    end = len(payload)
    while end - pos >= 4:
        chunk = payload[pos : pos + 4]
        if chunk == LZ4_LEGACY_MAGIC:  # a concatenated frame starts
            pos += 4
            continue
        if end - pos == 4:
            return _joined(out), chunk  # only the appended size word is left
        (size,) = _SIZE_WORD.unpack(chunk)
        if size == 0 or size > LZ4_LEGACY_BLOCK_BOUND or pos + 4 + size > end:
            raise ValueError(f"bad LZ4 block size {size} at payload offset {pos}")
        block = payload[pos + 4 : pos + 4 + size]
        try:
            out.append(lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK_MAX))
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(f"LZ4 block at payload offset {pos}: {exc}") from None
        pos += 4 + size
    if pos != end:
        raise EOFError(f"{end - pos} stray bytes after the last LZ4 block")
    return _joined(out), b""


def _joined(blocks: list[bytes]) -> bytes:
    if not blocks:
        raise EOFError("the LZ4 stream has no blocks")
    return b"".join(blocks)


_DECOMPRESSORS: dict[str, Callable[[bytes], tuple[bytes, bytes]]] = {
    "gzip": _gunzip,
    "xz": _unxz,
    "lzma": _unlzma,
    "bzip2": _bunzip2,
    "lz4": unlz4_legacy,
    "zstd": _unzstd,
    "lzo": _unlzo,
}

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (GZIP_MAGIC, "gzip"),
    (XZ_MAGIC, "xz"),
    (ZSTD_MAGIC, "zstd"),
    (LZ4_LEGACY_MAGIC, "lz4"),
    (BZIP2_MAGIC, "bzip2"),
    (LZMA_MAGIC, "lzma"),
    (LZO_MAGIC, "lzo"),
)
