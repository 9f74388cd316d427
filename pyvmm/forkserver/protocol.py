"""The fork server's wire protocol: length-prefixed JSON frames on a Unix stream socket.

Sans-IO: this module turns values into bytes and bytes into checked values;
the client and the server do the socket calls. It imports only the standard
library, because the client (:mod:`pyvmm.forkserver.client`) must start in
a few milliseconds and never pays for pyvmm's VM machinery.

A frame is a 4-byte big-endian length, then that many bytes of a JSON
object. JSON rather than a packed struct: argv and environment values are
variable-length strings, and ``ensure_ascii`` carries the lone surrogates
that stand for undecodable bytes in file names through unchanged.

Client -> server:

1. the request, in one ``sendmsg`` whose SCM_RIGHTS carry the client's
   standard fds: ``{"argv": [...], "prog": ..., "cwd": ..., "umask": ...,
   "env": {...}, "fds": [0, 1, 2]}`` (``fds``: which of 0, 1, 2 come, in
   order; a closed one is left out, so the VM's process has it closed too);
2. then any number of ``{"signal": N}``: the client received SIGINT,
   SIGTERM or SIGHUP, which the server delivers to the VM's process.

Server -> client: ``{"pid": N}`` once the VM's process exists, then
``{"exit": N}`` (its exit status) or ``{"killed": N}`` (the signal that
ended it), and the connection closes. ``{"error": "one line"}`` instead
means the request was refused (or the client broke the protocol) and
nothing runs.

Everything a peer sends is capped (a request at 64 KiB, every other frame
at 256 bytes) and checked here, once; a bad frame is a :class:`ProtocolError`
whose message is the one line the peer gets back.
"""

from __future__ import annotations

import json
import signal
import struct
from collections.abc import Mapping

HEADER = struct.Struct(">I")

#: A request: argv and the forwarded environment fit with room to spare.
MAX_REQUEST_BYTES = 64 * 1024
#: Signal frames and replies.
MAX_CONTROL_BYTES = 256
#: The standard fds a request may carry, in the order they are passed.
STANDARD_FDS = (0, 1, 2)
#: The signals a client forwards (those a shell or a CI runner sends to stop a job).
FORWARDED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

#: Environment variables that shape what ``pyvmm run`` does, beyond ``PYVMM_*``:
#: program lookup (QEMU for the nested host), the cache and temporary
#: directories, the user's identity and locale, the terminal's size for --help.
FORWARDED_ENV = frozenset(
    {
        "PATH", "HOME", "TMPDIR", "XDG_CACHE_HOME", "USER", "LOGNAME", "TERM",
        "LANG", "LC_ALL", "LC_CTYPE", "COLUMNS", "LINES",
    }
)  # fmt: skip
#: ``PYVMM_*`` variables that must not cross: the server's own address (a VM
#: process never relays again) and an fd number only meaningful in its process.
UNFORWARDED_PYVMM_ENV = frozenset({"PYVMM_FORKSERVER", "PYVMM_API_SOCK_FD"})

_REQUEST_KEYS = frozenset({"argv", "prog", "cwd", "umask", "env", "fds"})
_MAX_ARGS = 4096


class ProtocolError(ValueError):
    """The peer sent something this protocol does not allow; the message is one line."""


def is_forwarded(name: str) -> bool:
    """Whether the client passes environment variable ``name`` on (see the constants)."""
    if name.startswith("PYVMM_"):
        return name not in UNFORWARDED_PYVMM_ENV
    return name in FORWARDED_ENV


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` that the request carries."""
    return {key: value for key, value in environ.items() if is_forwarded(key)}


class Request:
    """One ``pyvmm`` command line to run, as the client would have run it itself.

    A plain class, not a dataclass: ``dataclasses`` imports ``inspect``, which
    alone costs the client more than everything else it imports.
    """

    __slots__ = ("argv", "cwd", "env", "fds", "prog", "umask")

    def __init__(
        self,
        argv: tuple[str, ...],
        prog: str,
        cwd: str,
        umask: int,
        env: dict[str, str],
        fds: tuple[int, ...],
    ) -> None:
        self.argv = argv  # the words after "pyvmm"
        self.prog = prog  # how the client was called, for usage messages ("pyvmm")
        self.cwd = cwd
        self.umask = umask
        self.env = env
        self.fds = fds  # which standard fds come with the request


def frame(message: dict[str, object]) -> bytes:
    """``message`` as one frame."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return HEADER.pack(len(body)) + body


def request_frame(request: Request) -> bytes:
    return frame(
        {
            "argv": list(request.argv),
            "prog": request.prog,
            "cwd": request.cwd,
            "umask": request.umask,
            "env": request.env,
            "fds": list(request.fds),
        }
    )


class FrameReader:
    """Reassembles frames from a byte stream; refuses a frame longer than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> dict[str, object] | None:
        """The next whole frame's object, or None until more bytes arrive."""
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > self.limit:
            raise ProtocolError(f"a frame of {length} bytes is over the limit of {self.limit}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        try:
            message = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("a frame is not JSON") from None
        if not isinstance(message, dict):
            raise ProtocolError("a frame is not a JSON object")
        return message

    @property
    def pending(self) -> int:
        """Bytes received that are not part of a whole frame yet."""
        return len(self._buffer)


def parse_request(message: dict[str, object]) -> Request:
    """The request in ``message``, every field checked; or a ProtocolError naming the field."""
    keys = set(message)
    if keys != _REQUEST_KEYS:
        missing, extra = sorted(_REQUEST_KEYS - keys), sorted(keys - _REQUEST_KEYS)
        raise ProtocolError(
            f"not a request: missing {missing}" if missing else f"not a request: unknown {extra}"
        )
    argv = _string_list(message["argv"], "argv")
    if not argv or argv[0] != "run":
        shown = repr(argv[0][:40]) if argv else "nothing"
        raise ProtocolError(f"the fork server runs only 'pyvmm run' command lines, not {shown}")
    prog = _string(message["prog"], "prog")
    cwd = _string(message["cwd"], "cwd")
    if not cwd.startswith("/"):
        raise ProtocolError("cwd must be an absolute path")
    umask = message["umask"]
    if not isinstance(umask, int) or isinstance(umask, bool) or not 0 <= umask <= 0o777:
        raise ProtocolError("umask must be a number from 0 to 0o777")
    return Request(
        argv=tuple(argv),
        prog=prog,
        cwd=cwd,
        umask=umask,
        env=_environment(message["env"]),
        fds=_standard_fds(message["fds"]),
    )


def parse_signal(message: dict[str, object]) -> signal.Signals:
    """The signal a ``{"signal": N}`` frame forwards (SIGINT, SIGTERM or SIGHUP only)."""
    if set(message) != {"signal"}:
        raise ProtocolError('after the request, only {"signal": N} frames may follow')
    number = message["signal"]
    if not isinstance(number, int) or isinstance(number, bool) or number not in FORWARDED_SIGNALS:
        raise ProtocolError(f"signal {str(number)[:20]} is not one a client forwards")
    return signal.Signals(number)


class Reply:
    """One server reply: ``kind`` is ``pid``, ``exit``, ``killed`` or ``error``."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: int | str) -> None:
        self.kind = kind
        self.value = value


_REPLY_KINDS = {"pid": int, "exit": int, "killed": int, "error": str}


def parse_reply(message: dict[str, object]) -> Reply:
    if len(message) != 1:
        raise ProtocolError("a reply has exactly one field")
    ((kind, value),) = message.items()
    expected = _REPLY_KINDS.get(kind)
    if expected is None or not isinstance(value, expected) or isinstance(value, bool):
        raise ProtocolError(f"unknown reply {kind[:20]!r}")
    return Reply(kind, value)


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string")
    if "\0" in value:
        raise ProtocolError(f"{what} holds a NUL character")
    return value


def _string_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be a list of strings")
    if len(value) > _MAX_ARGS:
        raise ProtocolError(f"{what} has {len(value)} items; at most {_MAX_ARGS}")
    return [_string(item, f"{what} item") for item in value]


def _environment(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ProtocolError("env must be an object of strings")
    env: dict[str, str] = {}
    for key, item in value.items():
        name = _string(key, "an env name")
        if not is_forwarded(name):
            raise ProtocolError(f"env variable {name[:40]!r} is not one the fork server takes")
        env[name] = _string(item, f"env {name}")
    return env


def _standard_fds(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or any(
        not isinstance(fd, int) or isinstance(fd, bool) for fd in value
    ):
        raise ProtocolError("fds must be a list of numbers")
    fds = tuple(value)
    if any(fd not in STANDARD_FDS for fd in fds) or list(fds) != sorted(set(fds)):
        raise ProtocolError("fds must list standard fds (0, 1, 2) in order, each once")
    return fds
