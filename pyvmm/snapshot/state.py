"""The snapshot state file: what is saved, and its versioned, checksummed format.

A state file is a fixed 56-byte header and a JSON payload::

    magic "PYVMMSNP" | u32 format version | u32 flags | SHA-256 of payload | u64 payload length

all little-endian. The header's layout never changes, so any pyvmm can say
why it cannot read a file: not a snapshot, a newer or older format, flags
it does not know (none are defined: any set bit is refused), a corrupt or
truncated payload. The payload is :class:`MicrovmState` as JSON
(:mod:`pyvmm.snapshot.codec`; KVM structs as base64). The memory file next
to it is raw guest RAM, region after region, so it can be mapped directly,
followed by a trailer that carries the snapshot's id
(:mod:`pyvmm.snapshot.memory_file`); :attr:`MemoryState.snapshot_id` is the
state file's half of that pair.

A state file is read only if it is a regular file of at most
:data:`MAX_STATE_SIZE` bytes; :func:`pack_state` refuses to write a larger
one, so pyvmm never writes what it cannot read back. (The size is
dominated by a diff's list of dirty runs: 64 MiB holds the 3.4 million
runs of every other page of a 26 GiB guest, the worst pattern there is.)

The format version lives here, in :data:`FORMAT_VERSION`; bump it (and
teach :func:`unpack_state` the old one, or raise :data:`MIN_FORMAT_VERSION`)
whenever a saved field changes meaning. Format 2 added the snapshot ids and
the memory file's trailer; format 3 saves devices by id (rate-limiter
budgets included) and rate limits as specs. Older files are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from pyvmm.config import MachineConfig
from pyvmm.layout import PAGE_SIZE
from pyvmm.snapshot import codec
from pyvmm.snapshot.device_states import DEVICE_STATE_TYPES, DevicesState
from pyvmm.snapshot.files import SnapshotError, open_regular, pread_exact

MAGIC = b"PYVMMSNP"
FORMAT_VERSION = 3
MIN_FORMAT_VERSION = 3
KNOWN_FLAGS = 0  # no header flag is defined yet
MAX_STATE_SIZE = 64 << 20
_HEADER = struct.Struct("<8sII32sQ")
HEADER_SIZE = _HEADER.size
_SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class VcpuState:
    """One vCPU as KVM reports it; the struct blobs go back to KVM unread."""

    id: int
    cpuid: tuple[tuple[int, int, int, int, int, int, int], ...]  # function, index, flags, eax..edx
    tsc_khz: int
    mp_state: int
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes | None
    xcrs: bytes | None
    debugregs: bytes | None
    lapic: bytes
    msrs: dict[int, int]
    vcpu_events: bytes


@dataclass(frozen=True)
class VmKvmState:
    """The in-kernel devices: both 8259s, the IOAPIC, the PIT, and kvmclock."""

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: bytes


@dataclass(frozen=True)
class MemoryState:
    """How the memory file maps to guest RAM, and which memory file it is.

    ``regions`` are (guest address, size), stored back to back in the file.
    ``snapshot_id`` (128 random bits, hex) is also in the memory file's
    trailer: the two files belong together only if the ids match. A diff
    snapshot's file holds only ``dirty`` (file offset, length) ranges; the
    rest are holes, and it must be merged onto the memory file of snapshot
    ``base_id`` (:func:`pyvmm.snapshot.merge_diff`) before it can be restored.
    Every value is checked here, once, so the code that seeks and writes by
    them can trust them.
    """

    size: int
    regions: tuple[tuple[int, int], ...]
    snapshot_id: str
    diff: bool = False
    dirty: tuple[tuple[int, int], ...] = ()
    base_id: str = ""

    def __post_init__(self) -> None:
        if not _SNAPSHOT_ID.fullmatch(self.snapshot_id):
            raise ValueError(f"memory.snapshot_id {self.snapshot_id[:40]!r} is not 32 hex digits")
        if self.diff != bool(_SNAPSHOT_ID.fullmatch(self.base_id)):
            raise ValueError("memory.base_id must be 32 hex digits in a diff snapshot, else empty")
        if self.diff and self.base_id == self.snapshot_id:
            raise ValueError("memory.base_id: a diff cannot be its own base")
        if self.dirty and not self.diff:
            raise ValueError("memory.dirty: a full snapshot has no dirty ranges")
        if sum(size for _, size in self.regions) != self.size or not self.regions:
            raise ValueError(f"memory.regions do not add up to memory.size {self.size}")
        for guest_addr, size in self.regions:
            if guest_addr % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
                raise ValueError(f"memory region {guest_addr:#x}+{size:#x} is not page-aligned")
        end = 0
        for start, length in self.dirty:
            if start < end or start % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
                raise ValueError(
                    f"memory.dirty range {start:#x}+{length:#x} is unaligned or out of order"
                )
            end = start + length
        if end > self.size:
            raise ValueError(f"memory.dirty ends at {end:#x}, past the {self.size:#x} bytes of RAM")


@dataclass(frozen=True)
class MicrovmState:
    """Everything in a state file."""

    pyvmm_version: str
    config: MachineConfig
    memory: MemoryState
    vcpus: tuple[VcpuState, ...]
    vm: VmKvmState
    devices: DevicesState


def pyvmm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyvmm")
    except PackageNotFoundError:
        return "unknown"


def pack_state(state: MicrovmState) -> bytes:
    """The state file's bytes: header, then the JSON payload."""
    payload = json.dumps(codec.encode(state), separators=(",", ":")).encode()
    if HEADER_SIZE + len(payload) > MAX_STATE_SIZE:
        raise SnapshotError(
            f"the snapshot state would be {len(payload) >> 20} MiB, over the "
            f"{MAX_STATE_SIZE >> 20} MiB a state file may have (a diff of "
            f"{len(state.memory.dirty)} scattered ranges: take a full snapshot instead)"
        )
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, digest, len(payload)) + payload


def unpack_state(data: bytes, name: str = "the state file") -> MicrovmState:
    """Parse and verify :func:`pack_state` bytes; :class:`SnapshotError` says what is wrong."""
    if len(data) < HEADER_SIZE or data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{name} is not a pyvmm snapshot state file")
    _, version, flags, digest, length = _HEADER.unpack_from(data)
    payload = data[HEADER_SIZE:]
    if not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        newer = "newer" if version > FORMAT_VERSION else "older"
        raise SnapshotError(
            f"{name}: snapshot format {version} is {newer} than this pyvmm "
            f"{pyvmm_version()} reads (formats {MIN_FORMAT_VERSION}-{FORMAT_VERSION})"
            + _writer(payload)
        )
    if flags & ~KNOWN_FLAGS:
        raise SnapshotError(
            f"{name} has header flags {flags:#x} this pyvmm {pyvmm_version()} does not know "
            "(corrupt, or written by a newer pyvmm)"
        )
    if len(payload) != length:
        raise SnapshotError(
            f"{name} is corrupt: {len(payload)} payload bytes, the header says {length} "
            "(truncated or appended to)"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{name} is corrupt: its SHA-256 checksum does not match")
    try:
        return codec.decode(json.loads(payload), MicrovmState, DEVICE_STATE_TYPES)
    except (ValueError, codec.CodecError) as exc:
        raise SnapshotError(f"{name} does not hold a valid snapshot: {exc}") from None


def _writer(payload: bytes) -> str:
    """ ", written by pyvmm X" if the payload says so (best effort, for error messages)."""
    try:
        writer = json.loads(payload).get("pyvmm_version")
    except (ValueError, AttributeError):
        return ""
    return f"; it was written by pyvmm {writer}" if isinstance(writer, str) else ""


def read_state(path: str | Path) -> MicrovmState:
    """Load and verify the state file at ``path`` (a regular file, at most MAX_STATE_SIZE)."""
    fd = open_regular(path, "snapshot state file")
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, len(MAGIC), 0) != MAGIC:  # say what it is not before how big it is
            raise SnapshotError(f"{path} is not a pyvmm snapshot state file")
        if size > MAX_STATE_SIZE:
            raise SnapshotError(
                f"snapshot state file {path} is {size} bytes, over the {MAX_STATE_SIZE >> 20} MiB "
                "a state file may have (not a state file?)"
            )
        data = pread_exact(fd, size, 0, f"snapshot state file {path}")
    finally:
        os.close(fd)
    return unpack_state(data, str(path))
