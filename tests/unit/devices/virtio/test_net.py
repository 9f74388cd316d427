"""virtio-net behind the virtio-mmio transport, with a fake back end."""

from __future__ import annotations

import struct
import threading
import time
from collections import deque

import pytest

from pyvmm.devices.virtio.ids import VIRTIO_ID_NET
from pyvmm.devices.virtio.mmio import (
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    MmioTransport,
    Reg,
)
from pyvmm.devices.virtio.net import (
    CONFIG,
    MAX_FRAME_SIZE,
    NET_QUEUE_SIZE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    VNET_HDR_SIZE,
    NetStats,
    RxOffloads,
    VirtioNet,
    VirtioNetState,
)
from pyvmm.devices.virtio.queue import VIRTQ_USED_F_NO_NOTIFY
from pyvmm.vmm.event_loop import EventLoop
from pyvmm.vmm.virtio_service import queue_server
from tests.support.device_harness import CountingIrq, FakeClock, limiter
from tests.support.virtio_driver import MockDriver, TransportAccess, bring_up

MAC = bytes.fromhex("52540012345a")
VERSION_1 = 1 << VIRTIO_F_VERSION_1
MRG = 1 << VIRTIO_NET_F_MRG_RXBUF
BASIC = VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
HDR = b"\x01\x00" + bytes(8) + b"\x00\x00"  # NEEDS_CSUM, no GSO, num_buffers 0


def frame(length: int, seed: int = 0) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(length))


class FakeBackend:
    """Frames to receive in a queue; frames sent collected as bytes."""

    def __init__(self, vnet_hdr: bool = True) -> None:
        self.vnet_hdr = vnet_hdr
        self.incoming: deque[bytes] = deque()
        self.sent: list[bytes] = []
        self.buffer_counts: list[int] = []
        self.offload: RxOffloads | None = None
        self.fail_write: OSError | None = None

    def readv(self, buffers: list[memoryview]) -> int:
        if not self.incoming:
            raise BlockingIOError
        data = self.incoming.popleft()
        offset = 0
        for buf in buffers:
            n = min(len(buf), len(data) - offset)
            buf[:n] = data[offset : offset + n]
            offset += n
        return offset

    def writev(self, buffers: list[memoryview]) -> int:
        if self.fail_write is not None:
            raise self.fail_write
        self.buffer_counts.append(len(buffers))
        data = b"".join(bytes(b) for b in buffers)
        self.sent.append(data)
        return len(data)

    def set_offload(self, offloads: RxOffloads) -> None:
        self.offload = offloads


class Guest(TransportAccess):
    """A VirtioNet in a transport, brought up with an RX and a TX driver."""

    def __init__(
        self,
        mem,
        *,
        features: int = BASIC,
        size: int = 16,
        backend=None,
        rx_limiter=None,
        tx_limiter=None,
    ) -> None:
        self.mem = mem
        self.backend = backend or FakeBackend()
        self.irq = CountingIrq()
        self.net = VirtioNet(self.backend, MAC, rx_limiter, tx_limiter)
        self.mmio = MmioTransport(self.net, self.irq, mem)
        self.rx = MockDriver(mem, size, desc_table=0x10_000)
        self.tx = MockDriver(mem, size, desc_table=0x20_000)
        self.tx._data = 0x400_000  # keep the two drivers' buffers apart
        self.rx_used = self.tx_used = 0
        self.bring_up(features, size)

    def bring_up(self, features: int, size: int) -> None:
        assert features & ~self.device_features() == 0
        bring_up(self.mmio, [self.rx, self.tx], features, size, NET_QUEUE_SIZE)

    def config(self) -> tuple:
        raw = bytearray()
        for offset in range(0, 12, 4):
            raw += self.rd(Reg.CONFIG + offset).to_bytes(4, "little")
        return CONFIG.unpack(bytes(raw[: CONFIG.size]))

    # --- traffic ------------------------------------------------------------------------
    def send(self, buffers) -> tuple[int, int]:
        """Post one TX chain, kick queue 1, return its used element."""
        head = self.tx.send(buffers)
        self.wr(Reg.QUEUE_NOTIFY, 1)
        assert self.tx.used_idx() == self.tx_used + 1
        elem = self.tx.used_elem(self.tx_used)
        self.tx_used += 1
        assert elem[0] == head
        return elem

    def post_rx(self, *lengths: int, kick: bool = True) -> list[tuple[int, list]]:
        """Post one RX chain per entry (an int or a list of buffer sizes)."""
        posted = []
        for spec in lengths:
            sizes = spec if isinstance(spec, list) else [spec]
            bufs = [self.rx.writable(n) for n in sizes]
            posted.append((self.rx.send(bufs), bufs))
        if kick:
            self.wr(Reg.QUEUE_NOTIFY, 0)
        return posted

    def rx_completions(self) -> list[tuple[int, int]]:
        out = []
        while self.rx_used != self.rx.used_idx():
            out.append(self.rx.used_elem(self.rx_used))
            self.rx_used = (self.rx_used + 1) & 0xFFFF
        return out

    def read_chain(self, bufs, length: int) -> bytes:
        data = b"".join(self.mem.read(b.addr, b.length) for b in bufs)
        return data[:length]


def test_identity_features_and_config(mem):
    g = Guest(mem)
    assert g.rd(Reg.DEVICE_ID) == VIRTIO_ID_NET
    offered = g.device_features()
    for bit in (
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_F_VERSION_1,
    ):
        assert offered >> bit & 1, bit
    mac, status, pairs = g.config()
    assert (mac, status, pairs) == (MAC, VIRTIO_NET_S_LINK_UP, 1)
    # Byte-wise config reads, as the Linux driver does for the MAC.
    buf = bytearray(1)
    g.mmio.read(Reg.CONFIG + 5, memoryview(buf))
    assert buf[0] == MAC[5]


def test_no_offloads_without_vnet_header(mem):
    g = Guest(mem, backend=FakeBackend(vnet_hdr=False))
    offered = g.device_features()
    assert not offered >> VIRTIO_NET_F_CSUM & 1
    assert not offered >> VIRTIO_NET_F_GUEST_TSO4 & 1
    assert offered >> VIRTIO_NET_F_MRG_RXBUF & 1
    assert g.backend.offload is None


def test_offloads_follow_acked_features(mem):
    guest_rx = (
        1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6
    )
    g = Guest(mem, features=BASIC | guest_rx | 1 << VIRTIO_NET_F_CSUM)
    assert g.backend.offload == RxOffloads(csum=True, tso4=True, tso6=True)
    g = Guest(mem, features=BASIC | 1 << VIRTIO_NET_F_GUEST_CSUM)
    assert g.backend.offload == RxOffloads(csum=True)
    g = Guest(mem, features=BASIC | 1 << VIRTIO_NET_F_GUEST_TSO4)  # TSO needs checksums
    assert g.backend.offload == RxOffloads()
    g = Guest(mem, features=BASIC)
    assert g.backend.offload == RxOffloads()


def test_tx_frame_passes_header_and_frame_zero_copy(mem):
    g = Guest(mem)
    payload = frame(1500)
    # Header and frame in separate descriptors, frame split in two, as Linux may.
    _head, length = g.send(
        [g.tx.readable(HDR), g.tx.readable(payload[:600]), g.tx.readable(payload[600:])]
    )
    assert length == 0
    assert g.backend.sent == [HDR + payload]
    assert g.backend.buffer_counts == [3]  # one writev, the guest's own buffers
    assert g.irq.count >= 1
    assert (g.net.stats.tx_frames, g.net.stats.tx_bytes) == (1, 1500)


def test_tx_without_vnet_header_strips_it(mem):
    g = Guest(mem, backend=FakeBackend(vnet_hdr=False))
    payload = frame(100)
    g.send([g.tx.readable(HDR[:4]), g.tx.readable(HDR[4:] + payload)])
    assert g.backend.sent == [payload]


def test_tx_oversized_or_malformed_frames_are_dropped(mem):
    g = Guest(mem)
    assert g.send([g.tx.readable(HDR + frame(MAX_FRAME_SIZE + 1))])[1] == 0
    assert g.send([g.tx.readable(HDR[:8])])[1] == 0  # shorter than the header
    assert g.send([g.tx.readable(HDR + frame(60)), g.tx.writable(16)])[1] == 0
    assert g.backend.sent == []
    assert g.net.stats.tx_drops == 3
    # The largest legal frame still goes through, and so does the next one.
    g.send([g.tx.readable(HDR + frame(MAX_FRAME_SIZE))])
    assert len(g.backend.sent[0]) == VNET_HDR_SIZE + MAX_FRAME_SIZE
    assert not g.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET


def test_tx_host_error_drops_the_frame_only(mem):
    g = Guest(mem)
    g.backend.fail_write = OSError(5, "EIO")
    assert g.send([g.tx.readable(HDR + frame(60))])[1] == 0
    assert g.net.stats.tx_drops == 1
    g.backend.fail_write = None
    g.send([g.tx.readable(HDR + frame(60))])
    assert len(g.backend.sent) == 1


def test_rx_into_one_chain(mem):
    g = Guest(mem)
    payload = frame(1000, 7)
    g.backend.incoming.append(bytes(VNET_HDR_SIZE) + payload)
    ((head, bufs),) = g.post_rx([VNET_HDR_SIZE, 1514])  # header and data separately
    assert g.rx_completions() == [(head, VNET_HDR_SIZE + 1000)]
    data = g.read_chain(bufs, VNET_HDR_SIZE + 1000)
    assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
    assert data[VNET_HDR_SIZE:] == payload
    assert (g.net.stats.rx_frames, g.net.stats.rx_bytes) == (1, 1000)
    assert g.irq.count >= 1


def test_rx_mergeable_across_two_chains(mem):
    g = Guest(mem, features=BASIC | MRG)
    payload = frame(2000, 3)
    g.backend.incoming.append(bytes(VNET_HDR_SIZE) + payload)
    posted = g.post_rx(1536, 1536, 1536)
    (h1, b1), (h2, b2), _ = posted
    total = VNET_HDR_SIZE + 2000
    assert g.rx_completions() == [(h1, 1536), (h2, total - 1536)]
    data = g.read_chain(b1, 1536) + g.read_chain(b2, total - 1536)
    assert struct.unpack_from("<H", data, 10)[0] == 2
    assert data[VNET_HDR_SIZE:] == payload
    # The third chain is still there for the next frame.
    g.backend.incoming.append(bytes(VNET_HDR_SIZE) + frame(50))
    g.net.process_rx()
    assert g.rx_completions() == [(posted[2][0], VNET_HDR_SIZE + 50)]


def test_rx_waits_for_buffers(mem):
    g = Guest(mem, features=BASIC | MRG)
    payload = frame(3000, 9)
    g.backend.incoming.extend([bytes(VNET_HDR_SIZE) + payload, bytes(VNET_HDR_SIZE) + frame(40)])
    g.mmio.process_queue(0)  # the TAP fd became readable: no buffers yet
    assert g.net.pending_len == VNET_HDR_SIZE + 3000
    assert g.rx_completions() == []
    # One buffer is not enough for the frame: it is taken back, nothing is returned.
    g.post_rx(1536)
    assert g.rx_completions() == []
    assert g.net.pending_len == VNET_HDR_SIZE + 3000
    # Two more: the pending frame fills the first two chains (num_buffers 2),
    # the frame queued behind it the third.
    g.post_rx(1536, 1536)
    done = g.rx_completions()
    total = VNET_HDR_SIZE + 3000
    assert [length for _h, length in done] == [1536, total - 1536, VNET_HDR_SIZE + 40]
    assert g.net.pending_len == 0
    assert g.net.stats.rx_frames == 2


def test_rx_without_mrg_needs_one_big_enough_chain(mem):
    g = Guest(mem)
    g.backend.incoming.extend(
        [bytes(VNET_HDR_SIZE) + frame(2000), bytes(VNET_HDR_SIZE) + frame(100)]
    )
    ((head, _bufs),) = g.post_rx(1536)
    # 2000 bytes never fit a 1536-byte chain: that frame is dropped, the chain kept.
    assert g.rx_completions() == [(head, VNET_HDR_SIZE + 100)]
    assert g.net.stats.rx_drops == 1


def test_rx_chain_too_small_for_header_is_returned_empty(mem):
    g = Guest(mem, features=BASIC | MRG)
    g.backend.incoming.append(bytes(VNET_HDR_SIZE) + frame(100))
    (bad, _), (good, _) = g.post_rx(4, 1536)
    assert g.rx_completions() == [(bad, 0), (good, VNET_HDR_SIZE + 100)]
    assert g.net.stats.errors == 1


def test_rx_without_vnet_header_prepends_a_zero_header(mem):
    g = Guest(mem, backend=FakeBackend(vnet_hdr=False))
    payload = frame(64, 1)
    g.backend.incoming.append(payload)
    ((head, bufs),) = g.post_rx(1536)
    assert g.rx_completions() == [(head, VNET_HDR_SIZE + 64)]
    data = g.read_chain(bufs, VNET_HDR_SIZE + 64)
    assert data == bytes(10) + b"\x01\x00" + payload


def test_rx_batch_signals_once(mem):
    g = Guest(mem)
    g.post_rx(1536, 1536, 1536, kick=False)
    before = g.irq.count
    g.backend.incoming.extend(bytes(VNET_HDR_SIZE) + frame(60, i) for i in range(3))
    g.mmio.process_queue(0)
    assert len(g.rx_completions()) == 3
    assert g.irq.count == before + 1


def test_rx_with_event_idx_rearms_the_kick(mem):
    g = Guest(mem)
    queue = g.net.queues[0]
    queue.event_idx = True
    g.backend.incoming.append(bytes(VNET_HDR_SIZE) + frame(60))
    g.net.process_rx()
    # No buffers: the device asked to be kicked at the next avail entry.
    assert g.rx.avail_event() == g.rx.avail_idx


def test_save_restore_round_trip(mem):
    g = Guest(mem)
    g.send([g.tx.readable(HDR + frame(60))])
    g.backend.incoming.append(bytes(VNET_HDR_SIZE) + frame(60))
    g.net.process_rx()
    assert g.net.pending_len
    state = g.net.save()
    assert g.net.pending_len == 0  # the pending frame is dropped, not saved
    assert isinstance(state, VirtioNetState)
    other = VirtioNet(FakeBackend(), MAC)
    other.restore(state)
    assert other.stats == g.net.stats
    assert other.stats.rx_drops == 1 and other.stats.tx_frames == 1
    with pytest.raises(ValueError):
        VirtioNet(FakeBackend(), bytes(6)).restore(state)
    with pytest.raises(ValueError):
        other.restore(VirtioNetState(MAC, {"bogus": 1}))
    assert NetStats() == VirtioNet(FakeBackend(), MAC).stats


def test_reset_forgets_pending_frame(mem):
    g = Guest(mem)
    g.backend.incoming.append(bytes(VNET_HDR_SIZE) + frame(60))
    g.net.process_rx()
    g.wr(Reg.STATUS, 0)
    assert g.net.pending_len == 0 and not g.net.activated


# --- rate limiting -------------------------------------------------------------------------
MS = 1_000_000


def post_tx(g: Guest, *frames: bytes) -> None:
    """Post one TX chain per frame and kick queue 1 once."""
    for data in frames:
        g.tx.send([g.tx.readable(HDR + data)])
    g.wr(Reg.QUEUE_NOTIFY, 1)


def test_tx_limiter_leaves_frames_in_the_ring(mem):
    clock = FakeClock()
    g = Guest(mem, tx_limiter=limiter("ops=2/100ms", clock))
    post_tx(g, frame(60, 1), frame(60, 2), frame(60, 3))
    assert g.backend.sent == [HDR + frame(60, 1), HDR + frame(60, 2)]
    assert g.tx.used_idx() == 2  # the third chain is still the driver's, in the ring
    assert g.net.throttled and g.net.tx_throttled
    assert g.net.retry_after == pytest.approx(0.05)  # one op per 50 ms
    assert g.net.stats.tx_throttled == 1
    # A kick before the tokens are back changes nothing and is not a new stall.
    g.wr(Reg.QUEUE_NOTIFY, 1)
    assert len(g.backend.sent) == 2 and g.net.stats.tx_throttled == 1
    clock.advance_ms(50)
    g.mmio.process_queue(1)  # what the owner's retry timer does
    assert g.backend.sent[2] == HDR + frame(60, 3)
    assert g.tx.used_idx() == 3
    assert not g.net.throttled
    assert (g.net.stats.tx_frames, g.net.stats.tx_drops) == (3, 0)


def test_tx_bandwidth_counts_frame_bytes_without_the_header(mem):
    clock = FakeClock()
    g = Guest(mem, tx_limiter=limiter("bw=1000/1s", clock))
    post_tx(g, frame(600), frame(400), frame(100))
    assert len(g.backend.sent) == 2  # 600 + 400 bytes: the bucket is empty
    assert g.net.retry_after == pytest.approx(0.1)  # 100 bytes at 1000/s
    clock.advance_ms(100)
    g.mmio.process_queue(1)
    assert len(g.backend.sent) == 3 and g.net.stats.tx_bytes == 1100


def test_tx_limiter_charges_nothing_for_dropped_chains(mem):
    clock = FakeClock()
    bucket = limiter("ops=1/1s", clock)
    g = Guest(mem, tx_limiter=bucket)
    assert g.send([g.tx.readable(HDR[:8])])[1] == 0  # shorter than the header: dropped
    assert g.net.stats.tx_drops == 1
    assert bucket.ops.budget == 1
    g.send([g.tx.readable(HDR + frame(60))])
    assert len(g.backend.sent) == 1 and bucket.ops.budget == 0


def test_rx_limiter_holds_one_frame_and_reads_no_more(mem):
    clock = FakeClock()
    g = Guest(mem, rx_limiter=limiter("ops=2/100ms", clock))
    g.post_rx(1536, 1536, 1536, 1536, 1536, 1536, kick=False)
    g.backend.incoming.extend(bytes(VNET_HDR_SIZE) + frame(60, i) for i in range(5))
    g.mmio.process_queue(0)  # the TAP fd became readable
    assert [length for _h, length in g.rx_completions()] == [VNET_HDR_SIZE + 60] * 2
    # The third frame waits in the scratch buffer; the last two stay in the back end.
    assert g.net.pending_len == VNET_HDR_SIZE + 60
    assert len(g.backend.incoming) == 2
    assert g.net.throttled and g.net.rx_throttled
    assert g.net.retry_after == pytest.approx(0.05)
    assert g.net.stats.rx_throttled == 1
    # More TAP edges or RX kicks before the tokens are back: nothing moves.
    g.mmio.process_queue(0)
    g.wr(Reg.QUEUE_NOTIFY, 0)
    assert g.rx_completions() == [] and len(g.backend.incoming) == 2
    assert g.net.stats.rx_throttled == 1
    clock.advance_ms(50)  # one token: the pending frame goes, the next one waits
    g.mmio.process_queue(0)
    assert len(g.rx_completions()) == 1
    assert len(g.backend.incoming) == 1 and g.net.pending_len
    clock.advance_ms(100)
    g.mmio.process_queue(0)
    done = g.rx_completions()
    assert len(done) == 2 and g.net.pending_len == 0 and not g.backend.incoming
    assert not g.net.throttled
    assert g.net.stats.rx_frames == 5


def test_rx_limiter_delivers_the_frames_in_order(mem):
    clock = FakeClock()
    g = Guest(mem, rx_limiter=limiter("bw=100/1s", clock))
    posted = g.post_rx(1536, 1536, 1536, kick=False)
    g.backend.incoming.extend(bytes(VNET_HDR_SIZE) + frame(60, i) for i in range(3))
    g.net.process_rx()
    assert len(g.rx_completions()) == 1  # 60 of 100 bytes; 60 more do not fit
    assert g.net.rx_retry_after == pytest.approx(0.2)  # 20 bytes short at 100/s
    for _ in range(2):
        clock.advance_ms(600)
        g.net.process_rx()
    assert len(g.rx_completions()) == 2
    for i, (_head, bufs) in enumerate(posted):
        data = g.read_chain(bufs, VNET_HDR_SIZE + 60)
        assert data[VNET_HDR_SIZE:] == frame(60, i)


def test_rx_frame_waiting_for_buffers_keeps_its_tokens_in_the_bucket(mem):
    clock = FakeClock()
    bucket = limiter("ops=1/1s", clock)
    g = Guest(mem, rx_limiter=bucket)
    g.backend.incoming.extend(bytes(VNET_HDR_SIZE) + frame(60, i) for i in range(2))
    g.mmio.process_queue(0)  # no RX buffers: pending, but not throttled
    assert g.net.pending_len and not g.net.throttled
    assert bucket.ops.budget == 1  # charged only once the frame goes
    g.post_rx(1536, 1536)
    assert len(g.rx_completions()) == 1
    assert bucket.ops.budget == 0
    assert g.net.throttled and g.net.pending_len  # the second frame waits for a token
    assert len(g.backend.incoming) == 0


def test_reset_clears_throttling(mem):
    clock = FakeClock()
    g = Guest(mem, tx_limiter=limiter("ops=1/1s", clock))
    post_tx(g, frame(60), frame(60))
    assert g.net.throttled
    g.wr(Reg.STATUS, 0)
    assert not g.net.throttled and not g.net.tx_throttled
    g.net.process_queue(1)  # inactive: nothing to do, nothing to retry
    assert not g.net.throttled


def test_stats_round_trip_with_throttle_counters(mem):
    clock = FakeClock()
    g = Guest(mem, tx_limiter=limiter("ops=1/1s", clock))
    post_tx(g, frame(60), frame(60))
    other = VirtioNet(FakeBackend(), MAC)
    other.restore(g.net.save())
    assert other.stats.tx_throttled == 1
    # A state saved before the counters existed still loads.
    old = {k: v for k, v in g.net.save().stats.items() if not k.endswith("_throttled")}
    other.restore(VirtioNetState(MAC, old))
    assert other.stats.tx_throttled == 0


# --- the event-loop retry (virtio_service.queue_server) ------------------------------------------
def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def run_on_loop(loop: EventLoop, callback) -> None:
    done = threading.Event()

    def call() -> None:
        callback()
        done.set()

    loop.call_soon(call)
    assert done.wait(5)


def test_retry_timer_drains_a_throttled_rx_side(mem):
    """One TAP edge, five queued frames: the timer (not another edge) delivers the rest."""
    g = Guest(mem, rx_limiter=limiter("ops=1/20ms"))
    g.post_rx(*[1536] * 6, kick=False)
    g.backend.incoming.extend(bytes(VNET_HDR_SIZE) + frame(60, i) for i in range(5))
    loop = EventLoop()
    loop.start()
    try:
        serve = queue_server(loop, g.mmio, g.net)
        start = time.monotonic()
        run_on_loop(loop, lambda: serve(0))  # the single edge
        assert wait_for(lambda: g.rx.used_idx() == 5)
        elapsed = time.monotonic() - start
    finally:
        loop.close()
    assert elapsed >= 0.07  # four waits of 20 ms after the first (full-bucket) frame
    assert g.net.stats.rx_frames == 5 and g.net.stats.rx_throttled >= 1


def test_retry_timer_drains_a_throttled_tx_ring(mem):
    g = Guest(mem, tx_limiter=limiter("ops=1/20ms"))
    for i in range(4):
        g.tx.send([g.tx.readable(HDR + frame(60, i))])
    loop = EventLoop()
    loop.start()
    try:
        serve = queue_server(loop, g.mmio, g.net)
        run_on_loop(loop, lambda: serve(1))  # one kick
        assert wait_for(lambda: len(g.backend.sent) == 4)
    finally:
        loop.close()
    assert [data[VNET_HDR_SIZE:] for data in g.backend.sent] == [frame(60, i) for i in range(4)]
    assert g.tx.used_idx() == 4 and not g.net.throttled


def test_rx_kicks_are_wanted_only_when_the_ring_ran_dry(mem):
    """While frames flow into posted buffers the driver need not kick; once a
    frame waits for buffers, it must."""
    g = Guest(mem, features=BASIC | MRG)
    g.post_rx(1536, 1536)
    assert g.rx.used_flags() & VIRTQ_USED_F_NO_NOTIFY  # buffers and no frame: no kicks
    g.backend.incoming.append(bytes(VNET_HDR_SIZE) + frame(100))
    g.mmio.process_queue(0)
    assert len(g.rx_completions()) == 1
    assert g.rx.used_flags() & VIRTQ_USED_F_NO_NOTIFY  # a buffer is left: no kicks
    g.backend.incoming.extend([bytes(VNET_HDR_SIZE) + frame(100, s) for s in (1, 2)])
    g.mmio.process_queue(0)
    assert len(g.rx_completions()) == 1 and g.net.pending_len
    assert not g.rx.used_flags() & VIRTQ_USED_F_NO_NOTIFY  # dry, with a frame waiting
    g.post_rx(1536)
    assert len(g.rx_completions()) == 1 and not g.net.pending_len


def test_tx_frames_posted_during_service_need_no_kick(mem):
    g = Guest(mem)
    flags_seen: list[int] = []
    writev = g.backend.writev

    def spy(buffers):
        flags_seen.append(g.tx.used_flags() & VIRTQ_USED_F_NO_NOTIFY)
        if len(flags_seen) == 1:  # the driver adds a frame meanwhile, without a kick
            g.tx.send([g.tx.readable(bytes(VNET_HDR_SIZE) + frame(60, 5))])
        return writev(buffers)

    g.backend.writev = spy
    g.tx.send([g.tx.readable(bytes(VNET_HDR_SIZE) + frame(60))])
    g.wr(Reg.QUEUE_NOTIFY, 1)
    assert flags_seen == [VIRTQ_USED_F_NO_NOTIFY] * 2
    assert g.tx.used_idx() == 2 and len(g.backend.sent) == 2
    assert not g.tx.used_flags() & VIRTQ_USED_F_NO_NOTIFY
    assert g.irq.count == 1
