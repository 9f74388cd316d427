"""Address-range dispatch for port-I/O and MMIO exits.

A :class:`Bus` maps non-overlapping ``[base, base+length)`` ranges to
devices. Overlapping ranges are rejected when added. An access that hits no
device (a "hole") is counted, and a read from a hole returns all ones like
an unclaimed ISA/PCI bus, instead of raising: a guest probing for hardware
that does not exist is normal, not an error.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from pyvmm.devices.base import BusDevice


class BusConflictError(ValueError):
    """A range was added that overlaps one already on the bus."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """One address space (port I/O or MMIO) and the devices on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._ranges: list[BusRange] = []
        self.unhandled_reads = 0
        self.unhandled_writes = 0

    def add(self, base: int, length: int, device: BusDevice, name: str = "") -> None:
        """Place ``device`` at ``[base, base+length)``; overlaps raise."""
        if length <= 0 or base < 0:
            raise BusConflictError(f"{self.name}: invalid range {base:#x}+{length:#x}")
        new = BusRange(base, length, device, name or type(device).__name__)
        index = bisect.bisect_left(self._bases, base)
        for neighbour in self._ranges[max(index - 1, 0) : index + 1]:
            if neighbour.base < new.end and base < neighbour.end:
                raise BusConflictError(
                    f"{self.name}: {new.name} at {base:#x}+{length:#x} overlaps "
                    f"{neighbour.name} at {neighbour.base:#x}+{neighbour.length:#x}"
                )
        self._bases.insert(index, base)
        self._ranges.insert(index, new)

    def ranges(self) -> tuple[BusRange, ...]:
        return tuple(self._ranges)

    def find(self, addr: int) -> BusRange | None:
        """The range containing ``addr``, if any."""
        index = bisect.bisect_right(self._bases, addr) - 1
        if index >= 0:
            found = self._ranges[index]
            if addr < found.end:
                return found
        return None

    def read(self, addr: int, data: memoryview) -> bool:
        """Dispatch a read; returns False (and fills ones) for a hole."""
        found = self.find(addr)
        if found is None or addr + len(data) > found.end:
            self.unhandled_reads += 1
            data[:] = b"\xff" * len(data)
            return False
        found.device.read(addr - found.base, data)
        return True

    def write(self, addr: int, data: memoryview) -> bool:
        """Dispatch a write; returns False (and drops it) for a hole."""
        found = self.find(addr)
        if found is None or addr + len(data) > found.end:
            self.unhandled_writes += 1
            return False
        found.device.write(addr - found.base, data)
        return True
