"""The API's HTTP server: HTTP/1.1 on a Unix stream socket, one thread per client.

:class:`ApiServer` binds the socket (mode 0600, refusing a path that
already exists, as Firecracker does), accepts clients on one thread and
serves each on its own thread: a client that sends half a request and
stalls holds only its own thread, never another client. Requests are
framed by :mod:`pyvmm.api.http_protocol` and handed to ``handler(method,
path, body) -> Response``, which may be called from several threads at
once; the router serializes VMM actions under its own lock.

Robustness (Firecracker's micro_http serves one connection at a time;
pyvmm serves them concurrently, so it owes limits):

- a request must arrive whole within ``request_timeout`` seconds of its
  first byte, however slowly it trickles in (a slowloris client is cut);
- an idle keep-alive connection waits ``idle_timeout`` (None: for ever, as
  Firecracker's clients expect);
- at most ``max_connections`` clients; when one more arrives, the
  connection that has waited longest without a request being handled
  (idle, or still sending its request) is closed to make room, so a new
  client is always served whatever the other clients do; only when every
  connection has a request being handled does the newcomer get a 503;
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
_IDLE, _RECEIVING, _HANDLING = "idle", "receiving", "handling"
_RECV_SIZE = 65536
_JOIN_TIMEOUT = 5.0
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20


class _Connection:
    """One client: its socket, its thread, and what it is doing since when."""

    def __init__(self, sock: socket.socket, data: bytes = b"", since: float | None = None) -> None:
        self.sock = sock
        self.data = data  # read before this server took the connection (see ApiServer.adopt)
        self.thread: threading.Thread | None = None
        self.phase = _IDLE if since is None else _RECEIVING
        self.since = time.monotonic() if since is None else since

    def enter(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.since = time.monotonic()


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
        listener: socket.socket | None = None,
    ) -> None:
        """``setup`` confines each API thread as it starts; ``on_error`` hears if the
        accept loop dies (a connection's own failure only ends that connection).
        ``listener``: a socket already bound to ``path`` and listening (bound early
        at start-up, before the heavy imports, so clients can connect at once)."""
        self.path = Path(path)
        self._setup = setup
        self._on_error = on_error or (lambda message: None)
        self._handler = handler
        self._body_limit = body_limit
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._listener: socket.socket | None = None
        self._prebound = listener
        self._inode: tuple[int, int] | None = None
        self._wake_r, self._wake_w = -1, -1
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, _Connection] = {}
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Bind the socket and start accepting; errors leave nothing behind."""
        if self._listener is not None:
            raise RuntimeError("the API server is already started")
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._listener = self._adopt(self._prebound) if self._prebound else self._bind()
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
        for _, connection in connections:
            thread = connection.thread
            if thread is None:
                continue
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

    @property
    def busy_count(self) -> int:
        """Connections whose request is being handled right now."""
        with self._lock:
            return sum(c.phase == _HANDLING for c in self._connections.values())

    # --- binding -------------------------------------------------------------------
    def _adopt(self, listener: socket.socket) -> socket.socket:
        """Take over a socket bound early (see :func:`bind_api_socket`)."""
        info = os.stat(self.path)
        self._inode = (info.st_dev, info.st_ino)
        return listener

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

    def adopt(self, conn: socket.socket, data: bytes = b"", since: float | None = None) -> None:
        """Serve a connection accepted before this server started (by
        :mod:`pyvmm.api.early_responder`), as if it had accepted it: ``data`` was read
        from it and not answered; ``since``, when that request's first byte came (its
        deadline counts from there), None if ``data`` holds no request."""
        self._admit(conn, data, since)

    def _admit(self, conn: socket.socket, data: bytes = b"", since: float | None = None) -> None:
        with self._lock:
            if self._closing:
                conn.close()
                return
            if len(self._connections) >= self._max_connections:
                self._make_room()
            if len(self._connections) < self._max_connections:
                connection = _Connection(conn, data, since)
                connection.thread = spawn(
                    ThreadRole.API,
                    "api-conn",
                    lambda: self._serve(connection),
                    on_error=lambda message: log.error("API connection: %s", message),
                    setup=self._setup,
                    start=False,
                )
                self._connections[conn] = connection
                connection.thread.start()
                return
        message = f"Too many open API connections (at most {self._max_connections})"
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(render_response(Response.fault(503, message), keep_alive=False))
        conn.close()

    def _make_room(self) -> None:
        """Close the connection that waited longest without a request being handled.

        Called with the lock held. The victim's thread sees its socket shut
        down and ends; its entry goes at once so the newcomer is counted.
        """
        waiting = [c for c in self._connections.values() if c.phase != _HANDLING]
        if not waiting:
            return
        victim = min(waiting, key=lambda c: c.since)
        log.info(
            "API server: %d connections open; closing one %s for %.1f s to serve a new client",
            len(self._connections), victim.phase, time.monotonic() - victim.since,
        )  # fmt: skip
        with contextlib.suppress(OSError):
            victim.sock.shutdown(socket.SHUT_RDWR)
        del self._connections[victim.sock]

    # --- serving one connection ---------------------------------------------------------
    def _serve(self, connection: _Connection) -> None:
        conn = connection.sock
        try:
            self._serve_requests(connection)
        except OSError as exc:
            log.debug("API connection ended: %s", exc)
        except Exception:  # a bug here must end one connection, not the server
            log.exception("API connection failed")
        finally:
            with self._lock:
                if self._connections.get(conn) is connection:
                    del self._connections[conn]
            conn.close()

    def _serve_requests(self, connection: _Connection) -> None:
        conn = connection.sock
        parser = RequestParser(self._body_limit)
        parser.feed(connection.data)
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
                if not self._receive(connection, parser):
                    return
                continue
            assert isinstance(event, Request)
            connection.enter(_HANDLING)
            response = self._handle(event)
            self._send(conn, response, keep_alive=event.keep_alive, version=event.version)
            connection.enter(_IDLE)
            if not event.keep_alive:
                return

    def _receive(self, connection: _Connection, parser: RequestParser) -> bool:
        """Feed the parser what the client sends; False when the connection should end.

        A request's deadline counts from its first byte: trickling bytes in
        does not extend it.
        """
        conn = connection.sock
        if parser.in_request:
            connection.enter(_RECEIVING)
            remaining = connection.since + self._request_timeout - time.monotonic()
            if remaining <= 0:
                log.debug("API connection: request not complete within %s s", self._request_timeout)
                return False
            conn.settimeout(remaining)
        else:
            connection.enter(_IDLE)
            conn.settimeout(self._idle_timeout)
        try:
            data = conn.recv(_RECV_SIZE)
        except TimeoutError:
            log.debug("API connection timed out")
            return False
        if not data:
            return False
        parser.feed(data)
        return True

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
