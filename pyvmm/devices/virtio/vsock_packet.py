"""The virtio-vsock packet header (virtio 1.2, section 5.10.6), declared once.

Every packet on the rx and tx queues starts with a 44-byte, packed,
little-endian ``struct virtio_vsock_hdr``; a VIRTIO_VSOCK_OP_RW packet is
followed by ``len`` bytes of payload, every other op has none. :data:`HDR`
is the precompiled layout; :class:`Header` names its fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmm.devices.virtio.chain_io import gather

if TYPE_CHECKING:
    from pyvmm.devices.virtio.queue import Descriptor
    from pyvmm.memory import GuestMemory

import struct
from typing import NamedTuple

#: struct virtio_vsock_hdr { le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port;
#: le32 len; le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt; }
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size  # 44

#: struct virtio_vsock_config { le64 guest_cid; }
CONFIG = struct.Struct("<Q")
#: struct virtio_vsock_event { le32 id; }
EVENT = struct.Struct("<I")

# --- well-known CIDs -------------------------------------------------------------------
VSOCK_HOST_CID = 2
# Which guest CIDs are valid: pyvmm.config.check_guest_cid.

# --- type ---------------------------------------------------------------------------------
VIRTIO_VSOCK_TYPE_STREAM = 1

# --- op -----------------------------------------------------------------------------------
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

# --- SHUTDOWN flags: what the sender will no longer do ------------------------------------
VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2

# --- event ids ------------------------------------------------------------------------------
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

#: The largest payload either side puts in one packet (Linux's
#: VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); a longer guest packet is refused.
MAX_PKT_PAYLOAD = 64 * 1024


class Header(NamedTuple):
    """The fields of one ``virtio_vsock_hdr``, in layout order."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


class MalformedPacket(ValueError):
    """A TX chain that cannot be a vsock packet (the guest's mistake)."""


def read_header(mem: GuestMemory, descs: list[Descriptor]) -> tuple[tuple[int, ...], int]:
    """The header fields of the packet in ``descs``, and the chain's total length.

    Raises :class:`MalformedPacket` for a chain with device-writable
    buffers or shorter than a header.
    """
    total = 0
    for desc in descs:
        if desc.is_write_only:
            raise MalformedPacket("TX chain has device-writable buffers")
        total += desc.length
    if total < HDR_SIZE:
        raise MalformedPacket(f"TX packet of {total} bytes is shorter than its header")
    first = descs[0]
    if first.length >= HDR_SIZE:
        return mem.read_struct(HDR, first.addr), total
    return HDR.unpack(gather(mem, descs, HDR_SIZE)), total


def rst_header(guest_cid: int, host_port: int, guest_port: int) -> bytes:
    """The header of an RST from the host to the guest (it has no payload)."""
    return HDR.pack(
        VSOCK_HOST_CID, guest_cid, host_port, guest_port, 0,
        VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RST, 0, 0, 0,
    )  # fmt: skip


def packet_problem(type_: int, op: int, length: int, total: int) -> str | None:
    """Why a well-addressed guest packet cannot be taken (None: it can)."""
    if type_ != VIRTIO_VSOCK_TYPE_STREAM or length > total - HDR_SIZE:
        return f"TX packet of type {type_}, len {length} in {total} bytes"
    if op == VIRTIO_VSOCK_OP_RW and length > MAX_PKT_PAYLOAD:
        return f"TX payload of {length} bytes"
    return None
