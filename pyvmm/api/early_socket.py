"""The API socket, bound in the first milliseconds of the process.

Firecracker's clients connect right after spawning the binary (pyrecracker
sends its first request about 20 ms later, with no retry). A Python VMM
needs longer than that to import its machinery, so ``pyvmm-firecracker``
binds and listens on the API socket first, before importing anything
heavy: the kernel queues early connections in the listen backlog, and the
API server (:class:`pyvmm.api.http.ApiServer`, which adopts this socket)
answers them as soon as it runs. Requests that act on the VM are served
once the VM machinery is loaded; queries (``GET /``) do not wait for it.

Until the API server starts, :mod:`pyvmm.api.early_responder` answers
``GET /`` on this socket (:meth:`EarlySocket.answer_early`), and hands its
connections over (:meth:`EarlySocket.stop_answering`).

Binding early is best effort: any problem (a live socket at the path, a
missing directory) returns None, and the normal start-up path reports it
with its one-line error.
"""

from __future__ import annotations

import contextlib
import os
import socket

TYPE_CHECKING = False  # typing itself is not imported this early
if TYPE_CHECKING:
    from pyvmm.api.early_responder import EarlyResponder, Pending

#: Connections the kernel queues before the server accepts (as the API server's own).
BACKLOG = 32


class EarlySocket:
    """A listening socket and the inode of the file it is bound to (to remove only ours)."""

    def __init__(self, listener: socket.socket, path: str) -> None:
        self.listener = listener
        self.path = path
        info = os.lstat(path)
        self.inode = (info.st_dev, info.st_ino)
        self.responder: EarlyResponder | None = None

    def answer_early(self, instance_id: str) -> None:
        """Answer ``GET /`` (instance ``instance_id``, not started) until :meth:`stop_answering`."""
        from pyvmm.api.early_responder import EarlyResponder

        self.responder = EarlyResponder.start(self.listener, instance_id)

    def stop_answering(self) -> tuple[list[Pending], int]:
        """Stop the early responder (its thread is gone on return): the connections it
        holds, for the API server to serve, and how many ``GET /`` it answered."""
        responder, self.responder = self.responder, None
        if responder is None:
            return [], 0
        return responder.stop(), responder.answered

    def release(self) -> None:
        """Close a socket that will not be served (bad flags) and remove its file."""
        for pending in self.stop_answering()[0]:
            pending.sock.close()
        self.listener.close()
        self.remove_file()

    def remove_file(self) -> None:
        """Remove the socket's file, if it is still this socket's."""
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


def adopt_handed(path: str) -> EarlySocket | None:
    """The listening socket the C launcher bound at ``path`` and handed over as
    ``PYVMM_API_SOCK_FD`` (see :mod:`pyvmm.api.launcher`), or None."""
    raw = os.environ.pop("PYVMM_API_SOCK_FD", None)
    if raw is None or not raw.isdigit():
        return None
    try:
        listener = socket.socket(fileno=int(raw))
        if listener.family != socket.AF_UNIX or listener.getsockname() != path:
            listener.detach()
            return None
        listener.set_inheritable(False)
        return EarlySocket(listener, path)
    except OSError:
        return None
