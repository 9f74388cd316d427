"""What every device model implements, and what it is given.

A device is a register file: it sees offsets into its own window, never
absolute addresses, and data as a small ``memoryview`` that the vCPU exit
handler owns (for port I/O 1, 2 or 4 bytes; for MMIO up to 8). A read fills
``data`` in place, so dispatching an exit allocates nothing.

Side effects are injected: an :class:`IrqTrigger` to raise an interrupt, and
plain callables for anything else (output, reset requests). A device never
calls an ioctl, opens a file or starts a thread, so unit tests drive it with
fakes and no KVM.
"""

from __future__ import annotations

from typing import Protocol


class BusDevice(Protocol):
    """A device that owns one address range on a :class:`pyvmm.vmm.bus.Bus`."""

    def read(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` with the value at ``offset`` (little-endian)."""

    def write(self, offset: int, data: memoryview) -> None:
        """Accept the guest's write of ``data`` at ``offset``."""


class IrqTrigger(Protocol):
    """An edge-triggered interrupt line (an irqfd, or a test fake)."""

    def trigger(self) -> None:
        """Signal one interrupt edge to the guest."""


class NoIrq:
    """An interrupt line connected to nothing (for tests and bare probes)."""

    def trigger(self) -> None:
        return None
