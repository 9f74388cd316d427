"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).

:class:`MmioTransport` is the register file a guest driver sees in one
``layout.MMIO_DEVICE_WINDOW`` window; it wraps one
:class:`~pyvmm.devices.virtio.device.VirtioDevice`. It owns the device status,
feature negotiation, the queues' configuration and the interrupt status,
and activates the device when the driver writes DRIVER_OK.

Rules a guest cannot break the host with:

* registers below 0x100 take only aligned 32-bit accesses; anything else
  reads zero or is ignored, and is counted in :attr:`invalid_accesses`;
* FEATURES_OK sticks only if the driver accepted a subset of the offered
  features including VIRTIO_F_VERSION_1 (this transport speaks no legacy);
* a queue's registers change only while the queue is not ready and the
  device is not running;
* a guest error while activating or processing a queue (an invalid ring, a
  malformed chain) sets DEVICE_NEEDS_RESET and signals a config change;
  nothing is raised out of :meth:`read`/:meth:`write`/:meth:`process_queue`.

Threads: a vCPU thread calls :meth:`read`/:meth:`write`; the event loop may
call :meth:`process_queue` after an ioeventfd fired. Both take the
transport's lock, so a reset never runs under a queue being processed.
``on_notify`` is called without the lock held.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from pyvmm.devices.base import IrqTrigger
from pyvmm.devices.virtio.device import VirtioDevice, VirtioInterrupt, VirtioInterruptState
from pyvmm.devices.virtio.queue import Queue, QueueState
from pyvmm.errors import GuestError
from pyvmm.memory import GuestMemory

_logger = logging.getLogger("pyvmm.devices.virtio.mmio")
T = TypeVar("T")

# --- register offsets ---------------------------------------------------------


class Reg(IntEnum):
    """Register offsets in the transport window (config space starts at CONFIG)."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


MMIO_MAGIC = 0x7472_6976  # "virt"
MMIO_VERSION = 2
VENDOR_QEMU = 0x554D_4551  # "QEMU": what Linux and every other VMM expect to see

# --- device status bits ---------------------------------------------------------
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# --- transport feature bits -----------------------------------------------------
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
TRANSPORT_FEATURES = (
    (1 << VIRTIO_F_RING_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1)
)

_U32_MASK = 0xFFFF_FFFF
_LOW32 = 0xFFFF_FFFF
_HIGH32 = 0xFFFF_FFFF << 32
# Status bits the driver may set itself (DEVICE_NEEDS_RESET is the device's).
_DRIVER_STATUS_BITS = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED
)


@dataclass(frozen=True)
class MmioTransportState:
    """Everything a restored transport needs besides the device and memory."""

    status: int
    device_features_sel: int
    driver_features_sel: int
    acked_features: int
    queue_sel: int
    interrupt: VirtioInterruptState
    queues: tuple[QueueState, ...]
    device: object  # the device's own save()


class MmioTransport:
    """A virtio-mmio v2 register file around one device; see the module docstring."""

    def __init__(
        self,
        device: VirtioDevice,
        irq: IrqTrigger,
        mem: GuestMemory,
        on_notify: Callable[[int], None] | None = None,
        *,
        vendor_id: int = VENDOR_QEMU,
    ) -> None:
        """``on_notify(index)`` receives QueueNotify writes (default: process at once)."""
        self.device = device
        self.mem = mem
        self.interrupt = VirtioInterrupt(irq)
        self.queues = [Queue(size) for size in device.queue_max_sizes]
        self._on_notify = on_notify
        self._vendor_id = vendor_id
        self._lock = threading.Lock()
        self.invalid_accesses = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.acked_features = 0
        self.queue_sel = 0

    @property
    def offered_features(self) -> int:
        return self.device.avail_features | TRANSPORT_FEATURES

    # --- BusDevice ------------------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from register or config space at ``offset``."""
        with self._lock:
            if offset >= Reg.CONFIG:
                self._config_access(offset - Reg.CONFIG, data, is_write=False)
                return
            if len(data) != 4 or offset % 4:
                self._invalid("read", offset, len(data))
                data[:] = bytes(len(data))
                return
            value = self._read_register(offset)
            data[:] = (value & _U32_MASK).to_bytes(4, "little")

    def write(self, offset: int, data: memoryview) -> None:
        """Accept a driver write at ``offset``; may notify a queue (outside the lock)."""
        notify: int | None = None
        with self._lock:
            if offset >= Reg.CONFIG:
                self._config_access(offset - Reg.CONFIG, data, is_write=True)
                return
            if len(data) != 4 or offset % 4:
                self._invalid("write", offset, len(data))
                return
            value = int.from_bytes(data, "little")
            if offset == Reg.QUEUE_NOTIFY:
                notify = self._notify_target(value)
            else:
                self._write_register(offset, value)
        if notify is None:
            return
        if self._on_notify is not None:
            self._on_notify(notify)
        else:
            self.process_queue(notify)

    # --- queue processing ---------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """Let the device process queue ``index`` if it is running; guest errors -> NEEDS_RESET."""
        with self._lock:
            if not self._running() or not 0 <= index < len(self.queues):
                return
            if not self.queues[index].ready:
                return
            try:
                self.device.process_queue(index)
            except GuestError as exc:
                _logger.warning(
                    "virtio device %d queue %d: %s", self.device.device_type, index, exc
                )
                self._needs_reset()

    def _running(self) -> bool:
        return (
            self.status & STATUS_DRIVER_OK != 0
            and self.status & STATUS_DEVICE_NEEDS_RESET == 0
            and self.device.activated
        )

    def _notify_target(self, value: int) -> int | None:
        index = value & 0xFFFF  # without NOTIFICATION_DATA, just the queue index
        if not self._running() or index >= len(self.queues) or not self.queues[index].ready:
            self._invalid("notify", Reg.QUEUE_NOTIFY, 4)
            return None
        return index

    def _needs_reset(self) -> None:
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self.interrupt.signal_config_change()

    # --- registers ------------------------------------------------------------
    def _selected_queue(self) -> Queue | None:
        if 0 <= self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    def _read_register(self, offset: int) -> int:  # noqa: C901 - the register map, one match
        queue = self._selected_queue()
        match offset:
            case Reg.MAGIC_VALUE:
                return MMIO_MAGIC
            case Reg.VERSION:
                return MMIO_VERSION
            case Reg.DEVICE_ID:
                return self.device.device_type
            case Reg.VENDOR_ID:
                return self._vendor_id
            case Reg.DEVICE_FEATURES:
                if self.device_features_sel > 1:
                    return 0
                return self.offered_features >> (32 * self.device_features_sel)
            case Reg.QUEUE_NUM_MAX:
                return self.device.queue_max_sizes[self.queue_sel] if queue is not None else 0
            case Reg.QUEUE_NUM:
                return queue.size if queue is not None else 0
            case Reg.QUEUE_READY:
                return int(queue.ready) if queue is not None else 0
            case Reg.INTERRUPT_STATUS:
                return self.interrupt.status
            case Reg.STATUS:
                return self.status
            case Reg.QUEUE_DESC_LOW:
                return self._queue_field(queue, "desc_table")
            case Reg.QUEUE_DESC_HIGH:
                return self._queue_field(queue, "desc_table") >> 32
            case Reg.QUEUE_DRIVER_LOW:
                return self._queue_field(queue, "avail_ring")
            case Reg.QUEUE_DRIVER_HIGH:
                return self._queue_field(queue, "avail_ring") >> 32
            case Reg.QUEUE_DEVICE_LOW:
                return self._queue_field(queue, "used_ring")
            case Reg.QUEUE_DEVICE_HIGH:
                return self._queue_field(queue, "used_ring") >> 32
            case Reg.SHM_LEN_LOW | Reg.SHM_LEN_HIGH | Reg.SHM_BASE_LOW | Reg.SHM_BASE_HIGH:
                return _U32_MASK  # no shared memory region: length and base all ones
            case Reg.CONFIG_GENERATION:
                return self.interrupt.config_generation
            case (  # write-only registers
                Reg.DEVICE_FEATURES_SEL
                | Reg.DRIVER_FEATURES
                | Reg.DRIVER_FEATURES_SEL
                | Reg.QUEUE_SEL
                | Reg.QUEUE_NOTIFY
                | Reg.INTERRUPT_ACK
                | Reg.SHM_SEL
                | Reg.QUEUE_RESET
            ):
                return 0
            case _:
                self._invalid("read", offset, 4)
                return 0

    @staticmethod
    def _queue_field(queue: Queue | None, name: str) -> int:
        return getattr(queue, name) if queue is not None else 0

    def _write_register(self, offset: int, value: int) -> None:
        match offset:
            case Reg.DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            case Reg.DRIVER_FEATURES:
                self._write_driver_features(value)
            case Reg.DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            case Reg.QUEUE_SEL:
                self.queue_sel = value
            case Reg.QUEUE_NUM:
                self._write_queue(offset, value)
            case Reg.QUEUE_READY:
                self._write_queue_ready(value)
            case Reg.INTERRUPT_ACK:
                self.interrupt.ack(value)
            case Reg.STATUS:
                self._write_status(value)
            case (
                Reg.QUEUE_DESC_LOW
                | Reg.QUEUE_DESC_HIGH
                | Reg.QUEUE_DRIVER_LOW
                | Reg.QUEUE_DRIVER_HIGH
                | Reg.QUEUE_DEVICE_LOW
                | Reg.QUEUE_DEVICE_HIGH
            ):
                self._write_queue(offset, value)
            case Reg.SHM_SEL:
                pass  # SHMSel: we have no shared memory regions to select
            case _:
                self._invalid("write", offset, 4)

    def _write_driver_features(self, value: int) -> None:
        if (
            self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK)
            or self.status & STATUS_DRIVER == 0
            or self.driver_features_sel > 1
        ):
            self._invalid("write", Reg.DRIVER_FEATURES, 4)
            return
        shift = 32 * self.driver_features_sel
        keep = _HIGH32 if shift == 0 else _LOW32
        self.acked_features = (self.acked_features & keep) | (value << shift)

    def _queue_writable(self, offset: int) -> Queue | None:
        queue = self._selected_queue()
        if queue is None or queue.ready or self.status & STATUS_DRIVER_OK:
            self._invalid("write", offset, 4)
            return None
        return queue

    def _write_queue(self, offset: int, value: int) -> None:
        queue = self._queue_writable(offset)
        if queue is None:
            return
        if offset == Reg.QUEUE_NUM:
            queue.size = value
            return
        name = {0x80: "desc_table", 0x90: "avail_ring", 0xA0: "used_ring"}[offset & ~0xF]
        old = getattr(queue, name)
        if offset & 0x4:
            setattr(queue, name, (old & _LOW32) | (value << 32))
        else:
            setattr(queue, name, (old & _HIGH32) | value)

    def _write_queue_ready(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is None or self.status & STATUS_DRIVER_OK:
            self._invalid("write", Reg.QUEUE_READY, 4)
            return
        queue.ready = value & 1 == 1

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        value &= ~STATUS_DEVICE_NEEDS_RESET  # the device's bit: a read-modify-write echoes it
        new_bits = value & ~self.status
        if value & ~_DRIVER_STATUS_BITS or self.status & ~value & _DRIVER_STATUS_BITS:
            # The driver only ever sets bits (or writes 0 to reset).
            self._invalid("write", Reg.STATUS, 4)
            return
        if new_bits & STATUS_FEATURES_OK and not self._features_acceptable():
            new_bits &= ~STATUS_FEATURES_OK  # read back without FEATURES_OK: refused
        if new_bits & STATUS_DRIVER_OK and not (self.status | new_bits) & STATUS_FEATURES_OK:
            new_bits &= ~STATUS_DRIVER_OK
            self._invalid("write", Reg.STATUS, 4)
        self.status |= new_bits
        if new_bits & STATUS_DRIVER_OK:
            self._activate()

    def _features_acceptable(self) -> bool:
        acked = self.acked_features
        return acked & ~self.offered_features == 0 and acked >> VIRTIO_F_VERSION_1 & 1 == 1

    def _activate(self) -> None:
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        event_idx = self.acked_features >> VIRTIO_RING_F_EVENT_IDX & 1 == 1
        for index, queue in enumerate(self.queues):
            queue.event_idx = event_idx
            if queue.ready and not self._queue_usable(index):
                _logger.warning(
                    "virtio device %d: queue %d is invalid", self.device.device_type, index
                )
                self._needs_reset()
                return
        try:
            self.device.activate(self.mem, self.queues, self.interrupt, self.acked_features)
        except GuestError as exc:
            _logger.warning("virtio device %d: activation: %s", self.device.device_type, exc)
            self.device.reset()
            self._needs_reset()

    def _queue_usable(self, index: int) -> bool:
        queue = self.queues[index]
        size = queue.size
        if not 0 < size <= self.device.queue_max_sizes[index] or size & (size - 1):
            return False
        return queue.is_valid(self.mem)

    def _reset(self) -> None:
        self.device.reset()
        for queue in self.queues:
            queue.reset()
        self.interrupt.reset()
        self._reset_registers()

    # --- config space ---------------------------------------------------------
    def _config_access(self, offset: int, data: memoryview, *, is_write: bool) -> None:
        size = len(data)
        if size == 8:
            parts = ((offset, data[:4]), (offset + 4, data[4:]))
        elif size in (1, 2, 4):
            parts = ((offset, data),)
        else:
            self._invalid("write" if is_write else "read", Reg.CONFIG + offset, size)
            if not is_write:
                data[:] = bytes(size)
            return
        for part_offset, part in parts:
            if is_write:
                self.device.write_config(part_offset, part)
            else:
                self.device.read_config(part_offset, part)

    def _invalid(self, kind: str, offset: int, size: int) -> None:
        self.invalid_accesses += 1
        _logger.debug("virtio-mmio: ignored %d-byte %s at %#x", size, kind, offset)

    # --- snapshot ---------------------------------------------------------------
    def run_locked(self, action: Callable[[VirtioDevice], T]) -> T:
        """``action(device)`` under the transport lock, as queue processing runs.

        For device calls from outside the register interface, such as
        virtio-vsock's transport reset after a snapshot is restored.
        """
        with self._lock:
            return action(self.device)

    def save(self) -> MmioTransportState:
        with self._lock:
            return MmioTransportState(
                status=self.status,
                device_features_sel=self.device_features_sel,
                driver_features_sel=self.driver_features_sel,
                acked_features=self.acked_features,
                queue_sel=self.queue_sel,
                interrupt=self.interrupt.save(),
                queues=tuple(queue.save() for queue in self.queues),
                device=self.device.save(),
            )

    def restore(self, state: MmioTransportState) -> None:
        """Load ``state``; re-activates the device if the driver had it running."""
        if len(state.queues) != len(self.queues):
            raise ValueError(
                f"virtio-mmio state has {len(state.queues)} queues, device has {len(self.queues)}"
            )
        with self._lock:
            self.device.reset()
            for queue, queue_state in zip(self.queues, state.queues, strict=True):
                queue.restore(queue_state)
            self.interrupt.restore(state.interrupt)
            self.status = state.status & (_DRIVER_STATUS_BITS | STATUS_DEVICE_NEEDS_RESET)
            self.device_features_sel = state.device_features_sel
            self.driver_features_sel = state.driver_features_sel
            self.acked_features = state.acked_features
            self.queue_sel = state.queue_sel
            self.device.restore(state.device)
            if self.status & STATUS_DRIVER_OK:
                # The same checks as a driver's DRIVER_OK: a state file whose rings
                # are not usable marks the device as needing a reset, never more.
                self._activate()
