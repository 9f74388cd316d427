"""What can go wrong talking to a guest agent, named by whose fault it is.

Every message is one line that names the problem. The split follows h11:
:class:`AgentProtocolError` is the agent's fault (a hostile or broken guest;
the VMM is never at risk), :class:`LocalProtocolError` is pyvmm's own bug or
a misuse of the client (two threads on one connection), and
:class:`~pyvmm.errors.ConfigError` (not defined here) is the caller's input.
"""

from __future__ import annotations

from pyvmm.errors import GuestError, PyvmmError


class SandboxError(PyvmmError):
    """Base class of the guest-agent errors."""


class AgentUnavailable(SandboxError):
    """No agent answered: the VM's vsock socket is missing, the guest refused
    the port (agent not started yet), or the agent never said HELLO."""


class AgentTimeout(SandboxError):
    """The agent did not answer within the time allowed."""


class AgentDisconnected(SandboxError):
    """The connection ended in the middle of an operation (the guest powered
    off, crashed, or its agent died)."""


class AgentProtocolError(SandboxError, GuestError):
    """The agent sent something the protocol does not allow."""


class UnsafeArchiveError(AgentProtocolError):
    """A tar stream from the agent tried to write outside its destination, or
    exceeded a cap; nothing of it was kept."""


class LocalProtocolError(SandboxError):
    """pyvmm itself tried something the protocol does not allow."""


class OutputLimitError(SandboxError):
    """A command wrote more output than the caller allowed; it was killed."""


class GuestOperationError(SandboxError):
    """The agent reported that an operation failed in the guest.

    ``kind`` is the protocol's error kind name (``not_found``, ``cannot_run``,
    ``bad_request``, ``failed``) and ``errno`` the guest's errno value.
    """

    def __init__(self, message: str, *, kind: str, errno: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = errno


class GuestFileNotFoundError(GuestOperationError):
    """The guest path of a ``get`` (or the parent of a ``put``) does not exist."""


class SandboxVmError(SandboxError):
    """The sandbox's VM failed: it did not boot, its agent never answered, it
    crashed or stopped. The message quotes the end of the guest's console."""


class SandboxClosed(SandboxError):
    """The sandbox was closed; nothing more can run in it."""
