"""virtio-vsock (virtio 1.2, section 5.10): stream sockets between guest and host programs.

Three queues: rx (0, device -> driver packets), tx (1, driver -> device) and
event (2); the config space is one le64, the guest's CID. No device feature
bits are offered: without any, the device speaks stream sockets only.
Every packet is a 44-byte header (:mod:`pyvmm.devices.virtio.vsock_packet`) plus, for
VIRTIO_VSOCK_OP_RW, its payload. The host end is CID 2.

This module is the virtio side and the connection bookkeeping; it opens
nothing. Host ends come from an injected :class:`VsockBackend` as
:class:`~pyvmm.devices.virtio.vsock_connection.HostStream` objects, normally
``pyvmm.host.vsock_uds.VsockUds`` (Firecracker's Unix-socket convention: host
clients connect to ``uds_path`` and send ``CONNECT <port>\\n``; a guest
connecting to host port P reaches the socket listening at ``<uds_path>_P``).

The VMM wires it like any device with a back end (``VsockUds`` subscribes
to the event loop and wakes RX); the back end removes its socket on close.

All device work runs under the transport lock: the back end never calls the
device, it records host events and calls its ``wake`` callable, which runs
``process_queue(0)``; the device then drains :meth:`VsockBackend.take_events`.
Any ``process_queue`` call (a kick of any queue) also delivers what is
pending for the guest, so a guest adding RX buffers flushes pending RX.

Data path. TX: each chain's header is unpacked with one precompiled struct;
RW payloads go to the host socket as views of guest RAM (no copy), and only
what the socket cannot take now is copied into the connection's buffer,
which our advertised credit bounds. RX: host bytes are received straight
into the RX chain's buffers in guest RAM, never more than the guest's
credit allows; one interrupt per ``process_queue`` call per queue.

What a guest cannot do to the host: a malformed TX chain is returned unused
and counted; a packet with the wrong CIDs is dropped; one with a bad type or
length, an unknown op, or for an unknown connection is answered with RST
(never an RST to an RST); a guest overrunning our credit loses the
connection. Connections are capped (:data:`MAX_CONNECTIONS`), and so is the
queue of RSTs owed to the guest: while it is long, TX is left in the ring
until the guest posts RX buffers.

Persistence: only the CID is state, and a restore may change it (clones).
Connections do not survive a snapshot (as in Firecracker):
:meth:`VirtioVsock.restore` drops them, and once the device runs again the
owner calls :meth:`VirtioVsock.send_transport_reset`, so the guest drops its
side too and re-reads its CID.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.config import check_guest_cid
from pyvmm.devices.virtio.chain_io import chain_views, scatter
from pyvmm.devices.virtio.device import VirtioDevice, copy_config
from pyvmm.devices.virtio.ids import VIRTIO_ID_VSOCK
from pyvmm.devices.virtio.queue import QueueError
from pyvmm.devices.virtio.vsock_connection import (
    DEFAULT_BUF_ALLOC,
    HOST_CLOSED,
    HOST_HUP,
    HOST_NEW,
    HOST_READABLE,
    HOST_WRITABLE,
    PENDING_CREDIT_UPDATE,
    PENDING_REQUEST,
    PENDING_RESPONSE,
    PENDING_SHUTDOWN,
    Connection,
    ConnState,
    HostStream,
    VsockBackend,
    VsockStats,
)
from pyvmm.devices.virtio.vsock_packet import (
    CONFIG,
    EVENT,
    HDR,
    HDR_SIZE,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HOST_CID,
    MalformedPacket,
    packet_problem,
    read_header,
    rst_header,
)

if TYPE_CHECKING:
    from pyvmm.devices.virtio.queue import Descriptor, DescriptorChain, Queue
    from pyvmm.memory import GuestMemory

_logger = logging.getLogger("pyvmm.devices.virtio.vsock")

VSOCK_QUEUE_SIZE = 256
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2

#: Live connections at most; a REQUEST or CONNECT beyond this is refused.
MAX_CONNECTIONS = 1024
#: Host ports the device gives host-initiated connections count up from here.
HOST_PORT_BASE = 1 << 30
#: While this many RSTs wait for RX buffers, TX chains stay in the ring.
RST_BACKLOG_LIMIT = 256
#: Hard cap on queued RSTs (the oldest are forgotten beyond it).
_RST_QUEUE_MAX = 4 * MAX_CONNECTIONS


@dataclass(frozen=True)
class VirtioVsockState:
    guest_cid: int


class VirtioVsock(VirtioDevice):
    """The virtio socket device; see the module docstring."""

    device_type = VIRTIO_ID_VSOCK
    queue_max_sizes = (VSOCK_QUEUE_SIZE, VSOCK_QUEUE_SIZE, VSOCK_QUEUE_SIZE)
    avail_features = 0

    def __init__(
        self,
        guest_cid: int,
        backend: VsockBackend,
        *,
        max_connections: int = MAX_CONNECTIONS,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
    ) -> None:
        super().__init__()
        self.guest_cid = check_guest_cid(guest_cid)
        self.backend = backend
        self.max_connections = max_connections
        self.buf_alloc = buf_alloc
        self._config = CONFIG.pack(guest_cid)
        self.stats = VsockStats()
        self._conns: dict[tuple[int, int], Connection] = {}
        self._by_stream: dict[HostStream, Connection] = {}
        #: Connections that may have a packet for the guest, served round-robin.
        self._rx_queue: deque[Connection] = deque()
        #: RSTs owed to the guest for packets of no (more) connection: (host port, guest port).
        self._rsts: deque[tuple[int, int]] = deque(maxlen=_RST_QUEUE_MAX)
        self._next_host_port = HOST_PORT_BASE
        self._tx_deferred = False

    @property
    def connections(self) -> int:
        """How many connections are live."""
        return len(self._conns)

    # --- config space ---------------------------------------------------------------
    def read_config(self, offset: int, data: memoryview) -> None:
        copy_config(self._config, offset, data)

    # --- lifecycle ----------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._drop_all()

    def save(self) -> VirtioVsockState:
        return VirtioVsockState(self.guest_cid)

    def restore(self, state: VirtioVsockState) -> None:
        """Drop every connection (send a transport reset once running). The CID this
        device was made with wins over ``state.guest_cid``: a clone's new CID."""
        self._drop_all()

    def send_transport_reset(self) -> bool:
        """Drop every connection and tell the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).

        For the snapshot code, after a restore; call it with the transport
        lock held. Returns True if the event reached an event-queue buffer
        (the guest then resets its sockets and re-reads its CID).
        """
        self._drop_all()
        mem, interrupt = self.mem, self.interrupt
        if mem is None or interrupt is None or not self.queues[EVENT_QUEUE].ready:
            return False
        queue = self.queues[EVENT_QUEUE]
        used_before = queue.next_used
        try:
            chain = queue.pop(mem)
        except QueueError as exc:
            if exc.head_index is None:
                raise
            self.stats.guest_errors += 1
            queue.add_used(mem, exc.head_index, 0)
            chain = None
        sent = False
        if chain is not None:
            if chain.readable() or chain.writable_bytes < EVENT.size:
                self.stats.guest_errors += 1
                queue.add_used(mem, chain.head_index, 0)
            else:
                scatter(mem, chain.descriptors, EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                queue.add_used(mem, chain.head_index, EVENT.size)
                sent = True
        if queue.next_used != used_before and queue.needs_notification(mem):
            interrupt.signal_used_queue()
        return sent

    # --- queues ------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """TX for queue 1; for every queue, then take host events and deliver RX."""
        if self.mem is None or self.interrupt is None:
            return
        if index == TX_QUEUE:
            self._process_tx()
        self._pump()

    def _pump(self) -> None:
        self._take_host_events()
        while True:
            self._deliver_rx()
            if not self._tx_deferred or len(self._rsts) >= RST_BACKLOG_LIMIT:
                break
            self._process_tx()  # RX made room for the replies TX needs

    # --- host events ---------------------------------------------------------------------
    def _take_host_events(self) -> None:
        for stream, bits in self.backend.take_events():
            conn = self._by_stream.get(stream)
            if conn is None:
                if not bits & HOST_NEW:
                    continue  # a stream we already let go
                conn = self._host_connect(stream)
                if conn is None:
                    continue
            if bits & HOST_CLOSED:
                self.stats.host_errors += 1
                self._close(conn)
                continue
            if bits & HOST_HUP:
                conn.host_hup = True
            if bits & HOST_WRITABLE and conn.tx_buf:
                self._flush(conn)
            if bits & HOST_READABLE and not conn.closed:
                conn.host_readable = True
                self._schedule(conn)

    def _host_connect(self, stream: HostStream) -> Connection | None:
        """A host client asked for a guest port: queue a REQUEST to the guest."""
        port = stream.requested_port
        if port is None or len(self._conns) >= self.max_connections:
            self.stats.refused += 1
            stream.close()
            return None
        host_port = self._alloc_host_port(port)
        conn = Connection(host_port, port, stream, ConnState.CONNECTING, self.buf_alloc)
        self._add(conn)
        conn.pending = PENDING_REQUEST
        self._schedule(conn)
        return conn

    def _alloc_host_port(self, guest_port: int) -> int:
        while True:  # at most len(self._conns) + 1 rounds
            port = self._next_host_port
            self._next_host_port = port + 1 if port + 1 < 0xFFFF_FFFF else HOST_PORT_BASE
            if (port, guest_port) not in self._conns:
                return port

    # --- TX: packets from the guest ---------------------------------------------------------
    def _process_tx(self) -> None:
        self._tx_deferred = self.serve_queue(TX_QUEUE, self._handle_tx, self._malformed_tx)

    def _malformed_tx(self, exc: QueueError) -> None:
        _logger.debug("virtio-vsock: dropping malformed TX chain: %s", exc)
        self.stats.guest_errors += 1

    def _handle_tx(self, chain: DescriptorChain) -> int | None:
        """One guest packet; always used length 0 (None: leave it, RSTs are backed up)."""
        if len(self._rsts) >= RST_BACKLOG_LIMIT:
            return None
        mem = self.mem
        assert mem is not None
        descs = chain.descriptors
        try:
            fields, total = read_header(mem, descs)
        except MalformedPacket as exc:
            return self._guest_error(str(exc))
        src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt = fields
        if src_cid != self.guest_cid or dst_cid != VSOCK_HOST_CID:
            return self._guest_error(f"TX packet from CID {src_cid} to CID {dst_cid}")
        self.stats.tx_packets += 1
        problem = packet_problem(type_, op, length, total)
        if problem is not None:
            self._guest_error(problem)
            if op != VIRTIO_VSOCK_OP_RST:
                self._reset_key(dst_port, src_port)
            return 0

        key = (dst_port, src_port)
        conn = self._conns.get(key)
        if op == VIRTIO_VSOCK_OP_REQUEST:
            if conn is not None:  # the guest reused a live pair: both ends are confused
                self._close(conn, notify_guest=False)
                self._queue_rst(dst_port, src_port)
            else:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return 0
        if conn is None:
            if op != VIRTIO_VSOCK_OP_RST:
                self._queue_rst(dst_port, src_port)
            return 0
        conn.set_peer_credit(buf_alloc, fwd_cnt)
        self._apply(conn, op, flags, descs, length)
        if not conn.closed and conn.has_rx_work():
            self._schedule(conn)
        return 0

    def _apply(
        self, conn: Connection, op: int, flags: int, descs: list[Descriptor], length: int
    ) -> None:
        """What a guest packet of a live connection does to it."""
        if op == VIRTIO_VSOCK_OP_RW:
            assert self.mem is not None
            views = chain_views(self.mem, descs, HDR_SIZE, length)
            try:
                self._guest_data(conn, views, length)
            finally:
                for view in views:
                    view.release()
        elif op == VIRTIO_VSOCK_OP_RST:
            self._close(conn, notify_guest=False)
        elif op == VIRTIO_VSOCK_OP_RESPONSE:
            self._guest_response(conn)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            self._guest_shutdown(conn, flags)
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            conn.pending |= PENDING_CREDIT_UPDATE
        elif op != VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            self._guest_error(f"TX packet with unknown op {op}")
            self._close(conn)

    def _guest_error(self, what: str) -> int:
        _logger.debug("virtio-vsock: %s", what)
        self.stats.guest_errors += 1
        return 0

    def _guest_connect(self, host_port: int, guest_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        """A guest REQUEST to host port ``host_port``: connect to its host service."""
        if len(self._conns) >= self.max_connections:
            self.stats.refused += 1
            self._queue_rst(host_port, guest_port)
            return
        try:
            stream = self.backend.connect(host_port)
        except OSError as exc:
            _logger.debug("virtio-vsock: no host service for port %d: %s", host_port, exc)
            self.stats.refused += 1
            self._queue_rst(host_port, guest_port)
            return
        conn = Connection(host_port, guest_port, stream, ConnState.ESTABLISHED, self.buf_alloc)
        conn.set_peer_credit(buf_alloc, fwd_cnt)
        conn.pending = PENDING_RESPONSE
        self._add(conn)
        self._schedule(conn)

    def _guest_response(self, conn: Connection) -> None:
        if conn.state is not ConnState.CONNECTING or not conn.announced:
            self._guest_error("unexpected RESPONSE")
            self._close(conn)
            return
        conn.state = ConnState.ESTABLISHED
        try:
            conn.stream.confirm(conn.host_port)
        except OSError as exc:
            self._host_error(conn, exc)

    def _guest_data(self, conn: Connection, views: list[memoryview], length: int) -> None:
        if conn.state is not ConnState.ESTABLISHED or conn.guest_send_done:
            self._guest_error("RW on a connection not open for guest data")
            self._close(conn)
            return
        try:
            accepted = conn.forward(views, length)
        except OSError as exc:
            self._host_error(conn, exc)
            return
        if not accepted:
            self._guest_error(f"guest overran its credit on port {conn.guest_port}")
            self._close(conn)
            return
        self.stats.tx_bytes += length
        if conn.wants_credit_update():
            conn.pending |= PENDING_CREDIT_UPDATE

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        if flags & VIRTIO_VSOCK_SHUTDOWN_SEND:
            conn.guest_send_done = True
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV:
            conn.guest_recv_done = True
        if conn.guest_send_done and conn.guest_recv_done:
            conn.state = ConnState.CLOSING
        self._after_flush(conn)

    # --- the host end ---------------------------------------------------------------------------
    def _flush(self, conn: Connection) -> None:
        try:
            conn.flush()
        except OSError as exc:
            self._host_error(conn, exc)
            return
        if conn.wants_credit_update():
            conn.pending |= PENDING_CREDIT_UPDATE
            self._schedule(conn)
        self._after_flush(conn)

    def _after_flush(self, conn: Connection) -> None:
        """Finish a shutdown or close that waited for the host to take our buffer."""
        if conn.tx_buf or conn.closed:
            return
        if conn.state is ConnState.CLOSING:
            self._close(conn)
        elif conn.guest_send_done:
            if not conn.host_write_shut:
                conn.host_write_shut = True
                conn.stream.shutdown_write()
            if conn.host_eof:
                self._close(conn)  # both directions are done

    def _host_error(self, conn: Connection, exc: OSError) -> None:
        _logger.debug("virtio-vsock: host stream of port %d: %s", conn.guest_port, exc)
        self.stats.host_errors += 1
        self._close(conn)

    def _host_eof(self, conn: Connection) -> None:
        conn.host_eof = True
        conn.host_readable = False
        if conn.guest_send_done and not conn.tx_buf:
            self._close(conn)
        else:
            conn.pending |= PENDING_SHUTDOWN

    # --- connection table ---------------------------------------------------------------------
    def _add(self, conn: Connection) -> None:
        self._conns[conn.key] = conn
        self._by_stream[conn.stream] = conn
        self.stats.connections_opened += 1

    def _close(self, conn: Connection, *, notify_guest: bool = True) -> None:
        """Forget ``conn`` and close its host end; RST the guest if it knows of it."""
        if conn.closed:
            return
        conn.closed = True
        conn.pending = 0
        self._conns.pop(conn.key, None)
        self._by_stream.pop(conn.stream, None)
        conn.stream.close()
        if notify_guest and conn.announced:
            self._queue_rst(conn.host_port, conn.guest_port)

    def _reset_key(self, host_port: int, guest_port: int) -> None:
        """RST for a bad packet: closes the connection of that pair if there is one."""
        conn = self._conns.get((host_port, guest_port))
        if conn is not None:
            self._close(conn)
        else:
            self._queue_rst(host_port, guest_port)

    def _queue_rst(self, host_port: int, guest_port: int) -> None:
        self._rsts.append((host_port, guest_port))

    def _drop_all(self) -> None:
        """Close every host end without telling the guest (reset, restore)."""
        for conn in list(self._conns.values()):
            self._close(conn, notify_guest=False)
        self._rx_queue.clear()
        self._rsts.clear()
        self._tx_deferred = False

    def _schedule(self, conn: Connection) -> None:
        if not conn.scheduled and not conn.closed:
            conn.scheduled = True
            self._rx_queue.append(conn)

    # --- RX: packets to the guest -------------------------------------------------------------
    def _deliver_rx(self) -> None:
        mem, interrupt = self.mem, self.interrupt
        assert mem is not None and interrupt is not None
        queue = self.queues[RX_QUEUE]
        if not queue.ready:
            return
        used_before = queue.next_used
        try:
            while self._rsts or self._rx_queue:
                chain = self._pop_rx_chain(mem, queue)
                if chain is None:
                    break
                used = self._fill_rx(mem, chain)
                if used is None:
                    queue.next_avail = (queue.next_avail - 1) & 0xFFFF  # nothing to say after all
                    break
                queue.add_used(mem, chain.head_index, used)
        finally:
            if queue.next_used != used_before and queue.needs_notification(mem):
                interrupt.signal_used_queue()

    def _pop_rx_chain(self, mem: GuestMemory, queue: Queue) -> DescriptorChain | None:
        """The next usable RX chain; unusable ones go back with length 0."""
        rearmed = False
        while True:
            try:
                chain = queue.pop(mem)
            except QueueError as exc:
                if exc.head_index is None:
                    raise
                self._guest_error(f"malformed RX chain: {exc}")
                queue.add_used(mem, exc.head_index, 0)
                continue
            if chain is None:
                if rearmed:
                    return None
                queue.set_notification(mem, True)  # kick us for new buffers ...
                rearmed = True  # ... and look once more
                continue
            rearmed = False
            if chain.writable_bytes < HDR_SIZE or chain.readable():
                self._guest_error(f"RX chain {chain.head_index} cannot hold a packet")
                queue.add_used(mem, chain.head_index, 0)
                continue
            return chain

    def _fill_rx(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        """Write the next packet owed to the guest into ``chain``; its length, None if none."""
        if self._rsts:
            return self._put_rst(mem, chain)
        rx_queue = self._rx_queue
        for _ in range(len(rx_queue)):
            conn = rx_queue.popleft()
            used = None if conn.closed else self._conn_packet(mem, chain, conn)
            if not conn.closed and conn.has_rx_work():
                rx_queue.append(conn)  # round-robin
            else:
                conn.scheduled = False
            if used is not None:
                return used
            if self._rsts:  # the connection failed while we served it
                return self._put_rst(mem, chain)
        return None

    def _conn_packet(
        self, mem: GuestMemory, chain: DescriptorChain, conn: Connection
    ) -> int | None:
        pending = conn.pending
        if pending & PENDING_REQUEST:
            conn.pending &= ~PENDING_REQUEST
            conn.announced = True
            return self._put_control(mem, chain, conn, VIRTIO_VSOCK_OP_REQUEST)
        if pending & PENDING_RESPONSE:
            conn.pending &= ~PENDING_RESPONSE
            return self._put_control(mem, chain, conn, VIRTIO_VSOCK_OP_RESPONSE)
        if conn.can_read_host():
            used = self._put_data(mem, chain, conn)
            if used is not None or conn.closed:
                return used
        pending = conn.pending
        if pending & PENDING_CREDIT_UPDATE:
            return self._put_control(mem, chain, conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        if pending & PENDING_SHUTDOWN:
            conn.pending &= ~PENDING_SHUTDOWN
            return self._put_control(
                mem, chain, conn, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND
            )
        return None

    def _put_data(self, mem: GuestMemory, chain: DescriptorChain, conn: Connection) -> int | None:
        """Receive host bytes straight into ``chain``; None if there were none (or EOF)."""
        capacity = chain.writable_bytes - HDR_SIZE
        if capacity <= 0:
            return self._guest_error("RX chain has no room for data")
        limit = min(capacity, conn.peer_credit(), MAX_PKT_PAYLOAD)
        descs = chain.descriptors
        views = chain_views(mem, descs, HDR_SIZE, limit)
        try:
            received = conn.stream.recv_into(views)
        except BlockingIOError:
            conn.host_readable = False
            return None
        except OSError as exc:
            self._host_error(conn, exc)
            return None
        finally:
            for view in views:
                view.release()
        if received <= 0:
            self._host_eof(conn)
            return None
        if received < limit and not conn.host_hup:
            conn.host_readable = False  # drained; the next arrival is a new event
        self._put_header(mem, descs, conn, VIRTIO_VSOCK_OP_RW, 0, received)
        stats = self.stats
        stats.rx_packets += 1
        stats.rx_bytes += received
        return HDR_SIZE + received

    def _put_control(
        self, mem: GuestMemory, chain: DescriptorChain, conn: Connection, op: int, flags: int = 0
    ) -> int:
        self._put_header(mem, chain.descriptors, conn, op, flags, 0)
        self.stats.rx_packets += 1
        return HDR_SIZE

    def _put_header(
        self,
        mem: GuestMemory,
        descs: list[Descriptor],
        conn: Connection,
        op: int,
        flags: int,
        length: int,
    ) -> None:
        conn.note_sent(length)
        fields = (
            VSOCK_HOST_CID,
            self.guest_cid,
            conn.host_port,
            conn.guest_port,
            length,
            VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            conn.buf_alloc,
            conn.fwd_cnt,
        )
        if descs[0].length >= HDR_SIZE:
            mem.write_struct(HDR, descs[0].addr, *fields)
        else:
            scatter(mem, descs, HDR.pack(*fields))

    def _put_rst(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        host_port, guest_port = self._rsts.popleft()
        scatter(mem, chain.descriptors, rst_header(self.guest_cid, host_port, guest_port))
        self.stats.rx_packets += 1
        self.stats.rsts_sent += 1
        return HDR_SIZE
