"""The host end of L1's console port: a Unix socket that QEMU listens on.

QEMU relays the socket to a virtio-serial port in L1 (see
:mod:`pyvmm.nested.agent`). The host connects once, right after QEMU starts,
and stays connected for L1's whole life, because L1 reads end-of-file from
the port whenever no host is connected. Bytes written to :meth:`fileno`
reach the streamed command's stdin; its stdout arrives through
:meth:`read`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pyvmm.errors import HostError

#: Longest path a Unix socket address takes (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
_CHUNK = 65536
_CONNECT_RETRY_S = 0.02


class ConsoleChannel:
    """A connected console port; see the module docstring."""

    def __init__(self, path: Path) -> None:
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            raise HostError(
                f"the console socket path {path} is longer than a Unix socket allows "
                f"({MAX_SOCKET_PATH} bytes): use a shorter work directory"
            )
        self.path = path
        self._sock: socket.socket | None = None

    def connect(self, deadline: float, alive: Callable[[], bool]) -> bool:
        """Connect once QEMU listens; False if QEMU exited first, HostError at ``deadline``."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if not alive():
                    return False
                if time.monotonic() > deadline:
                    raise HostError(f"QEMU did not open the console socket {self.path}") from None
                time.sleep(_CONNECT_RETRY_S)
                continue
            except OSError as exc:
                sock.close()
                raise HostError(f"cannot connect to the console socket {self.path}: {exc}") from exc
            sock.setblocking(False)
            self._sock = sock
            return True

    def fileno(self) -> int:
        if self._sock is None:
            raise HostError("the console port is not connected")
        return self._sock.fileno()

    def read(self, timeout: float) -> bytes | None:
        """What arrived within ``timeout`` seconds (b"" if nothing); None once QEMU is gone."""
        if self._sock is None:
            return None
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return b""
        try:
            data = self._sock.recv(_CHUNK)
        except BlockingIOError:
            return b""
        except OSError:
            return None
        return data if data else None

    def drain(self, sink: Callable[[bytes], object], idle: float, limit: float) -> None:
        """Pass on what is still in flight: stop after ``idle`` s of silence, or ``limit`` s.

        Why a quiet period: a command's last writes may still be in QEMU
        when L1 reports its exit status (through another device), and the
        port has no end-of-stream marker.
        """
        end = time.monotonic() + limit
        while time.monotonic() < end:
            data = self.read(idle)
            if not data:
                return
            sink(data)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
