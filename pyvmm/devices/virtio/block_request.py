"""virtio-blk requests (virtio 1.2, 5.2.6): the wire format, parsed and checked, no I/O.

:func:`parse_request` turns a descriptor chain into a :class:`Request` (or
into one that carries the status to answer at once); :func:`check_request`
checks it against the drive (capacity, read-only, supported operations).
Both are pure: they read small structs from guest memory and never touch
the back end's file, so the device (:mod:`pyvmm.devices.virtio.block`)
only runs what they let through.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from pyvmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE as WRITE
from pyvmm.devices.virtio.queue import Descriptor, DescriptorChain
from pyvmm.errors import GuestError

if TYPE_CHECKING:
    from pyvmm.memory import GuestMemory

BLOCK_QUEUE_SIZE = 256
SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# --- request types and status values (5.2.6) --------------------------------------
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

# --- what we advertise ---------------------------------------------------------------
#: Data segments per request the driver may use: the ring size less header and status.
SEG_MAX = BLOCK_QUEUE_SIZE - 2
MAX_DISCARD_SECTORS = 0x3F_FFFF  # 2 GiB - 512 per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB: the host file system's usual block
MAX_WRITE_ZEROES_SECTORS = 0x3F_FFFF
MAX_WRITE_ZEROES_SEG = 32

#: struct virtio_blk_req header: le32 type, le32 reserved, le64 sector.
REQ_HEADER = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
DISCARD_SEGMENT = struct.Struct("<QII")


class BlockBackend(Protocol):
    """What the device needs from its executor (``BlockFile`` or a test fake).

    Every method raises ``OSError`` on a host failure; ``read_into`` and
    ``write_from`` move every byte or raise.
    """

    read_only: bool
    sectors: int
    supports_discard: bool
    supports_write_zeroes: bool

    def read_into(self, offset: int, buffers: list[memoryview]) -> int: ...
    def write_from(self, offset: int, buffers: list[memoryview]) -> int: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...


# --- pure request parsing ---------------------------------------------------------------
class Request(NamedTuple):
    """One parsed chain.

    ``status_addr`` is None when the chain has no writable byte for the
    status (it is returned with length 0). ``status`` is set when parsing
    already decided the answer (with ``reason`` for the log); otherwise the
    request still has to be checked and executed. ``data`` are the payload
    buffers (``Descriptor``: address, length, flags) in the direction the
    type needs; ``ranges`` the (sector, num_sectors, flags) segments of
    DISCARD / WRITE_ZEROES.

    A named tuple: one is built per request, at a third of the cost of a
    frozen dataclass.
    """

    type: int
    sector: int
    status_addr: int | None
    data: Sequence[Descriptor] = ()
    data_len: int = 0
    ranges: tuple[tuple[int, int, int], ...] = ()
    status: int | None = None
    reason: str = ""


def _split(segments: list[Descriptor], count: int) -> tuple[list[Descriptor], list[Descriptor]]:
    """The first ``count`` bytes of ``segments`` and the rest, splitting one if needed."""
    head: list[Descriptor] = []
    rest: list[Descriptor] = []
    for desc in segments:
        addr, length, flags = desc
        if count >= length:
            head.append(desc)
            count -= length
        elif count > 0:
            head.append(Descriptor(addr, count, flags))
            rest.append(Descriptor(addr + count, length - count, flags))
            count = 0
        else:
            rest.append(desc)
    return head, rest


def _gather(mem: GuestMemory, segments: list[Descriptor]) -> bytes:
    return b"".join(mem.read(addr, length) for addr, length, _flags in segments)


def parse_request(mem: GuestMemory, chain: DescriptorChain) -> Request:
    """Turn ``chain`` into a :class:`Request`; never raises for a guest mistake.

    Reads only the 16-byte header and, for DISCARD / WRITE_ZEROES, the
    segment structs (at most ``MAX_DISCARD_SEG`` of them) from guest memory.

    Fast path: the layout every driver we know uses for reads, writes and
    flushes (a 16-byte header buffer, whole data buffers, a 1-byte status
    buffer) is recognised from the chain's split point and totals, with no
    list rebuilt; anything else takes the general path, which splits
    buffers anywhere. Both give the same answer for the same bytes.
    """
    descs = chain.descriptors
    readable_count = chain.readable_count
    last = descs[-1]
    if readable_count and descs[0][1] == REQ_HEADER.size and last[1] == 1 and last[2] & WRITE:
        req_type, _reserved, sector = mem.read_struct(REQ_HEADER, descs[0][0])
        status_addr = last[0]
        if req_type == VIRTIO_BLK_T_IN and readable_count == 1:
            data_len = chain.writable_bytes - 1
            if not data_len & (SECTOR_SIZE - 1):
                return Request(req_type, sector, status_addr, descs[1:-1], data_len)
        elif req_type == VIRTIO_BLK_T_OUT and readable_count == len(descs) - 1:
            data_len = chain.readable_bytes - REQ_HEADER.size
            if not data_len & (SECTOR_SIZE - 1):
                return Request(req_type, sector, status_addr, descs[1:-1], data_len)
        elif req_type == VIRTIO_BLK_T_FLUSH and len(descs) == 2:
            return Request(req_type, sector, status_addr)
    return _parse_general(mem, chain)


def _parse_general(mem: GuestMemory, chain: DescriptorChain) -> Request:
    """:func:`parse_request` for any layout, and for every error answer."""
    readable = chain.readable()
    writable = chain.writable()
    writable_len = chain.writable_bytes
    if writable_len == 0:
        return Request(type=-1, sector=0, status_addr=None, reason="no status byte")
    out_data, status = _split(writable, writable_len - 1)
    status_addr = status[0][0]
    out_len = writable_len - 1

    header_segments, in_data = _split(readable, REQ_HEADER.size)
    in_len = sum(length for _, length, _flags in in_data)
    try:
        header = _gather(mem, header_segments)
    except GuestError as exc:  # pop() checked the buffers; be safe anyway
        return Request(-1, 0, status_addr, status=VIRTIO_BLK_S_IOERR, reason=str(exc))
    if len(header) < REQ_HEADER.size:
        return Request(
            -1, 0, status_addr, status=VIRTIO_BLK_S_IOERR, reason="request header too short"
        )
    req_type, _reserved, sector = REQ_HEADER.unpack(header)

    def fail(status: int, reason: str) -> Request:
        return Request(req_type, sector, status_addr, status=status, reason=reason)

    if req_type not in _KNOWN_TYPES:
        return fail(VIRTIO_BLK_S_UNSUPP, f"request type {req_type}")
    problem = _layout_problem(req_type, in_len, out_len)
    if problem is not None:
        return fail(VIRTIO_BLK_S_IOERR, problem)
    if req_type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID):
        return Request(req_type, sector, status_addr, tuple(out_data), out_len)
    if req_type == VIRTIO_BLK_T_OUT:
        return Request(req_type, sector, status_addr, tuple(in_data), in_len)
    if req_type == VIRTIO_BLK_T_FLUSH:
        return Request(req_type, sector, status_addr)
    count, extra = divmod(in_len, DISCARD_SEGMENT.size)
    max_seg = MAX_DISCARD_SEG if req_type == VIRTIO_BLK_T_DISCARD else MAX_WRITE_ZEROES_SEG
    if extra or not 0 < count <= max_seg:
        return fail(VIRTIO_BLK_S_IOERR, f"{in_len} bytes of discard segments")
    try:
        raw = _gather(mem, in_data)
    except GuestError as exc:
        return fail(VIRTIO_BLK_S_IOERR, str(exc))
    ranges = tuple(DISCARD_SEGMENT.iter_unpack(raw))
    return Request(req_type, sector, status_addr, tuple(in_data), in_len, ranges)


_KNOWN_TYPES = frozenset(
    (
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    )
)


def _layout_problem(req_type: int, in_len: int, out_len: int) -> str | None:
    """Why a request's payload has the wrong direction or size for its type (None: fine).

    ``in_len`` is what the device reads (driver -> device), ``out_len`` what it writes.
    """
    if req_type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID):
        if in_len:
            return "device-readable payload on a read request"
        if req_type == VIRTIO_BLK_T_IN and out_len % SECTOR_SIZE:
            return f"read length {out_len} is not whole sectors"
    elif req_type == VIRTIO_BLK_T_OUT:
        if out_len:
            return "device-writable payload on a write request"
        if in_len % SECTOR_SIZE:
            return f"write length {in_len} is not whole sectors"
    elif req_type == VIRTIO_BLK_T_FLUSH:
        if in_len or out_len:
            return "payload on a flush request"
    elif out_len:
        return "device-writable payload on a discard request"
    return None


def check_request(request: Request, backend: BlockBackend, read_only: bool) -> tuple[int, str]:
    """(status, reason) to answer without I/O, or (VIRTIO_BLK_S_OK, "") to go ahead."""
    req_type = request.type
    capacity = backend.sectors
    writes = req_type in (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES)
    if writes and read_only:
        return VIRTIO_BLK_S_IOERR, "write to a read-only drive"
    if req_type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
        end = request.sector + (request.data_len >> SECTOR_SHIFT)
        if end > capacity:
            return VIRTIO_BLK_S_IOERR, f"sectors {request.sector}..{end} beyond {capacity}"
    elif req_type in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        discard = req_type == VIRTIO_BLK_T_DISCARD
        supported = backend.supports_discard if discard else backend.supports_write_zeroes
        if not supported:
            return VIRTIO_BLK_S_UNSUPP, "not supported by the host file"
        limit = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        allowed_flags = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        for sector, num, flags in request.ranges:
            if flags & ~allowed_flags:
                return VIRTIO_BLK_S_UNSUPP, f"segment flags {flags:#x}"
            if num > limit or sector + num > capacity:
                return VIRTIO_BLK_S_IOERR, f"segment {sector}+{num} beyond {capacity}/{limit}"
    return VIRTIO_BLK_S_OK, ""
