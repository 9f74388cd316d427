"""Lifecycle names shared by :mod:`pyvmm.vmm.machine` and :mod:`pyvmm.snapshot`.

Kept apart so the snapshot orchestration can use them without importing
the machine module that inherits it.
"""

from __future__ import annotations

import enum

# How long pausing (or parking freshly restored vCPUs) may take before it is a host error.
PAUSE_TIMEOUT = 5.0


class VmState(enum.Enum):
    """Where a machine is in its lifecycle (Firecracker's names, for its API)."""

    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"
