"""What an exec, put or get returns, and how the agent's answers become results or errors."""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.sandbox.errors import GuestFileNotFoundError, GuestOperationError
from pyvmm.sandbox.messages import Exec, Exit, Failure
from pyvmm.sandbox.protocol import ErrorKind


@dataclass(frozen=True)
class ExecResult:
    """How a command ended, shell style.

    ``exit_code`` is the command's status; 128+N if signal N killed it; 124
    if its timeout killed it; 126 if it could not be run and 127 if it was
    not found (``error`` then says why). ``stdout``/``stderr`` are empty
    for a stream given to a callback. ``duration`` is the host's wall time
    from request to end, ``guest_duration`` the command's own run time as
    the agent measured it (None if it never started).
    """

    exit_code: int
    signal: int | None
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool = False
    error: str | None = None
    guest_duration: float | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class TransferStats:
    """What a put or get moved (``skipped``: guest sockets, FIFOs and devices a get left out)."""

    entries: int
    content_bytes: int
    duration: float
    skipped: int = 0


def exec_result(event: Exit, kept: dict[int, bytearray], duration: float) -> ExecResult:
    if event.timed_out:
        code = 124
    elif event.signal is not None:
        code = 128 + event.signal
    else:
        code = event.status or 0
    return ExecResult(
        exit_code=code,
        signal=event.signal,
        stdout=bytes(kept[1]),
        stderr=bytes(kept[2]),
        duration=duration,
        timed_out=event.timed_out,
        guest_duration=event.duration_ns / 1e9,
    )


def start_failure(event: Failure, request: Exec, duration: float) -> ExecResult:
    """A command that could not start: 127 / 126 as a shell says, else an error."""
    if event.kind is ErrorKind.NOT_FOUND:
        code = 127
    elif event.kind is ErrorKind.CANNOT_RUN:
        code = 126
    else:
        command = request.argv[0].decode(errors="replace")
        raise operation_error(event, f"exec {command}")
    return ExecResult(code, None, b"", b"", duration, error=event.message)


def operation_error(event: Failure, what: str) -> GuestOperationError:
    cls = GuestFileNotFoundError if event.kind is ErrorKind.NOT_FOUND else GuestOperationError
    return cls(
        f"{what} failed in the guest: {event.message}",
        kind=event.kind.name.lower(),
        errno=event.errno,
    )
