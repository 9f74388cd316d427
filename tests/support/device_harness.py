"""Fakes shared by the device-model unit tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyvmm.config import parse_rate_limit
from pyvmm.devices.rate_limiter import RateLimiter


class CountingIrq:
    """An IrqTrigger that counts the edges it is given."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class RegisterAccess:
    """One-byte register reads and writes on ``self.dev``, as a guest does."""

    dev: Any

    def rd(self, offset: int) -> int:
        buf = bytearray(1)
        self.dev.read(offset, memoryview(buf))
        return buf[0]

    def wr(self, offset: int, value: int) -> None:
        self.dev.write(offset, memoryview(bytes((value,))))


class FakeClock:
    """A nanosecond clock (``TokenBucket``'s ``clock``) that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * 1_000_000)


def limiter(text: str, clock: Callable[[], int] = time.monotonic_ns) -> RateLimiter:
    """A running limiter from the CLI shorthand (``"ops=2/100ms"``), on ``clock``."""
    built = RateLimiter.from_spec(parse_rate_limit(text), clock)
    assert built is not None
    return built
