"""One command running in L1: its output as it comes, its input relay, and the checks.

Why a module of its own: while a command runs, the host has several things
to watch at once, every poll interval: the command's stdout and stderr files
(and the console port, when stdin is streamed), the user's quit key, QEMU
still being alive, L1's kernel reporting a lasting soft lockup, and the
command's deadline (then the command is killed in L1, within a bounded
grace). :class:`CommandStream` does that for :meth:`NestedHost.run
<pyvmm.nested.host.NestedHost.run>`; what it needs from the host is the
small :class:`L1` interface.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pyvmm.nested.agent import AgentFiles
from pyvmm.nested.console import ConsoleChannel
from pyvmm.nested.errors import NestedError, NestedStallError, NestedTimeoutError

if TYPE_CHECKING:
    from pyvmm.host.console_input import InputRelay

CANCEL_GRACE_S = 10.0
#: A soft lockup that L1 reports as lasting this long means L1 will not recover:
#: its watchdog reports at about 23 s, 49 s, 75 s...; the first report can be a
#: host that starved QEMU for a while, the second one has never recovered here.
LOCKUP_FATAL_S = 45
_POLL_S = 0.05
_OUTPUT_TAIL_CHARS = 2000
_STATUS_MAX_BYTES = 8
_DRAIN_IDLE_S = 0.3
_DRAIN_LIMIT_S = 5.0
_LOCKUP = re.compile(rb"soft lockup - CPU#\d+ stuck for (\d+)s")

OutputSink = Callable[[bytes], None]


@dataclass(frozen=True)
class NestedResult:
    """What a command did: exit status, output, and wall time seen by the host.

    A command run with ``stdin`` streams its stdout to ``on_stdout`` only
    (``stdout`` is empty); ``user_quit`` is True when the user pressed the
    quit key (Ctrl-A X) at the terminal, which ends the run at once.
    """

    returncode: int
    stdout: str
    stderr: str
    duration: float
    user_quit: bool = False


class L1(Protocol):
    """What a running command needs from its nested host."""

    @property
    def console_log(self) -> Path: ...

    @property
    def running(self) -> bool: ...

    def exit_status(self) -> int | None: ...

    def with_console(self, message: str, with_qemu_log: bool = True) -> str: ...

    def mark_stuck(self, reason: str) -> None: ...


def describe(command: Sequence[str] | str) -> str:
    """A command as a person would type it."""
    return command if isinstance(command, str) else shlex.join(command)


class CommandStream:
    """One running command: its output, its input relay, and the checks while it runs.

    With ``stdin`` (a host fd) the command's stdin and stdout are L1's
    ``console`` port; see :meth:`NestedHost.run <pyvmm.nested.host.NestedHost.run>`.
    """

    def __init__(
        self,
        l1: L1,
        files: AgentFiles,
        n: int,
        console: ConsoleChannel | None,
        on_stdout: OutputSink | None,
        on_stderr: OutputSink | None,
        stdin: int | None,
        terminal: bool,
    ) -> None:
        self.l1 = l1
        self.files = files
        self.n = n
        self.on_stdout = on_stdout
        self.out = FileTail(files.command(n, "out"), on_stdout)
        self.err = FileTail(files.command(n, "err"), on_stderr)
        self.l1_console = FileTail(l1.console_log, None, keep=False)
        self.quit = threading.Event()
        self.relay: InputRelay | None = None
        self.console = console if stdin is not None else None
        if stdin is not None:
            self.relay = self._start_relay(stdin, terminal)

    def _start_relay(self, stdin: int, terminal: bool) -> InputRelay:
        from pyvmm.host.console_input import EOT, InputRelay
        from pyvmm.host.terminal import EscapeFilter

        if self.console is None:
            raise NestedError("the nested host has no console port")
        relay = InputRelay(
            stdin,
            self.console.fileno(),
            end_of_input=b"" if terminal else EOT,
            escape=EscapeFilter(on_help=_write_terminal) if terminal else None,
            on_quit=self.quit.set,
        )
        relay.start(on_error=lambda message: self.quit.set())
        return relay

    def pump(self) -> None:
        """Move output along; wait up to one poll interval."""
        self.out.poll()
        self.err.poll()
        if self.console is not None:
            data = self.console.read(_POLL_S)
            if data and self.on_stdout is not None:
                self.on_stdout(data)
        else:
            time.sleep(_POLL_S)

    def wait(self, command: Sequence[str] | str, timeout: float | None) -> NestedResult:
        """Wait for the command's status, at most ``timeout`` seconds (None: no limit)."""
        l1 = self.l1
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        status_file = self.files.command(self.n, "status")
        while not status_file.exists():
            self.pump()
            if self.quit.is_set():
                l1.mark_stuck("the user quit while a command ran")
                return NestedResult(0, "", self.err.text(), time.monotonic() - started, True)
            if not l1.running:
                raise NestedError(l1.with_console(self._died()))
            lockup = self._lasting_lockup()
            if lockup is not None:
                l1.mark_stuck(lockup)
                raise NestedStallError(l1.with_console(lockup, with_qemu_log=False))
            if deadline is not None and time.monotonic() > deadline:
                fate = (
                    "was killed"
                    if self._cancel()
                    else f"L1 did not kill it within {CANCEL_GRACE_S:g} s (L1 is stuck)"
                )
                raise NestedTimeoutError(
                    l1.with_console(
                        f"`{describe(command)}` did not finish within {timeout:g} s in the "
                        f"nested host and {fate}{_output_tails(self.out, self.err)}",
                        with_qemu_log=False,
                    )
                )
        duration = time.monotonic() - started
        if self.console is not None and self.on_stdout is not None:
            self.console.drain(self.on_stdout, _DRAIN_IDLE_S, _DRAIN_LIMIT_S)
        self.out.poll()
        self.err.poll()
        return NestedResult(
            returncode=_read_status(status_file),
            stdout=self.out.text(),
            stderr=self.err.text(),
            duration=duration,
        )

    def _cancel(self) -> bool:
        """Ask L1 to kill the command; False (and L1 marked stuck) if it does not."""
        try:
            self.files.command(self.n, "cancel").write_bytes(b"")
            deadline = time.monotonic() + CANCEL_GRACE_S
            while not self.files.command(self.n, "status").exists():
                self.pump()
                if not self.l1.running or time.monotonic() > deadline:
                    raise _Overdue
        except (_Overdue, OSError):
            self.l1.mark_stuck(f"command {self.n} could not be killed within {CANCEL_GRACE_S:g} s")
            return False
        return True

    def _died(self) -> str:
        code = self.l1.exit_status()
        return f"L1 (QEMU) exited with status {code} while command {self.n} ran"

    def _lasting_lockup(self) -> str | None:
        """A soft lockup L1 reports as lasting :data:`LOCKUP_FATAL_S` or more, if any."""
        new = self.l1_console.poll()
        worst = max((int(m.group(1)) for m in _LOCKUP.finditer(new)), default=0)
        if worst < LOCKUP_FATAL_S:
            return None
        return (
            f"L1 stopped making progress (its kernel reports a soft lockup of {worst} s) "
            f"while command {self.n} ran"
        )

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()


class _Overdue(Exception):
    """A wait's deadline passed (internal)."""


class FileTail:
    """Reads a growing file in increments, passing new bytes to an optional sink.

    With ``keep=False`` only the read position is kept, not the data.
    """

    def __init__(self, path: Path, sink: OutputSink | None, keep: bool = True) -> None:
        self.path = path
        self.sink = sink
        self.keep = keep
        self._data = bytearray()
        self._offset = 0

    def poll(self) -> bytes:
        """Read what was appended since the last call; return it."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return b""
        if chunk:
            self._offset += len(chunk)
            if self.keep:
                self._data += chunk
            if self.sink is not None:
                self.sink(chunk)
        return chunk

    def text(self) -> str:
        return self._data.decode("utf-8", "replace")


def _output_tails(out: FileTail, err: FileTail) -> str:
    parts = []
    for name, tail in (("stdout", out), ("stderr", err)):
        text = tail.text()[-_OUTPUT_TAIL_CHARS:].rstrip()
        if text:
            parts.append(f"\n--- its {name} (end) ---\n{text}")
    return "".join(parts)


def _read_status(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            text = f.read(_STATUS_MAX_BYTES + 1).decode("ascii", "replace").strip()
    except OSError as exc:
        raise NestedError(f"cannot read the L1 agent's status file {path}: {exc}") from None
    if len(text) > _STATUS_MAX_BYTES or not text.isdigit():
        raise NestedError(f"the L1 agent wrote a malformed status {text[:20]!r} to {path}")
    return int(text)


def _write_terminal(text: str) -> None:
    """Show the escape help on the terminal (stderr, which is the same tty)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text)
        sys.stderr.flush()
