"""The L1 boot watchdog: wait for L1's agent, and tell a stalled boot from a slow one.

Why: L1 boots under QEMU-TCG in 2-20 s, and about once in a dozen boots
its kernel stops early and never goes on (seen at ``Loading compiled-in
X.509 certificates``, 0.88 s of guest time). A normal boot prints a console
line every second or two, so a console that stops growing for
``stall_timeout`` seconds means a stall: :func:`wait_until_ready` raises
:class:`Stalled` and the host boots L1 once more, well before the overall
boot timeout. While it waits, each new console line is reported as the
boot's progress.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pyvmm.nested.console_log import last_line, progress_line
from pyvmm.nested.errors import NestedBootError

#: How long an L1 may take from QEMU's start to its agent's ``ready``.
DEFAULT_BOOT_TIMEOUT_S = 120.0
#: An L1 that prints nothing on its console for this long while it boots is
#: stuck (a normal boot prints a line at least every second or two).
DEFAULT_STALL_S = 20.0
#: Boots tried before giving up on a stalling L1 (the first, and one retry).
BOOT_ATTEMPTS = 2
_POLL_S = 0.05


class Stalled(Exception):
    """L1's console stopped moving while it booted (the caller may boot it once more)."""


def exited(process: subprocess.Popen[bytes] | None) -> str:
    """How L1 ended, for an error message."""
    code = process.returncode if process is not None else None
    return f"L1 (QEMU) exited with status {code}"


def wait_until_ready(
    process: subprocess.Popen[bytes],
    console_log: Path,
    ready: Path,
    *,
    started: float,
    boot_timeout: float,
    stall_timeout: float,
    stage: Callable[[str], None],
    explain: Callable[[str], str],
) -> None:
    """Wait until ``ready`` exists; :class:`Stalled` when the console stops moving.

    ``started`` is QEMU's start (``time.monotonic()``); ``stage`` receives
    each new console line; ``explain`` adds L1's logs to an error message.
    Raises :class:`~pyvmm.nested.errors.NestedBootError` when QEMU exits or
    ``boot_timeout`` passes.
    """
    deadline = started + boot_timeout
    size, moved = 0, time.monotonic()
    while not ready.exists():
        if process.poll() is not None:
            raise NestedBootError(explain(exited(process)))
        now = time.monotonic()
        try:
            current = console_log.stat().st_size
        except OSError:
            current = size
        if current != size:
            size, moved = current, now
            stage(progress_line(console_log))
        elif now - moved > stall_timeout:
            raise Stalled(
                f"no console output for {stall_timeout:g} s after "
                f"{last_line(console_log) or 'starting'!r}"
            )
        if now > deadline:
            raise NestedBootError(explain(f"L1 did not boot within {boot_timeout:g} s"))
        time.sleep(_POLL_S)
