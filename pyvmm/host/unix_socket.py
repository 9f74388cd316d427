"""Listening Unix sockets at user-given paths: checked, stale ones replaced, removed once.

Both the API socket and the vsock device's socket live at paths a user (or
an orchestrator such as Kata) chose. A VMM that was SIGKILLed leaves its
socket file behind; the next VMM on the same path should not need a human
to delete it. So a path that holds a socket *nobody listens on* is stale:
it is removed, with a log line. A socket somebody still listens on, or a
file that is not a socket, is refused with one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from pyvmm.errors import ConfigError, HostError

#: sockaddr_un.sun_path is 108 bytes, NUL included.
MAX_UDS_PATH_BYTES = 107


def check_socket_path(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if a listening socket can be created there (a stale socket is removed).

    ``what`` names the socket in messages ("vsock uds_path", "API socket").
    """
    raw = os.fsencode(path)
    if not raw:
        raise ConfigError(f"{what} is empty")
    result = Path(os.fsdecode(raw))
    shown = str(result)[:120]
    if len(raw) > MAX_UDS_PATH_BYTES:
        raise ConfigError(
            f"{what} {shown!r} is {len(raw)} bytes; a Unix socket path holds at most "
            f"{MAX_UDS_PATH_BYTES}"
        )
    if not result.parent.is_dir():
        raise ConfigError(f"{what} {shown!r}: directory {str(result.parent)!r} missing")
    try:
        st = os.lstat(result)
    except FileNotFoundError:
        return result
    except OSError as exc:
        raise ConfigError(f"{what} {shown!r}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what} {shown!r} already exists and is not a socket")
    if _has_listener(result):
        raise ConfigError(f"{what} {shown!r} is in use: another process listens on it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(result)
    import logging  # here: pyvmm-firecracker binds its API socket before importing logging

    logging.getLogger(__name__).warning(
        "removed the stale socket %s (nobody listened on it)", result
    )
    return result


def _has_listener(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:  # a listener whose backlog is full: alive
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


class ListeningSocket:
    """A bound, listening, non-blocking Unix socket that removes its own path on close.

    It removes the path only if it is still the socket it created (same
    inode): a path someone replaced meanwhile is left alone.
    """

    def __init__(self, path: str | os.PathLike[str], what: str, backlog: int = 128) -> None:
        self.path = check_socket_path(path, what)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.bind(os.fspath(self.path))
            sock.listen(backlog)
            self._inode = os.stat(self.path).st_ino
        except OSError as exc:
            sock.close()
            raise HostError(f"cannot listen on {what} {str(self.path)!r}: {exc}") from exc
        self.sock: socket.socket | None = sock

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def close(self) -> None:
        """Close and remove the path (if it is still ours). Idempotent."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        sock.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
                os.unlink(self.path)
