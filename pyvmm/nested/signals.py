"""SIGINT and SIGTERM as an exception, so a nested host is always cleaned up.

A front end that owns a nested host (``pyvmm run`` in one, ``pyvmm nested``)
wraps its work in :func:`signals_raise`: the first SIGINT or SIGTERM raises
:class:`Signalled` in the main thread, which unwinds through the host's
``with`` block or ``finally`` (QEMU stopped, the work directory removed);
further signals are ignored meanwhile, so the clean-up itself is not cut
short. The front end then exits with 128 + the signal's number, as a shell
reports a process killed by it. (``timeout(1)`` sends SIGTERM.)
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Signalled(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Signalled` for the ``with`` block."""

    def handler(signum: int, frame: object) -> None:
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Signalled(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
