"""Console input: held until the guest's UART is ready, relayed from pipes with an EOF.

A real event loop, a real 16550 model and real pipes; the "guest" is the
test, reading and writing UART registers as a driver would.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from pyvmm.devices.legacy import serial as uart
from pyvmm.devices.legacy.serial import Serial
from pyvmm.host.console_input import EOT, InputRelay, SerialConsoleInput
from pyvmm.host.terminal import EscapeFilter
from pyvmm.vmm.event_loop import EventLoop
from tests.support.device_harness import CountingIrq


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop("test-events")
    loop.start()
    yield loop
    loop.close()


def read_reg(dev: Serial, offset: int) -> int:
    data = bytearray(1)
    dev.read(offset, memoryview(data))
    return data[0]


def write_reg(dev: Serial, offset: int, value: int) -> None:
    dev.write(offset, memoryview(bytes([value])))


def receive(dev: Serial, count: int, timeout: float = 5.0) -> bytes:
    """Read ``count`` bytes the way a polling driver does."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        if read_reg(dev, uart.LSR) & uart.LSR_DR:
            got.append(read_reg(dev, uart.DATA))
        else:
            time.sleep(0.001)
    return bytes(got)


def test_input_waits_for_rts_then_arrives_whole(loop: EventLoop) -> None:
    dev = Serial(CountingIrq(), lambda data: None)
    r, w = os.pipe()
    try:
        SerialConsoleInput(loop, r, dev, on_quit=lambda: None, escape=False).start()
        write_reg(dev, uart.MCR, uart.MCR_DTR)  # a Linux-like driver: modem lines first
        os.write(w, b"uname -r\n")
        time.sleep(0.2)
        assert dev.input_space() == dev.input_capacity  # nothing sent before RTS
        # The driver opens the port: FIFO reset, then RTS.
        write_reg(dev, uart.FCR, uart.FCR_ENABLE | uart.FCR_CLEAR_RX)
        write_reg(dev, uart.MCR, uart.MCR_DTR | uart.MCR_RTS | uart.MCR_OUT2)
        assert receive(dev, 9) == b"uname -r\n"
    finally:
        os.close(r)
        os.close(w)


def test_a_full_fifo_refills_when_drained_without_polling(loop: EventLoop) -> None:
    dev = Serial(CountingIrq(), lambda data: None, input_capacity=4)
    r, w = os.pipe()
    try:
        SerialConsoleInput(loop, r, dev, on_quit=lambda: None, escape=False).start()
        read_reg(dev, uart.LSR)  # a polling driver looks: ready
        payload = bytes(range(256)) * 4
        os.write(w, payload)
        assert receive(dev, len(payload)) == payload
    finally:
        os.close(r)
        os.close(w)


def test_ctrl_a_x_quits_on_a_terminal(loop: EventLoop) -> None:
    dev = Serial(CountingIrq(), lambda data: None)
    quit_called = threading.Event()
    r, w = os.pipe()
    try:
        SerialConsoleInput(loop, r, dev, on_quit=quit_called.set, escape=True).start()
        read_reg(dev, uart.LSR)
        os.write(w, b"ab\x01xcd")
        assert quit_called.wait(5)
        assert receive(dev, 2) == b"ab"
    finally:
        os.close(r)
        os.close(w)


def relay_output(relay: InputRelay, read_fd: int, timeout: float = 5.0) -> bytes:
    """Everything the relay wrote until it ended (its pipe's write end stays open)."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    os.set_blocking(read_fd, False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(read_fd, 65536)
        except BlockingIOError:
            chunk = b""
        got += chunk
        if relay.ended and not chunk:
            break
        time.sleep(0.01)
    return bytes(got)


def test_relay_copies_a_pipe_and_ends_with_eot() -> None:
    source_r, source_w = os.pipe()
    relay, read_fd = InputRelay.to_pipe(source_r)
    errors: list[str] = []
    relay.start(errors.append)
    try:
        payload = b"uname -r\n" + bytes(200_000) + b"\n"  # more than a pipe holds
        writer = threading.Thread(target=lambda: (os.write(source_w, payload), os.close(source_w)))
        writer.start()
        out = relay_output(relay, read_fd)
        writer.join(5)
        assert out == payload + EOT
        assert errors == []
    finally:
        relay.close()
        os.close(source_r)


def test_an_unfinished_last_line_is_ended_before_eot() -> None:
    source_r, source_w = os.pipe()
    relay, read_fd = InputRelay.to_pipe(source_r)
    relay.start(lambda message: None)
    try:
        os.write(source_w, b"uname -r")
        os.close(source_w)
        assert relay_output(relay, read_fd) == b"uname -r\n" + EOT
    finally:
        relay.close()
        os.close(source_r)


def test_relay_from_dev_null_sends_only_eot() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    relay, read_fd = InputRelay.to_pipe(fd)
    relay.start(lambda message: None)
    try:
        assert relay_output(relay, read_fd) == EOT
    finally:
        relay.close()
        os.close(fd)


def test_relay_with_escape_keys_quits_and_sends_no_eot() -> None:
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    quit_called = threading.Event()
    relay = InputRelay(
        source_r, sink_w, end_of_input=b"", escape=EscapeFilter(), on_quit=quit_called.set
    )
    relay.start(lambda message: None)
    try:
        os.write(source_w, b"ls\r\x01\x01\x01x")
        assert quit_called.wait(5)
        assert os.read(sink_r, 100) == b"ls\r\x01"
    finally:
        relay.close()
        for fd in (source_r, source_w, sink_r, sink_w):
            os.close(fd)


def test_close_ends_a_relay_blocked_on_input() -> None:
    source_r, source_w = os.pipe()
    relay, _ = InputRelay.to_pipe(source_r)
    relay.start(lambda message: None)
    started = time.monotonic()
    relay.close()
    assert time.monotonic() - started < 1.5
    assert not relay.ended
    os.close(source_r)
    os.close(source_w)
