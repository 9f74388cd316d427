from __future__ import annotations

import pytest

from pyvmm.vmm.bus import Bus, BusConflictError


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([offset]) * len(data)

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, bytes(data)))


def test_dispatch_uses_offsets() -> None:
    bus = Bus("pio")
    device = Recorder()
    bus.add(0x3F8, 8, device)
    data = memoryview(bytearray(1))
    assert bus.read(0x3FD, data)
    assert data[0] == 5
    assert bus.write(0x3F8, memoryview(b"A"))
    assert device.writes == [(0, b"A")]


@pytest.mark.parametrize(("base", "length"), [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x20)])
def test_overlap_rejected(base: int, length: int) -> None:
    bus = Bus("pio")
    bus.add(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(BusConflictError, match="overlaps com1"):
        bus.add(base, length, Recorder())


def test_adjacent_ranges_allowed() -> None:
    bus = Bus("mmio")
    bus.add(0x1000, 0x1000, Recorder(), "a")
    bus.add(0x2000, 0x1000, Recorder(), "b")
    bus.add(0x0, 0x1000, Recorder(), "c")
    assert [r.name for r in bus.ranges()] == ["c", "a", "b"]


def test_invalid_range_rejected() -> None:
    with pytest.raises(BusConflictError):
        Bus("x").add(0x10, 0, Recorder())


def test_holes_are_counted_not_raised() -> None:
    bus = Bus("pio")
    bus.add(0x60, 5, Recorder())
    data = memoryview(bytearray(2))
    assert not bus.read(0x70, data)
    assert bytes(data) == b"\xff\xff"
    assert not bus.write(0x71, data)
    # an access straddling the end of a device is a hole too
    assert not bus.read(0x64, memoryview(bytearray(2)))
    assert (bus.unhandled_reads, bus.unhandled_writes) == (2, 1)
