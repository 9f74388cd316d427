"""Progress lines for slow first-time work: downloads, extraction, builds, L1 boots.

Why: a new user's first ``pyvmm run`` downloads a 27-70 MB kernel, unpacks
it, builds an initramfs and (on PVM hosts) boots a nested host; without a
word on the screen that looks like a hang. On a terminal a task shows one
live line (bytes so far, or its current stage, and the elapsed time) that
is erased when the task ends, so the guest's console starts on a clean line.
Anywhere else (a pipe, a log, CI) a task prints exactly one line when it
starts and nothing else, so logs stay short.

Only work that actually happens reports: a cache hit prints nothing.
``PYVMM_PROGRESS=0`` silences everything (for programs that own stderr).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

_REDRAW_S = 0.1
_WIDTH = 100


class Progress:
    """One task's reporter; see :func:`task`."""

    def __init__(self, what: str, total: int | None, stream: TextIO | None) -> None:
        self.what = what
        self.total = total
        self._stream = stream
        self._live = _isatty(stream)
        self._started = time.monotonic()
        self._drawn = 0.0
        self._done: int | None = None
        self._stage = ""

    def begin(self) -> None:
        if self._stream is None:
            return
        if self._live:
            self._draw(force=True)
        else:
            size = f" ({_size(self.total)})" if self.total else ""
            self._write(f"pyvmm: {self.what}{size}...\n")

    def advance_to(self, done: int) -> None:
        """``done`` units (bytes) of ``total`` are finished."""
        self._done = done
        self._draw()

    def stage(self, text: str) -> None:
        """The task moved to a named stage (shown on a terminal only)."""
        self._stage = text
        self._draw()

    def end(self) -> None:
        """Erase the live line (once; later calls do nothing)."""
        if self._stream is not None and self._live:
            self._write("\r\x1b[K")
        self._stream = None

    def _draw(self, force: bool = False) -> None:
        if self._stream is None or not self._live:
            return
        now = time.monotonic()
        if not force and now - self._drawn < _REDRAW_S:
            return
        self._drawn = now
        parts = [f"pyvmm: {self.what}"]
        if self._done is not None:
            amount = _size(self._done)
            parts.append(f"{amount} of {_size(self.total)}" if self.total else amount)
        if self._stage:
            parts.append(self._stage)
        parts.append(f"{now - self._started:.0f} s")
        line = ": ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:])
        self._write("\r\x1b[K" + line[:_WIDTH])

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self._stream is not None
            self._stream.write(text)
            self._stream.flush()


@contextlib.contextmanager
def task(what: str, total: int | None = None, stream: TextIO | None = None) -> Iterator[Progress]:
    """Report ``what`` (e.g. ``"downloading linux-image-..."``) while the body runs.

    ``stream`` defaults to stderr; ``total`` is the expected byte count when
    known. The line is erased on a terminal whatever way the body ends.
    """
    if os.environ.get("PYVMM_PROGRESS", "1") == "0":
        stream = None
    elif stream is None:
        stream = sys.stderr
    progress = Progress(what, total, stream)
    progress.begin()
    try:
        yield progress
    finally:
        progress.end()


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    if count < 1_000_000:
        return f"{count / 1e3:.0f} kB"
    return f"{count / 1e6:.1f} MB"
