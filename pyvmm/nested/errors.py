"""What can go wrong with a nested host, as exception types callers can tell apart.

Why a module of their own: the host (:mod:`pyvmm.nested.host`), the boot
watch (:mod:`pyvmm.nested.boot_watch`) and a running command
(:mod:`pyvmm.nested.command_stream`) all raise them, and callers catch them
without importing the machinery. :mod:`pyvmm.nested.host` re-exports them.
"""

from __future__ import annotations

from pyvmm.errors import HostError


class NestedError(HostError):
    """The nested host failed: L1 did not boot, died, or stopped answering."""


class NestedBootError(NestedError):
    """L1 did not reach its agent loop."""


class NestedTimeoutError(NestedError):
    """A command did not finish in time (it was killed in L1)."""


class NestedStallError(NestedError):
    """L1 stopped making progress while a command ran (its kernel reports a lasting
    soft lockup). Not the command's fault: it may be run again in a new L1."""
