"""virtio-rng behind the virtio-mmio transport, driven by the mock driver in guest memory."""

from __future__ import annotations

import os

import pytest

from pyvmm.devices.virtio.device import VIRTIO_MMIO_INT_VRING
from pyvmm.devices.virtio.ids import VIRTIO_ID_RNG
from pyvmm.devices.virtio.mmio import (
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    MmioTransport,
    Reg,
)
from pyvmm.devices.virtio.queue import VIRTQ_AVAIL_F_NO_INTERRUPT
from pyvmm.devices.virtio.rng import (
    BUDGET_RETRY_S,
    MAX_BYTES_PER_CHAIN,
    RNG_QUEUE_SIZE,
    VirtioRng,
    VirtioRngState,
)
from tests.support.device_harness import CountingIrq, FakeClock, limiter
from tests.support.virtio_driver import MockDriver, TransportAccess, bring_up

VERSION_1 = 1 << VIRTIO_F_VERSION_1
EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX


class Entropy:
    """Deterministic "random" bytes 0, 1, 2, ... (mod 256); records each request."""

    def __init__(self, short_by: int = 0) -> None:
        self.counter = 0
        self.requests: list[int] = []
        self.short_by = short_by

    def __call__(self, n: int) -> bytes:
        self.requests.append(n)
        n = max(0, n - self.short_by)
        out = bytes((self.counter + i) & 0xFF for i in range(n))
        self.counter += n
        return out


def expected(start: int, n: int) -> bytes:
    return bytes((start + i) & 0xFF for i in range(n))


class Guest(TransportAccess):
    """A transport around a VirtioRng, and a driver that brought it up through registers."""

    def __init__(
        self,
        mem,
        *,
        entropy=None,
        budget=None,
        rate_limiter=None,
        features=VERSION_1,
        size=16,
        rng=None,
    ) -> None:
        self.mem = mem
        self.irq = CountingIrq()
        self.entropy = entropy or Entropy()
        self.rng = rng or VirtioRng(entropy=self.entropy, budget=budget, rate_limiter=rate_limiter)
        self.mmio = MmioTransport(self.rng, self.irq, mem)
        self.driver = MockDriver(mem, size)
        self.bring_up(features, size)

    def bring_up(self, features: int, size: int) -> None:
        bring_up(self.mmio, [self.driver], features, size, RNG_QUEUE_SIZE)

    def notify(self) -> None:
        self.wr(Reg.QUEUE_NOTIFY, 0)


def test_identity(mem):
    g = Guest(mem)
    assert g.rd(Reg.DEVICE_ID) == VIRTIO_ID_RNG
    assert g.rng.activated


def test_full_driver_flow(mem):
    g = Guest(mem)
    buf = g.driver.writable(32)
    head = g.driver.send([buf])
    g.notify()
    assert mem.read(buf.addr, 32) == expected(0, 32)
    assert g.driver.used_idx() == 1
    assert g.driver.used_elem(0) == (head, 32)
    assert g.irq.count == 1
    assert g.rd(Reg.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    g.wr(Reg.INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert g.rd(Reg.INTERRUPT_STATUS) == 0
    assert g.rng.bytes_served == 32


def test_writable_buffers_of_a_chain_are_filled_in_order(mem):
    g = Guest(mem)
    request = g.driver.readable(b"ignored")
    first, second = g.driver.writable(5), g.driver.writable(7)
    head = g.driver.send([request, first, second])
    g.notify()
    assert mem.read(first.addr, 5) == expected(0, 5)
    assert mem.read(second.addr, 7) == expected(5, 7)
    assert mem.read(request.addr, 7) == b"ignored"
    assert g.driver.used_elem(0) == (head, 12)


def test_chain_without_writable_buffers_is_returned_empty(mem):
    g = Guest(mem)
    head = g.driver.send([g.driver.readable(b"abc")])
    g.notify()
    assert g.driver.used_elem(0) == (head, 0)
    assert g.entropy.requests == []
    assert g.irq.count == 1


def test_several_chains_one_interrupt(mem):
    g = Guest(mem)
    heads = [g.driver.send([g.driver.writable(4)]) for _ in range(3)]
    g.notify()
    assert [g.driver.used_elem(i) for i in range(3)] == [(h, 4) for h in heads]
    assert g.irq.count == 1
    g.notify()  # nothing new: no interrupt
    assert g.irq.count == 1


def test_short_entropy_reports_the_bytes_written(mem):
    g = Guest(mem, entropy=Entropy(short_by=3))
    buf = g.driver.writable(10)
    head = g.driver.send([buf, g.driver.writable(10)])
    g.notify()
    assert g.driver.used_elem(0) == (head, 7)
    assert mem.read(buf.addr, 10) == expected(0, 7) + bytes(3)


def test_per_chain_cap(mem):
    g = Guest(mem)
    head = g.driver.send([g.driver.writable(MAX_BYTES_PER_CHAIN + 100)])
    g.notify()
    assert g.driver.used_elem(0) == (head, MAX_BYTES_PER_CHAIN)


def test_no_interrupt_flag_suppresses_the_edge(mem):
    g = Guest(mem)
    g.driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    g.driver.send([g.driver.writable(4)])
    g.notify()
    assert g.driver.used_idx() == 1
    assert g.irq.count == 0


def test_event_idx(mem):
    g = Guest(mem, features=VERSION_1 | EVENT_IDX)
    assert g.mmio.queues[0].event_idx
    g.driver.send([g.driver.writable(4)])
    g.notify()
    assert g.irq.count == 1  # first used buffer after activation always interrupts
    assert g.driver.avail_event() == 1  # kick me at the next buffer
    g.driver.set_used_event(5)  # the driver wants an interrupt only past entry 5
    g.driver.send([g.driver.writable(4)])
    g.notify()
    assert g.driver.used_idx() == 2
    assert g.driver.avail_event() == 2
    assert g.irq.count == 1


def test_budget_limits_and_throttles(mem):
    allowance = [6]

    def budget(n: int) -> int:
        granted = min(n, allowance[0])
        allowance[0] -= granted
        return granted

    g = Guest(mem, budget=budget)
    first = g.driver.send([g.driver.writable(4)])
    second = g.driver.send([g.driver.writable(4)])
    third = g.driver.send([g.driver.writable(4)])
    g.notify()
    assert g.driver.used_idx() == 2
    assert g.driver.used_elem(0) == (first, 4)
    assert g.driver.used_elem(1) == (second, 2)
    assert g.rng.throttled
    assert g.irq.count == 1

    assert g.rng.retry_after == BUDGET_RETRY_S  # a budget cannot say when: poll

    allowance[0] = 100
    g.mmio.process_queue(0)  # the owner retries once the budget refills
    assert not g.rng.throttled
    assert g.driver.used_elem(2) == (third, 4)
    assert g.irq.count == 2


def test_malformed_chain_needs_reset(mem):
    g = Guest(mem)
    g.driver.write_avail_entry(0, 200)  # head beyond the queue size
    g.driver.set_avail_idx(1)
    g.notify()  # does not raise
    assert g.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    g.wr(Reg.STATUS, 0)
    assert not g.rng.activated


def test_default_entropy_source(mem):
    g = Guest(mem, rng=VirtioRng(os.getrandom))  # entropy from os.getrandom
    buf = g.driver.writable(64)
    g.driver.send([buf])
    g.notify()
    assert g.driver.used_elem(0)[1] == 64
    assert mem.read(buf.addr, 64) != bytes(64)


def test_save_restore(mem):
    g = Guest(mem)
    g.driver.send([g.driver.writable(8)])
    g.notify()
    state = g.mmio.save()
    assert state.device == VirtioRngState(bytes_served=8)

    irq = CountingIrq()
    rng = VirtioRng(entropy=Entropy())
    restored = MmioTransport(rng, irq, mem)
    restored.restore(state)
    assert rng.activated and rng.bytes_served == 8
    head = g.driver.send([g.driver.writable(4)])
    restored.write(Reg.QUEUE_NOTIFY, memoryview(bytes(4)))
    assert g.driver.used_idx() == 2
    assert g.driver.used_elem(1) == (head, 4)
    assert irq.count == 1
    with pytest.raises(ValueError):
        rng.restore(VirtioRngState(bytes_served=-1))


# --- the rate limiter -----------------------------------------------------------------


def test_rate_limiter_bandwidth_with_its_own_retry_time(mem):
    clock = FakeClock()
    g = Guest(mem, rate_limiter=limiter("bw=8/100ms", clock))
    heads = [g.driver.send([g.driver.writable(4)]) for _ in range(3)]
    g.notify()
    assert g.driver.used_idx() == 2
    assert g.rng.throttled
    assert g.rng.retry_after == pytest.approx(0.05)  # 4 bytes at 80 bytes/s
    assert g.rng.bytes_served == 8
    clock.advance_ms(49)
    g.mmio.process_queue(0)
    assert g.driver.used_idx() == 2 and g.rng.throttled
    clock.advance_ms(1)
    g.mmio.process_queue(0)
    assert g.driver.used_elem(2) == (heads[2], 4)
    assert not g.rng.throttled and g.rng.retry_after == 0.0


def test_rate_limiter_ops(mem):
    clock = FakeClock()
    g = Guest(mem, rate_limiter=limiter("ops=1/1s", clock))
    g.driver.send([g.driver.writable(16)])
    g.driver.send([g.driver.writable(16)])
    g.notify()
    assert g.driver.used_idx() == 1 and g.rng.retry_after == pytest.approx(1.0)
    clock.advance_ms(1000)
    g.mmio.process_queue(0)
    assert g.driver.used_idx() == 2


def test_rate_limiter_chain_without_writable_buffers_is_free(mem):
    clock = FakeClock()
    bucket = limiter("ops=1/1s", clock)
    g = Guest(mem, rate_limiter=bucket)
    g.driver.send([g.driver.readable(b"abc")])
    g.driver.send([g.driver.writable(4)])
    g.notify()
    assert g.driver.used_idx() == 2 and not g.rng.throttled
    assert bucket.ops.budget == 0


def test_rate_limiter_chain_larger_than_the_bucket(mem):
    """All or nothing, as Firecracker: a full bucket lets it through, in debt."""
    clock = FakeClock()
    bucket = limiter("bw=16/1s", clock)
    g = Guest(mem, rate_limiter=bucket)
    head = g.driver.send([g.driver.writable(64)])
    g.driver.send([g.driver.writable(4)])
    g.notify()
    assert g.driver.used_elem(0) == (head, 64)
    assert g.driver.used_idx() == 1 and g.rng.throttled
    assert g.rng.retry_after == pytest.approx(3.25)  # 48 bytes of debt + 4 at 16/s
    clock.advance_ms(3250)
    g.mmio.process_queue(0)
    assert g.driver.used_idx() == 2


def test_rate_limiter_charges_only_the_bytes_written(mem):
    clock = FakeClock()
    bucket = limiter("bw=100/1s", clock)
    g = Guest(mem, entropy=Entropy(short_by=3), rate_limiter=bucket)
    g.driver.send([g.driver.writable(10)])
    g.notify()
    assert g.driver.used_elem(0)[1] == 7
    assert bucket.bandwidth.budget == 93


def test_budget_and_rate_limiter_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        VirtioRng(os.getrandom, budget=lambda n: n, rate_limiter=limiter("bw=1K"))
