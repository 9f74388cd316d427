"""The guest agent's wire protocol: numbers, frames, fields and size caps (sans-IO).

``guest/agent/PROTOCOL.md`` is the specification; this module carries its
numbers (the same as ``guest/agent/agent.h``: a unit test checks that they
agree) and its framing; :mod:`pyvmm.sandbox.messages` the payloads. Nothing
here touches a socket: :class:`FrameDecoder` takes bytes and returns frames,
raising :class:`ValueError` with the reason; the caller knows whose frame it
was and turns that into the right error (:mod:`pyvmm.sandbox.connection`).

Caps: every frame type has a payload size range, checked as soon as its
8-byte header is in, so a hostile length is refused before a byte of its
payload is buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from enum import IntEnum, IntFlag

PROTOCOL_VERSION = 1
#: Protocol versions this host speaks (the agent announces a range in HELLO).
SUPPORTED_VERSIONS = range(1, 2)
#: The vsock port the agent listens on: "py" in ASCII.
AGENT_PORT = 28793

HEADER = struct.Struct(">I B 3s")
HEADER_SIZE = HEADER.size
#: The largest STDOUT, STDERR or DATA payload either side sends.
MAX_CHUNK = 64 * 1024
MAX_PING = 64
MAX_ERROR_TEXT = 1024
MAX_AGENT_TEXT = 256
#: What the host sends at most in one request frame unless the agent's HELLO allows less.
MAX_REQUEST = 4 * 1024 * 1024
#: A guest path in a request (Linux's PATH_MAX, NUL excluded).
MAX_GUEST_PATH = 4095


class AgentType(IntEnum):
    """Frame types the agent sends."""

    HELLO = 0x01
    PONG = 0x02
    STARTED = 0x03
    STDOUT = 0x04
    STDERR = 0x05
    EXIT = 0x06
    ERROR = 0x07
    DATA = 0x08
    DONE = 0x09


class HostType(IntEnum):
    """Frame types the host sends."""

    HELLO = 0x41
    PING = 0x42
    EXEC = 0x43
    STDIN = 0x44
    SIGNAL = 0x45
    PUT = 0x46
    DATA = 0x47
    GET = 0x48


class Field(IntEnum):
    """Tags of the fields in EXEC, PUT and GET payloads."""

    ARG = 1
    ENV = 2
    CWD = 3
    UID = 4
    GID = 5
    TIMEOUT_MS = 6
    STDIN = 7
    PATH = 8
    MKDIRS = 9


class ErrorKind(IntEnum):
    """What an ERROR frame reports."""

    NOT_FOUND = 1  # exec: no such program (exit 127); get: no such path
    CANNOT_RUN = 2  # exec: not executable, or cwd/uid could not be applied (exit 126)
    BAD_REQUEST = 3  # the host broke the protocol
    FAILED = 4  # the operation failed in the guest (I/O error, fork failed, ...)


class Cap(IntFlag):
    """What an agent can do, from its HELLO."""

    EXEC = 0x01
    PUT = 0x02
    GET = 0x04
    SIGNAL = 0x08
    SET_UID = 0x10


ALL_CAPS = 0x1F


# --- frames -----------------------------------------------------------------------


def encode_frame(kind: int, payload: bytes = b"") -> bytes:
    """Header and payload of one frame."""
    return HEADER.pack(len(payload), kind, b"\0\0\0") + payload


class FrameDecoder:
    """Splits a byte stream into ``(type, payload)`` frames, within per-type size caps.

    ``limits`` maps each frame type this side may receive to its ``(min,
    max)`` payload size. :meth:`next_frame` raises :class:`ValueError` for an
    unknown type, reserved bytes that are not zero, or a size out of range,
    as soon as the header is complete. The buffer holds at most one frame
    plus what :meth:`feed` was given since the last :meth:`next_frame`.
    """

    def __init__(self, limits: Mapping[int, tuple[int, int]]) -> None:
        self._limits = dict(limits)
        self._buf = bytearray()
        self._checked = False  # the header at the head of _buf passed its checks

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next whole frame, or None until more bytes come."""
        if len(self._buf) < HEADER_SIZE:
            return None
        length, kind, reserved = HEADER.unpack_from(self._buf)
        if not self._checked:
            self._check(kind, length, reserved)
            self._checked = True
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._checked = False
        return kind, payload

    def _check(self, kind: int, length: int, reserved: bytes) -> None:
        if reserved != b"\0\0\0":
            raise ValueError(f"frame header has reserved bytes set ({reserved.hex()})")
        limits = self._limits.get(kind)
        if limits is None:
            raise ValueError(f"unknown frame type 0x{kind:02x}")
        low, high = limits
        if not low <= length <= high:
            raise ValueError(f"{_type_name(kind)} frame of {length} bytes (allowed: {low}..{high})")


def _type_name(kind: int) -> str:
    for enum in (AgentType, HostType):
        try:
            return enum(kind).name
        except ValueError:
            continue
    return f"0x{kind:02x}"


# --- fields (tag u8, length u32, value) ------------------------------------------------

_FIELD_HEAD = struct.Struct(">BI")


def encode_fields(fields: Sequence[tuple[Field, bytes]]) -> bytes:
    return b"".join(_FIELD_HEAD.pack(tag, len(value)) + value for tag, value in fields)


def decode_fields(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """``(tag, value)`` pairs; ValueError if a field runs past the payload."""
    offset = 0
    while offset < len(payload):
        if len(payload) - offset < _FIELD_HEAD.size:
            raise ValueError("truncated field header")
        tag, length = _FIELD_HEAD.unpack_from(payload, offset)
        offset += _FIELD_HEAD.size
        if length > len(payload) - offset:
            raise ValueError(f"field {tag} of {length} bytes runs past the payload")
        yield tag, payload[offset : offset + length]
        offset += length


def decode_u32(value: bytes, what: str) -> int:
    """A u32 field; ValueError unless it is 4 bytes."""
    if len(value) != 4:
        raise ValueError(f"{what} is {len(value)} bytes, not 4")
    return int.from_bytes(value, "big")


# --- size caps ---------------------------------------------------------------------------

#: Payload size range of each frame the agent may send.
AGENT_LIMITS: dict[int, tuple[int, int]] = {
    AgentType.HELLO: (12, 12 + MAX_AGENT_TEXT),
    AgentType.PONG: (0, MAX_PING),
    AgentType.STARTED: (4, 4),
    AgentType.STDOUT: (1, MAX_CHUNK),
    AgentType.STDERR: (1, MAX_CHUNK),
    AgentType.EXIT: (16, 16),
    AgentType.ERROR: (8, 8 + MAX_ERROR_TEXT),
    AgentType.DATA: (1, MAX_CHUNK),
    AgentType.DONE: (16, 16),
}

#: Payload size range of each frame the host may send (what a fake agent accepts).
HOST_LIMITS: dict[int, tuple[int, int]] = {
    HostType.HELLO: (2, 2),
    HostType.PING: (0, MAX_PING),
    HostType.EXEC: (5, MAX_REQUEST),
    HostType.STDIN: (0, MAX_CHUNK),
    HostType.SIGNAL: (4, 4),
    HostType.PUT: (5, 2 * MAX_GUEST_PATH),
    HostType.DATA: (0, MAX_CHUNK),
    HostType.GET: (5, 2 * MAX_GUEST_PATH),
}
