"""virtio-net (virtio 1.2, section 5.1): an Ethernet NIC backed by a host TAP.

Two queues, receiveq1 (0) and transmitq1 (1); no control queue. Every frame
in either direction is preceded by a 12-byte ``struct virtio_net_hdr_v1``
(the header always has ``num_buffers`` under VIRTIO_F_VERSION_1).

The back end is injected (:class:`NetBackend`, normally
``pyvmm.host.tap.Tap``). When it speaks the same header (``vnet_hdr``), the
device passes headers through both ways and offers the checksum and TSO
offloads; on activation it tells the back end which offloads the guest
accepts for RX (:class:`RxOffloads`: GUEST_CSUM, GUEST_TSO4, GUEST_TSO6).
Without ``vnet_hdr`` the device strips the header on TX, prepends a zeroed
one on RX and offers no offloads.

TX (:meth:`VirtioNet.process_queue` (1)): each chain's readable buffers
(header + frame) go to ONE ``writev`` as zero-copy views of guest RAM. A
chain with writable buffers, shorter than the header or with a frame over
:data:`MAX_FRAME_SIZE` is dropped; a host error drops the frame. Every TX
chain comes back with used length 0 (the device writes nothing into it).

RX (:meth:`VirtioNet.process_rx`, also run by ``process_queue(0)`` when the
driver adds buffers): one ``readv`` copies a frame from the back end into a
preallocated scratch buffer, which is then copied into the writable buffers
of one chain, or with VIRTIO_NET_F_MRG_RXBUF of as many chains as needed
(``num_buffers`` says how many). Chains are only returned once the whole
frame fits: when the ring runs dry mid-frame, the chains taken are put back
(``next_avail`` rewound) and the frame stays *pending* in the scratch buffer
until the driver adds buffers. A chain that cannot hold a header is returned
with length 0; a frame that can never fit (larger than one chain without
MRG_RXBUF, larger than the whole ring with it) is dropped.

A guest mistake costs only its chain or frame; a ring with no head to return
(bad ``avail.idx``) raises ``QueueError``, which the transport turns into
DEVICE_NEEDS_RESET. Host ``OSError`` is logged at debug level, counted, and
never propagates.

Owner's duty: call ``transport.process_queue(0)`` (which takes the transport
lock) whenever the back end's fd becomes readable, and again after
``retry_after`` while the device reports ``throttled`` (below). Register the
fd edge-triggered: while a frame is pending for lack of guest buffers the fd
stays readable, and the next ``process_queue(0)`` after a driver kick
drains it anyway.

Rate limiting (Firecracker's ``rx_rate_limiter``/``tx_rate_limiter``): each
direction may have a :class:`~pyvmm.devices.rate_limiter.RateLimiter` charged, per
frame, the frame's length without the virtio header (bandwidth bucket) and
one op (ops bucket). A TX frame without tokens stays in the TX ring. An RX
frame without tokens stays *pending* in the scratch buffer, and nothing more
is read from the back end until it is delivered: at most one frame is ever
held, whatever the limiter says (the rest waits in the TAP's own queue).
Tokens are charged when a frame goes to the guest or the TAP; an RX frame
kept pending for lack of guest buffers gets its tokens back until it goes. A
malformed TX chain is dropped free of charge; an RX frame too big for the
ring is charged like any other frame (it was read before it could be judged).

After ``process_queue(i)`` returns, :attr:`VirtioNet.throttled` and
:attr:`VirtioNet.retry_after` describe queue ``i`` (per direction:
``rx_throttled``/``tx_throttled``): when throttled, the owner must call
``process_queue(i)`` again after ``retry_after`` seconds. For RX that timer is
essential: the TAP fd is edge-triggered and gives no new edge for frames
already queued. :class:`NetStats` counts how often each direction became
throttled.

Persistence: :meth:`VirtioNet.save` keeps the MAC, the counters and both
limiters' buckets (a restored device continues with the budgets it had). A
pending RX frame is not saved: it is dropped, as a real NIC may drop frames.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from pyvmm.devices.rate_limiter import RateLimiter, RateLimiterState, restore_limiter
from pyvmm.devices.virtio.device import VirtioDevice, copy_config
from pyvmm.devices.virtio.ids import VIRTIO_ID_NET
from pyvmm.devices.virtio.queue import QueueError

if TYPE_CHECKING:
    from pyvmm.devices.virtio.device import VirtioInterrupt
    from pyvmm.devices.virtio.queue import DescriptorChain, Queue
    from pyvmm.memory import GuestMemory

_logger = logging.getLogger("pyvmm.devices.virtio.net")

NET_QUEUE_SIZE = 256
RX_QUEUE = 0
TX_QUEUE = 1

#: The largest frame (without the virtio header) either direction carries: a
#: 64 KiB GSO packet plus Ethernet and VLAN headers, as Linux sizes its big
#: receive buffers.
MAX_FRAME_SIZE = 65562

# --- feature bits (5.1.3) ---------------------------------------------------------
VIRTIO_NET_F_CSUM = 0  # device handles partial checksums from the driver
VIRTIO_NET_F_GUEST_CSUM = 1  # driver handles partial checksums from the device
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

VIRTIO_NET_S_LINK_UP = 1

OFFLOAD_FEATURES = (
    1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
)
BASE_FEATURES = 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF

#: struct virtio_net_hdr_v1, the header with num_buffers (virtio 1.2, 5.1.6).
VNET_HDR_SIZE = 12


class RxOffloads(NamedTuple):
    """What the guest accepts in frames it receives; the back end passes these through."""

    csum: bool = False  # partial checksums (GUEST_CSUM)
    tso4: bool = False  # GUEST_TSO4
    tso6: bool = False  # GUEST_TSO6

    @classmethod
    def from_features(cls, acked: int) -> RxOffloads:
        """From the negotiated features; TSO is only valid with checksums (5.1.3.1)."""
        if not acked >> VIRTIO_NET_F_GUEST_CSUM & 1:
            return cls()
        return cls(
            True,
            bool(acked >> VIRTIO_NET_F_GUEST_TSO4 & 1),
            bool(acked >> VIRTIO_NET_F_GUEST_TSO6 & 1),
        )


#: struct virtio_net_config, the fields we offer: u8 mac[6]; le16 status;
#: le16 max_virtqueue_pairs.
CONFIG = struct.Struct("<6sHH")
#: struct virtio_net_hdr_v1; only num_buffers (at offset 10) is ours to write on RX.
NUM_BUFFERS_OFFSET = 10
U16 = struct.Struct("<H")


class NetBackend(Protocol):
    """What the device needs from its back end (``pyvmm.host.tap.Tap`` has it).

    ``vnet_hdr``: frames carry a 12-byte virtio_net_hdr_v1 both ways.
    ``readv`` receives one frame and returns its length, or raises
    ``BlockingIOError`` when none is queued; ``writev`` sends one frame.
    """

    vnet_hdr: bool

    def readv(self, buffers: list[memoryview]) -> int: ...
    def writev(self, buffers: list[memoryview]) -> int: ...
    def set_offload(self, offloads: RxOffloads) -> None: ...


@dataclass
class NetStats:
    """Counters for metrics.

    ``*_drops`` are frames lost (too big, host error, restore); ``errors``
    counts malformed chains the guest posted; ``*_throttled`` counts how often
    that direction's rate limiter ran dry with a frame waiting (once per
    stall, however many retries the stall takes).
    """

    rx_frames: int = 0
    rx_bytes: int = 0
    rx_drops: int = 0
    rx_throttled: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_drops: int = 0
    tx_throttled: int = 0
    errors: int = 0


@dataclass(frozen=True)
class VirtioNetState:
    mac: bytes
    stats: dict[str, int] = field(default_factory=dict)
    rx_rate_limiter: RateLimiterState | None = None
    tx_rate_limiter: RateLimiterState | None = None


class VirtioNet(VirtioDevice):
    """The virtio network device; see the module docstring."""

    device_type = VIRTIO_ID_NET
    queue_max_sizes = (NET_QUEUE_SIZE, NET_QUEUE_SIZE)

    def __init__(
        self,
        backend: NetBackend,
        mac: bytes,
        rx_rate_limiter: RateLimiter | None = None,
        tx_rate_limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__()
        if len(mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, not {len(mac)}")
        self.backend = backend
        self.mac = bytes(mac)
        self._config = CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)
        self.vnet_hdr = bool(getattr(backend, "vnet_hdr", True))
        # Instance attribute: what this device offers depends on the back end.
        self.avail_features = BASE_FEATURES | (OFFLOAD_FEATURES if self.vnet_hdr else 0)
        self.stats = NetStats()
        self._scratch = bytearray(VNET_HDR_SIZE + MAX_FRAME_SIZE)
        self._scratch_view = memoryview(self._scratch)
        #: Length (header included) of the frame waiting in the scratch buffer; 0: none.
        self.pending_len = 0
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        # Per direction: a frame waits for tokens; call process_queue again after
        # *_retry_after seconds. ``throttled``/``retry_after`` mirror the queue
        # processed last (see the module docstring).
        self.rx_throttled = self.tx_throttled = False
        self.rx_retry_after = self.tx_retry_after = 0.0
        self.throttled = False
        self.retry_after = 0.0

    # --- config space -------------------------------------------------------------
    def read_config(self, offset: int, data: memoryview) -> None:
        copy_config(self._config, offset, data)

    # --- lifecycle ------------------------------------------------------------------
    def activate(
        self,
        mem: GuestMemory,
        queues: list[Queue],
        interrupt: VirtioInterrupt,
        acked_features: int = 0,
    ) -> None:
        super().activate(mem, queues, interrupt, acked_features)
        if self.vnet_hdr:
            offloads = RxOffloads.from_features(acked_features)
            try:
                self.backend.set_offload(offloads)
            except OSError as exc:  # pragma: no cover - the TAP accepts these flags
                _logger.warning("virtio-net: set_offload(%s): %s", offloads, exc)

    def reset(self) -> None:
        super().reset()
        self.pending_len = 0
        self.rx_throttled = self.tx_throttled = self.throttled = False

    @property
    def mrg_rxbuf(self) -> bool:
        return bool(self.acked_features >> VIRTIO_NET_F_MRG_RXBUF & 1)

    # --- queues -----------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """TX for queue 1; for queue 0 (the driver added RX buffers) deliver frames.

        Afterwards ``throttled``/``retry_after`` describe queue ``index``.
        """
        self.throttled = False
        if self.mem is None or self.interrupt is None:
            return
        if index == TX_QUEUE:
            self._process_tx()
            self.throttled, self.retry_after = self.tx_throttled, self.tx_retry_after
        elif index == RX_QUEUE:
            self.process_rx()
            self.throttled, self.retry_after = self.rx_throttled, self.rx_retry_after

    def _process_tx(self) -> None:
        was_throttled = self.tx_throttled
        self.tx_throttled = self.serve_queue(TX_QUEUE, self._send, self._drop_malformed_tx)
        if self.tx_throttled and not was_throttled:
            self.stats.tx_throttled += 1

    def _send(self, chain: DescriptorChain) -> int | None:
        """Used length 0 (TX buffers are device-readable only), or None: no tokens yet.

        One pass over the chain: :meth:`Queue.pop` already counted its bytes
        and found where the writable part starts.
        """
        mem = self.mem
        assert mem is not None
        descriptors = chain.descriptors
        frame_len = chain.readable_bytes - VNET_HDR_SIZE
        if chain.readable_count != len(descriptors) or not 0 <= frame_len <= MAX_FRAME_SIZE:
            _logger.debug(
                "virtio-net: dropping TX chain %d (%d readable bytes, %d writable)",
                chain.head_index,
                chain.readable_bytes,
                chain.writable_bytes,
            )
            self.stats.errors += 1
            self.stats.tx_drops += 1
            return 0
        limiter = self.tx_rate_limiter
        if limiter is not None and not limiter.consume(frame_len, 1):
            self.tx_retry_after = limiter.retry_after(frame_len, 1)
            return None
        stats = self.stats
        view = mem.view
        views = [view(addr, length) for addr, length, _flags in descriptors if length]
        try:
            self.backend.writev(views if self.vnet_hdr else _skip(views, VNET_HDR_SIZE))
        except OSError as exc:
            _logger.debug("virtio-net: TX of %d bytes: %s", frame_len, exc)
            stats.tx_drops += 1
            return 0
        finally:
            for v in views:
                v.release()
        stats.tx_frames += 1
        stats.tx_bytes += frame_len
        return 0

    def _drop_malformed_tx(self, exc: QueueError) -> None:
        _logger.debug("virtio-net: dropping malformed TX chain: %s", exc)
        self.stats.errors += 1
        self.stats.tx_drops += 1

    # --- receive --------------------------------------------------------------------------
    def process_rx(self) -> None:
        """Move frames from the back end into RX buffers until either runs out,
        or the RX rate limiter does (then ``rx_throttled`` is set).

        Call it with the transport lock held (``transport.process_queue(0)``).
        """
        was_throttled, self.rx_throttled = self.rx_throttled, False
        mem = self.mem
        interrupt = self.interrupt
        if mem is None or interrupt is None:
            return
        queue = self.queues[RX_QUEUE]
        if not queue.ready:
            return
        used_before = queue.next_used
        # No kicks for buffers the driver adds while frames flow: _deliver
        # turns them back on (and looks again) when the ring runs dry.
        queue.set_notification(mem, False)
        try:
            while True:
                if not self.pending_len:
                    if not self._read_frame():
                        break
                    if not self.pending_len:
                        continue  # a runt, dropped
                frame_len = self.pending_len - VNET_HDR_SIZE
                limiter = self.rx_rate_limiter
                if limiter is not None and not limiter.consume(frame_len, 1):
                    self.rx_throttled = True
                    self.rx_retry_after = limiter.retry_after(frame_len, 1)
                    if not was_throttled:
                        self.stats.rx_throttled += 1
                    break
                if not self._deliver(mem, queue):
                    if limiter is not None:
                        limiter.replenish(frame_len, 1)  # still pending: charged when it goes
                    break
        finally:
            if queue.next_used != used_before and queue.needs_notification(mem):
                interrupt.signal_used_queue()

    def _read_frame(self) -> bool:
        """Read one frame into the scratch buffer; False if the back end has none."""
        scratch = self._scratch_view
        header = VNET_HDR_SIZE if self.vnet_hdr else 0
        try:
            length = self.backend.readv([scratch[VNET_HDR_SIZE - header :]])
        except BlockingIOError:
            return False
        except OSError as exc:
            _logger.debug("virtio-net: RX read: %s", exc)
            self.stats.rx_drops += 1
            return False
        if length <= 0:
            return False
        if length <= header:
            self.stats.rx_drops += 1  # a runt: no frame after the header
            return True
        if not header:
            scratch[:VNET_HDR_SIZE] = bytes(VNET_HDR_SIZE)
        self.pending_len = length + VNET_HDR_SIZE - header
        return True

    def _deliver(self, mem: GuestMemory, queue: Queue) -> bool:
        """Copy the pending frame into RX chains; False if the ring ran dry first.

        The common case, the next chain is well formed and holds the whole
        frame, is served here in one pass; anything else (a malformed chain,
        a frame that needs several chains or fits none, an empty ring) goes
        to :meth:`_deliver_general`.
        """
        try:
            chain = queue.pop(mem)
        except QueueError as exc:
            if exc.head_index is None:
                raise
            _logger.debug("virtio-net: malformed RX chain: %s", exc)
            self.stats.errors += 1
            queue.add_used(mem, exc.head_index, 0)
            return self._deliver_general(mem, queue)
        if chain is None:
            return self._deliver_general(mem, queue)
        total = self.pending_len
        if chain.readable_count or chain.writable_bytes < total:
            queue.next_avail = (queue.next_avail - 1) & 0xFFFF  # put it back
            return self._deliver_general(mem, queue)
        scratch = self._scratch_view
        U16.pack_into(scratch, NUM_BUFFERS_OFFSET, 1)
        offset = 0
        write = mem.write
        for addr, length, _flags in chain.descriptors:
            n = min(length, total - offset)
            write(addr, scratch[offset : offset + n])
            offset += n
            if offset == total:
                break
        queue.add_used(mem, chain.head_index, total)
        stats = self.stats
        stats.rx_frames += 1
        stats.rx_bytes += total - VNET_HDR_SIZE
        self.pending_len = 0
        return True

    def _deliver_general(self, mem: GuestMemory, queue: Queue) -> bool:
        """:meth:`_deliver` for every case.

        Chains are returned (in pop order) only once the frame has a home;
        otherwise every chain popped here is put back.
        """
        total = self.pending_len
        collected = self._collect_rx_chains(mem, queue, total)
        if collected is None:
            return False  # not enough buffers yet: all put back, the frame waits
        popped, capacity = collected
        stats = self.stats
        good = [chain for _head, chain in popped if chain is not None]
        if capacity < total:
            # The frame does not fit; it is lost either way.
            stats.rx_drops += 1
            self.pending_len = 0
            if not any(chain is None for _head, chain in popped):
                queue.next_avail = (queue.next_avail - len(popped)) & 0xFFFF
                return True
            if not self.mrg_rxbuf and popped[-1][1] is not None:
                queue.next_avail = (queue.next_avail - 1) & 0xFFFF  # keep the good chain
                popped.pop()
            good = []
        lengths = self._write_frame(mem, good, total)
        for head, chain in popped:
            if chain is None:
                stats.errors += 1
                queue.add_used(mem, head, 0)
            else:
                queue.add_used(mem, head, lengths.get(id(chain), 0))
        if good:
            stats.rx_frames += 1
            stats.rx_bytes += total - VNET_HDR_SIZE
        self.pending_len = 0
        return True

    def _collect_rx_chains(
        self, mem: GuestMemory, queue: Queue, total: int
    ) -> tuple[list[tuple[int, DescriptorChain | None]], int] | None:
        """Chains for a ``total``-byte frame: (head, chain or None if unusable) and their room.

        None when the ring ran out before the frame fitted (the chains went
        back); less room than ``total`` when the frame can never fit.
        """
        mrg = self.mrg_rxbuf
        popped: list[tuple[int, DescriptorChain | None]] = []
        capacity = 0
        just_enabled = False
        while capacity < total:
            if not mrg and any(chain for _head, chain in popped):
                break  # one good chain is all we may use
            try:
                chain = queue.pop(mem)
            except QueueError as exc:
                if exc.head_index is None:
                    raise
                _logger.debug("virtio-net: malformed RX chain: %s", exc)
                popped.append((exc.head_index, None))
                just_enabled = False
                continue
            if chain is None:
                if not just_enabled:
                    # Ask to be kicked for new buffers, then look once more.
                    just_enabled = True
                    queue.set_notification(mem, True)
                    continue
                if len(popped) >= queue.size:
                    break  # we hold the whole ring: the frame can never fit
                queue.next_avail = (queue.next_avail - len(popped)) & 0xFFFF
                return None
            just_enabled = False
            usable = chain.writable_bytes >= VNET_HDR_SIZE and not chain.readable()
            popped.append((chain.head_index, chain if usable else None))
            capacity += chain.writable_bytes if usable else 0
        return popped, capacity

    def _write_frame(
        self, mem: GuestMemory, chains: list[DescriptorChain], total: int
    ) -> dict[int, int]:
        """Copy the pending frame across ``chains``; bytes written per chain (by ``id``)."""
        frame = self._scratch_view[:total]
        if chains:
            U16.pack_into(self._scratch, NUM_BUFFERS_OFFSET, len(chains))
        lengths: dict[int, int] = {}
        offset = 0
        for chain in chains:
            start = offset
            for desc in chain.writable():
                if offset == total:
                    break
                n = min(desc.length, total - offset)
                mem.write(desc.addr, frame[offset : offset + n])
                offset += n
            lengths[id(chain)] = offset - start
        return lengths

    # --- persistence --------------------------------------------------------------------
    def save(self) -> VirtioNetState:
        """MAC and counters; a pending RX frame is dropped (not saved)."""
        if self.pending_len:
            self.stats.rx_drops += 1
            self.pending_len = 0
        return VirtioNetState(
            self.mac,
            asdict(self.stats),
            self.rx_rate_limiter.save() if self.rx_rate_limiter is not None else None,
            self.tx_rate_limiter.save() if self.tx_rate_limiter is not None else None,
        )

    def restore(self, state: VirtioNetState) -> None:
        if state.mac != self.mac:
            raise ValueError(
                f"virtio-net state is for MAC {state.mac.hex(':')}, not {self.mac.hex(':')}"
            )
        stats = NetStats()
        for name, value in state.stats.items():
            if not hasattr(stats, name) or not isinstance(value, int) or value < 0:
                raise ValueError(f"virtio-net state: stats {name}={value!r}")
            setattr(stats, name, value)
        self.stats = stats
        self.pending_len = 0
        self.rx_rate_limiter = restore_limiter(state.rx_rate_limiter)
        self.tx_rate_limiter = restore_limiter(state.tx_rate_limiter)


def _skip(views: list[memoryview], count: int) -> list[memoryview]:
    """``views`` without their first ``count`` bytes (as slices, no copy)."""
    out = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        out.append(view[count:])
        count = 0
    return out
