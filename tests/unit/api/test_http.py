"""The API's HTTP layer: the sans-IO parser, and the server over a real Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.api.http import ApiServer
from pyvmm.api.http_protocol import (
    NEED_DATA,
    SEND_CONTINUE,
    ProtocolError,
    Request,
    RequestParser,
    Response,
    render_response,
)
from pyvmm.errors import ConfigError

# --- the parser, without sockets -----------------------------------------------------------


def parse_all(data: bytes, **kwargs) -> list[Request]:
    parser = RequestParser(**kwargs)
    parser.feed(data)
    requests = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            return requests
        assert isinstance(event, Request)
        requests.append(event)


def test_parser_reads_pipelined_requests_in_order():
    data = (
        b"PUT /drives/rootfs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
        b"GET /?x=1 HTTP/1.1\r\n\r\n"
        b"GET http://localhost/vm/config HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert parse_all(data) == [
        Request("PUT", "/drives/rootfs", b"{}", True, "HTTP/1.1"),
        Request("GET", "/", b"", True, "HTTP/1.1"),
        Request("GET", "/vm/config", b"", True, "HTTP/1.0"),
        Request("GET", "/version", b"", False, "HTTP/1.1"),
    ]


def test_parser_accepts_bare_lf_and_leading_blank_lines():
    assert parse_all(b"\r\n\nGET / HTTP/1.0\nContent-Length: 1\n\nx") == [
        Request("GET", "/", b"x", False, "HTTP/1.0")
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET /\r\n\r\n", "malformed request line"),
        (b"GET  / HTTP/1.1\r\n\r\n", "malformed request line"),
        (b"G(T / HTTP/1.1\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/2.0\r\n\r\n", "unsupported HTTP version"),
        (b"GET vm HTTP/1.1\r\n\r\n", "invalid request target"),
        (b"GET /\x7f HTTP/1.1\r\n\r\n", "invalid request target"),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", "malformed header line"),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", "malformed header line"),
        (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", "folded header lines"),
        (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting"),
        (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "is not supported"),
        (b"PUT / HTTP/1.1\r\nContent-Length: 51201\r\n\r\n", "larger than the limit of 51200"),
    ],
)
def test_parser_rejects_malformed_requests(data, message):
    with pytest.raises(ProtocolError, match=message) as info:
        parse_all(data)
    assert info.value.status == 400


def test_parser_caps_the_header_section():
    parser = RequestParser(max_header_bytes=100)
    parser.feed(b"GET / HTTP/1.1\r\n" + b"X-A: " + b"a" * 200)
    with pytest.raises(ProtocolError, match="larger than 100 bytes"):
        parser.next_event()


def test_parser_body_limit_can_depend_on_the_path():
    def limit(method: str, path: str) -> int:
        return 10 if path == "/small" else 1000

    assert parse_all(
        b"PUT /big HTTP/1.1\r\nContent-Length: 20\r\n\r\n" + b"x" * 20, body_limit=limit
    )
    with pytest.raises(ProtocolError, match="limit of 10"):
        parse_all(b"PUT /small HTTP/1.1\r\nContent-Length: 20\r\n\r\n", body_limit=limit)


def test_parser_asks_for_100_continue_once():
    parser = RequestParser()
    parser.feed(b"PUT /mmds HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert parser.next_event() is SEND_CONTINUE
    assert parser.next_event() is NEED_DATA
    assert parser.in_request
    parser.feed(b"abc")
    assert parser.next_event() == Request("PUT", "/mmds", b"abc", True)
    assert not parser.in_request
    with pytest.raises(ProtocolError) as info:
        parse_all(b"PUT / HTTP/1.1\r\nExpect: magic\r\n\r\n")
    assert info.value.status == 417


@given(cuts=st.lists(st.integers(0, 200), max_size=8))
def test_parser_result_does_not_depend_on_how_bytes_arrive(cuts):
    data = (
        b'PUT /mmds HTTP/1.1\r\nContent-Length: 11\r\n\r\n{"a": [1]} '
        b"GET / HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    )
    expected = parse_all(data)
    parser = RequestParser()
    got: list[Request] = []
    start = 0
    for cut in [*sorted(c % len(data) for c in cuts), len(data)]:
        parser.feed(data[start:cut])
        start = max(start, cut)
        while (event := parser.next_event()) is not NEED_DATA:
            got.append(event)
    assert got == expected


def test_render_response():
    ok = render_response(Response(200, {"a": "é"}), keep_alive=True)
    head, body = ok.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: application/json" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {"a": "é"}
    empty = render_response(Response(204, {"ignored": 1}), keep_alive=False)
    assert empty.endswith(b"Connection: close\r\n\r\n")
    assert b"Content-Length" not in empty
    old = render_response(
        Response(204, headers=(("Deprecation", "true"),)), keep_alive=True, version="HTTP/1.0"
    )
    assert b"Deprecation: true\r\n" in old and b"Connection: keep-alive" in old


# --- the server over a real Unix socket -------------------------------------------------------


_OPEN_CLIENTS: list[Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


class Client:
    """A raw HTTP client on one Unix socket connection (closed after each test)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _OPEN_CLIENTS.append(self)
        self.sock.settimeout(5.0)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> None:
        length = f"Content-Length: {len(body)}\r\n" if body else ""
        self.send(
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{length}{headers}\r\n".encode() + body
        )

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before a response")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def is_closed(self) -> bool:
        try:
            return not self._fill()
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def echo(method: str, path: str, body: bytes) -> Response:
    """Answers with what it got; /fail raises, /slow sleeps, /empty answers 204."""
    if path == "/fail":
        raise RuntimeError("boom")
    if path == "/slow":
        time.sleep(0.3)
    if path == "/empty":
        return Response(204)
    return Response(200, {"method": method, "path": path, "body": body.decode()})


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: AF_UNIX paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pyvmm-api-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(sock_dir: Path) -> Iterator[ApiServer]:
    with ApiServer(sock_dir / "api.sock", echo, request_timeout=2.0) as api:
        yield api


def test_socket_is_private_and_removed_on_close(sock_dir):
    api = ApiServer(sock_dir / "api.sock", echo)
    api.start()
    info = os.stat(api.path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    api.close()
    assert not api.path.exists()
    api.close()  # idempotent


def test_a_file_or_a_live_socket_is_refused_and_a_stale_socket_replaced(sock_dir, caplog):
    path = sock_dir / "api.sock"
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match=r"already exists and is not a socket"):
        ApiServer(path, echo).start()
    assert path.read_text() == "not a socket"
    path.unlink()
    with ApiServer(path, echo), pytest.raises(ConfigError, match=r"is in use: another process"):
        ApiServer(path, echo).start()  # someone serves there
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # what a SIGKILLed VMM leaves behind
    with caplog.at_level("WARNING"), ApiServer(path, echo) as api:
        client = Client(api.path)
        client.request("GET", "/")
        assert client.response()[0] == 200
    assert "removed the stale socket" in caplog.text


def test_keep_alive_serves_several_requests_on_one_connection(server):
    client = Client(server.path)
    for index in range(5):
        client.request("PUT", f"/drives/d{index}", json.dumps({"n": index}).encode())
        status, headers, body = client.response()
        assert status == 200 and "connection" not in headers
        assert json.loads(body) == {
            "method": "PUT",
            "path": f"/drives/d{index}",
            "body": json.dumps({"n": index}),
        }
    client.request("GET", "/empty")
    status, headers, body = client.response()
    assert status == 204 and body == b"" and "content-length" not in headers
    client.request("GET", "/last", headers="Connection: close\r\n")
    assert client.response()[0] == 200
    assert client.is_closed()


def test_pipelined_requests_are_answered_in_order(server):
    client = Client(server.path)
    client.send(b"GET /a HTTP/1.1\r\n\r\nGET /slow HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n")
    paths = [json.loads(client.response()[2])["path"] for _ in range(3)]
    assert paths == ["/a", "/slow", "/c"]


def test_http_10_closes_unless_keep_alive(server):
    client = Client(server.path)
    client.send(b"GET /x HTTP/1.0\r\n\r\n")
    assert client.response()[0] == 200
    assert client.is_closed()


def test_oversized_body_gets_400_and_the_connection_closes(server):
    client = Client(server.path)
    body = b"x" * 60000
    client.send(f"PUT /mmds HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    status, headers, raw = client.response()
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(raw) == {
        "fault_message": "Request payload with size 60000 is larger than the limit of 51200 "
        "allowed by server."
    }
    assert client.is_closed()


@pytest.mark.parametrize(
    "data",
    [
        b"HELLO\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_malformed_requests_get_400_with_a_fault_message(server, data):
    client = Client(server.path)
    client.send(data)
    status, _, raw = client.response()
    assert status == 400 and json.loads(raw)["fault_message"]
    assert client.is_closed()


def test_expect_100_continue(server):
    client = Client(server.path)
    client.send(b"PUT /mmds HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert client.response()[0] == 100
    client.send(b"{}")
    status, _, raw = client.response()
    assert status == 200 and json.loads(raw)["body"] == "{}"


def test_a_handler_error_is_a_500_and_the_connection_lives_on(server):
    client = Client(server.path)
    client.request("GET", "/fail")
    status, _, raw = client.response()
    assert status == 500 and "RuntimeError: boom" in json.loads(raw)["fault_message"]
    client.request("GET", "/ok")
    assert client.response()[0] == 200


def test_a_stalled_client_does_not_block_another(server):
    stalled = Client(server.path)
    stalled.send(b'PUT /mmds HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"half')
    other = Client(server.path)
    started = time.monotonic()
    other.request("GET", "/")
    assert other.response()[0] == 200
    assert time.monotonic() - started < 1.0
    stalled.close()


def test_a_stalled_request_times_out(sock_dir):
    with ApiServer(sock_dir / "api.sock", echo, request_timeout=0.2) as api:
        client = Client(api.path)
        client.send(b"GET / HTTP/1.1\r\nHost:")
        assert client.is_closed()
        idle = Client(api.path)  # idle keep-alive connections are not timed out
        time.sleep(0.4)
        idle.request("GET", "/")
        assert idle.response()[0] == 200


def test_concurrent_clients_from_threads(server):
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            client = Client(server.path)
            for index in range(10):
                client.request("PUT", f"/w{worker}", str(index).encode())
                status, _, raw = client.response()
                assert status == 200 and json.loads(raw)["body"] == str(index)
            client.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors


def test_a_new_client_is_served_whatever_idle_and_slow_clients_hold(sock_dir):
    """Idle keep-alive clients and a slowloris fill the server; a newcomer is still served,
    and the connection that waited longest without a request being handled makes room."""
    with ApiServer(sock_dir / "api.sock", echo, max_connections=3) as api:
        oldest, idle = Client(api.path), Client(api.path)
        for client in (oldest, idle):
            client.request("GET", "/")
            assert client.response()[0] == 200
        slow = Client(api.path)
        slow.send(b"PUT /x HTTP/1.1\r\nContent-Length: 500\r\n\r\n{")  # then it stalls
        time.sleep(0.1)
        for _ in range(5):  # each newcomer is served, one waiting connection at a time goes
            newcomer = Client(api.path)
            newcomer.request("GET", "/")
            assert newcomer.response()[0] == 200
        assert oldest.is_closed()
        assert api.connection_count <= 3


def test_503_only_when_every_connection_has_a_request_being_handled(sock_dir):
    release = threading.Event()

    def slow(method: str, path: str, body: bytes) -> Response:
        release.wait(10)
        return Response(200, {"ok": True})

    with ApiServer(sock_dir / "api.sock", slow, max_connections=2) as api:
        busy = [Client(api.path) for _ in range(2)]
        for client in busy:
            client.request("GET", "/")
        deadline = time.monotonic() + 5
        while api.busy_count < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        third = Client(api.path)
        status, _, raw = third.response()
        assert status == 503 and "at most 2" in json.loads(raw)["fault_message"]
        release.set()
        assert [client.response()[0] for client in busy] == [200, 200]


def test_a_request_trickled_in_is_cut_at_its_deadline(sock_dir):
    """A slowloris sender cannot extend its request by sending a byte now and then."""
    with ApiServer(sock_dir / "api.sock", echo, request_timeout=0.5) as api:
        client = Client(api.path)
        stop = threading.Event()

        def trickle() -> None:
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\n" * 10:
                if stop.wait(0.05):
                    return
                try:
                    client.send(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle)
        started = time.monotonic()
        sender.start()
        try:
            assert client.is_closed()  # the server hung up (recv ends) ...
            assert time.monotonic() - started < 2  # ... at the deadline, not after 400 bytes
        finally:
            stop.set()
            sender.join()


def test_close_ends_open_connections_and_joins(sock_dir):
    api = ApiServer(sock_dir / "api.sock", echo)
    api.start()
    clients = [Client(api.path) for _ in range(3)]
    clients[0].send(b"GET / HTTP/1.1\r\n")  # half a request
    clients[1].request("GET", "/")
    clients[1].response()
    started = time.monotonic()
    api.close()
    assert time.monotonic() - started < 2.0
    assert api.connection_count == 0
    assert all(client.is_closed() for client in clients)
    assert not [t for t in threading.enumerate() if t.name.startswith("api-")]
