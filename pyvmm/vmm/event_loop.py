"""The device event loop: one ``io`` thread, one epoll, one owner per fd.

Everything that waits on a file descriptor subscribes a callback for its fd:
queue kicks (ioeventfds), TAP devices, vsock sockets, console input. Timers
(rate-limiter retries, handshake timeouts) run on the same thread. Other
threads talk to the loop only through :meth:`EventLoop.call_soon`, which
wakes it with an eventfd.

A callback that raises ends the loop, and the error is handed to the loop's
owner (``on_error``, which stops the VM with it): devices never keep running
half-dead behind a loop nobody serves.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import select
import threading
import time
from collections.abc import Callable

from pyvmm.vmm.threads import NO_SETUP, ThreadRole, ThreadSetup, spawn

FdCallback = Callable[[int], None]  # receives the epoll event mask


class EventLoop:
    """An epoll loop with fd subscriptions, timers and a thread-safe wake-up."""

    def __init__(
        self,
        name: str = "pyvmm-io",
        *,
        on_error: Callable[[str], None] | None = None,
        setup: ThreadSetup = NO_SETUP,
    ) -> None:
        """``on_error(message)`` learns why the loop thread died (default: it is logged)."""
        self.name = name
        self._on_error = on_error or (lambda message: None)
        self._setup = setup
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._callbacks: dict[int, FdCallback] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._pending: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._pause_request: threading.Event | None = None
        self._pause_cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add_reader(self, fd: int, callback: FdCallback, events: int = select.EPOLLIN) -> None:
        """Call ``callback(events)`` on the loop thread whenever ``fd`` is ready."""
        self._callbacks[fd] = callback
        self._epoll.register(fd, events)

    def remove_reader(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread after ``delay`` seconds."""
        self.call_soon(
            lambda: heapq.heappush(
                self._timers, (time.monotonic() + delay, next(self._timer_ids), callback)
            )
        )

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread (safe from any thread)."""
        with self._lock:
            self._pending.append(callback)
        os.eventfd_write(self._wake_fd, 1)

    def start(self) -> None:
        self._thread = spawn(
            ThreadRole.IO, self.name, self._run, on_error=self._on_error, setup=self._setup
        )

    def pause(self, timeout: float = 5.0) -> None:
        """Park the loop thread between two rounds; returns once it is parked.

        While paused no callback runs, so no device touches guest memory;
        fd readiness and wake-ups wait in the kernel until :meth:`resume`.
        Raises TimeoutError if a callback keeps the loop busy past ``timeout``.
        """
        if self._thread is None or self._thread is threading.current_thread():
            return
        parked = threading.Event()

        def park() -> None:
            # Wait while *this* pause is the current one: a resume clears it
            # (even if another pause follows at once), and a pause that timed
            # out was cleared before its callback ran.
            with self._pause_cond:
                if self._pause_request is not parked:
                    return
                parked.set()
                while self._pause_request is parked and not self._stopping:
                    self._pause_cond.wait()

        with self._pause_cond:
            self._pause_request = parked
        self.call_soon(park)
        if not parked.wait(timeout):
            self.resume()
            raise TimeoutError(f"the event loop did not pause within {timeout:g} s")

    def resume(self) -> None:
        """Let a paused loop run again."""
        with self._pause_cond:
            self._pause_request = None
            self._pause_cond.notify_all()

    def stop(self) -> None:
        """Stop the loop thread and wait for it; idempotent."""
        self._stopping = True
        with self._pause_cond:
            self._pause_cond.notify_all()
        if self._wake_fd >= 0:
            os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def _run(self) -> None:
        while not self._stopping:
            self._run_once()

    def _run_once(self) -> None:
        timeout = -1.0
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        for fd, events in self._epoll.poll(timeout):
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                continue
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(events)
        with self._lock:
            pending, self._pending = self._pending, []
        for callback in pending:
            callback()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()
