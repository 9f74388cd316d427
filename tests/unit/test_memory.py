from __future__ import annotations

import struct

import pytest

from pyvmm import layout
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory


@pytest.fixture
def mem() -> GuestMemory:
    with GuestMemory.with_size(16 << 20) as memory:
        yield memory


def test_regions_split_around_mmio_hole() -> None:
    assert layout.ram_regions(64 << 20) == [(0, 64 << 20)]
    assert layout.ram_regions(4 << 30) == [
        (0, layout.MMIO_HOLE_START),
        (layout.HIGH_RAM_START, (4 << 30) - layout.MMIO_HOLE_START),
    ]


def test_large_memory_has_two_regions_and_no_ram_in_hole() -> None:
    with GuestMemory.with_size(4 << 30) as memory:
        assert [r.guest_addr for r in memory] == [0, layout.HIGH_RAM_START]
        assert memory.size == 4 << 30
        memory.write_u64(layout.HIGH_RAM_START, 7)
        assert memory.read_u64(layout.HIGH_RAM_START) == 7
        with pytest.raises(GuestMemoryError):
            memory.read(layout.MMIO_HOLE_START, 1)


def test_read_write_roundtrip(mem: GuestMemory) -> None:
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    mem.write_u16(0x2000, 0xBEEF)
    mem.write_u32(0x2004, 0xDEADBEEF)
    assert mem.read_u16(0x2000) == 0xBEEF
    assert mem.read_u32(0x2004) == 0xDEADBEEF
    assert mem.read(0x2000, 2) == b"\xef\xbe"
    mem.write_struct(struct.Struct("<IH"), 0x3000, 1, 2)
    assert mem.read_struct(struct.Struct("<IH"), 0x3000) == (1, 2)


def test_view_is_zero_copy(mem: GuestMemory) -> None:
    view = mem.view(0x4000, 4)
    view[:] = b"abcd"
    assert mem.read(0x4000, 4) == b"abcd"
    mem.write(0x4000, b"wxyz")
    assert bytes(view) == b"wxyz"
    view.release()


@pytest.mark.parametrize(
    ("addr", "length"),
    [(16 << 20, 1), ((16 << 20) - 3, 4), (-1, 1), (0, -1), (1 << 64, 1), ((16 << 20) - 1, 1 << 63)],
)
def test_out_of_range_raises(mem: GuestMemory, addr: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        mem.read(addr, length)
    with pytest.raises(GuestMemoryError):
        mem.view(addr, length)
    assert not mem.is_valid(addr, length)


def test_write_past_end_changes_nothing(mem: GuestMemory) -> None:
    end = 16 << 20
    with pytest.raises(GuestMemoryError):
        mem.write(end - 2, b"abcd")
    assert mem.read(end - 2, 2) == b"\0\0"


def test_fill_and_read_into(mem: GuestMemory) -> None:
    mem.fill(0x5000, 8, 0xAA)
    buffer = bytearray(8)
    mem.read_into(0x5000, buffer)
    assert buffer == b"\xaa" * 8


def test_unaligned_region_rejected() -> None:
    with pytest.raises(ValueError, match="page-aligned"):
        GuestMemory([(0, 4097)])
    with pytest.raises(ValueError, match="overlaps"):
        GuestMemory([(0, 0x2000), (0x1000, 0x1000)])


# --- dirty tracking -------------------------------------------------------------------


def test_every_accessor_is_tracked_and_taking_starts_afresh() -> None:
    from pyvmm.memory import DirtyTrackingMemory

    with DirtyTrackingMemory([(0, 16 * 4096)]) as mem:
        mem.write_u32(0x10, 1)
        mem.read(0x1FFF, 2)  # spans pages 1 and 2
        mem.view(8 * 4096, 4096)
        assert mem.take_dirty() == {0, 1, 2, 8}
        assert mem.take_dirty() == set()
        mem.put_back({5})
        assert mem.take_dirty() == {5}


def test_buffers_handed_out_for_good_are_reported_every_time() -> None:
    """A virtqueue binds its rings once (``locate``) and writes through them for
    as long as the device runs: memory reports those pages in every diff."""
    from pyvmm.memory import DirtyTrackingMemory

    with DirtyTrackingMemory([(0, 16 * 4096)]) as mem:
        mem.locate(3 * 4096 + 100, 6000)
        assert mem.take_dirty() == {3, 4}
        assert mem.take_dirty() == {3, 4}


def test_the_guests_own_writes_come_from_the_attached_dirty_log() -> None:
    from pyvmm.memory import DirtyTrackingMemory

    calls: list[tuple[int, int]] = []

    def kvm_log(slot: int, pages: int) -> bytes:
        calls.append((slot, pages))
        bitmap = bytearray((pages + 63) // 64 * 8)
        bitmap[0] = 0b101 if slot == 0 else 0b1  # pages 0 and 2 of slot 0, page 0 of slot 1
        return bytes(bitmap)

    high = (1 << 32) >> 12
    with DirtyTrackingMemory([(0, 16 * 4096), (1 << 32, 8 * 4096)]) as mem:
        mem.attach_dirty_log(kvm_log)
        assert mem.take_dirty() == {0, 2, high}
        assert calls == [(0, 16), (1, 8)]
