"""pyvmm's stdin carried to a ``pyvmm exec`` in a nested host, bytes and end intact.

The nested host streams a command's stdin over its console port, a byte
pipe with no end-of-stream of its own: its relay marks the end of the input
in-band, with the console's end-of-file character (and a newline before it
when the last line was unfinished), which is right for a guest's tty but
would corrupt binary input and cut it at the first 0x04. So the outer
``pyvmm exec`` wraps its stdin in frames - a u32 big-endian length, then
that many bytes; a zero length ends the input - and the inner one unwraps
them (``--stdin-frames``), ignoring whatever follows the end frame.

:class:`FrameEncoder` and :class:`FrameDecoder` are sans-IO;
:func:`encode_to_pipe` and :func:`decode_to_pipe` run them on an ``io``
thread between two fds.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable

from pyvmm.errors import ConfigError

_LENGTH = struct.Struct(">I")
#: Largest frame the encoder writes (and the decoder accepts).
MAX_FRAME = 64 * 1024
_READ = 64 * 1024


def encode(data: bytes) -> bytes:
    """``data`` as frames (empty ``data``: nothing; see :func:`end`)."""
    out = bytearray()
    for start in range(0, len(data), MAX_FRAME):
        chunk = data[start : start + MAX_FRAME]
        out += _LENGTH.pack(len(chunk)) + chunk
    return bytes(out)


def end() -> bytes:
    """The end frame."""
    return _LENGTH.pack(0)


class FrameDecoder:
    """Feed bytes in; get the payload bytes out; :attr:`ended` once the end frame came."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        """The payload bytes ``data`` completes (ConfigError on a frame over the cap)."""
        if self.ended:
            return b""
        self._buffer += data
        out = bytearray()
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length == 0:
                self.ended = True
                self._buffer.clear()
                break
            if length > MAX_FRAME:
                raise ConfigError(
                    f"--stdin-frames: a frame of {length} bytes (at most {MAX_FRAME})"
                )
            if len(self._buffer) < _LENGTH.size + length:
                break
            out += self._buffer[_LENGTH.size : _LENGTH.size + length]
            del self._buffer[: _LENGTH.size + length]
        return bytes(out)


def encode_to_pipe(source: int, on_error: Callable[[str], None]) -> int:
    """Frames of ``source``'s bytes (then the end frame) in a new pipe; its read end.

    The copying runs on an ``io`` thread; the pipe's write end is closed at
    the end, and the read end is the caller's to close.
    """

    def copy(write_fd: int) -> None:
        try:
            while True:
                try:
                    data = os.read(source, _READ)
                except OSError:
                    data = b""
                _write_all(write_fd, encode(data) if data else end())
                if not data:
                    return
        finally:
            with contextlib.suppress(OSError):
                os.close(write_fd)

    return _pipe_thread("pyvmm-stdin-frames", copy, on_error)


def decode_to_pipe(source: int, on_error: Callable[[str], None]) -> int:
    """The payload of framed ``source`` in a new pipe (closed at the end frame); its read end."""

    def copy(write_fd: int) -> None:
        decoder = FrameDecoder()
        try:
            while not decoder.ended:
                try:
                    data = os.read(source, _READ)
                except OSError:
                    data = b""
                if not data:
                    return  # the outer pyvmm went away: the input ends here
                _write_all(write_fd, decoder.feed(data))
        finally:
            with contextlib.suppress(OSError):
                os.close(write_fd)

    return _pipe_thread("pyvmm-stdin-unframe", copy, on_error)


def _pipe_thread(name: str, copy: Callable[[int], None], on_error: Callable[[str], None]) -> int:
    from pyvmm.vmm.threads import ThreadRole, spawn

    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)

    def run() -> None:
        with contextlib.suppress(BrokenPipeError):  # the reader is gone: nothing to do
            copy(write_fd)

    spawn(ThreadRole.IO, name, run, on_error=on_error)
    return read_fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
