"""The messages of the guest agent protocol, both directions: payload encode and decode.

Each message class has ``TYPE`` (its frame type), ``encode()`` (its payload)
and, for what a receiver decodes, ``decode(payload)``, which raises
:class:`ValueError` naming what is wrong (sizes were already checked by
:class:`~pyvmm.sandbox.protocol.FrameDecoder`). Both directions are here,
not only the host's: the unit tests' fake agents speak the agent's half with
the same code, so every message round-trips.

:meth:`Exec.build` and :func:`check_guest_path` turn a caller's values into a
request, with a :class:`~pyvmm.errors.ConfigError` for the first bad one.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from pyvmm.errors import ConfigError
from pyvmm.sandbox.protocol import (
    ALL_CAPS,
    MAX_GUEST_PATH,
    AgentType,
    Cap,
    ErrorKind,
    Field,
    HostType,
    decode_fields,
    decode_u32,
    encode_fields,
    encode_frame,
)

# --- messages from the agent ------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The agent's first frame: which protocol versions it speaks, what it can do."""

    TYPE: ClassVar[int] = AgentType.HELLO
    version_min: int
    version_max: int
    caps: Cap
    max_request: int
    agent: str

    _FIXED: ClassVar[struct.Struct] = struct.Struct(">HHII")

    def encode(self) -> bytes:
        fixed = self._FIXED.pack(self.version_min, self.version_max, self.caps, self.max_request)
        return fixed + self.agent.encode()

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        vmin, vmax, caps, max_request = cls._FIXED.unpack_from(payload)
        if vmin > vmax:
            raise ValueError(f"HELLO version range {vmin}..{vmax} is empty")
        agent = payload[cls._FIXED.size :].decode("utf-8", "replace")
        return cls(vmin, vmax, Cap(caps & ALL_CAPS), max_request, _printable(agent))


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[int] = AgentType.PONG
    payload: bytes

    def encode(self) -> bytes:
        return self.payload

    @classmethod
    def decode(cls, payload: bytes) -> Pong:
        return cls(payload)


@dataclass(frozen=True)
class Started:
    """The command is running (it was found and exec'ed)."""

    TYPE: ClassVar[int] = AgentType.STARTED
    pid: int

    def encode(self) -> bytes:
        return self.pid.to_bytes(4, "big")

    @classmethod
    def decode(cls, payload: bytes) -> Started:
        return cls(decode_u32(payload, "STARTED"))


@dataclass(frozen=True)
class Output:
    """A chunk of the command's stdout (``fd`` 1) or stderr (``fd`` 2)."""

    fd: int
    data: bytes

    @property
    def TYPE(self) -> int:
        return AgentType.STDOUT if self.fd == 1 else AgentType.STDERR

    def encode(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class Exit:
    """The command ended: ``status`` if it exited, ``signal`` if a signal killed it."""

    TYPE: ClassVar[int] = AgentType.EXIT
    status: int | None
    signal: int | None
    timed_out: bool
    duration_ns: int

    _FIXED: ClassVar[struct.Struct] = struct.Struct(">BBHIQ")

    def encode(self) -> bytes:
        how, value = (1, self.signal) if self.signal is not None else (0, self.status)
        return self._FIXED.pack(how, int(self.timed_out), 0, value or 0, self.duration_ns)

    @classmethod
    def decode(cls, payload: bytes) -> Exit:
        how, timed_out, reserved, value, duration = cls._FIXED.unpack(payload)
        if how > 1 or timed_out > 1 or reserved:
            raise ValueError(f"EXIT has invalid flags ({how}, {timed_out}, {reserved})")
        if how == 0 and value > 255:
            raise ValueError(f"EXIT status {value} is over 255")
        if how == 1 and not 0 < value < 128:
            raise ValueError(f"EXIT signal {value} is not 1..127")
        if how == 1:
            return cls(None, value, bool(timed_out), duration)
        return cls(value, None, bool(timed_out), duration)


@dataclass(frozen=True)
class Failure:
    """An ERROR frame: the request failed (see :class:`ErrorKind`)."""

    TYPE: ClassVar[int] = AgentType.ERROR
    kind: ErrorKind
    errno: int
    message: str

    _FIXED: ClassVar[struct.Struct] = struct.Struct(">B3sI")

    def encode(self) -> bytes:
        return self._FIXED.pack(self.kind, b"\0\0\0", self.errno) + self.message.encode()

    @classmethod
    def decode(cls, payload: bytes) -> Failure:
        kind, _reserved, errno = cls._FIXED.unpack_from(payload)
        try:
            error_kind = ErrorKind(kind)
        except ValueError:
            raise ValueError(f"ERROR of unknown kind {kind}") from None
        text = payload[cls._FIXED.size :].decode("utf-8", "replace")
        return cls(error_kind, errno, _printable(text))


@dataclass(frozen=True)
class Data:
    """A piece of a tar stream (GET from the agent; PUT from the host, empty = end)."""

    data: bytes
    from_host: bool = False

    @property
    def TYPE(self) -> int:
        return HostType.DATA if self.from_host else AgentType.DATA

    def encode(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class Done:
    """A PUT or GET finished: file bytes, entries, and entries skipped (GET only)."""

    TYPE: ClassVar[int] = AgentType.DONE
    content_bytes: int
    entries: int
    skipped: int

    _FIXED: ClassVar[struct.Struct] = struct.Struct(">QII")

    def encode(self) -> bytes:
        return self._FIXED.pack(self.content_bytes, self.entries, self.skipped)

    @classmethod
    def decode(cls, payload: bytes) -> Done:
        return cls(*cls._FIXED.unpack(payload))


AgentMessage = Hello | Pong | Started | Output | Exit | Failure | Data | Done


def decode_agent_message(kind: int, payload: bytes) -> AgentMessage:
    """The message in a frame from the agent (its size already checked); ValueError if bad."""
    if kind == AgentType.STDOUT:
        return Output(1, payload)
    if kind == AgentType.STDERR:
        return Output(2, payload)
    if kind == AgentType.DATA:
        return Data(payload)
    decoders = {
        AgentType.HELLO: Hello,
        AgentType.PONG: Pong,
        AgentType.STARTED: Started,
        AgentType.EXIT: Exit,
        AgentType.ERROR: Failure,
        AgentType.DONE: Done,
    }
    return decoders[AgentType(kind)].decode(payload)


def _printable(text: str) -> str:
    """Agent text for one-line messages: control characters become spaces."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text).strip()


# --- messages from the host ---------------------------------------------------------------


@dataclass(frozen=True)
class HostHello:
    TYPE: ClassVar[int] = HostType.HELLO
    version: int

    def encode(self) -> bytes:
        return self.version.to_bytes(2, "big")

    @classmethod
    def decode(cls, payload: bytes) -> HostHello:
        if len(payload) != 2:
            raise ValueError("HELLO from the host is not 2 bytes")
        return cls(int.from_bytes(payload, "big"))


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[int] = HostType.PING
    payload: bytes

    def encode(self) -> bytes:
        return self.payload

    @classmethod
    def decode(cls, payload: bytes) -> Ping:
        return cls(payload)


@dataclass(frozen=True)
class Exec:
    """Run ``argv`` (see :meth:`build` for the checks a caller's values get)."""

    TYPE: ClassVar[int] = HostType.EXEC
    argv: tuple[bytes, ...]
    env: tuple[bytes, ...] = ()
    cwd: bytes | None = None
    uid: int | None = None
    gid: int | None = None
    timeout_ms: int = 0
    stdin_piped: bool = False

    @classmethod
    def build(
        cls,
        argv: Sequence[str | bytes],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | bytes | None = None,
        uid: int | None = None,
        gid: int | None = None,
        timeout: float | None = None,
        stdin_piped: bool = False,
    ) -> Exec:
        """An EXEC from a caller's values; ConfigError names the first bad one."""
        if isinstance(argv, (str, bytes)):
            raise ConfigError("exec argv must be a list of arguments, not one string")
        args = tuple(_arg_bytes(a, f"argument {i}") for i, a in enumerate(argv))
        if not args or not args[0]:
            raise ConfigError("exec needs a command: argv is empty")
        variables = []
        for name, value in (env or {}).items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ConfigError(f"environment variable name {name!r} is not NAME")
            variables.append(_arg_bytes(f"{name}={value}", f"environment variable {name}"))
        raw_cwd = None if cwd is None else check_guest_path(cwd, "cwd")
        for what, value in (("uid", uid), ("gid", gid)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1
            ):
                raise ConfigError(f"{what} must be an integer from 0 to 4294967294, not {value!r}")
        timeout_ms = 0
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise ConfigError(f"timeout must be a number of seconds, not {timeout!r}")
            if not 0 < timeout <= 365 * 86400:
                raise ConfigError(f"timeout must be more than 0 and at most a year, not {timeout}")
            timeout_ms = max(1, round(timeout * 1000))
        return cls(args, tuple(variables), raw_cwd, uid, gid, timeout_ms, stdin_piped)

    def encode(self) -> bytes:
        fields: list[tuple[Field, bytes]] = [(Field.ARG, a) for a in self.argv]
        fields += [(Field.ENV, e) for e in self.env]
        if self.cwd is not None:
            fields.append((Field.CWD, self.cwd))
        if self.uid is not None:
            fields.append((Field.UID, self.uid.to_bytes(4, "big")))
        if self.gid is not None:
            fields.append((Field.GID, self.gid.to_bytes(4, "big")))
        if self.timeout_ms:
            fields.append((Field.TIMEOUT_MS, self.timeout_ms.to_bytes(8, "big")))
        fields.append((Field.STDIN, bytes([self.stdin_piped])))
        return encode_fields(fields)

    @classmethod
    def decode(cls, payload: bytes) -> Exec:
        argv: list[bytes] = []
        env: list[bytes] = []
        single: dict[int, bytes] = {}
        for tag, value in decode_fields(payload):
            if tag == Field.ARG:
                argv.append(value)
            elif tag == Field.ENV:
                env.append(value)
            elif tag in (Field.CWD, Field.UID, Field.GID, Field.TIMEOUT_MS, Field.STDIN):
                if tag in single:
                    raise ValueError(f"EXEC repeats field {Field(tag).name}")
                single[tag] = value
            else:
                raise ValueError(f"EXEC has unknown field {tag}")
        if not argv:
            raise ValueError("EXEC has no ARG")
        uid, gid = single.get(Field.UID), single.get(Field.GID)
        timeout = single.get(Field.TIMEOUT_MS, bytes(8))
        if len(timeout) != 8:
            raise ValueError("TIMEOUT_MS is not 8 bytes")
        return cls(
            tuple(argv),
            tuple(env),
            single.get(Field.CWD),
            None if uid is None else decode_u32(uid, "UID"),
            None if gid is None else decode_u32(gid, "GID"),
            int.from_bytes(timeout, "big"),
            single.get(Field.STDIN, b"\0") == b"\1",
        )


@dataclass(frozen=True)
class Stdin:
    """Bytes for the command's stdin; empty means end of input."""

    TYPE: ClassVar[int] = HostType.STDIN
    data: bytes

    def encode(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, payload: bytes) -> Stdin:
        return cls(payload)


@dataclass(frozen=True)
class Signal:
    TYPE: ClassVar[int] = HostType.SIGNAL
    signo: int

    def encode(self) -> bytes:
        return self.signo.to_bytes(4, "big")

    @classmethod
    def decode(cls, payload: bytes) -> Signal:
        return cls(decode_u32(payload, "SIGNAL"))


@dataclass(frozen=True)
class Put:
    """Receive a tar stream (DATA frames) and place its top entry at ``path``."""

    TYPE: ClassVar[int] = HostType.PUT
    path: bytes
    uid: int | None = None
    gid: int | None = None
    mkdirs: bool = True

    def encode(self) -> bytes:
        fields: list[tuple[Field, bytes]] = [(Field.PATH, self.path)]
        if self.uid is not None:
            fields.append((Field.UID, self.uid.to_bytes(4, "big")))
        if self.gid is not None:
            fields.append((Field.GID, self.gid.to_bytes(4, "big")))
        fields.append((Field.MKDIRS, bytes([self.mkdirs])))
        return encode_fields(fields)

    @classmethod
    def decode(cls, payload: bytes) -> Put:
        values = dict(
            _single_fields(payload, "PUT", {Field.PATH, Field.UID, Field.GID, Field.MKDIRS})
        )
        if Field.PATH not in values:
            raise ValueError("PUT has no PATH")
        uid, gid = values.get(Field.UID), values.get(Field.GID)
        return cls(
            values[Field.PATH],
            None if uid is None else decode_u32(uid, "UID"),
            None if gid is None else decode_u32(gid, "GID"),
            values.get(Field.MKDIRS, b"\0") == b"\1",
        )


@dataclass(frozen=True)
class Get:
    """Send the file or directory tree at ``path`` as a tar stream."""

    TYPE: ClassVar[int] = HostType.GET
    path: bytes

    def encode(self) -> bytes:
        return encode_fields([(Field.PATH, self.path)])

    @classmethod
    def decode(cls, payload: bytes) -> Get:
        values = dict(_single_fields(payload, "GET", {Field.PATH}))
        if Field.PATH not in values:
            raise ValueError("GET has no PATH")
        return cls(values[Field.PATH])


HostMessage = HostHello | Ping | Exec | Stdin | Signal | Put | Data | Get


def decode_host_message(kind: int, payload: bytes) -> HostMessage:
    """The message in a frame from the host; ValueError if bad (used by fake agents)."""
    if kind == HostType.DATA:
        return Data(payload, from_host=True)
    decoders = {
        HostType.HELLO: HostHello,
        HostType.PING: Ping,
        HostType.EXEC: Exec,
        HostType.STDIN: Stdin,
        HostType.SIGNAL: Signal,
        HostType.PUT: Put,
        HostType.GET: Get,
    }
    return decoders[HostType(kind)].decode(payload)


def encode_message(message: AgentMessage | HostMessage) -> bytes:
    """One whole frame."""
    return encode_frame(message.TYPE, message.encode())


def _single_fields(payload: bytes, what: str, allowed: set[Field]) -> Iterator[tuple[int, bytes]]:
    seen: set[int] = set()
    for tag, value in decode_fields(payload):
        if tag not in allowed:
            raise ValueError(f"{what} has unknown field {tag}")
        if tag in seen:
            raise ValueError(f"{what} repeats field {Field(tag).name}")
        seen.add(tag)
        yield tag, value


def _arg_bytes(value: str | bytes, what: str) -> bytes:
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
    elif isinstance(value, bytes):
        raw = value
    else:
        raise ConfigError(f"exec {what} must be str or bytes, not {type(value).__name__}")
    if b"\0" in raw:
        raise ConfigError(f"exec {what} contains a NUL byte")
    return raw


def check_guest_path(value: str | bytes, what: str = "guest path") -> bytes:
    """An absolute guest path as bytes, checked: ConfigError if it cannot be one."""
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
    elif isinstance(value, bytes):
        raw = value
    else:
        raise ConfigError(f"{what} must be str or bytes, not {type(value).__name__}")
    if not raw.startswith(b"/"):
        raise ConfigError(f"{what} {raw.decode(errors='replace')!r} is not an absolute path")
    if b"\0" in raw:
        raise ConfigError(f"{what} contains a NUL byte")
    if len(raw) > MAX_GUEST_PATH:
        raise ConfigError(
            f"{what} is {len(raw)} bytes long; a guest path has at most {MAX_GUEST_PATH}"
        )
    if b".." in raw.split(b"/"):
        raise ConfigError(f"{what} {raw.decode(errors='replace')!r} has a '..' component")
    return raw
