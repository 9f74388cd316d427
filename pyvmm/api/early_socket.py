"""The API socket, bound in the first milliseconds of the process.

Firecracker's clients connect right after spawning the binary (pyrecracker
sends its first request about 20 ms later, with no retry). A Python VMM
needs longer than that to import its machinery, so ``pyvmm-firecracker``
binds and listens on the API socket first, before importing anything
heavy: the kernel queues early connections in the listen backlog, and the
API server (:class:`pyvmm.api.http.ApiServer`, which adopts this socket)
answers them as soon as it runs. Requests that act on the VM are served
once the VM machinery is loaded; queries (``GET /``) do not wait for it.

Binding early is best effort: any problem (a live socket at the path, a
missing directory) returns None, and the normal start-up path reports it
with its one-line error.
"""

from __future__ import annotations

import contextlib
import os
import socket

#: Connections the kernel queues before the server accepts (as the API server's own).
BACKLOG = 32


class EarlySocket:
    """A listening socket and the inode of the file it is bound to (to remove only ours)."""

    def __init__(self, listener: socket.socket, path: str) -> None:
        self.listener = listener
        self.path = path
        info = os.lstat(path)
        self.inode = (info.st_dev, info.st_ino)

    def release(self) -> None:
        """Close a socket that will not be served (bad flags) and remove its file."""
        self.listener.close()
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self.inode:
                os.unlink(self.path)


def bind_early(path: str) -> EarlySocket | None:
    """A socket bound at ``path`` (mode 0600) and listening, or None (see above)."""
    try:
        from pyvmm.host.unix_socket import check_socket_path

        check_socket_path(path, "API socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except Exception:
        return None
    try:
        os.fchmod(listener.fileno(), 0o600)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(BACKLOG)
        return EarlySocket(listener, path)
    except OSError:
        listener.close()
        return None
