"""One client connection on the server side: its peer, its bytes and fds, its VM process.

The socket calls for a connection live here (``recvmsg`` with the fds that
come along, ``SO_PEERCRED``, a reply that never blocks the server); what
the bytes mean is :mod:`pyvmm.forkserver.protocol`'s business, and what to
do about them is the server loop's.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import struct
import time

from pyvmm.forkserver.protocol import (
    MAX_CONTROL_BYTES,
    MAX_REQUEST_BYTES,
    STANDARD_FDS,
    FrameReader,
    ProtocolError,
    Request,
    frame,
)

#: A client has this long from its connection to a whole request.
REQUEST_TIMEOUT = 10.0
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_RECV_BYTES = 16 * 1024
#: At most this many reads of leftover input before closing (a request is at most 64 KiB).
_DRAIN_READS = 8
#: Room for exactly three fds (CMSG_LEN, not CMSG_SPACE: the padding would fit a fourth),
#: so a fourth sets MSG_CTRUNC and the kernel closes the ones that did not fit.
_ANCILLARY_BYTES = socket.CMSG_LEN(len(STANDARD_FDS) * array.array("i").itemsize)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process that connected ``sock`` (the kernel's word, SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    _, uid, _ = _CREDENTIALS.unpack(raw)
    return uid


class Child:
    """A VM process the server forked: its pid, and a pidfd that is readable once it ends.

    Signals go through the pidfd, so they can never reach another process
    that reused the pid (the server reaps the child only after it ended).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.started = time.monotonic()
        #: When a SIGKILL follows the SIGTERM sent to it (client gone, server stopping).
        self.kill_at: float | None = None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signum)

    def terminate(self, grace: float) -> None:
        """SIGTERM now, SIGKILL after ``grace`` seconds unless it ended (the server's loop)."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        self.kill_at = deadline if self.kill_at is None else min(self.kill_at, deadline)

    def reap(self) -> int | None:
        """Collect the process if it ended: its status as ``waitstatus_to_exitcode`` gives
        it (a signal is negative); None while it runs. Never blocks."""
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


class Connection:
    """A client: first its request (and the fds with it), then signal frames while its VM runs."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.fds: list[int] = []  # received, not yet handed to a VM process
        self.child: Child | None = None
        self._reader = FrameReader(MAX_REQUEST_BYTES)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[dict[str, object]] | None:
        """The whole frames that arrived (maybe none); None once the client hung up.

        Raises :class:`ProtocolError` for an over-long frame, bad JSON, or
        file descriptors where none belong.
        """
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                _RECV_BYTES, _ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        fds = _fds_in(ancillary)
        self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {len(STANDARD_FDS)} file descriptors came along")
        if fds and (self.child is not None or self._reader.pending):
            raise ProtocolError("file descriptors may come only with the request's first byte")
        if not data:
            return None
        self._reader.feed(data)
        frames = []
        while (message := self._reader.next_frame()) is not None:
            frames.append(message)
            self._reader.limit = MAX_CONTROL_BYTES  # after the request: signal frames only
        return frames

    def check_fds(self, request: Request) -> None:
        """The fds that came are the ones the request names."""
        if len(self.fds) != len(request.fds):
            raise ProtocolError(
                f"the request names {len(request.fds)} standard fds but "
                f"{len(self.fds)} file descriptors came with it"
            )

    def reply(self, message: dict[str, object]) -> None:
        """Send one small reply; a client that cannot take it is treated as gone."""
        with contextlib.suppress(OSError):
            self.sock.send(frame(message))

    def release_fds(self) -> None:
        """Close the received fds (handed to a VM process, or refused)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close, after reading what the client already sent: a Unix socket closed with
        unread input makes the peer's next read fail with ECONNRESET, and the client
        would lose the error line it was just sent."""
        with contextlib.suppress(OSError):
            for _ in range(_DRAIN_READS):
                data, ancillary, _, _ = self.sock.recvmsg(
                    _RECV_BYTES, _ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC
                )
                self.fds.extend(_fds_in(ancillary))
                if not data:
                    break
        self.release_fds()
        self.sock.close()


def _fds_in(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return fds
