"""The Unix-socket back end of virtio-vsock: uds_path checks, CONNECT handshakes, timeouts."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from pyvmm.devices.virtio.vsock_packet import (
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VSOCK_HOST_CID,
)
from pyvmm.errors import ConfigError
from pyvmm.host.vsock_uds import MAX_UDS_PATH_BYTES, VsockUds, check_uds_path, parse_connect_line
from pyvmm.vmm.event_loop import EventLoop
from tests.support.vsock_driver import (
    GUEST_CID,
    recv_exactly,
    recv_until_eof,
    vsock_env,
    wait_until,
)

HOST_PORT_BASE = 1 << 30


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="vu-", dir="/tmp"))  # short: sun_path is 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(sockdir):
    with vsock_env(sockdir / "v.sock", connect_timeout=0.3, response_timeout=0.5) as e:
        yield e


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


# --- uds_path ------------------------------------------------------------------------------------
def test_uds_path_errors(sockdir):
    with pytest.raises(ConfigError, match="at most 107"):
        check_uds_path(sockdir / ("x" * MAX_UDS_PATH_BYTES))
    with pytest.raises(ConfigError, match="missing"):
        check_uds_path(sockdir / "nodir" / "v.sock")
    with pytest.raises(ConfigError, match="empty"):
        check_uds_path("")
    (sockdir / "file").write_text("")
    with pytest.raises(ConfigError, match="already exists"):
        check_uds_path(sockdir / "file")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sockdir / "stale.sock"))
    stale.close()  # a socket file nobody listens on any more
    # A socket file nobody listens on is stale: replaced (a killed VMM leaves one behind).
    VsockUds(sockdir / "stale.sock").close()
    assert not (sockdir / "stale.sock").exists()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sockdir / "live.sock"))
    live.listen()
    with pytest.raises(ConfigError, match="in use"):
        VsockUds(sockdir / "live.sock")
    live.close()
    assert check_uds_path(sockdir / "v.sock") == sockdir / "v.sock"


def test_close_removes_the_socket_and_closes_streams(sockdir):
    loop = EventLoop()
    backend = VsockUds(sockdir / "v.sock")
    backend.subscribe(loop, lambda: None)
    assert (sockdir / "v.sock").is_socket()
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sockdir / "v.sock_9"))
    srv.listen()
    stream = backend.connect(9)
    host, _ = srv.accept()
    with pytest.raises(OSError):
        backend.connect(10)  # nobody listens at v.sock_10
    assert backend.stream_count == 1
    backend.close()
    backend.close()
    assert not (sockdir / "v.sock").exists()
    assert stream.closed and backend.stream_count == 0
    assert host.recv(1) == b""
    loop.close()


def test_close_leaves_a_replaced_path_alone(sockdir):
    loop = EventLoop()
    backend = VsockUds(sockdir / "v.sock")
    backend.subscribe(loop, lambda: None)
    os.unlink(sockdir / "v.sock")
    (sockdir / "v.sock").write_text("someone else's")
    backend.close()
    assert (sockdir / "v.sock").read_text() == "someone else's"
    loop.close()


@pytest.mark.parametrize(
    ("line", "port"),
    [
        (b"CONNECT 52\n", 52),
        (b"CONNECT 0\n", 0),
        (b"CONNECT 4294967295\n", 2**32 - 1),
        (b"CONNECT 52\r\n", 52),
        (b"CONNECT 4294967296\n", None),
        (b"CONNECT 52", None),
        (b"CONNECT -1\n", None),
        (b"CONNECT  52\n", None),
        (b"CONNECT 5 2\n", None),
        (b"connect 52\n", None),
        (b"CONNECT \n", None),
        (b"CONNECT 0x10\n", None),
        (b"CONNECT \xd9\xa3\n", None),
        (b"CONNECT 00000000052\n", None),
    ],
)
def test_parse_connect_line(line, port):
    assert parse_connect_line(line) == port


# --- host-initiated connections ----------------------------------------------------------------
def test_host_connect_handshake_and_echo(env):
    client = env.host_connect(b"CONNECT 52\n")
    conn = env.accept_request(52)
    request = conn.packets[0].hdr
    assert (request.src_cid, request.dst_cid) == (VSOCK_HOST_CID, GUEST_CID)
    assert (request.src_port, request.dst_port) == (HOST_PORT_BASE, 52)
    assert request.op == VIRTIO_VSOCK_OP_REQUEST and request.buf_alloc == 256 * 1024
    assert read_line(client) == b"OK %d\n" % HOST_PORT_BASE
    client.sendall(b"echo me")
    wait_until(lambda: env.guest.dispatch() is not None and conn.data == b"echo me")
    conn.write_some(bytes(conn.data))
    assert recv_exactly(client, 7) == b"echo me"
    # A second client gets the next host port.
    other = env.host_connect(b"CONNECT 52\n")
    env.accept_request(52)
    assert read_line(other) == b"OK %d\n" % (HOST_PORT_BASE + 1)


def test_host_half_close_then_guest_echoes_and_closes(env):
    client = env.host_connect(b"CONNECT 7\n")
    conn = env.accept_request(7)
    assert read_line(client).startswith(b"OK ")
    client.sendall(b"all of it")
    client.shutdown(socket.SHUT_WR)
    wait_until(lambda: env.guest.dispatch() is not None and VIRTIO_VSOCK_OP_SHUTDOWN in conn.ops())
    assert conn.data == b"all of it"
    conn.write_some(bytes(conn.data))
    conn.send(
        VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND
    )
    assert recv_until_eof(client) == b"all of it"
    assert env.device.connections == 0


def test_bytes_right_after_the_connect_line_are_kept(env):
    client = env.host_connect(b"CONNECT 8\nearly bytes")
    conn = env.accept_request(8)
    assert read_line(client).startswith(b"OK ")
    wait_until(lambda: env.guest.dispatch() is not None and conn.data == b"early bytes")
    assert VIRTIO_VSOCK_OP_RW in conn.ops()


def test_guest_refusal_closes_the_client(env):
    client = env.host_connect(b"CONNECT 9\n")
    env.accept_request(9, answer=VIRTIO_VSOCK_OP_RST)  # nobody listens on guest port 9
    assert recv_until_eof(client) == b""
    assert env.device.connections == 0


def test_guest_that_never_answers_times_out(env):
    client = env.host_connect(b"CONNECT 10\n")
    env.guest.fill_rx(8)
    wait_until(lambda: env.guest.dispatch() is not None and env.guest.unrouted)
    assert recv_until_eof(client) == b""  # after response_timeout
    env.guest.dispatch()
    rst = [p for p in env.guest.unrouted if p.hdr.op == VIRTIO_VSOCK_OP_RST]
    if not rst:
        rst = wait_until(
            lambda: [p for p in env.guest.dispatch() if p.hdr.op == VIRTIO_VSOCK_OP_RST]
        )
    assert rst[0].hdr.src_port == HOST_PORT_BASE
    assert env.device.connections == 0
    assert env.backend.stream_count == 0


@pytest.mark.parametrize(
    "line",
    [b"CONNECT x\n", b"HELLO 52\n", b"CONNECT 99999999999\n", b"C" * 40, b"CONNECT 5"],
    ids=["not a number", "not CONNECT", "port too big", "overlong", "no newline before EOF"],
)
def test_bad_connect_line_closes_the_client(env, line):
    client = env.host_connect(line)
    if not line.endswith(b"\n") and len(line) < 32:
        client.shutdown(socket.SHUT_WR)
    assert recv_until_eof(client) == b""
    wait_until(lambda: env.backend.stream_count == 0)
    env.guest.fill_rx(4)
    assert env.guest.dispatch() == []  # the guest heard nothing


def test_silent_client_times_out(env):
    client = env.host_connect(b"CONN")
    assert recv_until_eof(client) == b""  # after connect_timeout
    assert env.backend.stream_count == 0


def test_connect_before_the_guest_listens_to_the_device(sockdir):
    """A CONNECT while the device has no RX buffers waits; the REQUEST follows them."""
    with vsock_env(sockdir / "v.sock") as env:
        client = env.host_connect(b"CONNECT 11\n")
        wait_until(lambda: env.backend.stream_count == 1)
        conn = env.accept_request(11)  # posts RX buffers now
        assert read_line(client).startswith(b"OK ")
        conn.send(VIRTIO_VSOCK_OP_RW, b"hi")
        assert recv_exactly(client, 2) == b"hi"


def test_many_host_clients_and_guest_rst_for_unknown(env):
    clients = [env.host_connect(b"CONNECT %d\n" % (100 + i)) for i in range(5)]
    conns = [env.accept_request(100 + i) for i in range(5)]
    for i, client in enumerate(clients):
        assert read_line(client) == b"OK %d\n" % (HOST_PORT_BASE + i)
        client.sendall(b"n%d" % i)
    wait_until(
        lambda: (
            env.guest.dispatch() is not None
            and [bytes(c.data) for c in conns] == [b"n%d" % i for i in range(5)]
        )
    )
    for conn in conns:
        conn.send(VIRTIO_VSOCK_OP_RST)
    for client in clients:
        assert recv_until_eof(client) == b""
    assert env.device.connections == 0
    assert not [p for p in env.guest.unrouted if p.hdr.op == VIRTIO_VSOCK_OP_RST]


def test_stream_cap_refuses_clients_and_guest_connects(sockdir):
    with vsock_env(sockdir / "v.sock", max_streams=1) as env:
        first = env.host_connect(b"")
        wait_until(lambda: env.backend.stream_count == 1)
        second = env.host_connect(b"CONNECT 1\n")
        assert recv_until_eof(second) == b""  # over the cap: closed at once
        srv = env.listen(80)
        conn = env.guest.socket(5000, 80)
        env.guest.fill_rx(4)
        conn.connect()
        wait_until(lambda: env.guest.dispatch() is not None and conn.packets)
        assert conn.ops() == [VIRTIO_VSOCK_OP_RST]
        first.close()
        srv.close()
