"""The virtio 1.x split virtqueue (virtio 1.2, section 2.7), device side, sans-IO.

The queue owns neither memory nor interrupts: every method that touches the
rings takes the :class:`~pyvmm.memory.GuestMemory` to use, and
:meth:`Queue.needs_notification` only *answers* whether the driver should be
interrupted; sending the interrupt is the caller's business. The transport
fills the driver-configured fields (``size``, ``ready``, the three ring
addresses, ``event_idx``) from its registers and checks :meth:`Queue.is_valid`
before the device uses the queue.

Everything in the rings is written by the guest, so nothing read from them is
trusted: chain walks stop after ``size`` hops (indirect tables after their own
entry count), every index is range-checked, every buffer must lie inside guest
RAM, and any violation raises :class:`QueueError`, never another exception,
never a hang. Ring accesses that fall outside guest RAM (a transport that did
not check :meth:`Queue.is_valid`) are reported as :class:`QueueError` too.

Memory ordering. The spec asks the device for barriers that Python cannot
spell. What we rely on, on x86-64 (TSO: loads are not reordered with loads,
stores not with stores):

* we read ``avail.idx`` before the ring entries and descriptors it covers, in
  program order, and only after the driver's notification reached us (the
  vCPU's stores are visible once its MMIO exit or ioeventfd has been seen);
* :meth:`Queue.add_used` writes the used element before ``used.idx``;
* the two places that need a *store-load* barrier (publish ``used.idx`` then
  read ``used_event``/the avail flags; publish ``avail_event``/the used flags
  then re-read ``avail.idx``) take and release a :class:`threading.Lock`,
  whose ``lock cmpxchg`` is a full barrier on x86.
"""

from __future__ import annotations

import mmap
import struct
import threading
from dataclasses import dataclass
from typing import NamedTuple

from pyvmm.errors import GuestError, GuestMemoryError
from pyvmm.memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

#: The largest queue size a split virtqueue may have (spec 2.7).
MAX_QUEUE_SIZE = 32768

#: The most entries one indirect table may hold. The spec bounds a whole chain
#: by the queue size, but Linux sizes indirect tables by the request's segment
#: count, not by the ring; like QEMU we accept up to 1024 (VIRTQUEUE_MAX_SIZE).
#: A chain therefore holds at most ``size - 1`` direct descriptors plus one
#: indirect table of at most this many entries.
MAX_INDIRECT_DESCRIPTORS = 1024

#: Total readable (or writable) bytes of a chain must fit the u32 ``used.len``.
MAX_CHAIN_BYTES = 0xFFFF_FFFF

# --- byte layouts (little-endian, virtio 1.x) ---------------------------------
#: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
DESC = struct.Struct("<QIHH")
#: struct virtq_used_elem { le32 id; le32 len; }
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")
# Bound methods for the hot paths (one attribute lookup fewer per access).
_DESC_FROM = DESC.unpack_from
_U16_FROM = U16.unpack_from
_USED_ELEM_INTO = USED_ELEM.pack_into
# ``Descriptor(a, l, f)`` runs NamedTuple's Python-level __new__; this is the
# C constructor it ends up calling, for the one place that builds them in bulk.
_new_tuple = tuple.__new__

# Offsets inside the rings. avail: flags, idx, ring[size], used_event.
# used: flags, idx, ring[size] of USED_ELEM, avail_event.
_RING_FLAGS = 0
_RING_IDX = 2
_RING_ENTRIES = 4
_DESC_ALIGN = 16
_AVAIL_ALIGN = 2
_USED_ALIGN = 4

# Any lock round trip is a full memory barrier on x86 (lock cmpxchg).
_BARRIER = threading.Lock()


def _full_barrier() -> None:
    with _BARRIER:
        pass


def _store_u16(buffer: mmap.mmap, offset: int, value: int) -> None:
    """Store a ring field the driver may read at any moment, in one 2-byte write.

    Not ``struct.pack_into``: it zeroes its target before packing, so a
    driver polling ``used.idx`` (or reading ``avail_event``) could see a
    transient 0 and consume stale entries or skip a notification.
    """
    buffer[offset : offset + 2] = value.to_bytes(2, "little")


def _check_used(head_index: int, length: int, size: int) -> None:
    """A used element the device is about to publish: a head of this ring, a u32 length."""
    if not 0 <= head_index < size:
        raise QueueError(f"used head {head_index} is not below queue size {size}")
    if not 0 <= length <= MAX_CHAIN_BYTES:
        raise ValueError(f"used length {length} does not fit a u32")


def desc_table_bytes(size: int) -> int:
    return DESC.size * size


def avail_ring_bytes(size: int) -> int:
    """flags + idx + ring[size] + used_event."""
    return _RING_ENTRIES + U16.size * size + U16.size


def used_ring_bytes(size: int) -> int:
    """flags + idx + ring[size] + avail_event."""
    return _RING_ENTRIES + USED_ELEM.size * size + U16.size


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if ``event_idx`` lies in the u16 window ``[old_idx, new_idx)``.

    The EVENT_IDX rule (spec 2.7.10): the other side wants a notification
    once the index it watches moves past ``event_idx``; we moved it from
    ``old_idx`` to ``new_idx`` since we last notified.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


class QueueError(GuestError):
    """The driver wrote a malformed ring or descriptor chain.

    The device decides what follows: fail the request (when ``head_index``
    is set it can be returned with ``add_used(head_index, 0)``) or put the
    device in DEVICE_NEEDS_RESET. ``head_index`` is None when there is no
    head that could be returned (a bad ``avail.idx``, a head ``>= size``).
    """

    def __init__(self, message: str, head_index: int | None = None) -> None:
        super().__init__(message)
        self.head_index = head_index


class Descriptor(NamedTuple):
    """One guest buffer: ``length`` bytes at guest-physical ``addr``.

    A named tuple, not a dataclass: one is built per buffer of every request,
    and a tuple costs a third of a frozen dataclass to create.
    """

    addr: int
    length: int
    flags: int

    @property
    def is_write_only(self) -> bool:
        """The device writes this buffer (the driver reads it back)."""
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


@dataclass(slots=True)
class DescriptorChain:
    """A request popped from the avail ring, with indirect tables expanded.

    :meth:`Queue.pop` guarantees: every buffer lies inside guest RAM, the
    device-readable descriptors come before the device-writable ones, and
    each direction's total length fits in a u32. The walk that checks this
    also records the split point and both totals, so a device asks for them
    without walking the chain again.
    """

    head_index: int
    descriptors: list[Descriptor]
    #: How many leading descriptors are device-readable.
    readable_count: int
    readable_bytes: int
    writable_bytes: int

    def readable(self) -> list[Descriptor]:
        """The device-readable part (the driver's request)."""
        return self.descriptors[: self.readable_count]

    def writable(self) -> list[Descriptor]:
        """The device-writable part (room for the device's reply)."""
        return self.descriptors[self.readable_count :]


@dataclass(frozen=True, slots=True)
class QueueState:
    """Everything :meth:`Queue.restore` needs; the rings themselves live in guest RAM."""

    max_size: int
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    event_idx: bool
    next_avail: int
    next_used: int
    signalled_used: int
    signalled_used_valid: bool


class Queue:
    """One split virtqueue, seen from the device.

    ``next_avail`` is the free-running u16 index of the next avail-ring entry
    to pop; ``next_used`` the u16 value ``used.idx`` has after our last
    :meth:`add_used`.
    """

    __slots__ = (
        "_avail_buf",
        "_avail_off",
        "_bound_layout",
        "_bound_mem",
        "_desc_buf",
        "_desc_off",
        "_used_buf",
        "_used_off",
        "avail_ring",
        "desc_table",
        "event_idx",
        "max_size",
        "next_avail",
        "next_used",
        "ready",
        "signalled_used",
        "signalled_used_valid",
        "size",
        "used_ring",
    )

    def __init__(self, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two <= 32768")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after device reset (size defaults to ``max_size``)."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.next_avail = 0
        self.next_used = 0
        # used.idx when needs_notification() last answered; not valid until then.
        self.signalled_used = 0
        self.signalled_used_valid = False
        self._unbind()

    def _unbind(self) -> None:
        self._bound_mem: GuestMemory | None = None
        self._bound_layout: tuple[int, int, int, int] | None = None
        self._desc_buf = self._avail_buf = self._used_buf = None
        self._desc_off = self._avail_off = self._used_off = 0

    def _bind(self, mem: GuestMemory) -> None:
        """Find the three rings' host buffers once per (memory, ring layout).

        The hot paths then ``unpack_from``/``pack_into`` those buffers at
        offsets they range-check themselves, instead of bounds-checking guest
        addresses on every access. Rebinds whenever the driver moved a ring
        or resized the queue.
        """
        size = self.size
        layout = (size, self.desc_table, self.avail_ring, self.used_ring)
        if mem is self._bound_mem and layout == self._bound_layout:
            return
        try:
            desc_buf, desc_off = mem.locate(self.desc_table, desc_table_bytes(size))
        except GuestMemoryError as exc:
            raise QueueError(f"descriptor table is outside guest RAM: {exc}") from exc
        try:
            avail_buf, avail_off = mem.locate(self.avail_ring, avail_ring_bytes(size))
        except GuestMemoryError as exc:
            raise QueueError(f"avail ring is outside guest RAM: {exc}") from exc
        try:
            used_buf, used_off = mem.locate(self.used_ring, used_ring_bytes(size))
        except GuestMemoryError as exc:
            raise QueueError(f"used ring is outside guest RAM: {exc}") from exc
        self._desc_buf, self._desc_off = desc_buf, desc_off
        self._avail_buf, self._avail_off = avail_buf, avail_off
        self._used_buf, self._used_off = used_buf, used_off
        self._bound_mem, self._bound_layout = mem, layout

    # --- configuration ---------------------------------------------------------
    def is_valid(self, mem: GuestMemory) -> bool:
        """True if the driver's configuration can be used.

        Checks the size (a power of two, at most ``max_size``), the ring
        alignments (descriptor table 16, avail 2, used 4) and that each ring,
        event fields included, lies inside guest RAM. It does not look at
        ``ready``, so the transport may call it before or after setting it.
        """
        size = self.size
        return (
            0 < size <= self.max_size
            and not size & (size - 1)
            and self.desc_table % _DESC_ALIGN == 0
            and self.avail_ring % _AVAIL_ALIGN == 0
            and self.used_ring % _USED_ALIGN == 0
            and mem.is_valid(self.desc_table, desc_table_bytes(size))
            and mem.is_valid(self.avail_ring, avail_ring_bytes(size))
            and mem.is_valid(self.used_ring, used_ring_bytes(size))
        )

    # --- the device's side of the rings ---------------------------------------------
    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None if the driver published nothing new.

        Returns None while the queue is not ready. Raises :class:`QueueError`
        on a malformed ring or chain. Once a head has been read from the
        avail ring, ``next_avail`` has moved past it even if the chain turns
        out malformed: the device can return it (``exc.head_index``) with
        ``add_used(head, 0)`` and carry on, and a retry cannot spin on the
        same bad entry. A bad ``avail.idx`` moves nothing (every later pop
        fails the same way: the device should need a reset).
        """
        if not self.ready or not self._pending(mem):
            return None
        size, next_avail = self.size, self.next_avail
        entry = self._avail_off + _RING_ENTRIES + 2 * (next_avail & (size - 1))
        head = _U16_FROM(self._avail_buf, entry)[0]
        self.next_avail = (next_avail + 1) & 0xFFFF
        if head >= size:
            raise QueueError(f"avail ring head {head} is >= queue size {size}")
        try:
            return self._walk(mem, head, size)
        except QueueError as exc:
            exc.head_index = head
            raise

    def _pending(self, mem: GuestMemory) -> int:
        """How many chains the driver published that we have not popped (checked)."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two <= {self.max_size}")
        self._bind(mem)
        avail_idx = _U16_FROM(self._avail_buf, self._avail_off + _RING_IDX)[0]
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > size:
            raise QueueError(
                f"avail.idx {avail_idx} is {pending} entries ahead of {self.next_avail}, "
                f"more than the queue size {size}"
            )
        return pending

    def pop_batch(self, mem: GuestMemory) -> list[DescriptorChain | QueueError]:
        """Every chain the driver has published so far, in ring order.

        The same checks as :meth:`pop`, for the price of one: the rings are
        bound and ``avail.idx`` read once per batch, not once per chain. A
        malformed chain with a head takes its place in the list as its
        :class:`QueueError` (``next_avail`` has moved past it, as with
        :meth:`pop`). An error with no head to return (a bad ``avail.idx``,
        a head ``>= size``) is raised if it comes first; otherwise the batch
        ends before it and the next call raises it.

        The caller may hand back an unserved tail of the batch by moving
        ``next_avail`` back by its length.
        """
        if not self.ready:
            return []
        pending = self._pending(mem)
        size, next_avail = self.size, self.next_avail
        avail_buf, avail_off = self._avail_buf, self._avail_off
        batch: list[DescriptorChain | QueueError] = []
        entries, mask, walk = avail_off + _RING_ENTRIES, size - 1, self._walk
        for _ in range(pending):
            head = _U16_FROM(avail_buf, entries + 2 * (next_avail & mask))[0]
            if head >= size:
                if not batch:
                    self.next_avail = (next_avail + 1) & 0xFFFF
                    raise QueueError(f"avail ring head {head} is >= queue size {size}")
                break
            next_avail = (next_avail + 1) & 0xFFFF
            try:
                batch.append(walk(mem, head, size))
            except QueueError as exc:
                exc.head_index = head
                batch.append(exc)
        self.next_avail = next_avail
        return batch

    def _walk(self, mem: GuestMemory, head: int, size: int) -> DescriptorChain:
        """The flattened chain starting at ``head`` (already checked ``< size``)."""
        descriptors: list[Descriptor] = []
        append = descriptors.append
        table, base = self._desc_buf, self._desc_off
        index = head
        limit = size  # hops left in the current table
        in_indirect = False
        readable_count = -1  # set at the first writable descriptor
        readable_bytes = writable_bytes = 0
        is_valid = mem.is_valid
        while True:
            if limit == 0:
                raise QueueError(f"descriptor chain at head {head} is longer than its table")
            limit -= 1
            addr, length, flags, next_index = _DESC_FROM(table, base + 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise QueueError("nested indirect descriptor table")
                table, base, entries = _indirect_table(mem, addr, length, flags)
                # The table's own WRITE flag is ignored (spec 2.7.5.3.2);
                # its chain starts at entry 0.
                index, size, limit, in_indirect = 0, entries, entries, True
                continue
            if not is_valid(addr, length):
                raise QueueError(f"buffer {addr:#x}+{length:#x} is outside guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                if readable_count < 0:
                    readable_count = len(descriptors)
                writable_bytes += length
            elif readable_count >= 0:
                raise QueueError("device-readable descriptor after a device-writable one")
            else:
                readable_bytes += length
            append(_new_tuple(Descriptor, (addr, length, flags)))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if next_index >= size:
                raise QueueError(f"next index {next_index} is >= table size {size}")
            index = next_index
        return _finished_chain(head, descriptors, readable_count, readable_bytes, writable_bytes)

    def add_used(self, mem: GuestMemory, head_index: int, length: int) -> None:
        """Return chain ``head_index`` to the driver, ``length`` bytes written into it.

        Writes the used element, then ``used.idx`` (in that order, so the
        driver never sees an index covering an unwritten element).
        """
        size = self.size
        _check_used(head_index, length, size)
        self._bind(mem)
        used_buf, used_off = self._used_buf, self._used_off
        next_used = self.next_used
        _USED_ELEM_INTO(
            used_buf, used_off + _RING_ENTRIES + 8 * (next_used % size), head_index, length
        )
        next_used = (next_used + 1) & 0xFFFF
        _store_u16(used_buf, used_off + _RING_IDX, next_used)
        self.next_used = next_used

    def add_used_batch(self, mem: GuestMemory, used: list[tuple[int, int]]) -> None:
        """:meth:`add_used` for each (head, length) of ``used``, with one ``used.idx`` store.

        For a device completing several chains at once (a merged block
        request): the driver sees them all appear together.
        """
        size = self.size
        for head_index, length in used:
            _check_used(head_index, length, size)
        self._bind(mem)
        used_buf, used_off = self._used_buf, self._used_off
        entries, mask = used_off + _RING_ENTRIES, size - 1
        next_used = self.next_used
        for head_index, length in used:
            _USED_ELEM_INTO(used_buf, entries + 8 * (next_used & mask), head_index, length)
            next_used = (next_used + 1) & 0xFFFF
        _store_u16(used_buf, used_off + _RING_IDX, next_used)
        self.next_used = next_used

    # --- notification suppression (spec 2.7.7, 2.7.10) -----------------------------
    def needs_notification(self, mem: GuestMemory) -> bool:
        """Should the device interrupt the driver for the used buffers added so far?

        With EVENT_IDX: yes if ``used.idx`` moved past the driver's
        ``used_event`` since the last time this method was asked. Without:
        yes unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT. Either way, no
        if nothing was added since the last answer, and yes on the first
        question after reset/restore. Records ``next_used`` as notified.
        """
        new = self.next_used
        old = self.signalled_used
        valid = self.signalled_used_valid
        self.signalled_used = new
        self.signalled_used_valid = True
        if valid and new == old:
            return False
        _full_barrier()  # our used.idx store before reading the driver's fields
        self._bind(mem)
        if self.event_idx:
            used_event = _U16_FROM(self._avail_buf, self._avail_off + _RING_ENTRIES + 2 * self.size)
            return not valid or vring_need_event(used_event[0], new, old)
        flags = _U16_FROM(self._avail_buf, self._avail_off + _RING_FLAGS)[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_notification(self, mem: GuestMemory, enabled: bool) -> None:
        """Ask the driver to kick us on new buffers (``enabled``) or not to bother.

        Without EVENT_IDX this sets or clears VIRTQ_USED_F_NO_NOTIFY. With
        EVENT_IDX, enabling writes ``avail_event = next_avail`` (kick me at the
        next buffer); disabling writes nothing, as the driver will not kick
        again until ``avail.idx`` passes the stale ``avail_event``. After
        enabling, the device must pop once more: a buffer published just
        before the driver saw the change would otherwise never be kicked.

        Devices disable notifications while they serve a queue (the driver
        then adds buffers without exits) and enable them once the ring is
        empty. Disabling needs no barrier: a kick that still comes is only
        a wasted wake-up.
        """
        self._bind(mem)
        used_buf, used_off = self._used_buf, self._used_off
        if self.event_idx:
            if not enabled:
                return
            _store_u16(used_buf, used_off + _RING_ENTRIES + 8 * self.size, self.next_avail)
        else:
            flags = _U16_FROM(used_buf, used_off + _RING_FLAGS)[0]
            if enabled:
                flags &= ~VIRTQ_USED_F_NO_NOTIFY
            else:
                flags |= VIRTQ_USED_F_NO_NOTIFY
            _store_u16(used_buf, used_off + _RING_FLAGS, flags)
            if not enabled:
                return
        _full_barrier()  # our store before the caller re-reads avail.idx

    # --- persistence -------------------------------------------------------------
    def save(self) -> QueueState:
        return QueueState(
            max_size=self.max_size,
            size=self.size,
            ready=self.ready,
            desc_table=self.desc_table,
            avail_ring=self.avail_ring,
            used_ring=self.used_ring,
            event_idx=self.event_idx,
            next_avail=self.next_avail,
            next_used=self.next_used,
            signalled_used=self.signalled_used,
            signalled_used_valid=self.signalled_used_valid,
        )

    def restore(self, state: QueueState) -> None:
        """Load a :meth:`save` result; the max size is the device's, so it must match."""
        if state.max_size != self.max_size:
            raise ValueError(f"saved max size {state.max_size} != queue max size {self.max_size}")
        for name in ("next_avail", "next_used", "signalled_used"):
            if not 0 <= getattr(state, name) <= 0xFFFF:
                raise ValueError(f"saved {name} {getattr(state, name)} is not a u16")
        self.size = state.size
        self.ready = state.ready
        self.desc_table = state.desc_table
        self.avail_ring = state.avail_ring
        self.used_ring = state.used_ring
        self.event_idx = state.event_idx
        self.next_avail = state.next_avail
        self.next_used = state.next_used
        self.signalled_used = state.signalled_used
        self.signalled_used_valid = state.signalled_used_valid


def _finished_chain(
    head: int,
    descriptors: list[Descriptor],
    readable_count: int,
    readable_bytes: int,
    writable_bytes: int,
) -> DescriptorChain:
    """The chain :meth:`Queue._walk` collected (``readable_count`` -1: all readable)."""
    if readable_bytes > MAX_CHAIN_BYTES or writable_bytes > MAX_CHAIN_BYTES:
        raise QueueError("descriptor chain's total length overflows a u32")
    if readable_count < 0:
        readable_count = len(descriptors)
    return DescriptorChain(head, descriptors, readable_count, readable_bytes, writable_bytes)


def _indirect_table(
    mem: GuestMemory, addr: int, length: int, flags: int
) -> tuple[object, int, int]:
    """The buffer, offset and entry count of the indirect table a descriptor points at."""
    if flags & VIRTQ_DESC_F_NEXT:
        raise QueueError("descriptor has both INDIRECT and NEXT")
    if length == 0 or length % DESC.size:
        raise QueueError(f"indirect table length {length} is not a multiple of 16")
    entries = length // DESC.size
    if entries > MAX_INDIRECT_DESCRIPTORS:
        raise QueueError(f"indirect table of {entries} entries exceeds {MAX_INDIRECT_DESCRIPTORS}")
    try:
        table, base = mem.locate(addr, length)
    except GuestMemoryError:
        raise QueueError(f"indirect table {addr:#x}+{length:#x} outside guest RAM") from None
    return table, base, entries
