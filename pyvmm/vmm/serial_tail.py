"""Remembers the end of the guest's serial output.

Used for messages ("the guest stopped after printing ...") and to tell a
kernel panic from an ordinary reset: Linux with ``panic=N`` reboots after a
panic, which looks like any reboot unless the guest has a pvpanic driver
loaded. The panic banner on the console is the fallback evidence.
"""

from __future__ import annotations

from collections.abc import Callable

PANIC_MARKER = b"Kernel panic - not syncing"


class SerialTail:
    """A serial output sink that forwards bytes and keeps the last ``size``."""

    def __init__(self, sink: Callable[[bytes], object], size: int = 8192) -> None:
        self._sink = sink
        self._size = size
        self._buffer = bytearray()

    def __call__(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > 2 * self._size:
            del self._buffer[: -self._size]
        self._sink(data)

    def text(self) -> str:
        return self._buffer[-self._size :].decode("utf-8", errors="replace")

    def last_line(self) -> str:
        """The last non-empty line printed, stripped."""
        for line in reversed(self.text().splitlines()):
            if line.strip():
                return line.strip()
        return ""

    def panic_line(self) -> str | None:
        """The kernel's panic banner line, if the guest printed one."""
        index = self._buffer.rfind(PANIC_MARKER)
        if index < 0:
            return None
        end = self._buffer.find(b"\n", index)
        line = self._buffer[index : end if end >= 0 else len(self._buffer)]
        return line.decode("utf-8", errors="replace").strip()
