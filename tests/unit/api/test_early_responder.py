"""The early ``GET /`` answer, and the hand-over of every other request to the API server.

In-process: :class:`EarlyResponder` on a real listening socket. Then real
``pyvmm-firecracker`` processes held before they import click (an audit
hook waits for a file), so that what the early responder does is known
without timing anything: the API server cannot exist yet.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.api.controller import InstanceInfo
from pyvmm.api.early_responder import EarlyResponder
from pyvmm.api.http_protocol import Response, render_response
from pyvmm.api.version import vmm_version
from pyvmm.vmm.lifecycle import VmState

GET_ROOT = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
PUT_MACHINE = (
    b"PUT /machine-config HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n"
    b'{"vcpu_count": 1, "mem_size_mib": 64}'
)
GET_MACHINE = b"GET /machine-config HTTP/1.1\r\n\r\n"


def instance_info(instance_id: str, *, keep_alive: bool = True, version: str = "HTTP/1.1") -> bytes:
    """The API server's answer to ``GET /`` before boot."""
    info = InstanceInfo(id=instance_id, state=VmState.NOT_STARTED, vmm_version=vmm_version())
    return render_response(Response(200, info.to_json()), keep_alive=keep_alive, version=version)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One whole response (status, raw bytes), read byte by byte: nothing of the next one."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        byte = sock.recv(1)
        assert byte, f"closed after {raw!r}"
        raw += byte
    length = 0
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(raw) < raw.index(b"\r\n\r\n") + 4 + length:
        raw += sock.recv(length)
    return int(raw.split(b" ")[1]), raw


def closed_unanswered(sock: socket.socket) -> bool:
    """The peer closed (or reset) the connection without sending anything."""
    sock.settimeout(60)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def nothing_to_read(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0)[0]


# --- in-process ------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "api.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    sock.listen(32)
    yield sock, path
    sock.close()


def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(30)
    client.connect(str(path))
    return client


def test_get_root_is_answered_as_the_api_server_answers_it(listener: tuple) -> None:
    sock, path = listener
    responder = EarlyResponder.start(sock, "vm-7")
    cases = [
        (GET_ROOT, instance_info("vm-7")),
        (b"GET / HTTP/1.1\nConnection: close\n\n", instance_info("vm-7", keep_alive=False)),
        (b"GET / HTTP/1.0\r\n\r\n", instance_info("vm-7", keep_alive=False, version="HTTP/1.0")),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
         instance_info("vm-7", version="HTTP/1.0")),
        (b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", instance_info("vm-7")),
    ]  # fmt: skip
    clients = []
    for request, expected in cases:
        client = connect(path)
        client.sendall(request)
        assert read_response(client)[1] == expected
        clients.append(client)
    clients[0].sendall(GET_ROOT)  # keep-alive: a second answer on the same connection
    assert read_response(clients[0])[1] == instance_info("vm-7")
    handed = responder.stop()
    # The closed ones (Connection: close, HTTP/1.0) are gone; the kept-alive ones are idle.
    assert [(p.data, p.since) for p in handed] == [(b"", None)] * 3
    assert responder.answered == 6
    for pending in handed:
        pending.sock.close()
    for client in clients:
        client.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        PUT_MACHINE,  # another method
        GET_MACHINE,  # another path
        b"GET /?x=1 HTTP/1.1\r\n\r\n",  # not exactly "/"
        b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",  # a body
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded: header\r\n\r\n",  # malformed: the server says why
        b"GET / HTTP/2.0\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\n\r\n",  # a leading blank line
        GET_ROOT + GET_MACHINE,  # pipelined after GET /
        b"GET / HTTP/1.1\r\nHost: loc",  # incomplete
        b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000,  # a head over 8 KiB
    ],
)
def test_anything_else_is_handed_over_unanswered(listener: tuple, request_bytes: bytes) -> None:
    sock, path = listener
    responder = EarlyResponder.start(sock, "vm-7")
    client = connect(path)
    client.sendall(GET_ROOT)
    read_response(client)
    client.sendall(request_bytes)
    marker = connect(path)  # answered after the request above was read (one thread)
    marker.sendall(GET_ROOT)
    read_response(marker)
    handed = responder.stop()
    assert nothing_to_read(client)
    # Whatever was read is handed over, in order, with when the request began.
    pending = [p for p in handed if p.data]
    assert len(pending) == 1
    assert request_bytes.startswith(pending[0].data) and pending[0].since is not None
    for p in handed:
        p.sock.close()
    client.close()
    marker.close()


def test_a_request_then_end_of_file_is_handed_over(listener: tuple) -> None:
    sock, path = listener
    responder = EarlyResponder.start(sock, "vm-7")
    client = connect(path)
    client.sendall(PUT_MACHINE)
    client.shutdown(socket.SHUT_WR)
    idle = connect(path)
    idle.close()  # connected and gone: nothing to hand over
    marker = connect(path)
    marker.sendall(GET_ROOT)
    read_response(marker)
    handed = [p for p in responder.stop() if p.data]
    assert [p.data for p in handed] == [PUT_MACHINE]
    for p in handed:
        p.sock.close()
    client.close()
    marker.close()


def test_a_failure_on_the_thread_is_logged_and_its_connections_handed_over(
    listener: tuple, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    responder = EarlyResponder.start(sock, "vm-7")
    client = connect(path)
    client.sendall(b"GET /version HTTP/1.1\r\n\r\n")
    marker = connect(path)
    marker.sendall(GET_ROOT)
    read_response(marker)

    def broken(*args: object) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(responder, "_answer", broken)
    other = connect(path)
    other.sendall(GET_ROOT)
    responder._thread.join(30)  # ended by the failure
    assert not responder._thread.is_alive()
    with caplog.at_level(logging.ERROR):
        handed = responder.stop()
    assert "early API responder failed" in caplog.text and "RuntimeError: bug" in caplog.text
    data = sorted(p.data for p in handed)
    assert data == [b"", GET_ROOT, b"GET /version HTTP/1.1\r\n\r\n"]  # the marker, idle
    for p in handed:
        p.sock.close()
    for c in (client, marker, other):
        c.close()


# --- pyvmm-firecracker processes --------------------------------------------------------

#: pyvmm-firecracker, held where it would import click until RELEASE exists; then it
#: writes the modules loaded so far to LISTING and goes on.
HELD = """
import json, os, sys, time
release, listing = sys.argv[1], sys.argv[2]
def hook(event, args):
    if event == "import" and args[0] == "click" and not hook.done:
        hook.done = True
        while not os.path.exists(release):
            time.sleep(0.01)
        with open(listing + ".tmp", "w") as f:
            json.dump(sorted(sys.modules), f)
        os.rename(listing + ".tmp", listing)
hook.done = False
sys.addaudithook(hook)
sys.argv = ["pyvmm-firecracker", *sys.argv[3:]]
from pyvmm.firecracker_cli import main
main()
"""


class Held:
    """A pyvmm-firecracker process held before its API server exists (see HELD)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.sock = tmp_path / "api.sock"
        self.release_file = tmp_path / "release"
        self.listing = tmp_path / "modules.json"
        self.process = subprocess.Popen(
            [sys.executable, "-c", HELD, str(self.release_file), str(self.listing),
             "--api-sock", str(self.sock), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=tmp_path,
        )  # fmt: skip

    def connect(self) -> socket.socket:
        while True:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                return connect(self.sock)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.005)

    def release(self) -> list[str]:
        """Let it go on; the modules it had loaded while held."""
        self.release_file.touch()
        while not self.listing.exists():
            assert self.process.poll() is None, self.process.communicate()[1]
            time.sleep(0.005)
        return json.loads(self.listing.read_text())

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Held]:
    process = Held(tmp_path, "--id", "early-bird")
    yield process
    process.close()


def test_get_root_is_answered_before_the_api_stack_is_imported(held: Held) -> None:
    client = held.connect()
    client.sendall(GET_ROOT)
    early = read_response(client)[1]
    assert early == instance_info("early-bird")
    loaded = set(held.release())
    assert not loaded & {"click", "pyvmm.serve", "pyvmm.api.http", "pyvmm.api.models",
                         "pyvmm.api.routes", "importlib.metadata"}  # fmt: skip
    client.sendall(GET_ROOT)
    assert read_response(client)[1] == early  # the API server's own answer, the same bytes
    # Its metrics count both.
    metrics = b'{"metrics_path": "metrics.json"}'
    flush = b'{"action_type": "FlushMetrics"}'
    for path, body in ((b"/metrics", metrics), (b"/actions", flush)):
        client.sendall(b"PUT %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body))
        assert read_response(client)[0] == 204
    last = json.loads((held.sock.parent / "metrics.json").read_text().splitlines()[-1])
    assert last["get_api_requests"]["instance_info_count"] == 2
    client.close()


def test_the_early_default_id_is_the_servers() -> None:
    from pyvmm import firecracker_cli, serve

    assert firecracker_cli.DEFAULT_INSTANCE_ID == serve.DEFAULT_INSTANCE_ID


def test_requests_sent_before_the_server_runs_are_served_in_order(held: Held) -> None:
    kept = held.connect()  # GET / answered early, then a PUT on the same connection
    kept.sendall(GET_ROOT)
    assert read_response(kept)[0] == 200
    kept.sendall(PUT_MACHINE)
    pipelined = held.connect()  # GET / and a PUT in one write: both wait for the server
    pipelined.sendall(GET_ROOT + PUT_MACHINE + GET_MACHINE)
    fresh = held.connect()  # a PUT alone
    fresh.sendall(PUT_MACHINE)
    marker = held.connect()
    marker.sendall(GET_ROOT)
    assert read_response(marker)[0] == 200
    assert all(nothing_to_read(c) for c in (kept, pipelined, fresh))
    held.release()
    assert read_response(kept)[0] == 204
    assert [read_response(pipelined)[0] for _ in range(3)] == [200, 204, 200]
    assert read_response(fresh)[0] == 204
    kept.sendall(GET_MACHINE)
    status, raw = read_response(kept)
    assert status == 200 and b'"mem_size_mib": 64' in raw
    for c in (kept, pipelined, fresh, marker):
        c.close()


def test_a_half_sent_request_gets_the_api_servers_request_timeout(held: Held) -> None:
    stalled = held.connect()
    stalled.sendall(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 37\r\n\r\n{")
    marker = held.connect()
    marker.sendall(GET_ROOT)
    read_response(marker)
    held.release()
    marker.sendall(GET_ROOT)
    assert read_response(marker)[0] == 200  # the server runs, and serves others meanwhile
    assert closed_unanswered(stalled)  # when its 10 s were up
    for c in (stalled, marker):
        c.close()


def test_no_early_answer_with_a_config_file(tmp_path: Path) -> None:
    """Firecracker answers nothing before the boot from --config-file: here that boot
    fails on the file, so the client waiting for GET / only sees the process end."""
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": 7}}))
    held = Held(tmp_path, "--config-file", str(config))
    try:
        client = held.connect()
        client.sendall(GET_ROOT)
        held.release_file.touch()
        assert closed_unanswered(client)
        assert held.process.wait(30) == 2
    finally:
        held.close()


def test_the_version_is_found_as_importlib_metadata_finds_it(tmp_path: Path) -> None:
    """``GET /`` reports it before importlib.metadata is imported: the same value."""
    code = (
        "from importlib.metadata import version\n"
        "from pyvmm.api.version import _dist_info_version, pyvmm_version\n"
        "print(_dist_info_version(), pyvmm_version(), version('pyvmm'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    fast, reported, reference = result.stdout.split()
    assert fast in (reference, "None") and reported == reference
