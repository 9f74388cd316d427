"""Feeds a host file descriptor (stdin, a pty, a pipe) into the guest UART.

Runs as an event-loop subscriber (files that epoll refuses, such as regular
files and /dev/null, are simply read on the loop until EOF). When the UART's input FIFO is full, the
bytes wait here and the fd is not read again until they are delivered, so a
fast producer cannot make pyvmm buffer without bound.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pyvmm.devices.legacy.serial import Serial
from pyvmm.host.terminal import EscapeFilter
from pyvmm.vmm.event_loop import EventLoop

_READ_SIZE = 4096
_RETRY_DELAY = 0.005


class SerialConsoleInput:
    """Copies bytes from ``fd`` into ``serial``; Ctrl-A X calls ``on_quit``."""

    def __init__(
        self,
        loop: EventLoop,
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

    def start(self) -> None:
        self._loop.call_soon(self._resume_reading)

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
        if self._escape is not None:
            data, quit_requested = self._escape.feed(data)
            if quit_requested:
                self._pause_reading()
                self._on_quit()
                return
        self._pending += data
        self._deliver()

    def _deliver(self) -> None:
        accepted = self._serial.enqueue_input(self._pending)
        self._pending = self._pending[accepted:]
        if self._pending:
            self._pause_reading()
            self._loop.call_later(_RETRY_DELAY, self._deliver)
        else:
            self._resume_reading()
