"""Token buckets and rate limiters, driven by a fake nanosecond clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.config import RateLimitSpec, TokenBucketSpec
from pyvmm.devices.rate_limiter import LimiterPatch, RateLimiter, TokenBucket
from pyvmm.errors import ConfigError
from tests.support.device_harness import FakeClock

MS = 1_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- TokenBucket -------------------------------------------------------------------


def test_starts_full_and_refills_linearly(clock: FakeClock) -> None:
    bucket = TokenBucket(1000, 100, clock=clock)
    assert bucket.consume(1000)
    assert not bucket.consume(1)
    clock.advance_ms(10)  # a tenth of the refill time: 100 tokens
    assert bucket.budget == 100
    assert not bucket.consume(101)
    assert bucket.consume(100)
    clock.advance_ms(1000)  # refill caps at size
    assert bucket.budget == 1000


def test_fractional_refill_is_not_lost_to_polling(clock: FakeClock) -> None:
    bucket = TokenBucket(3, 1000, clock=clock)  # one token every 333.33 ms
    assert bucket.consume(3)
    for _ in range(1000):  # poll every millisecond for a second
        clock.advance_ms(1)
        bucket.budget  # noqa: B018 (refills)
    assert bucket.budget == 3


def test_all_or_nothing(clock: FakeClock) -> None:
    bucket = TokenBucket(10, 1000, clock=clock)
    assert bucket.consume(7)
    assert not bucket.consume(4)
    assert bucket.budget == 3
    assert bucket.consume(3)


def test_one_time_burst_is_spent_first_and_never_refills(clock: FakeClock) -> None:
    bucket = TokenBucket(10, 1000, one_time_burst=5, clock=clock)
    assert bucket.consume(15)
    assert bucket.one_time_burst == 0
    assert not bucket.consume(1)
    clock.advance_ms(5000)
    assert bucket.one_time_burst == 0
    assert bucket.consume(10)
    assert not bucket.consume(1)


def test_oversized_request_waits_for_a_full_bucket_then_goes_into_debt(clock: FakeClock) -> None:
    bucket = TokenBucket(10, 1000, clock=clock)
    assert bucket.consume(1)
    assert not bucket.consume(25)  # not full
    assert bucket.time_until(25) == pytest.approx(0.1)
    clock.advance_ms(100)
    assert bucket.consume(25)  # full: allowed, 15 tokens of debt
    assert bucket.budget == -15
    assert bucket.time_until(1) == pytest.approx(1.6)
    assert bucket.consume(0)  # zero always goes through
    clock.advance_ms(1500)
    assert not bucket.consume(1)
    clock.advance_ms(100)
    assert bucket.consume(1)


def test_time_until_is_exact_enough_for_a_retry_timer(clock: FakeClock) -> None:
    bucket = TokenBucket(3, 1000, clock=clock)
    assert bucket.consume(3)
    wait = bucket.time_until(1)
    assert wait == pytest.approx(1 / 3, abs=1e-9)
    clock.now += round(wait * 1e9)
    assert bucket.consume(1)
    assert bucket.time_until(0) == 0.0
    clock.advance_ms(2000)
    assert bucket.time_until(3) == 0.0


def test_time_until_counts_the_remaining_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(10, 1000, one_time_burst=4, clock=clock)
    assert bucket.consume(10)  # 4 from the burst, 6 from the budget
    assert bucket.one_time_burst == 0 and bucket.budget == 4
    assert bucket.time_until(10) == pytest.approx(0.6)


def test_replenish_refunds_the_burst_first_and_caps_at_size(clock: FakeClock) -> None:
    bucket = TokenBucket(10, 1000, one_time_burst=5, clock=clock)
    assert bucket.consume(12)
    assert bucket.one_time_burst == 0 and bucket.budget == 3
    bucket.replenish(7)
    assert bucket.one_time_burst == 5 and bucket.budget == 5
    bucket.replenish(100)
    assert bucket.one_time_burst == 5 and bucket.budget == 10


def test_save_restore_round_trip(clock: FakeClock) -> None:
    bucket = TokenBucket(10, 1000, one_time_burst=5, clock=clock)
    assert bucket.consume(8)
    clock.advance_ms(150)  # 1.5 tokens
    state = bucket.save()
    other = FakeClock()
    other.now = 10**12
    restored = TokenBucket.restore(state, clock=other)
    assert restored.save() == state
    other.advance_ms(50)  # half a token more makes budget 9 (7 + 1.5 + 0.5)
    assert restored.budget == 9


def test_restore_rejects_a_corrupt_state(clock: FakeClock) -> None:
    from dataclasses import replace

    state = TokenBucket(10, 1000, clock=clock).save()
    with pytest.raises(ConfigError):
        TokenBucket.restore(replace(state, scaled_budget=state.scaled_budget + 1))
    with pytest.raises(ConfigError):
        TokenBucket.restore(replace(state, one_time_burst=1))


@pytest.mark.parametrize(
    ("args", "field"),
    [((0, 1000), "size"), ((10, 0), "refill_time"), ((10, 1, -1), "one_time_burst")],
)
def test_bucket_rejects_bad_parameters(args: tuple[int, ...], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        TokenBucket(*args)


def test_negative_requests_are_programming_errors(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        TokenBucket(10, 1000, clock=clock).consume(-1)


# --- RateLimiter ------------------------------------------------------------------


def test_limiter_takes_from_both_buckets_or_neither(clock: FakeClock) -> None:
    limiter = RateLimiter(TokenBucket(100, 1000, clock=clock), TokenBucket(2, 1000, clock=clock))
    assert limiter.consume(40)
    assert limiter.consume(40)
    assert not limiter.consume(10)  # bandwidth has 20, ops has none
    assert limiter.bandwidth is not None and limiter.bandwidth.budget == 20
    assert limiter.retry_after(10) == pytest.approx(0.5)
    assert not limiter.consume(30, ops=0)  # ops is fine, bandwidth is not
    assert limiter.ops is not None and limiter.ops.budget == 0
    assert limiter.retry_after(30, ops=0) == pytest.approx(0.1)
    clock.advance_ms(500)
    assert limiter.consume(10)


def test_unlimited_limiter_always_allows() -> None:
    limiter = RateLimiter()
    assert limiter.unlimited
    assert limiter.consume(10**12, ops=10**6)
    assert limiter.retry_after(10**12) == 0.0


def test_limiter_save_restore(clock: FakeClock) -> None:
    limiter = RateLimiter(TokenBucket(100, 1000, clock=clock), None)
    assert limiter.consume(60)
    restored = RateLimiter.restore(limiter.save(), clock=clock)
    assert restored.ops is None
    assert not restored.consume(41)
    assert restored.consume(40)


# --- configuration -------------------------------------------------------------------


def test_from_spec_builds_full_buckets(clock: FakeClock) -> None:
    spec = RateLimitSpec(TokenBucketSpec(1000, 100, one_time_burst=500), TokenBucketSpec(10, 1000))
    limiter = RateLimiter.from_spec(spec, clock)
    assert limiter is not None and limiter.bandwidth is not None and limiter.ops is not None
    assert (limiter.bandwidth.size, limiter.bandwidth.refill_time_ms) == (1000, 100)
    assert limiter.bandwidth.one_time_burst == 500
    assert (limiter.ops.size, limiter.ops.one_time_burst) == (10, 0)
    assert limiter.bandwidth.budget == 1000
    assert RateLimiter.from_spec(None) is None


def test_a_patch_keeps_absent_buckets_with_their_budget(clock: FakeClock) -> None:
    """Firecracker's PATCH: an absent bucket stays (budget too), a disabled one goes."""
    spec = RateLimitSpec(TokenBucketSpec(1000, 1000), TokenBucketSpec(10, 1000))
    limiter = RateLimiter.from_spec(spec, clock)
    assert limiter is not None and limiter.consume(600, 4)
    patch = LimiterPatch(ops=TokenBucketSpec(50, 100))
    patched = patch.apply(limiter, clock)
    assert patched is not None and patched.bandwidth is limiter.bandwidth
    assert patched.bandwidth.budget == 400 and patched.ops.budget == 50
    assert patch.apply_to_spec(spec) == RateLimitSpec(spec.bandwidth, TokenBucketSpec(50, 100))
    removed = LimiterPatch(bandwidth=None, ops=None)
    assert removed.apply(limiter, clock) is None and removed.apply_to_spec(spec) is None
    assert LimiterPatch().apply_to_spec(spec) == spec
    assert LimiterPatch(ops=None).apply_to_spec(None) is None


# --- the guarantee ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 5000),
    refill_ms=st.integers(1, 2000),
    burst=st.integers(0, 5000),
    steps=st.lists(
        st.tuples(st.integers(0, 3 * 10**9), st.integers(0, 12000)), min_size=1, max_size=60
    ),
)
def test_consumption_never_beats_the_rate(
    size: int, refill_ms: int, burst: int, steps: list[tuple[int, int]]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(size, refill_ms, one_time_burst=burst, clock=clock)
    consumed = 0
    largest_excess = 0
    for delay_ns, n in steps:
        clock.now += delay_ns
        burst_before = bucket.one_time_burst
        if bucket.consume(n):
            consumed += n
            largest_excess = max(largest_excess, n - burst_before - size)
        # size tokens per refill_ms: rate * elapsed = size * elapsed_ns / refill_ns
        allowed = size + burst + size * clock.now / (refill_ms * MS) + largest_excess
        assert consumed <= allowed + 1e-6
    if largest_excess == 0:  # no oversized request: strictly within the rate
        assert consumed <= size + burst + size * clock.now / (refill_ms * MS) + 1e-6


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(1, 1000),
    refill_ms=st.integers(1, 1000),
    used=st.integers(0, 2000),
    want=st.integers(1, 3000),
)
def test_time_until_is_enough_and_not_too_much(
    size: int, refill_ms: int, used: int, want: int
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(size, refill_ms, clock=clock)
    bucket.consume(used)
    wait_ns = round(bucket.time_until(want) * 1e9)
    if wait_ns > 1:
        clock.now += wait_ns - 2
        assert not bucket.can_consume(want)
        clock.now += 2
    else:
        clock.now += wait_ns
    assert bucket.consume(want)
