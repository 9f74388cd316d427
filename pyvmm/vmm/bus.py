"""Address-range dispatch for port-I/O and MMIO exits.

A :class:`Bus` maps non-overlapping ``[base, base+length)`` ranges to
devices. Overlapping ranges are rejected when added. An access that hits no
device (a "hole") is counted, and a read from a hole returns all ones like
an unclaimed ISA/PCI bus, instead of raising: a guest probing for hardware
that does not exist is normal, not an error.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from pyvmm.devices.base import BusDevice


class BusConflictError(ValueError):
    """A range was added that overlaps one already on the bus."""


class BusRange(NamedTuple):
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


_CACHE_LIMIT = 4096


class Bus:
    """One address space (port I/O or MMIO) and the devices on it.

    Guests hit the same few addresses over and over (a UART's data and
    status registers, a queue-notify register), so each address that lands
    on a device is remembered in a dict: the exit path then costs one dict
    lookup instead of a bisect and a range check. Only hits are cached and
    the cache is bounded, so a guest scanning addresses cannot grow it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._ranges: list[BusRange] = []
        self._cache: dict[int, tuple[BusDevice, int, int]] = {}
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
        self._cache.clear()

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

    def _lookup(self, addr: int) -> tuple[BusDevice, int, int] | None:
        """(device, offset, bytes left in its window) for ``addr``, cached."""
        hit = self._cache.get(addr)
        if hit is None:
            found = self.find(addr)
            if found is None:
                return None
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            hit = self._cache[addr] = (found.device, addr - found.base, found.end - addr)
        return hit

    def read(self, addr: int, data: memoryview) -> bool:
        """Dispatch a read; returns False (and fills ones) for a hole."""
        hit = self._lookup(addr)
        if hit is None or len(data) > hit[2]:
            self.unhandled_reads += 1
            data[:] = b"\xff" * len(data)
            return False
        hit[0].read(hit[1], data)
        return True

    def write(self, addr: int, data: memoryview) -> bool:
        """Dispatch a write; returns False (and drops it) for a hole."""
        hit = self._lookup(addr)
        if hit is None or len(data) > hit[2]:
            self.unhandled_writes += 1
            return False
        hit[0].write(hit[1], data)
        return True
