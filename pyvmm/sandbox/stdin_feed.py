"""A command's stdin, fed to the agent as the connection takes it.

bytes are sent in chunks; a binary file with a file descriptor (a pipe, a
terminal, pyvmm's own stdin) is read through that descriptor, from its
current position, when ``poll`` says it has data, so the client never blocks
on it while the command's output waits; a file object without one
(``BytesIO``) is read directly.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from pyvmm.errors import ConfigError

StdinSource = bytes | bytearray | memoryview | BinaryIO
#: Bytes read at a time (one STDIN frame).
CHUNK = 64 * 1024


class StdinFeed:
    """A command's stdin, read in chunks as the send queue drains."""

    def __init__(self, source: StdinSource) -> None:
        self.done = False
        self.fd: int | None = None
        self._data: memoryview | None = None
        self._file: BinaryIO | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._data = memoryview(bytes(source))
            return
        if not hasattr(source, "read") or isinstance(source, io.TextIOBase):
            raise ConfigError(f"stdin must be bytes or a binary file, not {type(source).__name__}")
        self._file = source
        try:
            self.fd = source.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None  # e.g. BytesIO: read it directly

    def read(self) -> bytes:
        """The next chunk; b"" once at the end."""
        chunk = b""
        if self._data is not None:
            chunk, self._data = bytes(self._data[:CHUNK]), self._data[CHUNK:]
        elif self.fd is not None:
            try:
                chunk = os.read(self.fd, CHUNK)
            except OSError:
                chunk = b""  # an unreadable stdin ends the command's input
        elif self._file is not None:
            chunk = self._file.read(CHUNK)
            if not isinstance(chunk, bytes):
                raise ConfigError("stdin must be opened in binary mode")
        if not chunk:
            self.done = True
        return chunk
