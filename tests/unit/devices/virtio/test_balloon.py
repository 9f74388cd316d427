"""virtio-balloon behind the virtio-mmio transport, driven by the mock driver in real guest RAM."""

from __future__ import annotations

import struct

import pytest

from pyvmm.devices.virtio.balloon import (
    BALLOON_QUEUE_SIZE,
    PAGES_PER_MIB,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_STATS_VQ,
    VirtioBalloon,
    VirtioBalloonState,
)
from pyvmm.devices.virtio.device import VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING
from pyvmm.devices.virtio.ids import VIRTIO_ID_BALLOON
from pyvmm.devices.virtio.mmio import MmioTransport, Reg
from pyvmm.memory import GuestMemory
from tests.support.device_harness import CountingIrq
from tests.support.virtio_driver import MockDriver, TransportAccess, bring_up

F_STATS = VIRTIO_BALLOON_F_STATS_VQ

MIB = 1 << 20


class Guest(TransportAccess):
    """A balloon behind a transport; one mock driver per queue, each with its own rings."""

    def __init__(self, mem: GuestMemory, *, stats: bool = True, target_mib: int = 0) -> None:
        self.mem = mem
        self.irq = CountingIrq()
        self.balloon = VirtioBalloon(
            target_mib * PAGES_PER_MIB, deflate_on_oom=True, stats_interval_s=int(stats)
        )
        self.mmio = MmioTransport(self.balloon, self.irq, mem)
        count = 3 if stats else 2
        self.drivers = [MockDriver(mem, 16, desc_table=0x10_000 + n * 0x1000) for n in range(count)]
        features = self.device_features()
        bring_up(self.mmio, self.drivers, features, 16, BALLOON_QUEUE_SIZE)

    def send_frames(self, queue: int, frames: list[int], at: int) -> int:
        self.mem.write(at, struct.pack(f"<{len(frames)}I", *frames))
        head = self.drivers[queue].add_chain([_readable(at, 4 * len(frames))])
        self.drivers[queue].publish(head)
        self.wr(Reg.QUEUE_NOTIFY, queue)
        return head


def _readable(addr: int, length: int):
    from tests.support.virtio_driver import Buffer

    return Buffer(addr, length, writable=False)


def resident_bytes(mem: GuestMemory) -> int:
    """Bytes of ``mem``'s host mapping that are in RAM (mincore through /proc/self/smaps)."""
    (region,) = mem.regions
    start = _address(region.view)
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                inside = low <= start < high
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found in /proc/self/smaps")


def _address(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_identity_features_and_config(mem: GuestMemory) -> None:
    g = Guest(mem, target_mib=3)
    assert g.rd(Reg.DEVICE_ID) == VIRTIO_ID_BALLOON
    features = g.device_features()
    assert features & VIRTIO_BALLOON_F_DEFLATE_ON_OOM and features & VIRTIO_BALLOON_F_STATS_VQ
    assert g.rd(Reg.CONFIG) == 3 * PAGES_PER_MIB  # num_pages
    g.wr(Reg.CONFIG + 4, 100)  # the driver reports what it holds
    assert g.balloon.stats()["actual_pages"] == 100
    g.balloon.set_target_pages(7 * PAGES_PER_MIB)
    assert g.rd(Reg.INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG
    assert g.rd(Reg.CONFIG) == 7 * PAGES_PER_MIB
    no_stats = VirtioBalloon(0, deflate_on_oom=False, stats_interval_s=0)
    assert no_stats.queue_max_sizes == (BALLOON_QUEUE_SIZE,) * 2
    assert not no_stats.avail_features & (VIRTIO_BALLOON_F_DEFLATE_ON_OOM | F_STATS)


def test_inflated_pages_are_given_back_to_the_host() -> None:
    """RSS of guest RAM before and after the balloon takes 24 of its 32 MiB (real madvise)."""
    with GuestMemory([(0, 32 * MIB)]) as mem:
        g = Guest(mem, stats=False, target_mib=24)
        for page in range(0, 32 * MIB, 4096):
            mem.write_u8(page, 0xAA)  # the guest touched every page
        before = resident_bytes(mem)
        frames = list(range((8 * MIB) >> 12, (32 * MIB) >> 12))
        for start in range(0, len(frames), 256):  # 1 KiB of frames per chain, as Linux sends
            g.send_frames(0, frames[start : start + 256], at=0x20_000 + (start // 256 % 8) * 1024)
        after = resident_bytes(mem)
        assert before >= 32 * MIB
        assert before - after >= 23 * MIB, (before, after)
        assert mem.read_u8(8 * MIB) == 0  # a released page comes back as zeros
        assert mem.read_u8(4 * MIB) == 0xAA  # pages outside the balloon are untouched
        assert g.balloon.inflated_pages == len(frames)
        assert g.drivers[0].used_idx() == len(frames) // 256
        g.send_frames(1, frames[:10], at=0x30_000)  # deflate: the guest takes pages back
        assert g.balloon.deflated_pages == 10


def test_frames_outside_guest_ram_are_counted_not_fatal(mem: GuestMemory) -> None:
    g = Guest(mem, stats=False)
    g.send_frames(0, [0xFFFF_FFF0, 0x300, 0x301], at=0x20_000)
    assert g.balloon.counters.invalid_pages == 1
    assert g.balloon.inflated_pages == 3
    assert g.drivers[0].used_idx() == 1  # the buffer went back to the driver


def test_statistics_protocol(mem: GuestMemory) -> None:
    g = Guest(mem)
    stats = struct.pack("<HQHQHQ", 4, 1000, 5, 2000, 99, 7)  # free, total, an unknown tag
    mem.write(0x40_000, stats)
    driver = g.drivers[2]
    head = driver.add_chain([_readable(0x40_000, len(stats))])
    driver.publish(head)
    g.wr(Reg.QUEUE_NOTIFY, 2)
    assert g.balloon.stats()["free_memory"] == 1000
    assert g.balloon.stats()["total_memory"] == 2000
    assert driver.used_idx() == 0  # the device keeps the buffer until it wants new numbers
    before = g.irq.count
    assert g.balloon.request_stats()
    assert driver.used_idx() == 1 and driver.used_elem(0) == (head, 0)
    assert g.irq.count == before + 1 and g.rd(Reg.INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING
    assert not g.balloon.request_stats()  # nothing held until the driver posts again


def test_state_round_trip_and_bad_states(mem: GuestMemory) -> None:
    g = Guest(mem, target_mib=2)
    g.wr(Reg.CONFIG + 4, 12)
    state = g.balloon.save()
    fresh = VirtioBalloon(0, deflate_on_oom=True, stats_interval_s=1)
    fresh.restore(state)
    assert fresh.save() == state
    for bad in (
        {"num_pages": -1},
        {"stats": (("nonsense", 1),)},
        {"stats_head": 4096},
        {"inflated_pages": "x"},
    ):
        with pytest.raises(ValueError):
            fresh.restore(VirtioBalloonState(**{**state.__dict__, **bad}))


def test_discard_needs_page_aligned_ranges_inside_ram(mem: GuestMemory) -> None:
    from pyvmm.errors import GuestMemoryError

    with pytest.raises(GuestMemoryError):
        mem.discard(0x1001, 4096)
    with pytest.raises(GuestMemoryError):
        mem.discard(0x800_000, 4096)
