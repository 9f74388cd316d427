"""Firecracker-style metrics: one JSON object per line, flushed periodically and on demand.

Like Firecracker's ``--metrics-path``/``PUT /metrics``, each line is a
snapshot of nested groups (``api_server``, ``vcpu``, ``block``, ``net``,
...) with ``utc_timestamp_ms``. Counters are *deltas since the previous
line*, as Firecracker's ``SharedIncMetric`` writes them, so a reader sums
lines; values under ``latencies_us`` are the latest measurement (gauges).

Every line carries Firecracker's groups and names (:data:`FIRECRACKER_GROUPS`,
zero where pyvmm has nothing to count), so a reader written for
Firecracker's lines (Kata Containers' metrics FIFO) finds what it expects;
pyvmm's own counters (per-device groups, exit kinds) come on top.

The writer knows nothing about VMs: it is given ``sources``, callables
that each return a nested dict of ints, and merges them. A flush runs on
whichever thread asks (``FlushMetrics``) or when the serving loop finds one
due (:meth:`MetricsWriter.flush_if_due`, every ``interval``); a lock keeps
lines whole and deltas right. It starts no thread of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pyvmm.errors import ConfigError

#: Firecracker writes metrics every 60 seconds.
DEFAULT_INTERVAL_S = 60.0
GAUGE_GROUPS = frozenset({"latencies_us"})

MetricsSource = Callable[[], Mapping[str, Any]]


def _zeros(*names: str) -> dict[str, int]:
    return dict.fromkeys(names, 0)


_API = ("actions", "boot_source", "drive", "logger", "machine_cfg", "cpu_cfg", "metrics",
        "network", "mmds", "vsock", "pmem", "serial", "hotplug_memory")  # fmt: skip
#: Firecracker's metric groups and the names in each (its metrics.rs), as zeros.
FIRECRACKER_GROUPS: dict[str, dict[str, int]] = {
    "api_server": _zeros("process_startup_time_us", "process_startup_time_cpu_us"),
    "deprecated_api": _zeros("deprecated_http_api_calls"),
    "get_api_requests": _zeros(
        "instance_info_count", "machine_cfg_count", "mmds_count", "vmm_version_count",
        "hotplug_memory_count",
    ),
    "put_api_requests": _zeros(*(f"{n}_{k}" for n in _API for k in ("count", "fails"))),
    "patch_api_requests": _zeros(
        *(f"{n}_{k}" for n in ("drive", "network", "machine_cfg", "mmds", "hotplug_memory",
                               "pmem") for k in ("count", "fails"))
    ),
    "logger": _zeros("missed_metrics_count", "metrics_fails", "missed_log_count",
                     "rate_limited_log_count"),
    "mmds": _zeros("rx_accepted", "rx_accepted_err", "rx_accepted_unusual", "rx_bad_eth",
                   "rx_invalid_token", "rx_no_token", "rx_count", "tx_bytes", "tx_count",
                   "tx_errors", "tx_frames", "connections_created", "connections_destroyed"),
    "seccomp": _zeros("num_faults"),
    "signals": _zeros("sigbus", "sigsegv", "sigxfsz", "sigxcpu", "sigpipe", "sighup", "sigill"),
    "vcpu": _zeros("exit_io_in", "exit_io_out", "exit_mmio_read", "exit_mmio_write",
                   "failures", "kvmclock_ctrl_fails"),
    "vmm": _zeros("panic_count"),
}  # fmt: skip


def _deltas(current: Mapping[str, Any], previous: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with every int replaced by its change since ``previous``."""
    out: dict[str, Any] = {}
    for key, value in current.items():
        if isinstance(value, Mapping):
            if key in GAUGE_GROUPS:
                out[key] = dict(value)
            else:
                before = previous.get(key)
                out[key] = _deltas(value, before if isinstance(before, Mapping) else {})
        elif isinstance(value, int) and not isinstance(value, bool):
            before = previous.get(key, 0)
            out[key] = value - before if isinstance(before, int) else value
        else:
            out[key] = value
    return out


def _merge(into: dict[str, Any], more: Mapping[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


class MetricsWriter:
    """Writes metrics lines to a file or FIFO at ``path``; see the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        sources: list[MetricsSource] | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._sources = list(sources or [])
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._previous: dict[str, Any] = {}
        self._fd = _open_metrics_file(self.path)
        self._next_due = time.monotonic() + interval
        self.lines_written = 0

    def add_source(self, source: MetricsSource) -> None:
        with self._lock:
            self._sources.append(source)

    def flush(self) -> None:
        """Write one line now (counters since the last line)."""
        with self._lock:
            if self._fd < 0:
                return
            current: dict[str, Any] = {}
            _merge(current, FIRECRACKER_GROUPS)
            for source in self._sources:
                _merge(current, source())
            line = {"utc_timestamp_ms": int(self._clock() * 1000)}
            line.update(_deltas(current, self._previous))
            self._previous = current
            data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
            # A FIFO nobody reads drops the line, as Firecracker does.
            with contextlib.suppress(BlockingIOError):
                os.write(self._fd, data)
            self.lines_written += 1

    def flush_if_due(self) -> bool:
        """Flush when ``interval`` seconds passed since the last periodic line."""
        now = time.monotonic()
        if now < self._next_due:
            return False
        self._next_due = now + self._interval
        self.flush()
        return True

    def close(self) -> None:
        """Write a last line and close the file; idempotent."""
        if self._fd >= 0:
            self.flush()
            with self._lock:
                os.close(self._fd)
                self._fd = -1


def _open_metrics_file(path: Path) -> int:
    """Append to a regular file (created if missing) or write to a FIFO without blocking."""
    try:
        if path.exists() and stat.S_ISFIFO(path.stat().st_mode):
            # O_RDWR: opening a FIFO with no reader yet must not block or fail.
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open metrics file {str(path)!r}: {exc.strerror}") from None
