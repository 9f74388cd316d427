"""The snapshot state file: what is saved, and its versioned, checksummed format.

A state file is a fixed 56-byte header and a JSON payload::

    magic "PYVMMSNP" | u32 format version | u32 flags (0) | SHA-256 of payload | u64 payload length

all little-endian. The header's layout never changes, so any pyvmm can say
why it cannot read a file: not a snapshot, a newer or older format, a
corrupt or truncated payload. The payload is :class:`MicrovmState` as JSON
(:mod:`pyvmm.snapshot.codec`; KVM structs as base64). The memory file next
to it is raw guest RAM, region after region, so it can be mapped directly.

The format version lives here, in :data:`FORMAT_VERSION`; bump it (and
teach :func:`unpack_state` the old one, or raise :data:`MIN_FORMAT_VERSION`)
whenever a saved field changes meaning.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from pyvmm.config import MachineConfig
from pyvmm.devices.legacy.acpi_pm import AcpiPmState, PvPanicState
from pyvmm.devices.legacy.boot_timer import BootTimerState
from pyvmm.devices.legacy.i8042 import I8042State
from pyvmm.devices.legacy.serial import SerialState
from pyvmm.devices.virtio.block import VirtioBlockState
from pyvmm.devices.virtio.mmio import MmioTransportState
from pyvmm.devices.virtio.net import VirtioNetState
from pyvmm.devices.virtio.rng import VirtioRngState
from pyvmm.devices.virtio.vsock import VirtioVsockState
from pyvmm.errors import ConfigError
from pyvmm.snapshot import codec

MAGIC = b"PYVMMSNP"
FORMAT_VERSION = 1
MIN_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sII32sQ")
HEADER_SIZE = _HEADER.size

# The only classes a state file may name (a virtio transport's device state).
_DEVICE_STATES: dict[str, type] = {
    cls.__name__: cls
    for cls in (VirtioBlockState, VirtioNetState, VirtioRngState, VirtioVsockState)
}


class SnapshotError(ConfigError):
    """A snapshot cannot be written or loaded; the message says which file and why."""


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
    """How the memory file maps to guest RAM.

    ``regions`` are (guest address, size), stored back to back in the file.
    A diff snapshot's file holds only ``dirty`` (file offset, length) ranges;
    the rest are holes, and it must be merged onto its base
    (:func:`pyvmm.snapshot.merge_diff`) before it can be restored.
    """

    size: int
    regions: tuple[tuple[int, int], ...]
    diff: bool = False
    dirty: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class DevicesState:
    serial: SerialState
    i8042: I8042State
    acpi_pm: AcpiPmState
    pvpanic: PvPanicState
    boot_timer: BootTimerState
    virtio: tuple[MmioTransportState, ...]


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
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, digest, len(payload)) + payload


def unpack_state(data: bytes, name: str = "the state file") -> MicrovmState:
    """Parse and verify :func:`pack_state` bytes; :class:`SnapshotError` says what is wrong."""
    if len(data) < HEADER_SIZE or data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(f"{name} is not a pyvmm snapshot state file")
    _, version, _, digest, length = _HEADER.unpack_from(data)
    payload = data[HEADER_SIZE:]
    if not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        newer = "newer" if version > FORMAT_VERSION else "older"
        raise SnapshotError(
            f"{name}: snapshot format {version} is {newer} than this pyvmm "
            f"{pyvmm_version()} reads (formats {MIN_FORMAT_VERSION}-{FORMAT_VERSION})"
            + _writer(payload)
        )
    if len(payload) != length:
        raise SnapshotError(
            f"{name} is corrupt: {len(payload)} payload bytes, the header says {length} "
            "(truncated or appended to)"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{name} is corrupt: its SHA-256 checksum does not match")
    try:
        return codec.decode(json.loads(payload), MicrovmState, _DEVICE_STATES)
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
    """Load and verify the state file at ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot state {path}: {exc.strerror}") from None
    return unpack_state(data, str(path))
