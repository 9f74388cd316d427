"""The boot-timer device: the guest tells us when it has finished booting.

Firecracker-compatible: a guest init (or a probe guest) writes the byte
``layout.BOOT_TIMER_MAGIC`` (123) at offset 0 of the MMIO window at
``layout.BOOT_TIMER_ADDR``, and the VMM logs how long it took since the VMM
started, so boot time is measured by the guest's own clock-free signal
instead of by scraping the console.

Only the first magic write is recorded and logged: the number of interest is
the time to the *first* "boot complete", and a guest writing the magic in a
loop must not be able to flood the host's log. Every write is still counted
in :attr:`BootTimer.writes`, which makes the device a cheap, side-effect-free
MMIO target for exit-latency benchmarks. Reads return zero.

The clock and the log sink are injected so tests need neither real time nor
log capture. Writes may come from any vCPU thread, so the counter and the
record are updated under a lock; the log call happens after releasing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm import layout

_logger = logging.getLogger("pyvmm.boot_timer")

_ZEROS = tuple(bytes(n) for n in range(9))


@dataclass(frozen=True)
class BootTimerState:
    """The boot-timer's state as plain values (``boot_time_ns`` None: not yet)."""

    writes: int
    boot_time_ns: int | None


def format_boot_time(boot_time_ns: int) -> str:
    """The log line, in Firecracker's format (microseconds, then milliseconds)."""
    return f"Guest-boot-time = {boot_time_ns // 1000:>6} us {boot_time_ns // 1_000_000} ms"


class BootTimer:
    """Records the guest's boot-complete signal; see the module docstring."""

    def __init__(
        self,
        start_ns: int,
        clock: Callable[[], int] = time.monotonic_ns,
        log: Callable[[str], object] | None = None,
    ) -> None:
        """``start_ns`` is ``clock()`` when the VMM started (the zero of boot time).

        ``log`` defaults to INFO on the ``pyvmm.boot_timer`` logger.
        """
        self._start_ns = start_ns
        self._clock = clock
        self._log = log if log is not None else _logger.info
        self._lock = threading.Lock()
        self.writes = 0
        self.boot_time_ns: int | None = None

    def read(self, offset: int, data: memoryview) -> None:
        """Reads return zero (the guest has nothing to learn from us)."""
        size = len(data)
        data[:] = _ZEROS[size] if size <= 8 else bytes(size)

    def write(self, offset: int, data: memoryview) -> None:
        """Count the write; record the boot time on the first magic byte at offset 0."""
        with self._lock:
            self.writes += 1
            if (
                offset != 0
                or not data
                or data[0] != layout.BOOT_TIMER_MAGIC
                or self.boot_time_ns is not None
            ):
                return
            elapsed = self._clock() - self._start_ns
            self.boot_time_ns = elapsed
        self._log(format_boot_time(elapsed))

    def save(self) -> BootTimerState:
        with self._lock:
            return BootTimerState(writes=self.writes, boot_time_ns=self.boot_time_ns)

    def restore(self, state: BootTimerState) -> None:
        """Load ``state``; ``start_ns`` stays this process's own (clocks differ)."""
        if not isinstance(state.writes, int) or state.writes < 0:
            raise ValueError(f"boot timer state: writes={state.writes!r}")
        if state.boot_time_ns is not None and not isinstance(state.boot_time_ns, int):
            raise ValueError(f"boot timer state: boot_time_ns={state.boot_time_ns!r}")
        with self._lock:
            self.writes = state.writes
            self.boot_time_ns = state.boot_time_ns
