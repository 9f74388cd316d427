"""Frames and messages of the guest-agent protocol: round trips, caps, checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.sandbox import messages as m
from pyvmm.sandbox import protocol as p

AGENT_H = Path(__file__).resolve().parents[3] / "guest" / "agent" / "agent.h"

AGENT_MESSAGES = [
    m.Hello(1, 3, p.Cap.EXEC | p.Cap.GET, 4 << 20, "pyvmm-agent pid 7"),
    m.Pong(b""),
    m.Pong(b"x" * p.MAX_PING),
    m.Started(4242),
    m.Output(1, b"out"),
    m.Output(2, b"e" * p.MAX_CHUNK),
    m.Exit(7, None, False, 123_456),
    m.Exit(None, 9, True, 2**63),
    m.Failure(p.ErrorKind.NOT_FOUND, 2, "foo: No such file or directory"),
    m.Data(b"tar" * 100),
    m.Done(2**40, 12, 3),
]

HOST_MESSAGES = [
    m.HostHello(1),
    m.Ping(b"12345678"),
    m.Exec((b"echo", b"hi"), (b"A=1", b"B="), b"/tmp", 1000, 100, 5000, True),
    m.Exec((b"true",)),
    m.Stdin(b""),
    m.Stdin(b"data"),
    m.Signal(15),
    m.Put(b"/dst", 5, 6, True),
    m.Put(b"/dst", mkdirs=False),
    m.Data(b"", from_host=True),
    m.Data(b"x" * p.MAX_CHUNK, from_host=True),
    m.Get(b"/etc/hostname"),
]


def frames(data: bytes, limits) -> list[tuple[int, bytes]]:
    decoder = p.FrameDecoder(limits)
    decoder.feed(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    assert decoder.buffered == 0
    return out


@pytest.mark.parametrize("message", AGENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_agent_messages_round_trip(message) -> None:
    [(kind, payload)] = frames(m.encode_message(message), p.AGENT_LIMITS)
    assert m.decode_agent_message(kind, payload) == message


@pytest.mark.parametrize("message", HOST_MESSAGES, ids=lambda m: type(m).__name__)
def test_host_messages_round_trip(message) -> None:
    [(kind, payload)] = frames(m.encode_message(message), p.HOST_LIMITS)
    assert m.decode_host_message(kind, payload) == message


def test_decoder_takes_any_split() -> None:
    stream = b"".join(m.encode_message(msg) for msg in AGENT_MESSAGES)
    decoder = p.FrameDecoder(p.AGENT_LIMITS)
    got = []
    for i in range(len(stream)):  # one byte at a time
        decoder.feed(stream[i : i + 1])
        while (frame := decoder.next_frame()) is not None:
            got.append(m.decode_agent_message(*frame))
    assert got == AGENT_MESSAGES


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (p.HEADER.pack(0xFFFF_FFFF, p.AgentType.STDOUT, b"\0\0\0"), "STDOUT frame of 4294967295"),
        (p.HEADER.pack(p.MAX_CHUNK + 1, p.AgentType.DATA, b"\0\0\0"), "DATA frame of 65537"),
        (p.HEADER.pack(0, p.AgentType.STDOUT, b"\0\0\0"), "STDOUT frame of 0 bytes"),
        (p.HEADER.pack(3, p.AgentType.STARTED, b"\0\0\0"), "STARTED frame of 3 bytes"),
        (p.HEADER.pack(4, p.AgentType.STARTED, b"\0\1\0"), "reserved bytes set"),
        (p.HEADER.pack(4, 0x99, b"\0\0\0"), "unknown frame type 0x99"),
        (p.HEADER.pack(2, p.HostType.HELLO, b"\0\0\0"), "unknown frame type 0x41"),
    ],
)
def test_bad_headers_are_refused_before_their_payload(header: bytes, reason: str) -> None:
    decoder = p.FrameDecoder(p.AGENT_LIMITS)
    decoder.feed(header)  # the header alone: nothing of the payload is waited for
    with pytest.raises(ValueError, match=re.escape(reason)):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("kind", "payload", "reason"),
    [
        (p.AgentType.EXIT, bytes([2, 0, 0, 0, 0, 0, 0, 1]) + bytes(8), "invalid flags"),
        (p.AgentType.EXIT, bytes([0, 0, 0, 0]) + (300).to_bytes(4, "big") + bytes(8), "over 255"),
        (p.AgentType.EXIT, bytes([1, 0, 0, 0]) + bytes(4) + bytes(8), "not 1..127"),
        (p.AgentType.ERROR, bytes([9, 0, 0, 0, 0, 0, 0, 0]) + b"x", "unknown kind 9"),
        (p.AgentType.HELLO, (5).to_bytes(2, "big") + (4).to_bytes(2, "big") + bytes(8), "empty"),
    ],
)
def test_bad_agent_payloads(kind: int, payload: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        m.decode_agent_message(kind, payload)


def test_agent_text_becomes_one_line() -> None:
    failure = m.Failure(p.ErrorKind.FAILED, 5, "line one\nline two\x1b[31m")
    decoded = m.decode_agent_message(p.AgentType.ERROR, failure.encode())
    assert decoded.message == "line one line two [31m"
    hello = m.Hello(1, 1, p.Cap(0), 10, "bad\r\nname\xff")
    assert "\n" not in m.decode_agent_message(p.AgentType.HELLO, hello.encode()).agent


def test_unknown_capability_bits_are_dropped() -> None:
    payload = m.Hello(1, 1, p.Cap.EXEC, 10, "").encode()
    payload = payload[:4] + (0xFFFF_FFFF).to_bytes(4, "big") + payload[8:]
    assert (
        m.Hello.decode(payload).caps
        == p.Cap.EXEC | p.Cap.PUT | p.Cap.GET | p.Cap.SIGNAL | p.Cap.SET_UID
    )


def test_exec_build_encodes_the_callers_values() -> None:
    req = m.Exec.build(
        ["sh", b"-c", "echo \udcff"], env={"A": "1"}, cwd="/w", uid=5, timeout=1.5,
        stdin_piped=True,
    )  # fmt: skip
    assert req.argv == (b"sh", b"-c", b"echo \xff")
    assert req.env == (b"A=1",)
    assert (req.cwd, req.uid, req.gid, req.timeout_ms, req.stdin_piped) == (
        b"/w",
        5,
        None,
        1500,
        True,
    )
    assert m.Exec.build(["x"], timeout=0.0001).timeout_ms == 1  # never 0, which means "none"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"argv": []}, "argv is empty"),
        ({"argv": [""]}, "argv is empty"),
        ({"argv": "ls -l"}, "not one string"),
        ({"argv": ["a\0b"]}, "argument 0 contains a NUL"),
        ({"argv": ["ls", 3]}, "argument 1 must be str or bytes"),
        ({"argv": ["ls"], "env": {"A=B": "1"}}, "not NAME"),
        ({"argv": ["ls"], "env": {"A": "x\0"}}, "NUL"),
        ({"argv": ["ls"], "cwd": "tmp"}, "not an absolute path"),
        ({"argv": ["ls"], "cwd": "/a/../b"}, "'..' component"),
        ({"argv": ["ls"], "uid": -1}, "uid must be an integer"),
        ({"argv": ["ls"], "gid": 2**32 - 1}, "gid must be an integer"),
        ({"argv": ["ls"], "uid": True}, "uid must be an integer"),
        ({"argv": ["ls"], "timeout": 0}, "more than 0"),
        ({"argv": ["ls"], "timeout": -1}, "more than 0"),
        ({"argv": ["ls"], "timeout": 10**9}, "at most a year"),
        ({"argv": ["ls"], "timeout": "5"}, "number of seconds"),
    ],
)
def test_exec_build_refuses_bad_values(kwargs: dict, reason: str) -> None:
    argv = kwargs.pop("argv")
    with pytest.raises(ConfigError, match=re.escape(reason)):
        m.Exec.build(argv, **kwargs)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (p.encode_fields([(p.Field.CWD, b"/")]), "no ARG"),
        (
            p.encode_fields([(p.Field.ARG, b"x"), (p.Field.CWD, b"/"), (p.Field.CWD, b"/")]),
            "repeats",
        ),
        (p.encode_fields([(p.Field.ARG, b"x"), (p.Field.PATH, b"/")]), "unknown field 8"),
        (p.encode_fields([(p.Field.ARG, b"x")])[:-1], "runs past"),
        (b"\x01\x00", "truncated field header"),
    ],
)
def test_bad_exec_payloads(payload: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        m.Exec.decode(payload)


def test_guest_path_checks() -> None:
    assert m.check_guest_path("/a/b") == b"/a/b"
    for bad, reason in (("a", "absolute"), ("/a/../b", "'..'"), ("/" + "x" * 5000, "4095")):
        with pytest.raises(ConfigError, match=re.escape(reason)):
            m.check_guest_path(bad)


def _c_constants() -> dict[str, int]:
    text = AGENT_H.read_text()
    found = {
        m[0]: int(m[1], 0)
        for m in re.findall(r"\b([A-Z][A-Z0-9_]+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", text)
    }
    found.update(
        {
            m[0]: int(m[1], 0)
            for m in re.findall(r"#define\s+([A-Z][A-Z0-9_]+)\s+(0x[0-9a-fA-F]+|\d+)u?\b", text)
        }
    )
    return found


def test_the_agent_source_carries_the_same_numbers() -> None:
    c = _c_constants()
    for enum, prefix in (
        (p.AgentType, "A_"),
        (p.HostType, "H_"),
        (p.Field, "F_"),
        (p.ErrorKind, "E_"),
    ):
        for member in enum:
            assert c[prefix + member.name] == member.value, (prefix, member)
    for cap in p.Cap:
        assert c[f"CAP_{cap.name}"] == cap.value
    assert c["DEFAULT_PORT"] == p.AGENT_PORT
    assert c["MAX_CHUNK"] == p.MAX_CHUNK
    assert c["MAX_PING"] == p.MAX_PING
    assert c["MAX_ERROR_TEXT"] == p.MAX_ERROR_TEXT
    assert c["FRAME_HEADER"] == p.HEADER_SIZE
    assert c["PROTOCOL_VERSION_MIN"] <= p.PROTOCOL_VERSION <= c["PROTOCOL_VERSION_MAX"]
