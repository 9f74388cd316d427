"""L1's QEMU as a child process: started so it cannot outlive us, ended in bounded time.

Why: a nested host must never leave a QEMU behind, whichever way pyvmm
ends. QEMU gets its own session (a terminal's Ctrl-C reaches pyvmm, which
then stops L1 in order) and SIGKILL when its parent dies (a killed test run
leaves no orphan). Ending it is SIGTERM, then SIGKILL, each wait bounded.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import BinaryIO

from pyvmm.nested.errors import NestedBootError

TERM_WAIT_S = 3.0
_KILL_WAIT_S = 10.0


def spawn(argv: Sequence[str], log: BinaryIO, name: str) -> subprocess.Popen[bytes]:
    """Start QEMU (``argv``) with stdout and stderr going to ``log`` (an open file).

    ``name`` is the program's name for the error message.
    """
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, not QEMU
            preexec_fn=parent_death_signal(),
        )
    except OSError as exc:
        raise NestedBootError(f"cannot start {name}: {exc}") from exc


def end(process: subprocess.Popen[bytes], term_wait: float = TERM_WAIT_S) -> None:
    """SIGTERM, then SIGKILL if QEMU does not exit within ``term_wait`` s; reap it."""
    if process.poll() is None:
        with contextlib.suppress(OSError):
            process.terminate()
        try:
            process.wait(term_wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_KILL_WAIT_S)


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies.

    So a killed test run leaves no orphaned QEMU behind. libc is loaded here,
    before the fork, so the child only makes one call.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return preexec
