"""Sandboxes: the host side of the guest agent (``guest/agent``).

- :mod:`~pyvmm.sandbox.protocol`: frames and messages (sans-IO), the numbers
  of ``guest/agent/PROTOCOL.md``;
- :mod:`~pyvmm.sandbox.connection`: one connection's state machine;
- :mod:`~pyvmm.sandbox.tarformat`, :mod:`~pyvmm.sandbox.tarwriter`,
  :mod:`~pyvmm.sandbox.tarsafe`: the tar streams of put and get, the
  receiving side checked as hostile;
- :mod:`~pyvmm.sandbox.client`: :class:`AgentClient`, blocking, over the
  VM's vsock Unix socket;
- :mod:`~pyvmm.sandbox.errors`: what can go wrong, by whose fault.
"""

from pyvmm.sandbox.client import AgentClient, ExecResult, TransferStats
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
