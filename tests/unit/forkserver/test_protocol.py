"""The fork server's frames and requests: what a peer may send, and the one-line refusals."""

from __future__ import annotations

import json
import signal
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.forkserver.protocol import (
    MAX_CONTROL_BYTES,
    MAX_REQUEST_BYTES,
    FrameReader,
    ProtocolError,
    Request,
    forwarded_env,
    frame,
    is_forwarded,
    parse_reply,
    parse_request,
    parse_signal,
    request_frame,
)


def request(**changes: object) -> dict[str, object]:
    message: dict[str, object] = {
        "argv": ["run", "--kernel", "k.elf"],
        "prog": "pyvmm",
        "cwd": "/tmp",
        "umask": 0o022,
        "env": {"PATH": "/usr/bin", "PYVMM_CACHE": "/c"},
        "fds": [0, 1, 2],
    }
    message.update(changes)
    return message


def read_all(data: bytes, limit: int = MAX_REQUEST_BYTES) -> list[dict[str, object]]:
    reader = FrameReader(limit)
    reader.feed(data)
    frames = []
    while (message := reader.next_frame()) is not None:
        frames.append(message)
    return frames


def test_a_request_round_trips_through_one_frame() -> None:
    sent = Request(("run", "--kernel", "k"), "python -m pyvmm", "/w", 0o077, {"HOME": "/h"}, (0, 2))
    (message,) = read_all(request_frame(sent))
    got = parse_request(message)
    assert (got.argv, got.prog, got.cwd, got.umask, got.env, got.fds) == (
        ("run", "--kernel", "k"), "python -m pyvmm", "/w", 0o077, {"HOME": "/h"}, (0, 2),
    )  # fmt: skip


def test_undecodable_file_names_survive() -> None:
    """argv holds lone surrogates for bytes that are not UTF-8 (os.fsdecode); they must cross."""
    name = b"/tmp/k\xff\xfe.elf".decode("utf-8", "surrogateescape")
    sent = Request(("run", "--kernel", name), "pyvmm", "/tmp", 0, {}, (0, 1, 2))
    (message,) = read_all(request_frame(sent))
    assert parse_request(message).argv[2] == name


def test_frames_split_anywhere_are_reassembled() -> None:
    data = frame({"pid": 42}) + frame({"exit": 0})
    reader = FrameReader(MAX_CONTROL_BYTES)
    frames = []
    for byte in data:
        reader.feed(bytes([byte]))
        while (message := reader.next_frame()) is not None:
            frames.append(message)
    assert frames == [{"pid": 42}, {"exit": 0}]
    assert reader.pending == 0


def test_a_frame_over_the_limit_is_refused_from_its_header() -> None:
    reader = FrameReader(MAX_CONTROL_BYTES)
    reader.feed(struct.pack(">I", MAX_CONTROL_BYTES + 1))  # no body needed to refuse it
    with pytest.raises(ProtocolError, match="over the limit of 256"):
        reader.next_frame()


def test_a_request_larger_than_64_kib_is_refused() -> None:
    big = Request(("run", "x" * MAX_REQUEST_BYTES), "pyvmm", "/", 0, {}, ())
    with pytest.raises(ProtocolError, match="over the limit"):
        read_all(request_frame(big))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"run"', "not a JSON object"),
    ],
)
def test_garbage_is_a_protocol_error(body: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        read_all(struct.pack(">I", len(body)) + body)


@given(st.binary(max_size=300))
def test_any_bytes_give_frames_or_a_protocol_error(data: bytes) -> None:
    try:
        frames = read_all(data, MAX_CONTROL_BYTES)
    except ProtocolError as error:
        assert "\n" not in str(error)
    else:
        assert all(isinstance(message, dict) for message in frames)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"argv": "run"}, "argv must be a list"),
        ({"argv": ["run", 3]}, "argv item must be a string"),
        ({"argv": ["run", "a\0b"]}, "NUL"),
        ({"argv": []}, "only 'pyvmm run'"),
        ({"argv": ["doctor"]}, "only 'pyvmm run' command lines, not 'doctor'"),
        ({"argv": ["run"] * 5000}, "at most 4096"),
        ({"prog": None}, "prog must be a string"),
        ({"cwd": "relative/dir"}, "absolute"),
        ({"umask": -1}, "umask"),
        ({"umask": 0o1000}, "umask"),
        ({"umask": True}, "umask"),
        ({"umask": "022"}, "umask"),
        ({"env": ["PATH"]}, "env must be an object"),
        ({"env": {"LD_PRELOAD": "/x.so"}}, "'LD_PRELOAD' is not one the fork server takes"),
        ({"env": {"PYVMM_FORKSERVER": "/s"}}, "'PYVMM_FORKSERVER'"),
        ({"env": {"PATH": 1}}, "env PATH must be a string"),
        ({"fds": [0, 1, 2, 3]}, "standard fds"),
        ({"fds": [2, 1]}, "in order"),
        ({"fds": [1, 1]}, "each once"),
        ({"fds": [True]}, "list of numbers"),
        ({"fds": "012"}, "list of numbers"),
    ],
)
def test_bad_requests_name_the_field(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle) as caught:
        parse_request(request(**changes))
    assert "\n" not in str(caught.value)


def test_a_request_with_missing_or_unknown_keys_is_refused() -> None:
    message = request()
    del message["cwd"]
    with pytest.raises(ProtocolError, match=r"missing \['cwd'\]"):
        parse_request(message)
    with pytest.raises(ProtocolError, match=r"unknown \['shell'\]"):
        parse_request(request(shell="/bin/sh"))


def test_the_client_forwards_pyvmm_variables_and_what_pyvmm_reads() -> None:
    environ = {
        "PATH": "/bin", "HOME": "/root", "TMPDIR": "/t", "LANG": "C.UTF-8", "COLUMNS": "120",
        "PYVMM_CACHE": "/c", "PYVMM_PROGRESS": "0",
        "PYVMM_FORKSERVER": "/s", "PYVMM_API_SOCK_FD": "3",
        "LD_PRELOAD": "/evil.so", "PYTHONPATH": "/p", "SSH_AUTH_SOCK": "/a",
    }  # fmt: skip
    assert forwarded_env(environ) == {
        "PATH": "/bin", "HOME": "/root", "TMPDIR": "/t", "LANG": "C.UTF-8", "COLUMNS": "120",
        "PYVMM_CACHE": "/c", "PYVMM_PROGRESS": "0",
    }  # fmt: skip
    assert is_forwarded("PYVMM_ANYTHING_NEW")
    assert not is_forwarded("pyvmm_cache")


def test_signal_frames() -> None:
    assert parse_signal({"signal": int(signal.SIGTERM)}) is signal.SIGTERM
    assert parse_signal({"signal": 2}) is signal.SIGINT
    for bad in ({"signal": int(signal.SIGKILL)}, {"signal": True}, {"signal": "15"}):
        with pytest.raises(ProtocolError, match="is not one a client forwards"):
            parse_signal(bad)
    with pytest.raises(ProtocolError, match="only"):
        parse_signal(request())


def test_replies() -> None:
    assert (parse_reply({"pid": 7}).kind, parse_reply({"pid": 7}).value) == ("pid", 7)
    assert parse_reply({"killed": 15}).value == 15
    assert parse_reply({"error": "refused"}).value == "refused"
    for bad in ({"exit": "0"}, {"exit": False}, {"bye": 1}, {"exit": 0, "pid": 1}, {}):
        with pytest.raises(ProtocolError):
            parse_reply(bad)


def test_frames_are_ascii_json_with_a_length_header() -> None:
    data = frame({"error": "caf\u00e9"})
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert json.loads(data[4:]) == {"error": "caf\u00e9"}
    assert data[4:].isascii()
