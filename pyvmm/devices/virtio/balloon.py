"""virtio-balloon (virtio 1.2, section 5.5): guest memory handed back to the host, on request.

Why a VMM has one: a sandbox host packs many microVMs; the balloon lets the
host take back memory a guest does not use (Firecracker's ``/balloon``
routes), and see what the guest does with its memory (statistics).

Queues: ``inflateq`` (0) and ``deflateq`` (1) carry arrays of little-endian
u32 page frame numbers of 4 KiB pages; ``statsq`` (2) exists when
VIRTIO_BALLOON_F_STATS_VQ is offered. Config space: ``num_pages`` (the
target the host sets, offset 0) and ``actual`` (what the driver reports it
holds, offset 4).

- Inflate: every listed page is released with ``mem.discard`` (the host
  drops its backing: ``madvise(MADV_DONTNEED)`` in :mod:`pyvmm.memory`), so
  the host really gets the memory back. Consecutive frames are released as
  one range. A frame outside guest RAM is skipped and counted, never an
  error that stops the device: a guest value must not break the VMM.
- Deflate: nothing to do; a page the guest touches again is faulted in
  afresh (zero-filled, or from the memory file after a restore).
- Statistics (the driver's protocol): the driver posts one buffer of
  ``(le16 tag, le64 value)`` records and kicks; the device keeps that
  buffer and, when it wants fresh numbers (:meth:`request_stats`, called
  by the owner every ``stats_polling_interval_s``), returns it; the driver
  refills and posts it again.
- Deflate-on-OOM is a feature bit only: the guest's driver deflates by
  itself under memory pressure when VIRTIO_BALLOON_F_DEFLATE_ON_OOM is
  negotiated.

Changing the target (:meth:`set_target_pages`) raises a config-change
interrupt; the driver then inflates or deflates towards it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.ids import VIRTIO_ID_BALLOON
from pyvmm.errors import GuestMemoryError

if TYPE_CHECKING:
    from pyvmm.devices.virtio.queue import DescriptorChain

VIRTIO_BALLOON_F_MUST_TELL_HOST = 1 << 0
VIRTIO_BALLOON_F_STATS_VQ = 1 << 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2

INFLATE_QUEUE, DEFLATE_QUEUE, STATS_QUEUE = 0, 1, 2
BALLOON_QUEUE_SIZE = 256
PAGE_SHIFT = 12  # balloon frames are 4 KiB whatever the guest's page size
PAGES_PER_MIB = 1 << (20 - PAGE_SHIFT)
#: Bytes of page frame numbers read from one chain (the Linux driver sends at most 1 KiB).
MAX_PFN_BYTES = 64 * 1024
_STAT = struct.Struct("<HQ")

#: Statistic tags (virtio spec and Linux's include/uapi/linux/virtio_balloon.h), by
#: the names Firecracker's ``/balloon/statistics`` gives them.
STAT_NAMES = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
    10: "oom_kill",
    11: "alloc_stall",
    12: "async_scan",
    13: "direct_scan",
    14: "async_reclaim",
    15: "direct_reclaim",
}


@dataclass(frozen=True)
class VirtioBalloonState:
    num_pages: int
    actual_pages: int
    stats: tuple[tuple[str, int], ...]
    stats_head: int | None
    inflated_pages: int
    deflated_pages: int
    invalid_pages: int


@dataclass
class BalloonCounters:
    """Firecracker's ``balloon`` metric group names."""

    inflate_count: int = 0
    deflate_count: int = 0
    stats_updates_count: int = 0
    invalid_pages: int = 0


class VirtioBalloon(VirtioDevice):
    """The virtio memory balloon; see the module docstring."""

    device_type = VIRTIO_ID_BALLOON

    def __init__(self, target_pages: int, *, deflate_on_oom: bool, stats_interval_s: int) -> None:
        """``stats_interval_s`` > 0 offers the statistics queue; the owner calls
        :meth:`request_stats` that often."""
        super().__init__()
        stats = stats_interval_s > 0
        self.stats_interval_s = stats_interval_s
        self.avail_features = VIRTIO_BALLOON_F_MUST_TELL_HOST
        if deflate_on_oom:
            self.avail_features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        if stats:
            self.avail_features |= VIRTIO_BALLOON_F_STATS_VQ
        self.queue_max_sizes = (BALLOON_QUEUE_SIZE,) * (3 if stats else 2)
        self.num_pages = _pages(target_pages)
        self.actual_pages = 0
        self.latest_stats: dict[str, int] = {}
        self._stats_head: int | None = None
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.counters = BalloonCounters()

    # --- the host's side -------------------------------------------------------------
    def set_target_pages(self, pages: int) -> None:
        """A new target; the driver hears of it through a config-change interrupt."""
        self.num_pages = _pages(pages)
        if self.interrupt is not None:
            self.interrupt.signal_config_change()

    def request_stats(self) -> bool:
        """Hand the held statistics buffer back so the driver refills it; False if none held."""
        head, self._stats_head = self._stats_head, None
        if head is None or self.mem is None or self.interrupt is None:
            return False
        queue = self.queues[STATS_QUEUE]
        queue.add_used(self.mem, head, 0)
        if queue.needs_notification(self.mem):
            self.interrupt.signal_used_queue()
        return True

    # --- config space ----------------------------------------------------------------
    def _config(self) -> bytes:
        return struct.pack("<II", self.num_pages, self.actual_pages)

    def read_config(self, offset: int, data: memoryview) -> None:
        chunk = self._config()[offset : offset + len(data)] if offset >= 0 else b""
        data[:] = chunk.ljust(len(data), b"\0")

    def write_config(self, offset: int, data: memoryview) -> None:
        """The driver writes ``actual`` (offset 4); ``num_pages`` is the host's."""
        if offset == 4 and len(data) == 4:
            self.actual_pages = int.from_bytes(data, "little")

    # --- queues ----------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if self.mem is None or self.interrupt is None:
            return
        if index == INFLATE_QUEUE:
            self.serve_queue(index, self._inflate)
        elif index == DEFLATE_QUEUE:
            self.serve_queue(index, self._deflate)
        elif index == STATS_QUEUE and len(self.queues) > STATS_QUEUE:
            self._take_stats()

    def _frames(self, chain: DescriptorChain) -> list[int]:
        mem = self.mem
        assert mem is not None
        data = bytearray()
        for desc in chain.readable():
            take = min(desc.length, MAX_PFN_BYTES - len(data))
            data += mem.read(desc.addr, take)
            if len(data) >= MAX_PFN_BYTES:
                break
        usable = len(data) - len(data) % 4
        return list(struct.unpack_from(f"<{usable // 4}I", data)) if usable else []

    def _inflate(self, chain: DescriptorChain) -> int:
        frames = self._frames(chain)
        for start, count in _runs(frames):
            try:
                self.mem.discard(start << PAGE_SHIFT, count << PAGE_SHIFT)  # type: ignore[union-attr]
            except GuestMemoryError:
                self.counters.invalid_pages += count
        self.inflated_pages += len(frames)
        self.counters.inflate_count += 1
        return 0

    def _deflate(self, chain: DescriptorChain) -> int:
        self.deflated_pages += len(self._frames(chain))
        self.counters.deflate_count += 1
        return 0

    def _take_stats(self) -> None:
        mem = self.mem
        assert mem is not None
        queue = self.queues[STATS_QUEUE]
        while (chain := queue.pop(mem)) is not None:
            if self._stats_head is not None:  # a driver that posts two: give the old one back
                queue.add_used(mem, self._stats_head, 0)
            self._stats_head = chain.head_index
            stats: dict[str, int] = {}
            data = b"".join(mem.read(d.addr, min(d.length, 4096)) for d in chain.readable())
            for offset in range(0, len(data) - _STAT.size + 1, _STAT.size):
                tag, value = _STAT.unpack_from(data, offset)
                if tag in STAT_NAMES:
                    stats[STAT_NAMES[tag]] = value
            self.latest_stats = stats
            self.counters.stats_updates_count += 1

    def stats(self) -> dict[str, int]:
        """Firecracker's ``BalloonStats``: target and actual size, then the guest's numbers."""
        return {
            "target_pages": self.num_pages,
            "actual_pages": self.actual_pages,
            "target_mib": self.num_pages // PAGES_PER_MIB,
            "actual_mib": self.actual_pages // PAGES_PER_MIB,
            **self.latest_stats,
        }

    def reset(self) -> None:
        super().reset()
        self._stats_head = None
        self.actual_pages = 0

    # --- persistence -------------------------------------------------------------------
    def save(self) -> VirtioBalloonState:
        return VirtioBalloonState(
            num_pages=self.num_pages,
            actual_pages=self.actual_pages,
            stats=tuple(sorted(self.latest_stats.items())),
            stats_head=self._stats_head,
            inflated_pages=self.inflated_pages,
            deflated_pages=self.deflated_pages,
            invalid_pages=self.counters.invalid_pages,
        )

    def restore(self, state: VirtioBalloonState) -> None:
        self.num_pages = _pages(state.num_pages)
        self.actual_pages = _pages(state.actual_pages)
        stats = dict(state.stats)
        if any(name not in STAT_NAMES.values() or not _is_u64(v) for name, v in stats.items()):
            raise ValueError(f"virtio-balloon state: bad statistics {state.stats!r}")
        self.latest_stats = stats
        head = state.stats_head
        if head is not None and not (isinstance(head, int) and 0 <= head < BALLOON_QUEUE_SIZE):
            raise ValueError(f"virtio-balloon state: stats_head={head!r}")
        self._stats_head = head
        for name in ("inflated_pages", "deflated_pages", "invalid_pages"):
            if not _is_u64(getattr(state, name)):
                raise ValueError(f"virtio-balloon state: {name}={getattr(state, name)!r}")
        self.inflated_pages = state.inflated_pages
        self.deflated_pages = state.deflated_pages
        self.counters.invalid_pages = state.invalid_pages


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _pages(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise ValueError(f"virtio-balloon: a page count must be a u32, not {value!r}")
    return value


def _runs(frames: list[int]) -> list[tuple[int, int]]:
    """Sorted, de-duplicated frames as (first frame, count) runs of consecutive frames."""
    runs: list[tuple[int, int]] = []
    for frame in sorted(set(frames)):
        if runs and runs[-1][0] + runs[-1][1] == frame:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((frame, 1))
    return runs
