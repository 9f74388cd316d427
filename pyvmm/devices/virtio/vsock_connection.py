"""One virtio-vsock stream connection: its state, credit and host-bound buffer.

Pure logic: a :class:`Connection` talks to its host end only through the
:class:`HostStream` it is given (``pyvmm.host.vsock_uds`` makes them from Unix
sockets; tests may fake them) and never opens anything itself.

Credit (virtio 1.2, 5.10.6.3). Each side tells the other, in every packet
header, how much receive buffer it has (``buf_alloc``) and how many bytes it
has consumed so far (``fwd_cnt``, a free-running u32). A sender may have at
most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes in flight.

* Towards the guest, :meth:`Connection.peer_credit` is that bound; the device
  never reads more host bytes than it allows.
* Towards the host, our ``buf_alloc`` bounds :attr:`Connection.tx_buf`: bytes
  the guest sent that the host socket has not taken yet. ``fwd_cnt`` counts
  bytes handed to the host socket. A guest that respects our credit can
  never overfill the buffer; :meth:`Connection.forward` refuses one that
  does. Once the guest's view of our free space (``buf_alloc - (rx_cnt -
  fwd_cnt we last told it)``) drops below :data:`CREDIT_UPDATE_THRESHOLD`
  while we have consumed more, :meth:`Connection.wants_credit_update` says
  so; every packet we send carries the current ``fwd_cnt`` anyway.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

#: Receive buffer we advertise per connection (bytes the guest may have in flight to us).
DEFAULT_BUF_ALLOC = 256 * 1024
#: Tell the guest about consumed bytes once it believes it has less room than this.
CREDIT_UPDATE_THRESHOLD = 64 * 1024

_U32 = 0xFFFF_FFFF

# --- what the back end reports about a host stream (bits of one event) -----------------
HOST_READABLE = 1  # bytes (or EOF, or an error) may be waiting
HOST_WRITABLE = 2  # the stream takes bytes again
HOST_HUP = 4  # the host peer will send no more: a short read is not proof of "drained"
HOST_NEW = 8  # a host client asked for guest port ``stream.requested_port``
HOST_CLOSED = 16  # the back end gave up on the stream (e.g. the guest never answered)

# --- control packets a connection owes the guest (bits of Connection.pending) ----------
PENDING_REQUEST = 1
PENDING_RESPONSE = 2
PENDING_CREDIT_UPDATE = 4
PENDING_SHUTDOWN = 8  # host EOF: SHUTDOWN with the SEND flag


class HostStream(Protocol):
    """The host end of one connection, as the back end hands it to the device.

    ``recv_into`` fills ``buffers`` and returns the byte count, 0 at EOF; it
    raises ``BlockingIOError`` when nothing is waiting and ``OSError`` when
    the stream failed. ``send`` returns how many bytes of ``buffers`` the
    stream took (0 when it is full) or raises ``OSError``. ``want_write``
    asks for HOST_WRITABLE events while the device holds unsent bytes.
    ``confirm`` tells a host client that the guest accepted its connection.
    ``close`` is idempotent. ``requested_port`` is the guest port a host
    client asked for (None for streams the device connected).
    """

    requested_port: int | None

    def recv_into(self, buffers: list[memoryview]) -> int: ...
    def send(self, buffers: list[memoryview]) -> int: ...
    def want_write(self, enabled: bool) -> None: ...
    def confirm(self, host_port: int) -> None: ...
    def shutdown_write(self) -> None: ...
    def close(self) -> None: ...


class ConnState(enum.Enum):
    CONNECTING = "connecting"  # host-initiated: waiting for the guest's RESPONSE
    ESTABLISHED = "established"
    CLOSING = "closing"  # the guest shut down both ways: flush tx_buf, then close


class Connection:
    """One stream between guest port ``guest_port`` and host port ``host_port``."""

    __slots__ = (
        "announced",
        "buf_alloc",
        "closed",
        "fwd_cnt",
        "guest_port",
        "guest_recv_done",
        "guest_send_done",
        "host_eof",
        "host_hup",
        "host_port",
        "host_readable",
        "host_write_shut",
        "last_fwd_cnt_sent",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "pending",
        "rx_cnt",
        "scheduled",
        "state",
        "stream",
        "tx_buf",
        "tx_cnt",
    )

    def __init__(
        self,
        host_port: int,
        guest_port: int,
        stream: HostStream,
        state: ConnState,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
    ) -> None:
        self.host_port = host_port
        self.guest_port = guest_port
        self.stream = stream
        self.state = state
        #: The guest has heard of this connection (it sent or was sent a REQUEST).
        self.announced = state is not ConnState.CONNECTING
        self.closed = False
        self.pending = 0
        self.scheduled = False  # in the device's RX round-robin
        # Guest -> host.
        self.buf_alloc = buf_alloc
        self.rx_cnt = 0  # bytes received from the guest
        self.fwd_cnt = 0  # ... of which the host stream took this many
        self.last_fwd_cnt_sent = 0  # the fwd_cnt the guest last heard
        self.tx_buf = bytearray()
        self.guest_send_done = False
        self.guest_recv_done = False
        self.host_write_shut = False
        # Host -> guest.
        self.tx_cnt = 0  # bytes sent to the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.host_readable = False
        self.host_hup = False
        self.host_eof = False

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    # --- host -> guest ----------------------------------------------------------------
    def set_peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        """Record the credit fields of a packet the guest sent."""
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def peer_credit(self) -> int:
        """How many more bytes the guest can take now (never negative)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    def can_read_host(self) -> bool:
        """Host bytes may be waiting and the guest may take some."""
        return (
            self.host_readable
            and self.state is ConnState.ESTABLISHED
            and not self.host_eof
            and not self.guest_recv_done
            and self.peer_credit() > 0
        )

    def has_rx_work(self) -> bool:
        return bool(self.pending) or self.can_read_host()

    def note_sent(self, payload_len: int) -> None:
        """A packet with ``payload_len`` bytes went to the guest carrying our fwd_cnt."""
        self.tx_cnt = (self.tx_cnt + payload_len) & _U32
        self.last_fwd_cnt_sent = self.fwd_cnt
        self.pending &= ~PENDING_CREDIT_UPDATE

    # --- guest -> host ------------------------------------------------------------------
    def wants_credit_update(self) -> bool:
        """We consumed bytes the guest does not know about, and it thinks it is short of room."""
        if self.fwd_cnt == self.last_fwd_cnt_sent:
            return False
        believed_used = (self.rx_cnt - self.last_fwd_cnt_sent) & _U32
        return self.buf_alloc - believed_used < CREDIT_UPDATE_THRESHOLD

    def forward(self, views: list[memoryview], length: int) -> bool:
        """Pass ``length`` guest bytes (in ``views``) on to the host stream.

        What the stream does not take now is copied into :attr:`tx_buf` and
        HOST_WRITABLE events are requested. Returns False, taking nothing,
        if the guest overran its credit. Raises ``OSError`` if the stream
        failed.
        """
        buffered = len(self.tx_buf)
        if buffered + length > self.buf_alloc:
            return False
        self.rx_cnt = (self.rx_cnt + length) & _U32
        if buffered:
            for view in views:
                self.tx_buf += view
            return True
        sent = self.stream.send(views) if length else 0
        self.fwd_cnt = (self.fwd_cnt + sent) & _U32
        if sent < length:
            skip = sent
            for view in views:
                if skip >= len(view):
                    skip -= len(view)
                    continue
                self.tx_buf += view[skip:]
                skip = 0
            self.stream.want_write(True)
        return True

    def flush(self) -> None:
        """Send what :attr:`tx_buf` holds; stop asking for HOST_WRITABLE once it is empty."""
        buf = self.tx_buf
        if not buf:
            return
        with memoryview(buf) as view:
            sent = self.stream.send([view])
        if sent:
            del buf[:sent]
            self.fwd_cnt = (self.fwd_cnt + sent) & _U32
        if not buf:
            self.stream.want_write(False)


class VsockBackend(Protocol):
    """The host side the device needs (``pyvmm.host.vsock_uds.VsockUds`` has it).

    ``connect(port)`` connects to the host service for port ``port`` (a
    guest REQUEST to CID 2) and returns its stream, or raises ``OSError``
    (answered with RST). ``take_events()`` returns and forgets the host
    events recorded since the last call, one ``(stream, HOST_* bits)`` per
    stream; a new host client's stream comes with HOST_NEW.
    """

    def connect(self, port: int) -> HostStream: ...
    def take_events(self) -> list[tuple[HostStream, int]]: ...


@dataclass
class VsockStats:
    """Counters for metrics: ``rx_*`` towards the guest, ``tx_*`` from it (payload bytes).

    ``guest_errors`` counts malformed chains and packets; ``refused`` the
    connections turned away (no host service, the connection cap).
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rsts_sent: int = 0
    connections_opened: int = 0
    refused: int = 0
    guest_errors: int = 0
    host_errors: int = 0
