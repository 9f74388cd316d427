"""What a virtio device model implements, and the interrupt it is given.

A :class:`VirtioDevice` knows its own queues and config space, nothing about
the transport: the transport (``pyvmm.devices.virtio.mmio.MmioTransport``) owns the
register file, feature negotiation and the :class:`~pyvmm.devices.virtio.queue.Queue`
objects, and hands the device its guest memory, its queues and a
:class:`VirtioInterrupt` only at :meth:`VirtioDevice.activate` (the driver
wrote DRIVER_OK). Until then, and again after :meth:`VirtioDevice.reset`,
the device is inactive and holds no reference to any of them.

Like every device model, a virtio device never calls an ioctl, opens a file
or starts a thread: :meth:`VirtioDevice.process_queue` is called by whoever
learns of a driver notification (the transport in tests, an ioeventfd
handler on the event loop in the VMM).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.devices.base import IrqTrigger
from pyvmm.devices.virtio.queue import DescriptorChain, QueueError

if TYPE_CHECKING:
    from pyvmm.devices.virtio.queue import Queue
    from pyvmm.memory import GuestMemory

# --- InterruptStatus bits -----------------------------------------------------
VIRTIO_MMIO_INT_VRING = 1  # a used buffer was added to some queue
VIRTIO_MMIO_INT_CONFIG = 2  # the configuration changed (or the device needs a reset)


@dataclass(frozen=True)
class VirtioInterruptState:
    status: int
    config_generation: int


class VirtioInterrupt:
    """The interrupt line of one transport plus its InterruptStatus bits.

    A device calls :meth:`signal_used_queue` from whatever thread processes
    its queues while a vCPU thread reads and acknowledges the status through
    the transport, so the bits live under a lock. The edge is sent after the
    lock is released.
    """

    def __init__(self, irq: IrqTrigger) -> None:
        self._irq = irq
        self._lock = threading.Lock()
        self._status = 0
        self._config_generation = 0

    @property
    def status(self) -> int:
        """The InterruptStatus register value."""
        with self._lock:
            return self._status

    @property
    def config_generation(self) -> int:
        """Bumped by every :meth:`signal_config_change` (the ConfigGeneration register)."""
        with self._lock:
            return self._config_generation

    def signal_used_queue(self) -> None:
        """Set the used-buffer bit and send an edge."""
        with self._lock:
            self._status |= VIRTIO_MMIO_INT_VRING
        self._irq.trigger()

    def signal_config_change(self) -> None:
        """Set the config-change bit, bump the generation and send an edge."""
        with self._lock:
            self._status |= VIRTIO_MMIO_INT_CONFIG
            self._config_generation = (self._config_generation + 1) & 0xFFFF_FFFF
        self._irq.trigger()

    def ack(self, bits: int) -> None:
        """Clear the bits the driver wrote to InterruptACK."""
        with self._lock:
            self._status &= ~bits

    def reset(self) -> None:
        """Clear the status bits (the generation keeps counting, as it must only change)."""
        with self._lock:
            self._status = 0

    def save(self) -> VirtioInterruptState:
        with self._lock:
            return VirtioInterruptState(self._status, self._config_generation)

    def restore(self, state: VirtioInterruptState) -> None:
        with self._lock:
            self._status = state.status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)
            self._config_generation = state.config_generation & 0xFFFF_FFFF


def copy_config(config: bytes, offset: int, data: memoryview) -> None:
    """Fill ``data`` from config-space bytes at ``offset``; beyond the end reads 0."""
    chunk = config[offset : offset + len(data)] if offset >= 0 else b""
    data[:] = chunk.ljust(len(data), b"\0")


class VirtioDevice:
    """Base class of the virtio device models; subclasses set the class attributes.

    * ``device_type``: the virtio device ID (:mod:`pyvmm.devices.virtio.ids`);
    * ``queue_max_sizes``: one maximum size per queue, in queue-index order;
    * ``avail_features``: the device-specific feature bits it offers (the
      transport adds the transport bits such as VIRTIO_F_VERSION_1).

    Subclasses implement :meth:`process_queue` and :meth:`save`/:meth:`restore`
    (every device: persistence is a contract); a device with a config space
    overrides :meth:`read_config`/:meth:`write_config`.
    """

    device_type: int = 0
    queue_max_sizes: tuple[int, ...] = ()
    avail_features: int = 0
    #: The queue to serve when the device's host back end has news for the guest
    #: (a TAP with frames, vsock sockets with data): the receive queue.
    backend_queue: int = 0
    # A rate-limited device sets ``throttled`` when it left requests in the
    # ring, and ``retry_after`` (seconds) for when its owner should process
    # the queue again.
    throttled: bool = False
    retry_after: float = 0.0

    def __init__(self) -> None:
        self.mem: GuestMemory | None = None
        self.queues: list[Queue] = []
        self.interrupt: VirtioInterrupt | None = None
        self.acked_features = 0

    @property
    def activated(self) -> bool:
        return self.mem is not None

    # --- configuration space (offsets relative to the start of config space) ---
    def read_config(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` from the config space; beyond its end reads zero."""
        data[:] = bytes(len(data))

    def write_config(self, offset: int, data: memoryview) -> None:
        """Accept a driver write into config space (ignored by default)."""
        return None

    # --- lifecycle ------------------------------------------------------------
    def activate(
        self,
        mem: GuestMemory,
        queues: list[Queue],
        interrupt: VirtioInterrupt,
        acked_features: int = 0,
    ) -> None:
        """Start using ``queues`` in ``mem``; the driver wrote DRIVER_OK.

        ``acked_features`` is every feature bit the driver accepted (device
        and transport bits alike). Raising :class:`~pyvmm.errors.GuestError`
        refuses the activation: the transport then reports DEVICE_NEEDS_RESET.
        """
        self.mem = mem
        self.queues = queues
        self.interrupt = interrupt
        self.acked_features = acked_features

    def process_queue(self, index: int) -> None:
        """Handle a driver notification of queue ``index`` (only called when activated).

        May raise :class:`~pyvmm.errors.GuestError` (for example
        ``QueueError`` on a malformed chain); the transport then puts the
        device in DEVICE_NEEDS_RESET.
        """
        raise NotImplementedError

    def serve_queue(
        self,
        index: int,
        handle: Callable[[DescriptorChain], int | None],
        on_malformed: Callable[[QueueError], None] | None = None,
    ) -> bool:
        """Hand every available chain of queue ``index`` to ``handle``; the loop
        every request queue shares.

        ``handle`` returns the used length, or None to leave the chain in the
        ring for later (a rate limiter ran dry): serving stops there and this
        returns True. A malformed chain that still has a head goes to
        ``on_malformed`` and back to the driver with length 0; without
        ``on_malformed`` (or with no head to return) the QueueError propagates
        and the transport marks the device as needing a reset. Notifications
        and interrupts as in :meth:`serve_batches`.
        """
        mem = self.mem
        assert mem is not None
        queue = self.queues[index]
        add_used = queue.add_used

        def handle_batch(batch: list[DescriptorChain | QueueError]) -> int:
            for position, chain in enumerate(batch):
                if type(chain) is not DescriptorChain:
                    if on_malformed is None:
                        raise chain
                    on_malformed(chain)
                    add_used(mem, chain.head_index, 0)
                    continue
                length = handle(chain)
                if length is None:
                    return len(batch) - position
                add_used(mem, chain.head_index, length)
            return 0

        return self.serve_batches(index, handle_batch)

    def serve_batches(
        self, index: int, handle_batch: Callable[[list[DescriptorChain | QueueError]], int]
    ) -> bool:
        """Hand queue ``index``'s available chains to ``handle_batch``, a batch at a time.

        A batch is what :meth:`Queue.pop_batch` returns: chains, and the
        QueueError of each malformed one, in ring order. ``handle_batch``
        completes what it takes (``add_used``) and returns how many chains
        at the *end* of the batch it left untouched (0 normally; more when a
        rate limiter ran dry): those go back to the ring and serving stops,
        and this returns True (deferred).

        Notifications are off while the device is busy, so the driver adds
        requests without an exit per kick (the device finds them on its next
        pop); once the ring is empty they are re-enabled and the ring checked
        once more for a chain published before the driver could see that
        (spec 2.7.10). With VIRTIO_F_EVENT_IDX "off" means ``avail_event`` is
        left stale, which has the same effect, as in QEMU and Firecracker.
        One interrupt per call, if anything was used and the driver wants it.
        """
        mem, interrupt = self.mem, self.interrupt
        assert mem is not None and interrupt is not None
        queue = self.queues[index]
        used_before = queue.next_used
        deferred = False
        queue.set_notification(mem, False)
        batch = queue.pop_batch(mem)
        while True:
            if batch:
                untouched = handle_batch(batch)
                if untouched:
                    queue.next_avail = (queue.next_avail - untouched) & 0xFFFF
                    deferred = True
                    break
            # Served what there was: notifications back on, then one more look
            # (rather than a look first: at queue depth 1 that pop finds nothing).
            queue.set_notification(mem, True)
            batch = queue.pop_batch(mem)
            if not batch:
                break
            queue.set_notification(mem, False)
        if queue.next_used != used_before and queue.needs_notification(mem):
            interrupt.signal_used_queue()
        return deferred

    def reset(self) -> None:
        """Back to inactive: forget memory, queues and interrupt (the driver wrote 0)."""
        self.mem = None
        self.queues = []
        self.interrupt = None
        self.acked_features = 0

    def save(self) -> object:
        """The device's own state (not the queues or memory, which the transport saves).

        Every device implements it, even one with little state: a device that
        cannot be saved fails loudly here rather than restoring half-made.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be saved in a snapshot")

    def restore(self, state: object) -> None:
        """Load the state from :meth:`save`; called on an inactive device.

        Raises ValueError (or TypeError) for a state that does not fit the device.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be restored from a snapshot")
