"""HTTP/1.1 for the API, sans-IO: request bytes in, requests out; responses to bytes.

:class:`RequestParser` is fed whatever the socket gave and yields complete
:class:`Request` values (h11's shape, no socket anywhere), so every framing
rule is tested without one. What it accepts is what Firecracker's API
clients send, and no more:

- a request line ``METHOD SP target SP HTTP/1.0|HTTP/1.1``; the target is
  an absolute path (``/drives/rootfs``) or an absolute URI
  (``http://localhost/drives/rootfs``); a query string is dropped;
- header lines ``Name: value`` (CRLF or bare LF line ends); the header
  section is capped at :data:`MAX_HEADER_BYTES`;
- a body only by ``Content-Length``, capped by ``body_limit`` (Firecracker's
  ``--http-api-max-payload-size``, 51200 bytes by default); any
  ``Transfer-Encoding`` but ``identity`` (chunked included) is refused, as
  micro_http refuses encodings it does not implement;
- ``Expect: 100-continue`` (curl sends it for bodies over 1 KiB) yields a
  :data:`SEND_CONTINUE` event before the body is awaited;
- persistent connections: HTTP/1.1 unless ``Connection: close``, HTTP/1.0
  only with ``Connection: keep-alive``; pipelined requests are parsed in
  order.

Anything else raises :class:`ProtocolError` (the client's fault; status 400,
as Firecracker answers every malformed request). After one, the framing of
the stream is lost: the caller answers it and closes the connection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

#: Firecracker's default ``--http-api-max-payload-size``.
DEFAULT_MAX_BODY = 51200
#: Request line plus headers; Firecracker's clients send a few hundred bytes.
MAX_HEADER_BYTES = 8192
SERVER_NAME = "pyvmm API"

BodyLimit = int | Callable[[str, str], int]

_TOKEN_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
_LINE_SPLIT_RE = re.compile(rb"\r?\n")
_TARGET_RE = re.compile(rb"^[\x21-\x7e]+$")
_ABSOLUTE_URI_RE = re.compile(rb"^https?://[^/?#]*", re.IGNORECASE)
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


class ProtocolError(Exception):
    """The client broke HTTP framing; answer with ``status`` and close."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """One complete request: ``path`` has no query string; ``body`` may be empty."""

    method: str
    path: str
    body: bytes
    keep_alive: bool
    version: str = "HTTP/1.1"


@dataclass(frozen=True)
class Response:
    """What a route answers: a status and a JSON value (None: no body)."""

    status: int
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def fault(cls, status: int, message: str) -> Response:
        """Firecracker's error shape: ``{"fault_message": "..."}``."""
        return cls(status, {"fault_message": message})


class _Event:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: :meth:`RequestParser.next_event`: feed more bytes.
NEED_DATA = _Event("NEED_DATA")
#: :meth:`RequestParser.next_event`: send :data:`CONTINUE_RESPONSE`, then feed the body.
SEND_CONTINUE = _Event("SEND_CONTINUE")
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass
class _Head:
    method: str
    path: str
    version: str
    keep_alive: bool
    length: int
    expect_continue: bool


def _show(raw: bytes, limit: int = 60) -> str:
    text = raw.decode("latin-1")
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


class RequestParser:
    """Turns one connection's bytes into :class:`Request` events; see the module doc."""

    def __init__(
        self, body_limit: BodyLimit = DEFAULT_MAX_BODY, max_header_bytes: int = MAX_HEADER_BYTES
    ) -> None:
        self._body_limit = body_limit
        self._max_header = max_header_bytes
        self._buf = bytearray()
        self._head: _Head | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def in_request(self) -> bool:
        """Whether part of a request has arrived (to tell a stall from an idle connection)."""
        return self._head is not None or bool(self._buf.strip(b"\r\n"))

    def next_event(self) -> Request | _Event:
        """The next :class:`Request`, or :data:`NEED_DATA` / :data:`SEND_CONTINUE`."""
        if self._head is None:
            while self._buf[:1] == b"\n" or self._buf[:2] == b"\r\n":
                del self._buf[: 1 if self._buf[:1] == b"\n" else 2]
            match = _HEADER_END_RE.search(self._buf, 0, self._max_header + 4)
            if match is None or match.start() > self._max_header:
                if len(self._buf) > self._max_header:
                    raise ProtocolError(
                        f"the request line and headers are larger than {self._max_header} bytes"
                    )
                return NEED_DATA
            head = bytes(self._buf[: match.start()])
            del self._buf[: match.end()]
            self._head = self._parse_head(head)
            if self._head.expect_continue and self._head.length > len(self._buf):
                return SEND_CONTINUE
        head = self._head
        if len(self._buf) < head.length:
            return NEED_DATA
        body = bytes(self._buf[: head.length])
        del self._buf[: head.length]
        self._head = None
        return Request(head.method, head.path, body, head.keep_alive, head.version)

    # --- parsing the head ------------------------------------------------------------
    def _parse_head(self, head: bytes) -> _Head:
        lines = _LINE_SPLIT_RE.split(head)
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN_RE.match(parts[0]):
            raise ProtocolError(f"malformed request line {_show(lines[0])}")
        method_raw, target, version_raw = parts
        if version_raw not in _VERSIONS:
            raise ProtocolError(f"unsupported HTTP version {_show(version_raw)}")
        method, version = method_raw.decode(), version_raw.decode()
        path = self._parse_target(target)
        headers = self._parse_headers(lines[1:])

        encodings = [
            token.strip().lower()
            for value in headers.get("transfer-encoding", [])
            for token in value.split(",")
        ]
        if any(token != "identity" for token in encodings):
            raise ProtocolError(
                f"Transfer-Encoding {', '.join(headers['transfer-encoding'])!r} is not supported; "
                "send the body with a Content-Length"
            )
        lengths = set(headers.get("content-length", []))
        if len(lengths) > 1:
            raise ProtocolError("conflicting Content-Length headers")
        length_text = lengths.pop() if lengths else "0"
        if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 18:
            raise ProtocolError(f"invalid Content-Length {length_text!r}")
        length = int(length_text)
        limit = self._body_limit(method, path) if callable(self._body_limit) else self._body_limit
        if length > limit:
            raise ProtocolError(
                f"Request payload with size {length} is larger than the limit of {limit} "
                "allowed by server."
            )
        expect = [value.strip().lower() for value in headers.get("expect", [])]
        if any(value != "100-continue" for value in expect):
            raise ProtocolError(f"unsupported Expect {', '.join(headers['expect'])!r}", 417)
        tokens = {
            token.strip().lower()
            for value in headers.get("connection", [])
            for token in value.split(",")
        }
        if version == "HTTP/1.1":
            keep_alive = "close" not in tokens
        else:
            keep_alive = "keep-alive" in tokens and "close" not in tokens
        return _Head(method, path, version, keep_alive, length, bool(expect))

    @staticmethod
    def _parse_target(target: bytes) -> str:
        if not _TARGET_RE.match(target):
            raise ProtocolError(f"invalid request target {_show(target)}")
        absolute = _ABSOLUTE_URI_RE.match(target)
        if absolute is not None:
            target = target[absolute.end() :] or b"/"
        if not target.startswith(b"/"):
            raise ProtocolError(f"invalid request target {_show(target)}")
        for separator in (b"#", b"?"):
            target = target.split(separator, 1)[0]
        return target.decode("ascii")

    @staticmethod
    def _parse_headers(lines: list[bytes]) -> dict[str, list[str]]:
        headers: dict[str, list[str]] = {}
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                raise ProtocolError("folded header lines are not supported")
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN_RE.match(name) or b"\r" in value or b"\x00" in value:
                raise ProtocolError(f"malformed header line {_show(line)}")
            headers.setdefault(name.decode().lower(), []).append(
                value.strip(b" \t").decode("latin-1")
            )
        return headers


def render_response(response: Response, *, keep_alive: bool, version: str = "HTTP/1.1") -> bytes:
    """The bytes of ``response``; a 204 never carries a body."""
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {response.status} {reason}", f"Server: {SERVER_NAME}"]
    body = b""
    if response.status != HTTPStatus.NO_CONTENT:
        if response.body is not None:
            body = json.dumps(response.body, ensure_ascii=False).encode()
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if not keep_alive:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
