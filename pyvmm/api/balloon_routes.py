"""The balloon routes: ``/balloon``, ``/balloon/statistics`` and ``/balloon/hinting/*``.

Registered into :mod:`pyvmm.api.routes`' table on import. Before boot they
change the configuration; after boot ``PATCH /balloon`` sets the running
device's target and ``PATCH /balloon/statistics`` its polling interval
(which cannot turn statistics on or off: the statistics queue exists or not
from boot). Free page hinting is refused by name.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pyvmm.api.balloon import (
    NO_HINTING,
    parse_balloon,
    parse_balloon_stats_update,
    parse_balloon_update,
)
from pyvmm.api.http_protocol import Response
from pyvmm.api.routes import Fault, Router, no_content, route

NO_BALLOON = "Balloon device is not configured (PUT /balloon before starting the microVM)."
NO_STATS = (
    "Balloon statistics are not enabled: stats_polling_interval_s was 0 when the device "
    "was configured."
)


def _configured(router: Router) -> Any:
    balloon = router.resources.balloon
    if balloon is None:
        raise Fault(NO_BALLOON)
    return balloon


@route("GET", "/balloon", "balloon")
def _get_balloon(router: Router, value: Any, path_id: str | None) -> Response:
    return Response(200, _configured(router).to_json())


@route("GET", "/balloon/statistics", "balloon_stats")
def _get_balloon_stats(router: Router, value: Any, path_id: str | None) -> Response:
    if not _configured(router).stats_polling_interval_s:
        raise Fault(NO_STATS)
    router.post_boot()
    stats = router.call("Balloon error: ", router.controller.balloon_stats)
    return Response(200, stats)


@route("PUT", "/balloon", "balloon")
def _put_balloon(router: Router, value: Any, path_id: str | None) -> Response:
    balloon = parse_balloon(value)
    router.pre_boot(boot_specific=True)
    router.resources.set_balloon(balloon)
    return no_content()


@route("PATCH", "/balloon", "balloon")
def _patch_balloon(router: Router, value: Any, path_id: str | None) -> Response:
    amount_mib = parse_balloon_update(value)
    balloon = _configured(router)
    if router.started:
        router.call("Balloon error: ", router.controller.set_balloon_target, amount_mib)
    router.resources.balloon = replace(balloon, amount_mib=amount_mib)
    return no_content()


@route("PATCH", "/balloon/statistics", "balloon_stats")
def _patch_balloon_stats(router: Router, value: Any, path_id: str | None) -> Response:
    interval = parse_balloon_stats_update(value)
    balloon = _configured(router)
    if router.started:
        if (interval == 0) != (balloon.stats_polling_interval_s == 0):
            raise Fault(
                "Balloon error: statistics cannot be turned on or off after boot "
                f"(stats_polling_interval_s is {balloon.stats_polling_interval_s})"
            )
        router.call("Balloon error: ", router.controller.set_balloon_stats_interval, interval)
    router.resources.balloon = replace(balloon, stats_polling_interval_s=interval)
    return no_content()


def _no_hinting(router: Router, value: Any, path_id: str | None) -> Response:
    raise Fault(f"Balloon error: {NO_HINTING}.")


route("PATCH", "/balloon/hinting/start", "balloon_hinting")(_no_hinting)
route("PATCH", "/balloon/hinting/stop", "balloon_hinting")(_no_hinting)
route("GET", "/balloon/hinting/status", "balloon_hinting")(_no_hinting)
