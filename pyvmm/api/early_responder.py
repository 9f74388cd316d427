"""``GET /`` answered while the rest of ``pyvmm-firecracker`` is still being imported.

The API socket is bound first (:mod:`pyvmm.api.early_socket`), but the API
server needs ~100 ms of imports before it answers anything. Clients poll
``GET /`` to learn that the VMM is up, so :class:`EarlyResponder` answers
exactly that, on its own thread, from the standard library alone: the
instance info before boot, byte for byte what the API server would send
(``state`` "Not started").

Everything else is left to the API server. The responder reads each
connection's requests; the first that is not exactly ``GET /`` without a
body (another method or path, a body, a request still incomplete, anything
sent after ``GET /`` in the same read, a request header over 8 KiB) stops it
reading that connection. :meth:`EarlyResponder.stop` (called before the
server starts and before any seccomp filter is installed) ends the thread
and returns every connection still open, with the bytes already read and
when the pending request's first byte came, for
:meth:`pyvmm.api.http.ApiServer.adopt` to serve as if it had accepted them:
no request is lost or answered twice. A failure on the thread is logged by
:meth:`~EarlyResponder.stop`, which hands over what the thread had.

Not started when the answer would be wrong: with ``--config-file``
Firecracker answers nothing before that boot is done.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import threading
import time

#: As the API server's own limits (``http_protocol.MAX_HEADER_BYTES``, ``http.DEFAULT_*``).
MAX_HEADER_BYTES = 8192
MAX_CONNECTIONS = 32
#: A client that does not read its answer for this long loses the connection.
SEND_TIMEOUT = 1.0
#: Answers per connection: far below what a socket buffers, so sending never waits long.
MAX_ANSWERS = 16

_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
_LINE_SPLIT_RE = re.compile(rb"\r?\n")
_HEADER_RE = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\x00]*?)[ \t]*$")
#: Headers that mean a body, or more than an answer (but ``Content-Length: 0``).
_NOT_OURS = {b"content-length", b"transfer-encoding", b"expect"}


class Pending:
    """A connection handed over: its socket, the bytes read from it and not answered, and
    when its pending request's first byte arrived (None: idle between requests)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""
        self.since: float | None = None
        self.answered = 0
        self.done = False  # no longer read: a request for the API server, or end of file


class EarlyResponder:
    """Answers ``GET /`` on ``listener`` until :meth:`stop`; see the module docstring."""

    def __init__(self, listener: socket.socket, instance_id: str) -> None:
        from pyvmm.api.version import vmm_version

        self._listener = listener
        self._body = json.dumps(
            {
                "id": instance_id,
                "state": "Not started",
                "started": False,
                "vmm_version": vmm_version(),
                "app_name": "pyvmm",
            },
            ensure_ascii=False,
        ).encode()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._connections: dict[int, Pending] = {}
        self._error: BaseException | None = None
        #: ``GET /`` requests answered (the API server's metrics count them).
        self.answered = 0
        self._thread = threading.Thread(target=self._run, name="api-early", daemon=True)

    @classmethod
    def start(cls, listener: socket.socket, instance_id: str) -> EarlyResponder:
        responder = cls(listener, instance_id)
        responder._thread.start()
        return responder

    def stop(self) -> list[Pending]:
        """End the thread; the connections it holds, for the API server (call once)."""
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._error is not None:
            import logging

            logging.getLogger(__name__).error(
                "the early API responder failed; the API server takes its connections over",
                exc_info=self._error,
            )
        return list(self._connections.values())

    # --- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # told on the main thread by stop()
            self._error = exc

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        listening = False
        while True:
            if listening != (len(self._connections) < MAX_CONNECTIONS):
                # Over the limit the kernel queues newcomers for the API server.
                listening = not listening
                if listening:
                    poller.register(self._listener, select.POLLIN)
                else:
                    poller.unregister(self._listener)
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    return
                if fd == self._listener.fileno():
                    self._accept(poller)
                    continue
                connection = self._connections[fd]
                self._receive(connection)
                if connection.done or connection.sock.fileno() < 0:
                    poller.unregister(fd)
                if connection.sock.fileno() < 0:
                    del self._connections[fd]

    def _accept(self, poller: select.poll) -> None:
        sock, _ = self._listener.accept()
        sock.settimeout(SEND_TIMEOUT)  # only read when poll says so: no wait there
        self._connections[sock.fileno()] = Pending(sock)
        poller.register(sock, select.POLLIN)

    def _receive(self, connection: Pending) -> None:
        try:
            data = connection.sock.recv(MAX_HEADER_BYTES + 1)
        except OSError:
            data = b""
        if not data:
            if connection.data:
                connection.done = True  # the API server sees the request, then the end
            else:
                connection.sock.close()
            return
        if connection.since is None:
            connection.since = time.monotonic()
        connection.data += data
        request = self._instance_info_request(connection.data)
        if request is None:
            if _HEADER_END_RE.search(connection.data) or len(connection.data) > MAX_HEADER_BYTES:
                connection.done = True  # a whole request head, not ours
            return
        keep_alive, version = request
        answer = self._answer(keep_alive, version)
        connection.data, connection.since = b"", None
        connection.answered += 1
        self.answered += 1
        try:
            connection.sock.sendall(answer)
        except OSError:
            connection.sock.close()
            return
        if not keep_alive:
            connection.sock.close()
        elif connection.answered >= MAX_ANSWERS:
            connection.done = True

    def _answer(self, keep_alive: bool, version: str) -> bytes:
        """What ``http_protocol.render_response`` makes of the instance info."""
        lines = [
            "HTTP/1.1 200 OK",
            "Server: pyvmm API",
            "Content-Type: application/json",
            f"Content-Length: {len(self._body)}",
        ]
        if not keep_alive:
            lines.append("Connection: close")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self._body

    def _instance_info_request(self, data: bytes) -> tuple[bool, str] | None:
        """``(keep_alive, version)`` if ``data`` is exactly one ``GET /`` without a body."""
        match = _HEADER_END_RE.search(data)
        if match is None or match.end() != len(data) or match.start() > MAX_HEADER_BYTES:
            return None
        request_line, *lines = _LINE_SPLIT_RE.split(data[: match.start()])
        if request_line not in (b"GET / HTTP/1.1", b"GET / HTTP/1.0"):
            return None
        tokens: set[bytes] = set()
        for line in lines:
            header = _HEADER_RE.match(line)
            if header is None:
                return None
            name = header[1].lower()
            if name in _NOT_OURS and not (name == b"content-length" and header[2] == b"0"):
                return None
            if name == b"connection":
                tokens.update(token.strip().lower() for token in header[2].split(b","))
        version = request_line[-8:].decode()
        if version == "HTTP/1.1":
            return b"close" not in tokens, version
        return b"keep-alive" in tokens and b"close" not in tokens, version
