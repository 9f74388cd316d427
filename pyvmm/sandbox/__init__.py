"""Sandboxes: throw-away microVMs that run commands for their caller; the agent's host side.

The library (:class:`Sandbox`, :class:`SandboxPool`); ``pyvmm exec`` is its
command-line front end (:mod:`pyvmm.cli_exec`, and :mod:`pyvmm.cli_exec_nested`
through a nested host), outside this runtime package as the other front ends are:

- :mod:`~pyvmm.sandbox.sandbox`: :class:`Sandbox` (exec, put, get, pause,
  resume, snapshot, restore, fork); :mod:`~pyvmm.sandbox.pool`:
  :class:`SandboxPool`, restored sandboxes kept paused and ready;
- :mod:`~pyvmm.sandbox.config`: :class:`SandboxConfig`, parsed once;
  :mod:`~pyvmm.sandbox.guest`: the default guest (built by the guest kit in a
  child process: the runtime never imports the tooling) and its kernel command line;
- :mod:`~pyvmm.sandbox.cache`: the snapshot cache and its key;
  :mod:`~pyvmm.sandbox.template`: the first boot that fills it;
  :mod:`~pyvmm.sandbox.launch`: restore or boot, agent, identity;
  :mod:`~pyvmm.sandbox.snapshots`: saved sandboxes and forks;
  :mod:`~pyvmm.sandbox.identity`: what makes clones distinct;
  :mod:`~pyvmm.sandbox.disks`: per-sandbox disk copies (reflink or sparse copy);
  :mod:`~pyvmm.sandbox.workdir`: a sandbox's directory;
- :mod:`~pyvmm.sandbox.runners`, :mod:`~pyvmm.sandbox.vm`,
  :mod:`~pyvmm.sandbox.jailed`: where the VMM runs and how it is confined;
- :mod:`~pyvmm.sandbox.stdin_frames`: stdin framed through a nested host's
  console port (for ``pyvmm exec`` there);
- :mod:`~pyvmm.sandbox.pytest_plugin`: the ``sandbox`` fixture.

The guest agent's host side (``guest/agent/PROTOCOL.md``):

- :mod:`~pyvmm.sandbox.protocol`: the wire format (numbers, frames, fields,
  size caps); :mod:`~pyvmm.sandbox.messages`: the messages of both
  directions (sans-IO); :mod:`~pyvmm.sandbox.connection`: one connection's
  state machine;
- :mod:`~pyvmm.sandbox.tarformat`, :mod:`~pyvmm.sandbox.tarwriter`,
  :mod:`~pyvmm.sandbox.tarsafe`: the tar streams of put and get, the
  receiving side checked as hostile;
- :mod:`~pyvmm.sandbox.client`: :class:`AgentClient`, blocking, over the
  VM's vsock Unix socket (:mod:`~pyvmm.sandbox.vsock_connect`), with
  :mod:`~pyvmm.sandbox.stdin_feed` and :mod:`~pyvmm.sandbox.results`;
- :mod:`~pyvmm.sandbox.errors`: what can go wrong, by whose fault.

:class:`Sandbox` and :class:`SandboxPool` are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.sandbox.client import AgentClient
from pyvmm.sandbox.errors import (
    AgentDisconnected,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    GuestFileNotFoundError,
    GuestOperationError,
    LocalProtocolError,
    OutputLimitError,
    SandboxClosed,
    SandboxError,
    SandboxVmError,
    UnsafeArchiveError,
)
from pyvmm.sandbox.protocol import AGENT_PORT
from pyvmm.sandbox.results import ExecResult, TransferStats

if TYPE_CHECKING:
    from pyvmm.sandbox.config import SandboxConfig, sandbox_config
    from pyvmm.sandbox.pool import SandboxPool
    from pyvmm.sandbox.sandbox import Sandbox

_LAZY = {
    "Sandbox": "pyvmm.sandbox.sandbox",
    "SandboxPool": "pyvmm.sandbox.pool",
    "SandboxConfig": "pyvmm.sandbox.config",
    "sandbox_config": "pyvmm.sandbox.config",
}

__all__ = [
    "AGENT_PORT",
    "AgentClient",
    "AgentDisconnected",
    "AgentProtocolError",
    "AgentTimeout",
    "AgentUnavailable",
    "ExecResult",
    "GuestFileNotFoundError",
    "GuestOperationError",
    "LocalProtocolError",
    "OutputLimitError",
    "Sandbox",
    "SandboxClosed",
    "SandboxConfig",
    "SandboxError",
    "SandboxPool",
    "SandboxVmError",
    "TransferStats",
    "UnsafeArchiveError",
    "sandbox_config",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvmm.sandbox' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
