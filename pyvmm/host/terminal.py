"""The host side of the guest's serial console: escape keys and raw mode.

When the VMM's stdin is a terminal, every key should go to the guest, Ctrl-C
included, so the terminal is put in raw mode (:func:`raw_terminal`) and the
user needs another way to talk to the VMM itself. We follow QEMU's
``-nographic`` convention, which users already know (:class:`EscapeFilter`):

    Ctrl-A x      quit the VMM
    Ctrl-A h / ?  show the escape help
    Ctrl-A Ctrl-A send one Ctrl-A to the guest
    Ctrl-A other  swallowed (nothing reaches the guest), as in QEMU

The filter is sans-IO (bytes in, bytes for the guest plus a quit flag out) so
it is tested without a terminal; only :func:`raw_terminal` touches termios.
The caller decides whether to filter at all: when stdin is a pipe or file,
its bytes are data for the guest and no byte should be special.
"""

from __future__ import annotations

import contextlib
import logging
import os
import termios
from collections.abc import Callable, Iterator

_logger = logging.getLogger("pyvmm.host.terminal")

CTRL_A = 0x01
_QUIT_KEYS = frozenset(b"xX")
_HELP_KEYS = frozenset(b"h?")

# termios attribute list indexes (the layout tcgetattr returns).
_IFLAG, _OFLAG, _CFLAG, _LFLAG, _ISPEED, _OSPEED, _CC = range(7)


def escape_key_name(escape: int) -> str:
    """How to write the escape key for a human: ``C-a`` for 0x01."""
    if 1 <= escape <= 26:
        return "C-" + chr(escape + 0x60)
    return f"0x{escape:02x}"


def help_text(escape: int = CTRL_A) -> str:
    """The escape help, with CRLF line ends because the terminal is raw."""
    key = escape_key_name(escape)
    lines = (
        f"{key} h    print this help",
        f"{key} x    exit pyvmm (the guest is stopped, not shut down)",
        f"{key} {key}  send {key} to the guest",
    )
    return "\r\n" + "\r\n".join(lines) + "\r\n"


class EscapeFilter:
    """Separates escape sequences from keystrokes meant for the guest.

    State (a pending escape key) carries over between :meth:`feed` calls,
    because a terminal read may end right after the escape key.
    """

    def __init__(
        self, escape: int = CTRL_A, on_help: Callable[[str], object] | None = None
    ) -> None:
        """``on_help`` receives :func:`help_text` when the user asks for it.

        It is a callback rather than a return value so :meth:`feed` keeps its
        simple ``(bytes_for_guest, quit)`` shape; pass something that writes
        to the terminal (stderr), or nothing to ignore help requests.
        """
        if not 0 <= escape <= 0xFF:
            raise ValueError(f"escape must be a byte value, not {escape!r}")
        self._escape = escape
        self._on_help = on_help
        self._after_escape = False
        self._quit = False

    @property
    def quit_requested(self) -> bool:
        return self._quit

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Filter one chunk of terminal input.

        Returns the bytes to send to the guest and whether the user asked to
        quit. Input after the quit key is dropped, and so is any later input.
        """
        if self._quit:
            return b"", True
        escape = self._escape
        if not self._after_escape and escape not in data:
            return bytes(data), False  # the common case: no escape at all
        out = bytearray()
        for byte in data:
            if self._after_escape:
                self._after_escape = False
                if byte == escape:
                    out.append(escape)
                elif byte in _QUIT_KEYS:
                    self._quit = True
                    return bytes(out), True
                elif byte in _HELP_KEYS and self._on_help is not None:
                    self._on_help(help_text(escape))
                # anything else (and help with no one to show it to) is
                # swallowed together with its escape, as QEMU does
            elif byte == escape:
                self._after_escape = True
            else:
                out.append(byte)
        return bytes(out), False


def make_raw(attributes: list) -> list:
    """Raw-mode termios attributes derived from ``attributes`` (tcgetattr's list).

    Like cfmakeraw(3) (no line editing, echo, signals or input translation;
    8-bit characters; reads return after one byte) except that output
    processing (OPOST) stays on, as QEMU's stdio console keeps it: the
    guest's console already sends CRLF, and the VMM's own log lines printed
    while the terminal is raw still start at column 0.
    """
    raw = list(attributes)
    raw[_IFLAG] &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    raw[_LFLAG] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    raw[_CFLAG] = (raw[_CFLAG] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(raw[_CC])
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    raw[_CC] = cc
    return raw


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Put the terminal on ``fd`` in raw mode for the ``with`` block.

    Yields True if it did, False if ``fd`` is not a terminal (then nothing
    is changed). The original settings come back on exit, also when the
    block raises; if the terminal has gone away by then (hang-up, closed
    fd) that is logged, not raised, so it cannot hide the real error.
    """
    if not os.isatty(fd):
        yield False
        return
    original = termios.tcgetattr(fd)
    # TCSADRAIN: let pending output finish first, and keep typed-ahead input.
    termios.tcsetattr(fd, termios.TCSADRAIN, make_raw(original))
    try:
        yield True
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, original)
        except (termios.error, OSError) as exc:
            _logger.warning("could not restore terminal settings on fd %d: %s", fd, exc)
