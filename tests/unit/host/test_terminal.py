"""Console escape handling (pure) and raw mode on a real pty."""

from __future__ import annotations

import contextlib
import logging
import os
import termios
from collections.abc import Iterator

import pytest

from pyvmm.host.terminal import (
    CTRL_A,
    EscapeFilter,
    escape_key_name,
    help_text,
    make_raw,
    raw_terminal,
)

# --- EscapeFilter -------------------------------------------------------------------


def test_plain_input_passes_through() -> None:
    assert EscapeFilter().feed(b"ls -l\r\x03") == (b"ls -l\r\x03", False)


def test_empty_input() -> None:
    assert EscapeFilter().feed(b"") == (b"", False)


def test_ctrl_a_x_quits_and_keeps_earlier_bytes() -> None:
    filt = EscapeFilter()
    assert filt.feed(b"ab\x01xcd") == (b"ab", True)
    assert filt.quit_requested


def test_uppercase_x_also_quits() -> None:
    assert EscapeFilter().feed(b"\x01X") == (b"", True)


def test_input_after_quit_is_dropped() -> None:
    filt = EscapeFilter()
    filt.feed(b"\x01x")
    assert filt.feed(b"more") == (b"", True)


def test_double_escape_sends_one_literal() -> None:
    assert EscapeFilter().feed(b"a\x01\x01b") == (b"a\x01b", False)


def test_four_escapes_send_two() -> None:
    assert EscapeFilter().feed(b"\x01\x01\x01\x01") == (b"\x01\x01", False)


def test_unknown_escape_is_swallowed() -> None:
    assert EscapeFilter().feed(b"a\x01zb") == (b"ab", False)


def test_escape_split_across_reads() -> None:
    filt = EscapeFilter()
    assert filt.feed(b"abc\x01") == (b"abc", False)
    assert filt.feed(b"x") == (b"", True)


def test_literal_escape_split_across_reads() -> None:
    filt = EscapeFilter()
    assert filt.feed(b"\x01") == (b"", False)
    assert filt.feed(b"\x01q") == (b"\x01q", False)


@pytest.mark.parametrize("key", [b"h", b"?"])
def test_help_calls_back_and_sends_nothing(key: bytes) -> None:
    shown: list[str] = []
    filt = EscapeFilter(on_help=shown.append)
    assert filt.feed(b"a\x01" + key + b"b") == (b"ab", False)
    assert shown == [help_text()]
    assert "C-a x" in shown[0] and "C-a C-a" in shown[0]


def test_help_without_callback_is_ignored() -> None:
    assert EscapeFilter().feed(b"\x01h") == (b"", False)


def test_custom_escape_key() -> None:
    filt = EscapeFilter(escape=0x1D)  # Ctrl-]
    assert filt.feed(b"\x01x") == (b"\x01x", False)
    assert filt.feed(b"\x1d\x1d\x1dx") == (b"\x1d", True)


def test_invalid_escape_rejected() -> None:
    with pytest.raises(ValueError):
        EscapeFilter(escape=256)


def test_escape_key_names() -> None:
    assert escape_key_name(CTRL_A) == "C-a"
    assert escape_key_name(0x1A) == "C-z"
    assert escape_key_name(0x1D) == "0x1d"


def test_help_text_uses_crlf() -> None:
    text = help_text()
    assert "\n" not in text.replace("\r\n", "")


def test_feed_accepts_bytearray() -> None:
    assert EscapeFilter().feed(bytearray(b"hi")) == (b"hi", False)


# --- raw mode ------------------------------------------------------------------------


@pytest.fixture
def pty() -> Iterator[int]:
    master, slave = os.openpty()
    try:
        yield slave
    finally:
        os.close(master)
        with contextlib.suppress(OSError):
            os.close(slave)


def test_make_raw_is_pure_and_keeps_opost() -> None:
    attrs = [
        termios.ICRNL | termios.IXON,
        termios.OPOST | termios.ONLCR,
        termios.CS7 | termios.PARENB,
        termios.ICANON | termios.ECHO | termios.ISIG,
        termios.B38400,
        termios.B38400,
        [b"\x00"] * termios.NCCS,
    ]
    snapshot = [list(a) if isinstance(a, list) else a for a in attrs]
    raw = make_raw(attrs)
    assert attrs == snapshot  # input untouched
    assert raw[0] & (termios.ICRNL | termios.IXON) == 0
    assert raw[1] & termios.OPOST
    assert raw[2] & termios.CSIZE == termios.CS8 and not raw[2] & termios.PARENB
    assert raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
    assert raw[6][termios.VMIN] == 1 and raw[6][termios.VTIME] == 0


def test_raw_terminal_changes_and_restores(pty: int) -> None:
    original = termios.tcgetattr(pty)
    assert original[3] & termios.ICANON  # a fresh pty is cooked
    with raw_terminal(pty) as changed:
        assert changed
        inside = termios.tcgetattr(pty)
        assert inside[3] & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
        assert inside[0] & termios.ICRNL == 0
        assert inside[1] & termios.OPOST
    assert termios.tcgetattr(pty) == original


def test_raw_terminal_restores_on_exception(pty: int) -> None:
    original = termios.tcgetattr(pty)
    with pytest.raises(RuntimeError, match="boom"), raw_terminal(pty):
        raise RuntimeError("boom")
    assert termios.tcgetattr(pty) == original


def test_raw_terminal_is_a_no_op_on_a_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        with raw_terminal(read_end) as changed:
            assert changed is False
    finally:
        os.close(read_end)
        os.close(write_end)


def test_raw_terminal_survives_a_vanished_tty(pty: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pyvmm.host.terminal"), raw_terminal(pty):
        os.close(pty)
    assert "could not restore terminal settings" in caplog.text
