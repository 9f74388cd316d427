"""Firecracker's ``rate_limiter`` objects: token buckets, and PUT versus PATCH meaning.

Split from :mod:`pyvmm.api.models` (same rules: one ``parse_*`` per shape,
one-line errors naming the field). Firecracker's ``TokenBucket`` and
``RateLimiter`` take unknown fields silently (no ``deny_unknown_fields``),
and so do these parsers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyvmm.api.fields import Fields
from pyvmm.config import RateLimitSpec, TokenBucketSpec
from pyvmm.devices.rate_limiter import KEEP, LimiterPatch

U64_MAX = (1 << 64) - 1


def _json_or_none(value: Any) -> Any:
    return None if value is None else value.to_json()


@dataclass(frozen=True)
class TokenBucketConfig:
    """One token bucket: ``size`` tokens refilled every ``refill_time`` ms.

    A bucket with ``size`` or ``refill_time`` 0 is *disabled* (Firecracker's
    rule): in a PATCH it removes that limit.
    """

    size: int
    refill_time: int
    one_time_burst: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.refill_time > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "one_time_burst": self.one_time_burst or None,
            "refill_time": self.refill_time,
        }


@dataclass(frozen=True)
class RateLimiterConfig:
    """A ``rate_limiter`` object: a bandwidth (bytes) and an ops bucket.

    In a device's configuration (PUT) an absent bucket means unlimited and
    disabled buckets have been dropped by :meth:`enabled_only`. In a PATCH
    body an absent bucket leaves the device's bucket as it is and a disabled
    one removes it.
    """

    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None

    def enabled_only(self) -> RateLimiterConfig | None:
        """The same limiter without disabled buckets; None if nothing is left."""
        bandwidth = self.bandwidth if self.bandwidth and self.bandwidth.enabled else None
        ops = self.ops if self.ops and self.ops.enabled else None
        if bandwidth is None and ops is None:
            return None
        return RateLimiterConfig(bandwidth, ops)

    def to_spec(self) -> RateLimitSpec | None:
        """The machine config's limit: the enabled buckets (None when nothing is limited)."""
        buckets = [
            TokenBucketSpec(b.size, b.refill_time, b.one_time_burst) if b and b.enabled else None
            for b in (self.bandwidth, self.ops)
        ]
        return RateLimitSpec(*buckets) if any(buckets) else None

    def to_patch(self) -> LimiterPatch:
        """Firecracker's PATCH meaning: an absent bucket stays, a disabled one goes."""
        spec = self.to_spec()
        return LimiterPatch(
            bandwidth=KEEP if self.bandwidth is None else spec.bandwidth if spec else None,
            ops=KEEP if self.ops is None else spec.ops if spec else None,
        )

    @classmethod
    def from_spec(cls, spec: RateLimitSpec | None) -> RateLimiterConfig | None:
        """The API's shape of a configured limit (``GET /vm/config``)."""
        if spec is None:
            return None
        return cls(
            *(
                TokenBucketConfig(b.size, b.refill_time_ms, b.one_time_burst) if b else None
                for b in (spec.bandwidth, spec.ops)
            )
        )

    def to_json(self) -> dict[str, Any]:
        return {"bandwidth": _json_or_none(self.bandwidth), "ops": _json_or_none(self.ops)}


def merge_rate_limiter(
    current: RateLimiterConfig | None, patch: RateLimiterConfig | None
) -> RateLimiterConfig | None:
    """``current`` after a PATCH: absent buckets kept, disabled ones removed."""
    if patch is None:
        return current
    current = current or RateLimiterConfig()
    merged = RateLimiterConfig(
        bandwidth=current.bandwidth if patch.bandwidth is None else patch.bandwidth,
        ops=current.ops if patch.ops is None else patch.ops,
    )
    return merged.enabled_only()


def parse_token_bucket(value: Any, where: str) -> TokenBucketConfig:
    fields = Fields(value, where, ("size", "one_time_burst", "refill_time"), ignore_unknown=True)
    return TokenBucketConfig(
        size=fields.required_integer("size", 0, U64_MAX),
        refill_time=fields.required_integer("refill_time", 0, U64_MAX),
        one_time_burst=fields.integer("one_time_burst", 0, U64_MAX, default=0) or 0,
    )


def parse_rate_limiter(value: Any, where: str) -> RateLimiterConfig | None:
    """A ``rate_limiter`` object as given (disabled buckets kept), or None if null."""
    if value is None:
        return None
    fields = Fields(value, where, ("bandwidth", "ops"), ignore_unknown=True)
    bandwidth = fields.object("bandwidth")
    ops = fields.object("ops")
    return RateLimiterConfig(
        parse_token_bucket(bandwidth, f"{where}.bandwidth") if bandwidth is not None else None,
        parse_token_bucket(ops, f"{where}.ops") if ops is not None else None,
    )
