"""The host end of virtio-vsock: Unix sockets, in Firecracker's convention.

:class:`VsockUds` is the :class:`~pyvmm.devices.virtio.vsock.VsockBackend` of the
VMM. It owns every host fd of the device; the device model
(``pyvmm.devices.virtio.vsock``) only sees :class:`UdsStream` objects.

* Host-initiated: it listens on ``uds_path``. A client connects, sends
  ``CONNECT <port>\\n`` (decimal guest port) and, once the guest accepted,
  reads ``OK <host port>\\n``; after that the socket carries the stream both
  ways. A client that sends a malformed or overlong line, or no full line
  within ``connect_timeout`` seconds, is closed; so is one the guest refuses
  (RST) or does not answer within ``response_timeout`` seconds.
* Guest-initiated: a guest connecting to host port P makes :meth:`connect`
  connect (non-blocking) to ``<uds_path>_P``; if nothing listens there (or
  its backlog is full), the guest gets RST. A ``uds_path`` so long that
  ``<uds_path>_P`` no longer fits a Unix socket address fails the same way.

Wiring (see ``pyvmm.devices.virtio.vsock``): construct it (it binds and
listens, replacing a stale socket file), then ``subscribe(loop, wake)`` with
``wake = lambda: transport.process_queue(0)`` before the loop thread starts:
whenever a host socket has news the back end records it and calls ``wake``; the device then
collects the news with :meth:`take_events` under the transport lock. The
back end never calls the device, and never calls ``wake`` from a method the
device calls, so nothing re-enters the transport lock. :meth:`close`
closes everything and removes ``uds_path``.

Streams are registered edge-triggered (EPOLLIN|EPOLLRDHUP, plus EPOLLOUT
only while the device holds bytes the socket did not take), so a stream
whose bytes wait for guest credit does not keep the loop spinning.

Threads: callbacks and timers run on the event-loop thread; the device calls
in with the transport lock held, normally on that thread too, but a device
reset comes from a vCPU thread, so the shared bookkeeping has a lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from pyvmm.devices.virtio.vsock_connection import (
    HOST_CLOSED,
    HOST_HUP,
    HOST_NEW,
    HOST_READABLE,
    HOST_WRITABLE,
)
from pyvmm.host.events import EventOps, Wake
from pyvmm.host.unix_socket import MAX_UDS_PATH_BYTES, ListeningSocket, check_socket_path

_logger = logging.getLogger("pyvmm.host.vsock_uds")

__all__ = ["MAX_UDS_PATH_BYTES", "UdsStream", "VsockUds", "check_uds_path", "parse_connect_line"]
#: "CONNECT 4294967295\n" is 19 bytes; a longer line is refused.
MAX_CONNECT_LINE = 32
#: Host clients that have not finished their CONNECT line, at most.
MAX_HANDSHAKES = 64
#: Host streams (both directions, handshakes included), at most.
MAX_STREAMS = 1024 + MAX_HANDSHAKES
_ACCEPT_BATCH = 64
#: sendmsg()/recvmsg() take at most IOV_MAX buffers.
_IOV_MAX = 1024

_DATA_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_HUP_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


def check_uds_path(uds_path: str | os.PathLike[str]) -> Path:
    """``uds_path`` if the device can listen there (a stale socket is removed), else ConfigError."""
    return check_socket_path(uds_path, "vsock uds_path")


def parse_connect_line(line: bytes) -> int | None:
    """The port of a ``CONNECT <port>\\n`` line (``\\r\\n`` accepted), or None if malformed."""
    if not line.endswith(b"\n"):
        return None
    text = line[:-1].removesuffix(b"\r")
    if not text.startswith(b"CONNECT "):
        return None
    digits = text[len(b"CONNECT ") :]
    if not 0 < len(digits) <= 10 or not digits.isdigit():
        return None
    port = int(digits)
    return port if port <= 0xFFFF_FFFF else None


class UdsStream:
    """One host socket of the device.

    A :class:`~pyvmm.devices.virtio.vsock_connection.HostStream`.
    """

    __slots__ = (
        "_backend",
        "closed",
        "confirmed",
        "fd",
        "handshaking",
        "requested_port",
        "sock",
        "writing",
    )

    def __init__(self, backend: VsockUds, sock: socket.socket, *, handshaking: bool) -> None:
        self._backend = backend
        self.sock = sock
        self.fd = sock.fileno()
        self.handshaking = handshaking  # still waiting for the CONNECT line
        self.requested_port: int | None = None
        self.confirmed = False
        self.writing = False  # registered for EPOLLOUT
        self.closed = False

    def recv_into(self, buffers: list[memoryview]) -> int:
        if len(buffers) == 1:
            return self.sock.recv_into(buffers[0])
        return self.sock.recvmsg_into(buffers[:_IOV_MAX])[0]

    def send(self, buffers: list[memoryview]) -> int:
        try:
            if len(buffers) == 1:
                return self.sock.send(buffers[0], socket.MSG_NOSIGNAL)
            return self.sock.sendmsg(buffers[:_IOV_MAX], (), socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return 0

    def want_write(self, enabled: bool) -> None:
        self._backend._set_writing(self, enabled)

    def confirm(self, host_port: int) -> None:
        """Tell the host client ``OK <host_port>``: the guest accepted."""
        line = b"OK %d\n" % host_port
        if self.sock.send(line, socket.MSG_NOSIGNAL) != len(line):
            raise OSError(errno.EAGAIN, "host client does not take the OK line")
        self.confirmed = True

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._backend._close_stream(self)


class VsockUds:
    """Unix-socket host side of one virtio-vsock device; see the module docstring."""

    def __init__(
        self,
        uds_path: str | os.PathLike[str],
        *,
        connect_timeout: float = 2.0,
        response_timeout: float = 5.0,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self._listener: ListeningSocket | None = ListeningSocket(uds_path, "vsock uds_path")
        self.uds_path = self._listener.path
        self._loop: EventOps = _NOT_SUBSCRIBED
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._streams: set[UdsStream] = set()
        self._handshakes = 0
        self._events: dict[UdsStream, int] = {}
        self._wake: Wake = _no_wake

    def subscribe(self, ops: EventOps, wake: Wake) -> None:
        """Serve the listening socket on ``ops``; ``wake()`` whenever host sockets have news."""
        self._loop = ops
        self._wake = wake
        if self._listener is not None:
            ops.add_reader(self._listener.fileno(), self._on_accept)

    # --- VsockBackend ------------------------------------------------------------------------
    def connect(self, port: int) -> UdsStream:
        """Connect to ``<uds_path>_<port>`` without blocking; OSError if nobody listens."""
        with self._lock:
            if self._listener is None:
                raise OSError(errno.ESHUTDOWN, "the vsock back end is closed")
            if len(self._streams) >= self.max_streams:
                raise OSError(errno.EMFILE, "too many vsock host streams")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(f"{os.fspath(self.uds_path)}_{port}")
        except OSError:
            sock.close()
            raise
        return self._add_stream(sock, handshaking=False)

    def take_events(self) -> list[tuple[UdsStream, int]]:
        with self._lock:
            if not self._events:
                return []
            events, self._events = self._events, {}
        return list(events.items())

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def stream_count(self) -> int:
        with self._lock:
            return len(self._streams)

    def close(self) -> None:
        """Close the listener and every stream; remove ``uds_path``. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is not None:
            if self._loop is not _NOT_SUBSCRIBED:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            self._close_stream(stream)

    # --- streams ----------------------------------------------------------------------------------
    def _add_stream(self, sock: socket.socket, *, handshaking: bool) -> UdsStream:
        stream = UdsStream(self, sock, handshaking=handshaking)
        with self._lock:
            self._streams.add(stream)
            self._handshakes += handshaking
        self._loop.add_reader(stream.fd, self._callback(stream), _DATA_EVENTS)
        return stream

    def _callback(self, stream: UdsStream) -> Callable[[int], None]:
        return lambda events: self._on_stream(stream, events)

    def _set_writing(self, stream: UdsStream, enabled: bool) -> None:
        with self._lock:
            if stream.closed or stream.writing == enabled:
                return
            stream.writing = enabled
        mask = _DATA_EVENTS | (select.EPOLLOUT if enabled else 0)
        self._loop.remove_reader(stream.fd)
        self._loop.add_reader(stream.fd, self._callback(stream), mask)

    def _close_stream(self, stream: UdsStream) -> None:
        with self._lock:
            if stream.closed:
                return
            stream.closed = True
            self._streams.discard(stream)
            self._events.pop(stream, None)
            if stream.handshaking:
                stream.handshaking = False
                self._handshakes -= 1
        self._loop.remove_reader(stream.fd)
        stream.sock.close()

    def _post(self, stream: UdsStream, bits: int) -> None:
        with self._lock:
            if stream.closed:
                return
            self._events[stream] = self._events.get(stream, 0) | bits
        self._wake()

    # --- event-loop callbacks ---------------------------------------------------------------------
    def _on_accept(self, _events: int) -> None:
        listener = self._listener
        if listener is None or listener.sock is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and the like: the client waits in the backlog
                _logger.warning("vsock: accepting on %s: %s", self.uds_path, exc)
                return
            with self._lock:
                full = len(self._streams) >= self.max_streams or self._handshakes >= MAX_HANDSHAKES
            if full:
                _logger.debug("vsock: too many host clients; closing a new one")
                sock.close()
                continue
            sock.setblocking(False)
            stream = self._add_stream(sock, handshaking=True)
            self._loop.call_later(self.connect_timeout, lambda s=stream: self._handshake_expired(s))

    def _on_stream(self, stream: UdsStream, events: int) -> None:
        if stream.closed:
            return
        if stream.handshaking:
            self._read_connect_line(stream, events)
            return
        bits = 0
        if events & _READ_EVENTS:
            bits |= HOST_READABLE
        if events & _HUP_EVENTS:
            bits |= HOST_HUP
        if events & _WRITE_EVENTS:
            bits |= HOST_WRITABLE
        if bits:
            self._post(stream, bits)

    def _read_connect_line(self, stream: UdsStream, events: int) -> None:
        """Peek for a full line (edge-triggered: each arrival looks again), then consume it."""
        try:
            data = stream.sock.recv(MAX_CONNECT_LINE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._close_stream(stream)
            return
        end = data.find(b"\n")
        if end < 0:
            if not data or len(data) >= MAX_CONNECT_LINE or events & _HUP_EVENTS:
                self._close_stream(stream)  # gone, overlong, or no line will ever come
            return
        try:
            line = stream.sock.recv(end + 1)
        except OSError:
            self._close_stream(stream)
            return
        port = parse_connect_line(line)
        if port is None:
            _logger.debug("vsock: bad connect line %r from a host client", line)
            self._close_stream(stream)
            return
        with self._lock:
            if stream.closed:
                return
            stream.handshaking = False
            self._handshakes -= 1
            stream.requested_port = port
        self._loop.call_later(self.response_timeout, lambda: self._response_expired(stream))
        # Bytes after the line are already waiting: no new edge will say so.
        self._post(stream, HOST_NEW | HOST_READABLE)

    def _handshake_expired(self, stream: UdsStream) -> None:
        if stream.handshaking and not stream.closed:
            _logger.debug("vsock: host client sent no CONNECT line in time")
            self._close_stream(stream)

    def _response_expired(self, stream: UdsStream) -> None:
        if stream.confirmed or stream.closed:
            return
        _logger.debug("vsock: guest did not accept port %s in time", stream.requested_port)
        with self._lock:
            device_knows = not self._events.get(stream, 0) & HOST_NEW
        self._close_stream(stream)
        if device_knows:  # it has a connection for the stream: let it RST the guest
            with self._lock:
                self._events[stream] = HOST_CLOSED
            self._wake()


def _no_wake() -> None:
    return None


class _NotSubscribed:
    """The event loop of a back end not yet subscribed: any use is a wiring bug."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError("VsockUds.subscribe(loop, wake) must be called before use")


_NOT_SUBSCRIBED: EventOps = _NotSubscribed()  # type: ignore[assignment]
