"""Firecracker's balloon bodies: ``PUT``/``PATCH /balloon`` and ``PATCH /balloon/statistics``.

Same rules as :mod:`pyvmm.api.models`: one ``parse_*`` per shape, unknown
fields refused, one-line errors naming the field. Free page hinting and
free page reporting (``free_page_hinting``, ``free_page_reporting`` and the
``/balloon/hinting/*`` routes) are refused by name: pyvmm's balloon does
not offer those virtio features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyvmm.api.fields import Fields
from pyvmm.config import BalloonConfig

#: The largest target a u32 page count holds, in MiB.
MAX_AMOUNT_MIB = (1 << 32) // 256 - 1
MAX_STATS_INTERVAL_S = 1 << 16
NO_HINTING = "free page hinting and reporting are not supported by pyvmm's balloon"


@dataclass(frozen=True)
class BalloonResource:
    """``PUT /balloon`` (and ``GET /balloon``): the device as configured."""

    amount_mib: int
    deflate_on_oom: bool
    stats_polling_interval_s: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "amount_mib": self.amount_mib,
            "deflate_on_oom": self.deflate_on_oom,
            "stats_polling_interval_s": self.stats_polling_interval_s,
        }

    def to_config(self) -> BalloonConfig:
        return BalloonConfig(self.amount_mib, self.deflate_on_oom, self.stats_polling_interval_s)

    @classmethod
    def from_config(cls, config: BalloonConfig) -> BalloonResource:
        return cls(config.amount_mib, config.deflate_on_oom, config.stats_polling_interval_s)


def parse_balloon(value: Any, where: str = "balloon") -> BalloonResource:
    fields = Fields(
        value,
        where,
        (
            "amount_mib",
            "deflate_on_oom",
            "stats_polling_interval_s",
            "free_page_hinting",
            "free_page_reporting",
        ),
    )
    for name in ("free_page_hinting", "free_page_reporting"):
        if fields.boolean(name):
            raise fields.error(name, f"is not supported ({NO_HINTING})")
    return BalloonResource(
        amount_mib=fields.required_integer("amount_mib", 0, MAX_AMOUNT_MIB),
        deflate_on_oom=fields.boolean("deflate_on_oom", required=True),
        stats_polling_interval_s=fields.integer(
            "stats_polling_interval_s", 0, MAX_STATS_INTERVAL_S, default=0
        )
        or 0,
    )


def parse_balloon_update(value: Any, where: str = "balloon") -> int:
    """``PATCH /balloon``: the new target, in MiB."""
    return Fields(value, where, ("amount_mib",)).required_integer("amount_mib", 0, MAX_AMOUNT_MIB)


def parse_balloon_stats_update(value: Any, where: str = "balloon/statistics") -> int:
    """``PATCH /balloon/statistics``: the new polling interval, in seconds."""
    fields = Fields(value, where, ("stats_polling_interval_s",))
    return fields.required_integer("stats_polling_interval_s", 0, MAX_STATS_INTERVAL_S)
