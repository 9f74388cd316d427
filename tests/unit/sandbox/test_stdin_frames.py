"""Framed stdin for a nested ``pyvmm exec``: any bytes and their end arrive intact."""

from __future__ import annotations

import os
import random
import time

import pytest

from pyvmm.errors import ConfigError
from pyvmm.host.console_input import EOT
from pyvmm.sandbox import stdin_frames as sf


def test_any_bytes_in_any_pieces_come_out_whole() -> None:
    data = bytes(range(256)) * 600 + EOT * 10  # the console's end-of-file byte, inside the data
    stream = sf.encode(data) + sf.end() + b"\n" + EOT  # what the relay adds after our end
    rng = random.Random(7)
    decoder = sf.FrameDecoder()
    out = bytearray()
    at = 0
    while at < len(stream):
        size = rng.randint(1, 9000)
        out += decoder.feed(stream[at : at + size])
        at += size
    assert bytes(out) == data
    assert decoder.ended


def test_nothing_after_the_end_frame_is_taken() -> None:
    decoder = sf.FrameDecoder()
    assert decoder.feed(sf.encode(b"hi") + sf.end() + sf.encode(b"late")) == b"hi"
    assert decoder.feed(sf.encode(b"more")) == b""


def test_an_oversized_frame_is_refused() -> None:
    with pytest.raises(ConfigError, match="frame of"):
        sf.FrameDecoder().feed((sf.MAX_FRAME + 1).to_bytes(4, "big"))


def test_the_pipes_carry_the_stream_and_close_at_its_end() -> None:
    source_r, source_w = os.pipe()
    framed = sf.encode_to_pipe(source_r, on_error=pytest.fail)
    plain = sf.decode_to_pipe(framed, on_error=pytest.fail)
    payload = os.urandom(200_000) + EOT
    os.write(source_w, payload[:100_000])
    time.sleep(0.05)
    os.write(source_w, payload[100_000:])
    os.close(source_w)
    received = bytearray()
    while chunk := os.read(plain, 65536):
        received += chunk
    assert bytes(received) == payload
    for fd in (source_r, framed, plain):
        os.close(fd)
