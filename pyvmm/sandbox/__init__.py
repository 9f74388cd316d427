"""Sandboxes: the host side of the guest agent (``guest/agent``).

- :mod:`~pyvmm.sandbox.protocol`: the wire format (numbers, frames, fields,
  size caps) of ``guest/agent/PROTOCOL.md``; :mod:`~pyvmm.sandbox.messages`:
  the messages of both directions (sans-IO);
- :mod:`~pyvmm.sandbox.connection`: one connection's state machine;
- :mod:`~pyvmm.sandbox.tarformat`, :mod:`~pyvmm.sandbox.tarwriter`,
  :mod:`~pyvmm.sandbox.tarsafe`: the tar streams of put and get, the
  receiving side checked as hostile;
- :mod:`~pyvmm.sandbox.client`: :class:`AgentClient`, blocking, over the
  VM's vsock Unix socket (:mod:`~pyvmm.sandbox.vsock_connect`), with
  :mod:`~pyvmm.sandbox.stdin_feed` and :mod:`~pyvmm.sandbox.results`;
- :mod:`~pyvmm.sandbox.errors`: what can go wrong, by whose fault.
"""

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
    SandboxError,
    UnsafeArchiveError,
)
from pyvmm.sandbox.protocol import AGENT_PORT
from pyvmm.sandbox.results import ExecResult, TransferStats

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
    "SandboxError",
    "TransferStats",
    "UnsafeArchiveError",
]
