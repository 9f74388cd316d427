"""The API's HTTP server: HTTP/1.1 on a Unix stream socket, one thread per client.

:class:`ApiServer` binds the socket (mode 0600, refusing a path that
already exists, as Firecracker does), accepts clients on one thread and
serves each on its own thread: a client that sends half a request and
stalls holds only its own thread, never another client. Requests are
framed by :mod:`pyvmm.api.http_protocol` and handed to ``handler(method,
path, body) -> Response``, which may be called from several threads at
once; the router serializes VMM actions under its own lock.

Robustness:

- at most ``max_connections`` clients; one more gets a 503 and is closed;
- a request that has started must complete within ``request_timeout``
  seconds of its last byte, or the connection is closed; an idle
  keep-alive connection waits ``idle_timeout`` (None: for ever, as
  Firecracker's clients expect);
- framing errors (:class:`~pyvmm.api.http_protocol.ProtocolError`) get
  ``{"fault_message": ...}`` with status 400 and the connection closes,
  after reading what the client had in flight so it sees the answer;
- a handler that raises gets a 500, and the connection carries on.

:meth:`ApiServer.close` stops accepting, shuts every connection down,
joins all threads and unlinks the socket (if it is still ours).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyvmm.api.http_protocol import (
    CONTINUE_RESPONSE,
    DEFAULT_MAX_BODY,
    NEED_DATA,
    SEND_CONTINUE,
    BodyLimit,
    ProtocolError,
    Request,
    RequestParser,
    Response,
    render_response,
)
from pyvmm.errors import HostError
from pyvmm.host.unix_socket import check_socket_path
from pyvmm.vmm.threads import NO_SETUP, ThreadRole, ThreadSetup, spawn

log = logging.getLogger(__name__)

Handler = Callable[[str, str, bytes], Response]

DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_REQUEST_TIMEOUT = 10.0
_RECV_SIZE = 65536
_JOIN_TIMEOUT = 5.0
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20


class ApiServer:
    """Serves ``handler`` on the Unix socket at ``path``; see the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: Handler,
        *,
        body_limit: BodyLimit = DEFAULT_MAX_BODY,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        idle_timeout: float | None = None,
        setup: ThreadSetup = NO_SETUP,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        """``setup`` confines each API thread as it starts; ``on_error`` hears if the
        accept loop dies (a connection's own failure only ends that connection)."""
        self.path = Path(path)
        self._setup = setup
        self._on_error = on_error or (lambda message: None)
        self._handler = handler
        self._body_limit = body_limit
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake_r, self._wake_w = -1, -1
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Bind the socket and start accepting; errors leave nothing behind."""
        if self._listener is not None:
            raise RuntimeError("the API server is already started")
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._listener = self._bind()
        except BaseException:
            os.close(wake_r)
            os.close(wake_w)
            raise
        self._wake_r, self._wake_w = wake_r, wake_w
        self._accept_thread = spawn(
            ThreadRole.API,
            "api-accept",
            self._accept_loop,
            on_error=self._on_error,
            setup=self._setup,
        )
        log.debug("API server listening on %s", self.path)

    def close(self) -> None:
        """Stop serving: close the listener, end every connection, join, unlink."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            connections = list(self._connections.items())
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_TIMEOUT)
        for sock, _ in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in connections:
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                log.error("API connection thread %s did not stop", thread.name)
        if self._listener is not None:
            self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._unlink_if_ours()

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    # --- binding -------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        # A socket nobody listens on (a killed VMM's) is replaced; a live one is refused.
        check_socket_path(self.path, "API socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # The socket file takes the socket inode's mode at bind time, so it is
            # never reachable with looser permissions than 0600.
            os.fchmod(listener.fileno(), 0o600)
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            info = os.stat(self.path)
            self._inode = (info.st_dev, info.st_ino)
            listener.listen(self._max_connections)
        except OSError as exc:
            listener.close()
            self._unlink_if_ours()
            raise HostError(f"cannot listen on API socket {self.path}: {exc.strerror}") from None
        return listener

    def _unlink_if_ours(self) -> None:
        if self._inode is None:
            return
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None

    # --- accepting -------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                events = selector.select()
                if any(key.fd == self._wake_r for key, _ in events):
                    return
                try:
                    conn, _ = self._listener.accept()
                except OSError as exc:  # EMFILE and the like: keep serving the others
                    log.warning("API server: accept failed: %s", exc)
                    time.sleep(0.05)
                    continue
                self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        with self._lock:
            if self._closing:
                conn.close()
                return
            if len(self._connections) < self._max_connections:
                thread = spawn(
                    ThreadRole.API,
                    "api-conn",
                    lambda: self._serve(conn),
                    on_error=lambda message: log.error("API connection: %s", message),
                    setup=self._setup,
                    start=False,
                )
                self._connections[conn] = thread
                thread.start()
                return
        message = f"Too many open API connections (at most {self._max_connections})"
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(render_response(Response.fault(503, message), keep_alive=False))
        conn.close()

    # --- serving one connection ---------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_requests(conn)
        except OSError as exc:
            log.debug("API connection ended: %s", exc)
        except Exception:  # a bug here must end one connection, not the server
            log.exception("API connection failed")
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _serve_requests(self, conn: socket.socket) -> None:
        parser = RequestParser(self._body_limit)
        while True:
            try:
                event = parser.next_event()
            except ProtocolError as exc:
                self._send(conn, Response.fault(exc.status, str(exc)), keep_alive=False)
                self._linger(conn)
                return
            if event is SEND_CONTINUE:
                conn.sendall(CONTINUE_RESPONSE)
                continue
            if event is NEED_DATA:
                conn.settimeout(self._request_timeout if parser.in_request else self._idle_timeout)
                try:
                    data = conn.recv(_RECV_SIZE)
                except TimeoutError:
                    log.debug("API connection timed out")
                    return
                if not data:
                    return
                parser.feed(data)
                continue
            assert isinstance(event, Request)
            response = self._handle(event)
            self._send(conn, response, keep_alive=event.keep_alive, version=event.version)
            if not event.keep_alive:
                return

    def _handle(self, request: Request) -> Response:
        try:
            return self._handler(request.method, request.path, request.body)
        except Exception as exc:
            log.exception("API handler failed on %s %s", request.method, request.path)
            return Response.fault(500, f"Internal error: {type(exc).__name__}: {exc}")

    def _send(
        self,
        conn: socket.socket,
        response: Response,
        *,
        keep_alive: bool,
        version: str = "HTTP/1.1",
    ) -> None:
        conn.settimeout(self._request_timeout)
        conn.sendall(render_response(response, keep_alive=keep_alive, version=version))

    @staticmethod
    def _linger(conn: socket.socket) -> None:
        """Half-close, then read what the client still sends, so it reads our answer.

        Closing with unread data would reset the connection, and the client
        could lose the error response we just wrote.
        """
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            drained = 0
            while drained < _LINGER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                conn.settimeout(remaining)
                data = conn.recv(_RECV_SIZE)
                if not data:
                    return
                drained += len(data)
