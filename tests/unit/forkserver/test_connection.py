"""A client connection on the server side, over a real socketpair: fds, limits, hang-ups."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator

import pytest

from pyvmm.forkserver.connection import Connection, peer_uid
from pyvmm.forkserver.protocol import ProtocolError, Request, frame, parse_request, request_frame


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Connection]]:
    client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    connection = Connection(server)
    yield client, connection
    client.close()
    connection.close()


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def open_fds(count: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]


def test_a_request_and_its_fds_arrive_together(pair) -> None:
    client, connection = pair
    fds = open_fds(3)
    request = Request(("run",), "pyvmm", "/", 0o22, {}, (0, 1, 2))
    send_with_fds(client, request_frame(request) + frame({"signal": 15}), fds)
    frames = connection.receive()
    assert frames is not None and len(frames) == 2
    connection.check_fds(parse_request(frames[0]))
    assert len(connection.fds) == 3 and set(connection.fds).isdisjoint(fds)  # new fd numbers
    connection.release_fds()
    assert connection.fds == []
    for fd in fds:
        os.close(fd)


def test_nothing_yet_is_an_empty_list_and_a_hang_up_is_none(pair) -> None:
    client, connection = pair
    assert connection.receive() == []
    client.shutdown(socket.SHUT_WR)
    assert connection.receive() is None


def test_more_fds_than_the_three_standard_ones_are_refused(pair) -> None:
    client, connection = pair
    fds = open_fds(4)
    send_with_fds(client, request_frame(Request(("run",), "p", "/", 0, {}, (0, 1, 2))), fds)
    with pytest.raises(ProtocolError, match="more than 3 file descriptors"):
        connection.receive()
    connection.release_fds()  # what did arrive is closed, not leaked
    for fd in fds:
        os.close(fd)


def test_an_fd_count_that_differs_from_the_request_is_refused(pair) -> None:
    client, connection = pair
    fds = open_fds(2)
    send_with_fds(client, request_frame(Request(("run",), "p", "/", 0, {}, (0, 1, 2))), fds)
    (message,) = connection.receive() or []
    with pytest.raises(ProtocolError, match="names 3 standard fds but 2 file descriptors"):
        connection.check_fds(parse_request(message))
    for fd in fds:
        os.close(fd)


def test_fds_after_the_first_byte_are_refused(pair) -> None:
    client, connection = pair
    data = request_frame(Request(("run",), "p", "/", 0, {}, ()))
    client.sendall(data[:3])
    assert connection.receive() == []
    fds = open_fds(1)
    send_with_fds(client, data[3:], fds)
    with pytest.raises(ProtocolError, match="only with the request's first byte"):
        connection.receive()
    os.close(fds[0])


def test_after_the_request_a_long_frame_is_refused(pair) -> None:
    client, connection = pair
    client.sendall(request_frame(Request(("run",), "p", "/", 0, {}, ())))
    assert len(connection.receive() or []) == 1
    client.sendall(frame({"signal": 15, "pad": "x" * 300}))
    with pytest.raises(ProtocolError, match="over the limit of 256"):
        connection.receive()


def test_peer_uid_is_the_connecting_process_uid(pair) -> None:
    _, connection = pair
    assert peer_uid(connection.sock) == os.getuid()
