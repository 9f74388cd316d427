"""Firecracker-style metrics: one JSON object per line, flushed periodically and on demand.

Like Firecracker's ``--metrics-path``/``PUT /metrics``, each line is a
snapshot of nested groups (``api_server``, ``vcpu``, ``block``, ``net``,
...) with ``utc_timestamp_ms``. Counters are *deltas since the previous
line*, as Firecracker's ``SharedIncMetric`` writes them, so a reader sums
lines; values under ``latencies_us`` are the latest measurement (gauges).

The writer knows nothing about VMs: it is given ``sources``, callables
that each return a nested dict of ints, and merges them. A flush runs on
whichever thread asks (``FlushMetrics``) or on the writer's own periodic
thread (``pyvmm-metrics``); a lock keeps lines whole and deltas right.
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = _open_metrics_file(self.path)
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

    def start(self) -> None:
        """Flush every ``interval`` seconds on a ``pyvmm-metrics`` thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pyvmm-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        """Write a last line, stop the thread and close the file; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
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
