"""A mock virtio driver: lays out a split virtqueue in test memory and plays the guest.

It builds chains (direct or through an indirect table), publishes them in
the avail ring and reads the used ring back, all through
:class:`~pyvmm.memory.GuestMemory` so the queue under test sees exactly what
a guest would have written. The raw ``write_desc``/``write_avail_entry``/
``set_avail_idx`` methods write anything at all, for malformed-ring tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.devices.virtio.queue import (
    DESC,
    U16,
    USED_ELEM,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
    avail_ring_bytes,
)
from pyvmm.memory import GuestMemory

DESC_TABLE = 0x10_000
DATA_START = 0x100_000
DATA_END = 0x800_000


@dataclass(frozen=True)
class Buffer:
    """A buffer the driver puts in a chain: ``data`` (readable) or ``length`` bytes (writable)."""

    addr: int
    length: int
    writable: bool


class MockDriver:
    """The driver side of one split virtqueue of ``size`` entries in ``mem``."""

    def __init__(self, mem: GuestMemory, size: int = 16, *, desc_table: int = DESC_TABLE) -> None:
        self.mem = mem
        self.size = size
        self.desc_table = desc_table
        self.avail_ring = desc_table + 16 * size
        self.used_ring = (self.avail_ring + avail_ring_bytes(size) + 3) & ~3
        self.avail_idx = 0
        self._next_desc = 0
        self._data = DATA_START
        mem.fill(desc_table, self.used_ring + 6 + 8 * size - desc_table)

    def queue(self, *, max_size: int | None = None, event_idx: bool = False) -> Queue:
        """A device-side queue configured the way the transport would, and ready."""
        queue = Queue(max_size or self.size)
        queue.size = self.size
        queue.desc_table = self.desc_table
        queue.avail_ring = self.avail_ring
        queue.used_ring = self.used_ring
        queue.event_idx = event_idx
        queue.ready = True
        return queue

    def start_at(self, index: int) -> None:
        """Pretend the ring already ran to ``index`` (set the queue's counters to match)."""
        self.avail_idx = index & 0xFFFF
        self.mem.write_struct(U16, self.avail_ring + 2, self.avail_idx)
        self.mem.write_struct(U16, self.used_ring + 2, self.avail_idx)

    # --- buffers -------------------------------------------------------------------
    def alloc(self, length: int, data: bytes = b"") -> int:
        """Guest RAM for a buffer (a bump allocator that wraps around)."""
        if self._data + length > DATA_END:
            self._data = DATA_START
        addr = self._data
        self._data = (self._data + length + 15) & ~15
        if data:
            self.mem.write(addr, data)
        return addr

    def readable(self, data: bytes) -> Buffer:
        return Buffer(self.alloc(len(data), data), len(data), False)

    def writable(self, length: int) -> Buffer:
        return Buffer(self.alloc(length), length, True)

    # --- raw ring access (anything goes) -------------------------------------------
    def write_desc(
        self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0
    ) -> None:
        self.mem.write_struct(DESC, self.desc_table + 16 * index, addr, length, flags, next_)

    def write_avail_entry(self, slot: int, head: int) -> None:
        self.mem.write_struct(U16, self.avail_ring + 4 + 2 * slot, head)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_struct(U16, self.avail_ring + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_struct(U16, self.avail_ring, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_struct(U16, self.avail_ring + 4 + 2 * self.size, value)

    # --- building and publishing chains --------------------------------------------
    def _take_descs(self, count: int) -> list[int]:
        indices = [(self._next_desc + i) % self.size for i in range(count)]
        self._next_desc = (self._next_desc + count) % self.size
        return indices

    def add_chain(self, buffers: list[Buffer]) -> int:
        """Write ``buffers`` as a direct chain; returns its head (not yet published)."""
        indices = self._take_descs(len(buffers))
        for position, (index, buf) in enumerate(zip(indices, buffers, strict=True)):
            last = position == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if buf.writable else 0)
            nxt = 0 if last else indices[position + 1]
            self.write_desc(index, buf.addr, buf.length, flags, nxt)
        return indices[0]

    def write_indirect_table(self, buffers: list[Buffer]) -> tuple[int, int]:
        """An indirect table chaining ``buffers`` in order; returns (addr, byte length)."""
        table = self.alloc(16 * len(buffers))
        for i, buf in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if buf.writable else 0)
            self.mem.write_struct(
                DESC, table + 16 * i, buf.addr, buf.length, flags, 0 if last else i + 1
            )
        return table, 16 * len(buffers)

    def add_indirect_chain(
        self, buffers: list[Buffer], direct: list[Buffer] | tuple[()] = ()
    ) -> int:
        """``direct`` buffers chained in the ring, then one descriptor for an indirect table."""
        table, length = self.write_indirect_table(buffers)
        indices = self._take_descs(len(direct) + 1)
        for position, buf in enumerate(direct):
            flags = VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if buf.writable else 0)
            self.write_desc(indices[position], buf.addr, buf.length, flags, indices[position + 1])
        self.write_desc(indices[-1], table, length, VIRTQ_DESC_F_INDIRECT)
        return indices[0]

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and bump avail.idx."""
        self.write_avail_entry(self.avail_idx % self.size, head)
        self.set_avail_idx(self.avail_idx + 1)

    def send(self, buffers: list[Buffer]) -> int:
        head = self.add_chain(buffers)
        self.publish(head)
        return head

    # --- reading the device's side -------------------------------------------------
    def used_idx(self) -> int:
        return self.mem.read_struct(U16, self.used_ring + 2)[0]

    def used_flags(self) -> int:
        return self.mem.read_struct(U16, self.used_ring)[0]

    def used_elem(self, index: int) -> tuple[int, int]:
        """(head id, length) of the used entry for free-running index ``index``."""
        return self.mem.read_struct(USED_ELEM, self.used_ring + 4 + 8 * (index % self.size))

    def avail_event(self) -> int:
        return self.mem.read_struct(U16, self.used_ring + 4 + 8 * self.size)[0]


def read_reg(transport, offset: int) -> int:
    """A 32-bit register read, as the driver's readl()."""
    buf = bytearray(4)
    transport.read(offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def write_reg(transport, offset: int, value: int) -> None:
    transport.write(offset, memoryview(value.to_bytes(4, "little")))


def device_features(transport) -> int:
    """The 64 feature bits the device offers (both DeviceFeaturesSel pages)."""
    from pyvmm.devices.virtio.mmio import Reg

    value = 0
    for sel in (0, 1):
        write_reg(transport, Reg.DEVICE_FEATURES_SEL, sel)
        value |= read_reg(transport, Reg.DEVICE_FEATURES) << (32 * sel)
    return value


class TransportAccess:
    """Register access on ``self.mmio`` for the test guests of each device."""

    mmio: object

    def rd(self, offset: int) -> int:
        return read_reg(self.mmio, offset)

    def wr(self, offset: int, value: int) -> None:
        write_reg(self.mmio, offset, value)

    def device_features(self) -> int:
        return device_features(self.mmio)


def bring_up(transport, drivers, features: int, size: int, queue_max: int) -> None:
    """Initialise a virtio-mmio device as a driver does (spec 3.1.1).

    ``features`` is what the driver acks; queue n uses ``drivers[n]``'s rings.
    """
    from pyvmm.devices.virtio.mmio import (
        STATUS_ACKNOWLEDGE,
        STATUS_DRIVER,
        STATUS_DRIVER_OK,
        STATUS_FEATURES_OK,
        Reg,
    )

    def rd(offset: int) -> int:
        return read_reg(transport, offset)

    def wr(offset: int, value: int) -> None:
        write_reg(transport, offset, value)

    wr(Reg.STATUS, 0)
    wr(Reg.STATUS, STATUS_ACKNOWLEDGE)
    wr(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    for sel in (0, 1):
        wr(Reg.DRIVER_FEATURES_SEL, sel)
        wr(Reg.DRIVER_FEATURES, features >> (32 * sel) & 0xFFFF_FFFF)
    wr(Reg.STATUS, rd(Reg.STATUS) | STATUS_FEATURES_OK)
    assert rd(Reg.STATUS) & STATUS_FEATURES_OK
    for index, driver in enumerate(drivers):
        wr(Reg.QUEUE_SEL, index)
        assert rd(Reg.QUEUE_NUM_MAX) == queue_max
        wr(Reg.QUEUE_NUM, size)
        for low, addr in (
            (Reg.QUEUE_DESC_LOW, driver.desc_table),
            (Reg.QUEUE_DRIVER_LOW, driver.avail_ring),
            (Reg.QUEUE_DEVICE_LOW, driver.used_ring),
        ):
            wr(low, addr & 0xFFFF_FFFF)
            wr(low + 4, addr >> 32)
        wr(Reg.QUEUE_READY, 1)
    wr(Reg.STATUS, rd(Reg.STATUS) | STATUS_DRIVER_OK)
    assert rd(Reg.STATUS) & STATUS_DRIVER_OK
