"""Host input for the guest's serial console: from a terminal, a pipe or a file.

Two parts, because the two halves of the job live in different places:

- :class:`SerialConsoleInput` runs on the VM's event loop and copies bytes
  from an fd into the UART. It sends nothing before the guest's driver is
  ready (:attr:`~pyvmm.devices.legacy.serial.Serial.ready_for_input`: Linux
  resets the receive FIFO while it opens the port, so earlier bytes would be
  lost), and when the UART is full the bytes wait here and the fd is not
  read again until the guest drains it, so a fast producer cannot make
  pyvmm buffer without bound. No polling: the UART's input listener wakes
  it. On a terminal it also takes the escape keys (Ctrl-A X quits).
- :class:`InputRelay` is for front ends whose input is data, not a person:
  it copies a pipe or a file on a thread of its own and, when the input
  ends, sends the console's end-of-file character (Ctrl-D, after a newline
  if the last line was unfinished), so a shell
  reading the console exits as it would at the end of a script, and the
  default guest powers off. ``printf 'uname -r\\n' | pyvmm run`` ends that
  way. The nested host's front end uses it too, with the escape keys, to
  forward a terminal into L1 (:mod:`pyvmm.nested.run`).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvmm.devices.legacy.serial import Serial
from pyvmm.host.events import EventOps
from pyvmm.host.terminal import EscapeFilter

if TYPE_CHECKING:
    from pyvmm.vmm.threads import ThreadSetup

_READ_SIZE = 4096
_CLOSE_WAIT_S = 2.0

#: What a terminal sends for end of file (VEOF): a shell reading a tty in
#: canonical mode gets a read of 0 bytes for it when the line is empty.
EOT = b"\x04"


class SerialConsoleInput:
    """Copies bytes from ``fd`` into ``serial``; Ctrl-A X calls ``on_quit``."""

    def __init__(
        self,
        loop: EventOps,
        fd: int,
        serial: Serial,
        on_quit: Callable[[], None],
        escape: bool,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._serial = serial
        self._on_quit = on_quit
        self._escape = EscapeFilter() if escape else None
        self._pending = b""
        self._reading = False
        self._eof = False
        self._pollable = True
        serial.set_input_listener(self._on_serial_ready)

    def start(self) -> None:
        self._loop.call_soon(self._resume_reading)

    def _on_serial_ready(self) -> None:
        """The UART can take input again (called on the vCPU thread)."""
        if self._pending:
            with contextlib.suppress(OSError):  # the loop is already closed
                self._loop.call_soon(self._deliver)

    def _resume_reading(self) -> None:
        if self._reading or self._eof:
            return
        if self._pollable:
            try:
                self._loop.add_reader(self._fd, self._on_readable)
                self._reading = True
                return
            except PermissionError:  # a regular file or /dev/null: always readable
                self._pollable = False
        self._loop.call_soon(lambda: self._on_readable(0))

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self, events: int) -> None:
        if self._pending or self._eof:
            return  # a call queued before reading was paused
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the guest simply gets no more input
            self._eof = True
            self._pause_reading()
            return
        quit_requested = False
        if self._escape is not None:
            data, quit_requested = self._escape.feed(data)
        self._pending += data
        if quit_requested:
            self._eof = True  # no more input: the VM is stopping
            self._deliver()
            self._on_quit()
            return
        self._deliver()

    def _deliver(self) -> None:
        if self._pending and self._serial.ready_for_input:
            accepted = self._serial.enqueue_input(self._pending)
            self._pending = self._pending[accepted:]
        if self._pending:
            self._pause_reading()  # the serial's input listener calls _deliver again
        else:
            self._resume_reading()


class InputRelay:
    """Copies fd ``source`` to fd ``sink`` on its own thread, then sends ``end_of_input``.

    A sink that goes away (EPIPE, a closed socket) ends the relay quietly.
    With an ``escape`` filter the source is a person at a terminal: Ctrl-A X
    calls ``on_quit`` and ends the relay, and ``end_of_input`` is not sent.
    :meth:`to_pipe` builds a relay into a new pipe, for a VM whose console
    reads an fd. Every wait also watches a stop pipe, so :meth:`close` ends
    the thread even while it waits for input or for room in the sink.
    """

    def __init__(
        self,
        source: int,
        sink: int,
        *,
        end_of_input: bytes = EOT,
        escape: EscapeFilter | None = None,
        on_quit: Callable[[], None] | None = None,
    ) -> None:
        self._source = source
        self._sink = sink
        self._end = end_of_input
        self._escape = escape
        self._on_quit = on_quit
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._owned: list[int] = []
        self._thread: threading.Thread | None = None
        #: True once the source ended (and ``end_of_input`` was sent).
        self.ended = False

    @classmethod
    def to_pipe(cls, source: int, *, end_of_input: bytes = EOT) -> tuple[InputRelay, int]:
        """A relay from ``source`` into a new pipe; returns it and the pipe's read end.

        Both pipe ends belong to the relay: :meth:`close` closes them.
        """
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        relay = cls(source, write_fd, end_of_input=end_of_input)
        relay._owned += [read_fd, write_fd]
        return relay, read_fd

    def start(self, on_error: Callable[[str], None], setup: ThreadSetup | None = None) -> None:
        """Start the relay thread: an ``io`` role thread (see :mod:`pyvmm.vmm.threads`),
        under ``setup``'s filter when the VM's threads have one."""
        from pyvmm.vmm.threads import NO_SETUP, ThreadRole, spawn

        self._thread = spawn(
            ThreadRole.IO, "console-relay", self._run, on_error=on_error, setup=setup or NO_SETUP
        )

    def close(self) -> None:
        """Stop the thread, wait for it, and close the relay's own fds. Idempotent."""
        if self._stop_w < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(_CLOSE_WAIT_S)
        for fd in (*self._owned, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned = []
        self._stop_r = self._stop_w = -1

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # the sink or the source went away
            self._copy()

    def _copy(self) -> None:
        last = b"\n"
        while self._wait(self._source, select.POLLIN):
            data = os.read(self._source, _READ_SIZE)
            if not data:
                self.ended = True
                # An unfinished last line is ended first, as a person presses Enter
                # before Ctrl-D: in a tty's canonical mode a Ctrl-D after text only
                # hands that text over, it is not an end of file.
                if self._end and last != b"\n":
                    self._write(b"\n")
                self._write(self._end)
                return
            last = data[-1:]
            if self._escape is not None:
                data, quit_requested = self._escape.feed(data)
                self._write(data)
                if quit_requested:
                    if self._on_quit is not None:
                        self._on_quit()
                    return
            else:
                self._write(data)

    def _wait(self, fd: int, events: int) -> bool:
        """Wait until ``fd`` is ready (or hung up); False once :meth:`close` was called."""
        poller = select.poll()
        poller.register(fd, events)
        poller.register(self._stop_r, select.POLLIN)
        ready = dict(poller.poll())
        return self._stop_r not in ready

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._wait(self._sink, select.POLLOUT):
                return
            try:
                view = view[os.write(self._sink, view) :]
            except BlockingIOError:  # a non-blocking sink (a socket) filled up again
                continue
