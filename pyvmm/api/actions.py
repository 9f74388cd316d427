"""The hand-off of API requests from the API threads to the VMM thread.

Firecracker's shape: the API thread parses a request and forwards it; the
VMM thread acts on it, one request at a time, and hands the answer back.
pyvmm keeps that split for everything that changes the VM or its
configuration, for three reasons:

- a query (``GET /``, ``GET /vm/config``, ``GET /machine-config``...) is
  answered on the API thread and never waits behind a long action (a
  snapshot of 4 GiB, a boot);
- a long action runs on the main thread, where Python delivers signals, so
  SIGTERM interrupts it (the serving loop turns it into a cancellation)
  instead of waiting for it to finish;
- the API threads never build VMs, so their seccomp filter only needs what
  serving HTTP needs (``api`` in :mod:`pyvmm.jail.default_filters`).

:class:`ActionQueue` is that hand-off: :meth:`~ActionQueue.call` (any
thread) queues a callable and waits for its result; :meth:`~ActionQueue.run_pending`
(the VMM thread) runs what is queued. :class:`InlineActions` runs the
callable on the caller's thread, for library use and unit tests where
there is no serving loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class ActionCancelledError(BaseException):
    """The VMM is stopping: a queued or running action will not complete.

    A BaseException, as KeyboardInterrupt is: raised by the signal handler in
    the middle of an action, it must unwind through the action's cleanup
    (every builder and snapshot writer cleans up on BaseException) and not
    be taken for the action's own failure by an ``except Exception``.
    """


class Actions(Protocol):
    """Where the router runs the requests that act on the VM."""

    def call(self, action: Callable[[], T]) -> T: ...


class InlineActions:
    """Runs each action on the calling thread (no serving loop: library use, unit tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def call(self, action: Callable[[], T]) -> T:
        with self._lock:
            return action()


class _Pending(Generic[T]):
    """One queued action and, once it ran, its outcome."""

    def __init__(self, action: Callable[[], T]) -> None:
        self.action = action
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.action()
        except BaseException as error:  # handed to the waiting thread, which re-raises it
            self.error = error
        finally:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class ActionQueue:
    """Actions queued by API threads, run one at a time on the VMM thread.

    ``call`` blocks its (API) thread until the action ran; an action that
    raises re-raises in the caller. After :meth:`close` every queued and
    future action fails with :class:`ActionCancelledError`.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Pending[object]] = queue.SimpleQueue()
        self._closed = threading.Event()
        self.running: _Pending[object] | None = None

    def call(self, action: Callable[[], T]) -> T:
        if self._closed.is_set():
            raise ActionCancelledError("the VMM is stopping")
        pending: _Pending[T] = _Pending(action)
        self._queue.put(pending)  # type: ignore[arg-type]
        if self._closed.is_set():  # closed while queueing: nobody will run it
            self._drain()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    def run_pending(self, timeout: float) -> bool:
        """Run queued actions (on the VMM thread), waiting up to ``timeout`` for the first.

        Returns whether one ran. A BaseException that escapes an action
        (the cancellation a signal raises) is handed to its caller, then
        re-raised here so the serving loop stops.
        """
        try:
            pending = self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        while True:
            self.running = pending
            try:
                pending.run()
            finally:
                self.running = None
                if not pending.done.is_set():  # interrupted before it could even start
                    pending.fail(ActionCancelledError("the VMM is stopping"))
            if pending.error is not None and not isinstance(pending.error, Exception):
                raise pending.error
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return True

    def close(self) -> None:
        """Refuse new actions and fail the queued ones (the VMM is stopping)."""
        self._closed.set()
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return
            pending.fail(ActionCancelledError("the VMM is stopping"))
