"""Token-bucket rate limiters, shaped like Firecracker's ``rate_limiter`` object.

A device back end (block, net) asks its :class:`RateLimiter` before each
request: ``consume(bytes_, ops)`` either takes the tokens from both buckets
and returns True, or takes nothing and returns False, in which case the owner
arms a timer for ``retry_after(bytes_, ops)`` seconds and tries again then.
Nothing here sleeps, reads a clock other than the injected one, or owns a fd.

Bucket semantics (:class:`TokenBucket`)
---------------------------------------
- The bucket holds at most ``size`` tokens and starts full. It refills
  linearly, ``size`` tokens per ``refill_time_ms``; partial tokens are kept
  exactly (integer arithmetic in token-nanoseconds), so no rate is lost to
  rounding however often it is polled.
- ``one_time_burst`` extra tokens are spent first and never refill (only
  :meth:`TokenBucket.replenish` gives them back, up to the initial amount).
- ``consume(n)`` is all or nothing.
- **Oversized requests** (``n`` larger than what the bucket can ever hold,
  after the remaining burst): allowed once the bucket is *full*; the bucket
  then goes into *debt* (a negative budget of ``n - burst - size`` tokens)
  that refills before anything else succeeds. So a 1 MiB write through a
  64 KiB/s bucket waits for a full bucket, goes through, then blocks the
  device for the ~15 s the excess is worth: the long-run rate holds, and a
  request is never refused forever. (Firecracker also lets the request
  through and charges the excess as a wait; we charge it as debt, which is
  the same wait, expressed in tokens.)
- Hence the guarantee, tested with hypothesis: over any run,
  ``consumed <= size + one_time_burst + rate * elapsed + largest excess``,
  where the last term is zero unless an oversized request went through.
- ``consume(0)`` always succeeds, even in debt.

Configuration and state
-----------------------
A limiter is made from a config's :class:`~pyvmm.config.RateLimitSpec`
(:meth:`RateLimiter.from_spec`; the CLI shorthand and Firecracker's JSON are
parsed into specs by their front ends). Its buckets' budgets are state:
:meth:`RateLimiter.save` goes into the device's snapshot state, and a
restored device continues with the budget it had. A running device's
limiter changes through a :class:`LimiterPatch` (Firecracker's PATCH).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvmm.config import RateLimitSpec, TokenBucketSpec
from pyvmm.errors import ConfigError

_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000

Clock = Callable[[], int]


@dataclass(frozen=True)
class TokenBucketState:
    """What :meth:`TokenBucket.save` records (the clock reading is not kept)."""

    size: int
    refill_time_ms: int
    initial_one_time_burst: int
    one_time_burst: int
    #: the budget in token-nanoseconds-per-refill units: tokens * refill_time_ns
    scaled_budget: int


class TokenBucket:
    """``size`` tokens refilling linearly over ``refill_time_ms``; see the module doc."""

    def __init__(
        self,
        size: int,
        refill_time_ms: int,
        one_time_burst: int = 0,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        _check_int("size", size, minimum=1)
        _check_int("refill_time", refill_time_ms, minimum=1)
        _check_int("one_time_burst", one_time_burst, minimum=0)
        self.size = size
        self.refill_time_ms = refill_time_ms
        self.initial_one_time_burst = one_time_burst
        self.one_time_burst = one_time_burst
        self._clock = clock
        self._refill_ns = refill_time_ms * _NS_PER_MS
        self._full = size * self._refill_ns
        # Budget in units of 1/refill_ns tokens: refill over dt ns adds dt * size.
        self._scaled = self._full
        self._last = clock()

    @classmethod
    def from_spec(
        cls, spec: TokenBucketSpec | None, clock: Clock = time.monotonic_ns
    ) -> TokenBucket | None:
        """A full bucket as ``spec`` describes it (None for no bucket)."""
        if spec is None:
            return None
        return cls(spec.size, spec.refill_time_ms, spec.one_time_burst, clock)

    # --- queries -----------------------------------------------------------------

    @property
    def budget(self) -> int:
        """Whole tokens in the bucket now (negative while in debt), burst excluded."""
        self._refill()
        return self._scaled // self._refill_ns

    def time_until(self, n: int) -> float:
        """Seconds until ``consume(n)`` can succeed (0.0 if it can now)."""
        _check_request(n)
        if n == 0:
            return 0.0
        self._refill()
        deficit = self._needed(n) * self._refill_ns - self._scaled
        if deficit <= 0:
            return 0.0
        return -(-deficit // self.size) / _NS_PER_S  # ceil: the retry must succeed

    def can_consume(self, n: int) -> bool:
        """Whether ``consume(n)`` would succeed now (takes nothing)."""
        _check_request(n)
        if n == 0:
            return True
        self._refill()
        return self._scaled >= self._needed(n) * self._refill_ns

    # --- changes ----------------------------------------------------------------

    def consume(self, n: int) -> bool:
        """Take ``n`` tokens (burst first) and return True, or take none and return False."""
        if not self.can_consume(n):
            return False
        from_burst = min(n, self.one_time_burst)
        self.one_time_burst -= from_burst
        self._scaled -= (n - from_burst) * self._refill_ns  # negative only when oversized
        return True

    def replenish(self, n: int) -> None:
        """Give back ``n`` tokens (for a request that was not carried out after all).

        The used part of the one-time burst is refunded first, then the
        budget, which never exceeds ``size``.
        """
        _check_request(n)
        self._refill()
        to_burst = min(n, self.initial_one_time_burst - self.one_time_burst)
        self.one_time_burst += to_burst
        self._scaled = min(self._full, self._scaled + (n - to_burst) * self._refill_ns)

    # --- persistence ---------------------------------------------------------------

    def save(self) -> TokenBucketState:
        self._refill()
        return TokenBucketState(
            size=self.size,
            refill_time_ms=self.refill_time_ms,
            initial_one_time_burst=self.initial_one_time_burst,
            one_time_burst=self.one_time_burst,
            scaled_budget=self._scaled,
        )

    @classmethod
    def restore(cls, state: TokenBucketState, clock: Clock = time.monotonic_ns) -> TokenBucket:
        """A bucket in ``state``; refilling resumes from now (downtime earns nothing)."""
        bucket = cls(state.size, state.refill_time_ms, state.initial_one_time_burst, clock)
        if not 0 <= state.one_time_burst <= state.initial_one_time_burst:
            raise ConfigError("token bucket state: one_time_burst out of range")
        if state.scaled_budget > bucket._full:
            raise ConfigError("token bucket state: budget exceeds the bucket size")
        bucket.one_time_burst = state.one_time_burst
        bucket._scaled = state.scaled_budget
        return bucket

    # --- internals -------------------------------------------------------------

    def _needed(self, n: int) -> int:
        """Budget (whole tokens) that ``consume(n)`` needs: capped at a full bucket."""
        return min(max(n - self.one_time_burst, 0), self.size)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed <= 0:  # a clock that stands still or (wrongly) steps back
            return
        self._last = now
        self._scaled = min(self._full, self._scaled + elapsed * self.size)


@dataclass(frozen=True)
class RateLimiterState:
    bandwidth: TokenBucketState | None
    ops: TokenBucketState | None


class RateLimiter:
    """A bandwidth bucket (bytes) and an ops bucket (requests); None means unlimited."""

    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None):
        self.bandwidth = bandwidth
        self.ops = ops

    def _pairs(self, bytes_: int, ops: int) -> list[tuple[TokenBucket, int]]:
        return [(b, n) for b, n in ((self.bandwidth, bytes_), (self.ops, ops)) if b is not None]

    def consume(self, bytes_: int, ops: int = 1) -> bool:
        """Take from both buckets, or from neither and return False."""
        pairs = self._pairs(bytes_, ops)
        if not all(bucket.can_consume(n) for bucket, n in pairs):
            return False
        for bucket, n in pairs:
            bucket.consume(n)
        return True

    def retry_after(self, bytes_: int, ops: int = 1) -> float:
        """Seconds until ``consume(bytes_, ops)`` can succeed (0.0 if now)."""
        return max((bucket.time_until(n) for bucket, n in self._pairs(bytes_, ops)), default=0.0)

    def replenish(self, bytes_: int, ops: int = 1) -> None:
        for bucket, n in self._pairs(bytes_, ops):
            bucket.replenish(n)

    @property
    def unlimited(self) -> bool:
        return self.bandwidth is None and self.ops is None

    def save(self) -> RateLimiterState:
        return RateLimiterState(
            bandwidth=self.bandwidth.save() if self.bandwidth else None,
            ops=self.ops.save() if self.ops else None,
        )

    @classmethod
    def restore(cls, state: RateLimiterState, clock: Clock = time.monotonic_ns) -> RateLimiter:
        return cls(
            TokenBucket.restore(state.bandwidth, clock) if state.bandwidth else None,
            TokenBucket.restore(state.ops, clock) if state.ops else None,
        )

    @classmethod
    def from_spec(
        cls, spec: RateLimitSpec | None, clock: Clock = time.monotonic_ns
    ) -> RateLimiter | None:
        """The running limiter a config's :class:`~pyvmm.config.RateLimitSpec` describes."""
        if spec is None:
            return None
        return cls(
            TokenBucket.from_spec(spec.bandwidth, clock), TokenBucket.from_spec(spec.ops, clock)
        )


def restore_limiter(state: RateLimiterState | None) -> RateLimiter | None:
    """The limiter a device saved (None: it had none); ValueError if the state is bad."""
    if state is None:
        return None
    try:
        return RateLimiter.restore(state)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class _Keep:
    """The :data:`KEEP` marker's type."""

    def __repr__(self) -> str:
        return "KEEP"


#: In a :class:`LimiterPatch`: leave this bucket as it is.
KEEP = _Keep()


@dataclass(frozen=True)
class LimiterPatch:
    """A change to a running device's limiter, as Firecracker's PATCH bodies mean it.

    Each bucket is :data:`KEEP` (absent from the PATCH: unchanged, its
    budget too), None (a disabled bucket: remove the limit) or the spec of a
    new, full bucket. The same patch applies to the config
    (:meth:`apply_to_spec`) and to the running limiter (:meth:`apply`), so
    the two cannot drift apart.
    """

    bandwidth: TokenBucketSpec | _Keep | None = KEEP
    ops: TokenBucketSpec | _Keep | None = KEEP

    def apply_to_spec(self, current: RateLimitSpec | None) -> RateLimitSpec | None:
        """The configured limit after the patch; None when no bucket is left."""
        bandwidth = self._pick(self.bandwidth, current.bandwidth if current else None)
        ops = self._pick(self.ops, current.ops if current else None)
        if bandwidth is None and ops is None:
            return None
        return RateLimitSpec(bandwidth, ops)

    def apply(
        self, current: RateLimiter | None, clock: Clock = time.monotonic_ns
    ) -> RateLimiter | None:
        """The running limiter after the patch; None when no bucket is left."""
        kept = current or RateLimiter()
        bandwidth = (
            kept.bandwidth
            if isinstance(self.bandwidth, _Keep)
            else TokenBucket.from_spec(self.bandwidth, clock)
        )
        ops = kept.ops if isinstance(self.ops, _Keep) else TokenBucket.from_spec(self.ops, clock)
        if bandwidth is None and ops is None:
            return None
        return RateLimiter(bandwidth, ops)

    @staticmethod
    def _pick(
        patch: TokenBucketSpec | _Keep | None, current: TokenBucketSpec | None
    ) -> TokenBucketSpec | None:
        return current if isinstance(patch, _Keep) else patch


# --- checks ----------------------------------------------------------------------


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field} must be an integer, got {value!r}")
    if value < minimum:
        bound = "positive" if minimum == 1 else f"at least {minimum}"
        raise ConfigError(f"{field} must be {bound}, got {value}")


def _check_request(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"token requests are non-negative integers, got {n!r}")
