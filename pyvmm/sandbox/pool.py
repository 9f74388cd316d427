"""``SandboxPool``: sandboxes restored ahead of time, paused, handed out in milliseconds.

    from pyvmm.sandbox import SandboxPool

    with SandboxPool(4, memory="256M") as pool:
        with pool.acquire() as sandbox:
            sandbox.exec(["make", "test"])

A refill thread keeps ``size`` sandboxes ready: each one restored from the
configuration's cached snapshot with its own identity (:mod:`pyvmm.sandbox.launch`),
its agent connected, then paused - a paused sandbox costs no CPU and only
the memory its guest touched. :meth:`SandboxPool.acquire` takes the oldest,
resumes it and sets its clock (it stood still while paused), and the refill
thread replaces it. A sandbox acquired is the caller's: closing it throws
it away, it never returns to the pool.

When the refill fails (the guest does not boot, the host is out of memory)
the error is kept: an :meth:`acquire` that finds nothing ready raises it
instead of waiting in vain, and the refill retries after a pause that
doubles up to :data:`MAX_BACKOFF` seconds.
"""

from __future__ import annotations

import threading
from collections import deque

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.sandbox.config import SandboxConfig, sandbox_config
from pyvmm.sandbox.errors import SandboxClosed, SandboxError
from pyvmm.sandbox.launch import Launched, launch_cached
from pyvmm.sandbox.runners import choose_runner
from pyvmm.sandbox.sandbox import Sandbox
from pyvmm.sandbox.snapshots import close_launched
from pyvmm.vmm.threads import ThreadRole, spawn

MAX_SIZE = 64
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0


class SandboxPool:
    """Keeps ``size`` paused sandboxes of one configuration ready (see the module docstring)."""

    def __init__(self, size: int, config: SandboxConfig | None = None, **options: object) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
            raise ConfigError(f"a pool holds 1 to {MAX_SIZE} sandboxes, not {size!r}")
        if config is None:
            config = sandbox_config(**options)  # type: ignore[arg-type]
        elif options:
            raise ConfigError("give a SandboxConfig or keyword options, not both")
        if config.fresh_boot:
            raise ConfigError("a pool restores snapshots: fresh_boot does not apply")
        self.size = size
        self.config = config
        self._runner = choose_runner(config)
        self._ready: deque[Launched] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._error: PyvmmError | None = None
        #: Sandboxes handed out, and refills that failed, since the pool was made.
        self.acquired = 0
        self.failures = 0
        self._thread = spawn(ThreadRole.VMM, "pyvmm-pool", self._refill, on_error=self._died)

    @property
    def ready(self) -> int:
        """How many sandboxes wait, paused, right now."""
        with self._cond:
            return len(self._ready)

    def wait_ready(self, count: int | None = None, timeout: float | None = None) -> bool:
        """Wait until ``count`` (default: all) sandboxes are ready; False on timeout.
        Raises the refill's error if it fails meanwhile."""
        wanted = self.size if count is None else min(count, self.size)
        with self._cond:
            done = self._cond.wait_for(
                lambda: len(self._ready) >= wanted or self._closed or self._error, timeout
            )
            if self._error is not None and len(self._ready) < wanted:
                raise self._error
            return bool(done) and len(self._ready) >= wanted

    def acquire(self, timeout: float | None = None) -> Sandbox:
        """A running sandbox, fresh from the pool (waiting up to ``timeout`` for one)."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._closed or self._error, timeout)
            if self._closed:
                raise SandboxClosed("the sandbox pool is closed")
            if not self._ready:
                if self._error is not None:
                    raise SandboxError(f"the pool has no sandbox ready: {self._error}")
                raise SandboxError(f"no sandbox became ready within {timeout:g} s")
            launched = self._ready.popleft()
            self.acquired += 1
            self._cond.notify_all()
        sandbox = Sandbox._adopt(self.config, self._runner, launched, paused=True)
        try:
            sandbox.resume(set_clock=True)
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def close(self) -> None:
        """Stop refilling and throw away the sandboxes still waiting. Idempotent."""
        with self._cond:
            self._closed = True
            waiting = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()
        for launched in waiting:
            close_launched(launched)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the refill thread -------------------------------------------------------------

    def _refill(self) -> None:
        backoff = FIRST_BACKOFF
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or len(self._ready) < self.size)
                if self._closed:
                    return
            try:
                launched = launch_cached(self.config, self._runner, paused=True)
            except PyvmmError as exc:
                with self._cond:
                    self._error = exc
                    self.failures += 1
                    self._cond.notify_all()
                    if self._cond.wait_for(lambda: self._closed, backoff):
                        return
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = FIRST_BACKOFF
            with self._cond:
                if not self._closed:
                    self._ready.append(launched)
                    self._error = None
                    self._cond.notify_all()
                    continue
            close_launched(launched)
            return

    def _died(self, message: str) -> None:
        """The refill thread itself failed (a bug): acquire() reports it from now on."""
        with self._cond:
            self._error = SandboxError(f"the pool's refill thread failed: {message}")
            self._cond.notify_all()
