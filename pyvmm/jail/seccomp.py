"""Seccomp for a front end: which filters, compiled once, and what a fault does.

Front ends call :func:`make_setup` early, before any thread is started:

- ``pyvmm-firecracker``/``pyvmm serve``/``pyvmm run`` (and a jailed VMM):
  ``FaultPolicy.EXIT`` - a denied call ends the process with status 148;
- a library :class:`~pyvmm.microvm.MicroVM`: ``FaultPolicy.STOP_VM`` - the
  call fails with EPERM and only that VM stops.

The returned :class:`~pyvmm.jail.thread_setup.SeccompSetup` is passed down
to every thread pyvmm starts (``spawn(..., setup=...)``), and the front end
calls ``setup.enter(ThreadRole.VMM)`` on its main thread once it is done
with trusted set-up (flags, config file), before it serves anything.
Measured on this host: compiling the four default filters takes about 7 ms,
entering a role (one ``seccomp()``) about 0.1 ms.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from pyvmm.jail import faults
from pyvmm.jail.default_filters import DEFAULT_FILTERS
from pyvmm.jail.faults import FaultPolicy
from pyvmm.jail.filter_file import Filter, parse_filters, read_filter_file
from pyvmm.jail.thread_setup import SeccompSetup

_M_ARENA_MAX = -8

__all__ = ["FaultPolicy", "default_filters", "load_filters", "make_setup", "precompile_defaults"]


_DEFAULTS = "pyvmm's default seccomp filters"


def default_filters() -> dict[str, Filter]:
    return dict(_parsed_defaults())


@functools.cache
def _parsed_defaults() -> dict[str, Filter]:
    """Parsed once per process (a process forked from a warm one never parses them)."""
    return parse_filters(DEFAULT_FILTERS, _DEFAULTS)


def precompile_defaults() -> None:
    """Compile the default filters now: a process forked after this (the fork server's
    VM processes) starts with them compiled."""
    _compiled_defaults()


@functools.cache
def _compiled_defaults() -> dict[str, bytes]:
    """The default filters as BPF, compiled once per process (immutable bytes)."""
    return SeccompSetup.compile(_parsed_defaults(), _DEFAULTS).programs()


def load_filters(path: str | os.PathLike[str] | None) -> dict[str, Filter]:
    """The filters in ``path`` (Firecracker's JSON format), or pyvmm's defaults."""
    return default_filters() if path is None else read_filter_file(Path(path))


def make_setup(filter_file: str | os.PathLike[str] | None, policy: FaultPolicy) -> SeccompSetup:
    """Compile the filters, install the SIGSYS handler; nothing is filtered yet.

    Raises :class:`~pyvmm.errors.ConfigError` (one line) for a bad file.
    """
    if filter_file is None:
        setup = SeccompSetup(_compiled_defaults())
    else:
        setup = SeccompSetup.compile(read_filter_file(Path(filter_file)), repr(str(filter_file)))
    _fix_malloc_arena_limit()
    faults.install_handler(policy)
    return setup


def _fix_malloc_arena_limit() -> None:
    """Set glibc's arena limit now, so no confined thread has to compute it later.

    The first thread that needs a new malloc arena once 8 exist makes glibc
    read ``/sys/devices/system/cpu/online`` (seen in the measured traces): a
    confined vCPU thread may not open files. ``M_ARENA_MAX`` set to glibc's
    own default (8 per CPU) removes that read without changing behaviour.
    """
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, 8 * (os.cpu_count() or 1))
