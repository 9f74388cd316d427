"""A test guest for virtio-vsock: the three queues, packets, and guest-side credit.

:class:`VsockGuest` brings a :class:`~pyvmm.devices.virtio.vsock.VirtioVsock` up
behind a real :class:`~pyvmm.devices.virtio.mmio.MmioTransport` and plays the Linux
driver: RX chains are a 44-byte header buffer plus a 4 KiB data buffer (as
Linux 6.1 posts them), TX chains a header buffer plus a payload buffer.
:class:`GuestConn` is one guest socket with its credit bookkeeping; it
asserts on every RW packet that the device stayed within the credit the
guest had advertised.

Threads: the test thread is the guest (it writes rings and QueueNotify, as a
vCPU would); an event-loop thread may run the back end and the device's
``process_queue(0)`` at the same time, serialised by the transport lock.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.devices.virtio.mmio import (
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    MmioTransport,
    Reg,
)
from pyvmm.devices.virtio.vsock import VSOCK_QUEUE_SIZE, VirtioVsock
from pyvmm.devices.virtio.vsock_packet import (
    HDR,
    HDR_SIZE,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HOST_CID,
    Header,
)
from pyvmm.host.vsock_uds import VsockUds
from pyvmm.memory import GuestMemory
from pyvmm.vmm.event_loop import EventLoop
from tests.support.device_harness import CountingIrq
from tests.support.virtio_driver import Buffer, MockDriver, TransportAccess, bring_up

GUEST_MEM_SIZE = 16 << 20
LINUX_RX_BUF = 4096


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> object:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.0005)


class RegionDriver(MockDriver):
    """A MockDriver whose buffers come from its own ``[start, end)`` of guest RAM."""

    def __init__(self, mem: GuestMemory, size: int, *, desc_table: int, start: int, end: int):
        super().__init__(mem, size, desc_table=desc_table)
        self._start, self._end = start, end
        self._data = start

    def alloc(self, length: int, data: bytes = b"") -> int:
        if self._data + length > self._end:
            self._data = self._start
        addr = self._data
        self._data = (addr + length + 15) & ~15
        if data:
            self.mem.write(addr, data)
        return addr


@dataclass(frozen=True)
class Packet:
    hdr: Header
    payload: bytes


class VsockGuest(TransportAccess):
    """A VirtioVsock in a transport, brought up with rx, tx and event drivers."""

    def __init__(self, mem: GuestMemory, device: VirtioVsock, *, size: int = 256) -> None:
        self.mem = mem
        self.device = device
        self.cid = device.guest_cid
        self.irq = CountingIrq()
        self.mmio = MmioTransport(device, self.irq, mem)
        self.rx = RegionDriver(mem, size, desc_table=0x10_000, start=0x100_000, end=0x600_000)
        self.tx = RegionDriver(mem, size, desc_table=0x20_000, start=0x600_000, end=0xE00_000)
        self.ev = RegionDriver(mem, size, desc_table=0x30_000, start=0xE00_000, end=0xF00_000)
        bring_up(self.mmio, [self.rx, self.tx, self.ev], 1 << VIRTIO_F_VERSION_1, size, 256)
        assert VSOCK_QUEUE_SIZE == 256
        self._rx_chains: dict[int, list[Buffer]] = {}
        self.rx_target = 0  # RX chains dispatch() keeps posted
        self.rx_sizes: tuple[int, ...] = (HDR_SIZE, LINUX_RX_BUF)  # buffers of each RX chain
        self._rx_used = self._tx_used = self._ev_used = 0
        self.conns: dict[tuple[int, int], GuestConn] = {}
        self.unrouted: list[Packet] = []

    # --- driver side --------------------------------------------------------------------
    def kick(self, index: int) -> None:
        self.wr(Reg.QUEUE_NOTIFY, index)

    def needs_reset(self) -> bool:
        return bool(self.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET)

    def fill_rx(self, target: int = 64) -> None:
        """Keep ``target`` Linux-shaped RX chains posted (now and in :meth:`dispatch`)."""
        self.rx_target = target
        self.post_rx(target - self.rx_outstanding())

    def post_rx(self, count: int = 1) -> None:
        """Post ``count`` RX chains of writable buffers ``rx_sizes``, then kick."""
        if count <= 0:
            return
        for _ in range(count):
            bufs = [self.rx.writable(n) for n in self.rx_sizes]
            self._rx_chains[self.rx.send(bufs)] = bufs
        self.kick(0)

    def rx_outstanding(self) -> int:
        return len(self._rx_chains)

    def collect(self) -> list[Packet]:
        """The packets the device returned since the last call (their chains are forgotten)."""
        out = []
        while self._rx_used != self.rx.used_idx():
            head, length = self.rx.used_elem(self._rx_used)
            self._rx_used = (self._rx_used + 1) & 0xFFFF
            bufs = self._rx_chains.pop(head)
            capacity = sum(b.length for b in bufs)
            assert length <= capacity, (length, capacity)
            if length == 0:
                continue  # a chain the device refused
            raw = b"".join(self.mem.read(b.addr, b.length) for b in bufs)[:length]
            hdr = Header._make(HDR.unpack_from(raw))
            assert hdr.src_cid == VSOCK_HOST_CID and hdr.dst_cid == self.cid, hdr
            assert hdr.type == VIRTIO_VSOCK_TYPE_STREAM, hdr
            assert length == HDR_SIZE + hdr.len, (length, hdr)
            out.append(Packet(hdr, raw[HDR_SIZE:]))
        return out

    def dispatch(self) -> list[Packet]:
        """Collect packets, hand each to its GuestConn (or ``unrouted``); refill RX to target."""
        packets = self.collect()
        for pkt in packets:
            conn = self.conns.get((pkt.hdr.dst_port, pkt.hdr.src_port))
            if conn is None:
                self.unrouted.append(pkt)
            else:
                conn.on_packet(pkt)
        self.post_rx(self.rx_target - self.rx_outstanding())
        return packets

    def send_chain(self, buffers: list[Buffer]) -> tuple[int, int]:
        """Post one TX chain and kick; returns its used element (asserting it came back)."""
        head = self.tx.send(buffers)
        self.kick(1)
        assert self.tx.used_idx() == (self._tx_used + 1) & 0xFFFF, "TX chain not consumed"
        elem = self.tx.used_elem(self._tx_used)
        self._tx_used = (self._tx_used + 1) & 0xFFFF
        assert elem[0] == head
        return elem

    def send(
        self,
        op: int,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int = 256 * 1024,
        fwd_cnt: int = 0,
        length: int | None = None,
        type_: int = VIRTIO_VSOCK_TYPE_STREAM,
        src_cid: int | None = None,
        dst_cid: int = VSOCK_HOST_CID,
    ) -> None:
        """One packet from the guest: header and payload in separate buffers, as Linux sends."""
        header = HDR.pack(
            self.cid if src_cid is None else src_cid,
            dst_cid,
            src_port,
            dst_port,
            len(payload) if length is None else length,
            type_,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        )
        buffers = [self.tx.readable(header)]
        if payload:
            buffers.append(self.tx.readable(payload))
        self.send_chain(buffers)

    def post_event_buffer(self, size: int = 4) -> int:
        head = self.ev.send([self.ev.writable(size)])
        self.kick(2)
        return head

    def events(self) -> list[tuple[int, bytes]]:
        """(used length, first 4 bytes) of each event-queue buffer the device returned."""
        out = []
        while self._ev_used != self.ev.used_idx():
            head, length = self.ev.used_elem(self._ev_used)
            self._ev_used = (self._ev_used + 1) & 0xFFFF
            desc_addr = self.mem.read_u64(self.ev.desc_table + 16 * head)
            out.append((length, self.mem.read(desc_addr, 4)))
        return out

    # --- sockets ----------------------------------------------------------------------------
    def socket(self, local_port: int, peer_port: int, buf_alloc: int = 256 * 1024) -> GuestConn:
        conn = GuestConn(self, local_port, peer_port, buf_alloc)
        self.conns[(local_port, peer_port)] = conn
        return conn


@dataclass
class GuestConn:
    """The guest's end of one connection, with the credit rules a Linux guest follows."""

    guest: VsockGuest
    local_port: int
    peer_port: int
    buf_alloc: int
    fwd_cnt: int = 0  # bytes the guest application consumed
    advertised_fwd: int = 0  # fwd_cnt the device last heard
    rx_cnt: int = 0
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    data: bytearray = field(default_factory=bytearray)
    packets: list[Packet] = field(default_factory=list)

    def send(self, op: int, payload: bytes = b"", **kw) -> None:
        self.advertised_fwd = self.fwd_cnt
        self.guest.send(
            op,
            self.local_port,
            self.peer_port,
            payload,
            buf_alloc=self.buf_alloc,
            fwd_cnt=self.fwd_cnt,
            **kw,
        )
        if op == VIRTIO_VSOCK_OP_RW:
            self.tx_cnt += len(payload)

    def connect(self) -> None:
        self.send(VIRTIO_VSOCK_OP_REQUEST)

    def on_packet(self, pkt: Packet) -> None:
        self.packets.append(pkt)
        self.peer_buf_alloc = pkt.hdr.buf_alloc
        self.peer_fwd_cnt = pkt.hdr.fwd_cnt
        if pkt.hdr.op == VIRTIO_VSOCK_OP_RW:
            self.rx_cnt += len(pkt.payload)
            in_flight = self.rx_cnt - self.advertised_fwd
            assert in_flight <= self.buf_alloc, f"device overran credit: {in_flight}"
            self.data += pkt.payload

    def ops(self) -> list[int]:
        return [p.hdr.op for p in self.packets]

    def consume(self) -> None:
        """The application read everything; tell the device when it runs short (as Linux does)."""
        self.fwd_cnt = self.rx_cnt
        if self.buf_alloc - (self.rx_cnt - self.advertised_fwd) < self.buf_alloc // 2:
            self.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)

    def write_some(self, data: bytes) -> int:
        """Send as much of ``data`` as the device's credit allows; returns the count."""
        sent = 0
        while sent < len(data):
            n = min(self.peer_credit(), MAX_PKT_PAYLOAD, len(data) - sent)
            if n <= 0:
                break
            self.send(VIRTIO_VSOCK_OP_RW, data[sent : sent + n])
            sent += n
        return sent


# --- a whole device with its Unix-socket back end and event loop ------------------------------
GUEST_CID = 3


@dataclass
class VsockEnv:
    loop: EventLoop
    backend: VsockUds
    device: VirtioVsock
    guest: VsockGuest
    uds: Path
    #: What the event loop thread reported dying of (nothing, in a passing test).
    loop_errors: list[str]

    def listen(self, port: int) -> socket.socket:
        """A host service for guest connections to port ``port`` (at ``<uds>_<port>``)."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(f"{self.uds}_{port}")
        srv.listen(16)
        srv.settimeout(5)
        return srv

    def guest_connect(
        self, port: int = 1234, local_port: int = 5000, buf_alloc: int = 256 * 1024
    ) -> tuple[GuestConn, socket.socket]:
        """Guest connects to host ``port`` (a listener must exist); returns both ends."""
        srv = self.listen(port)
        guest = self.guest
        if not guest.rx_target:
            guest.fill_rx(64)
        conn = guest.socket(local_port, port, buf_alloc)
        conn.connect()
        wait_until(lambda: guest.dispatch() and conn.packets, what="RESPONSE")
        assert conn.ops() == [VIRTIO_VSOCK_OP_RESPONSE]
        host, _ = srv.accept()
        host.settimeout(5)
        srv.close()
        return conn, host

    def host_connect(self, line: bytes) -> socket.socket:
        """A host client of ``uds`` that sent ``line``."""
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(str(self.uds))
        if line:
            client.sendall(line)
        return client

    def accept_request(
        self, client_port: int, buf_alloc: int = 256 * 1024, answer: int = VIRTIO_VSOCK_OP_RESPONSE
    ) -> GuestConn:
        """Wait for the device's REQUEST to guest port ``client_port``; ``answer`` it."""
        guest = self.guest
        if not guest.rx_target:
            guest.fill_rx(64)

        def request() -> Packet | None:
            guest.dispatch()
            for pkt in guest.unrouted:
                if pkt.hdr.op == VIRTIO_VSOCK_OP_REQUEST and pkt.hdr.dst_port == client_port:
                    guest.unrouted.remove(pkt)
                    return pkt
            return None

        pkt = wait_until(request, what="REQUEST")
        assert isinstance(pkt, Packet)
        conn = guest.socket(client_port, pkt.hdr.src_port, buf_alloc)
        conn.on_packet(pkt)
        conn.send(answer)
        return conn


@contextmanager
def vsock_env(
    uds: Path, *, start_loop: bool = True, device_kw: dict | None = None, **backend_kw
) -> Iterator[VsockEnv]:
    """Guest RAM, an event loop thread, VsockUds at ``uds`` and a VirtioVsock, brought up."""
    mem = GuestMemory([(0, GUEST_MEM_SIZE)])
    errors: list[str] = []
    loop = EventLoop("vsock-test", on_error=errors.append)
    backend = VsockUds(uds, **backend_kw)
    device = VirtioVsock(GUEST_CID, backend, **(device_kw or {}))
    guest = VsockGuest(mem, device)
    backend.subscribe(loop, lambda: guest.mmio.process_queue(0))
    if start_loop:
        loop.start()
    try:
        yield VsockEnv(loop, backend, device, guest, uds, errors)
    finally:
        loop.stop()
        backend.close()
        loop.close()
        mem.close()
    assert errors == []
    assert not guest.needs_reset()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_until_eof(sock: socket.socket) -> bytes:
    """Everything until the peer closed (a close with our bytes unread resets: also the end)."""
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)
