"""virtio-vsock behind virtio-mmio, with real Unix sockets and an event-loop thread on the host."""

from __future__ import annotations

import fcntl
import random
import shutil
import socket
import tempfile
import termios
import threading
import time
from pathlib import Path

import pytest

from pyvmm.config import check_guest_cid
from pyvmm.devices.virtio import vsock as vsock_module
from pyvmm.devices.virtio.ids import VIRTIO_ID_VSOCK
from pyvmm.devices.virtio.mmio import TRANSPORT_FEATURES, Reg
from pyvmm.devices.virtio.vsock import VirtioVsock, VirtioVsockState
from pyvmm.devices.virtio.vsock_packet import (
    HDR,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
)
from pyvmm.errors import ConfigError
from tests.support.vsock_driver import (
    GUEST_CID,
    GuestConn,
    VsockEnv,
    recv_exactly,
    recv_until_eof,
    vsock_env,
    wait_until,
)

KIB = 1024
BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND


@pytest.fixture
def sockdir():
    path = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))  # short: sun_path is 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(sockdir):
    with vsock_env(sockdir / "v.sock") as e:
        yield e


def wait_op(env: VsockEnv, conn: GuestConn, op: int) -> None:
    wait_until(lambda: env.guest.dispatch() is not None and op in conn.ops(), what=f"op {op}")


def unrouted_after(env: VsockEnv) -> list:
    env.guest.dispatch()
    out, env.guest.unrouted = env.guest.unrouted, []
    return out


def host_backlog(sock: socket.socket) -> int:
    """Bytes waiting unread in a host socket."""
    buf = bytearray(4)
    fcntl.ioctl(sock, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


# --- identity ---------------------------------------------------------------------------------
def test_identity_config_and_features(env):
    g = env.guest
    assert g.rd(Reg.DEVICE_ID) == VIRTIO_ID_VSOCK
    assert g.device_features() == TRANSPORT_FEATURES  # no device bits: stream only
    assert (g.rd(Reg.CONFIG), g.rd(Reg.CONFIG + 4)) == (GUEST_CID, 0)
    buf = bytearray(2)
    g.mmio.read(Reg.CONFIG, memoryview(buf))
    assert buf == bytes([GUEST_CID, 0])


@pytest.mark.parametrize("cid", [0, 1, 2, 2**32 - 1, 2**32, -3, True, "3", 3.0])
def test_check_guest_cid_rejects(cid):
    with pytest.raises(ConfigError, match="CID"):
        check_guest_cid(cid)


def test_check_guest_cid_accepts_range():
    assert check_guest_cid(3) == 3
    assert check_guest_cid(2**32 - 2) == 2**32 - 2
    with pytest.raises(ConfigError):
        VirtioVsock(2, backend=None)  # type: ignore[arg-type]


# --- guest-initiated connections ------------------------------------------------------------------
def test_guest_connect_and_small_data_both_ways(env):
    conn, host = env.guest_connect(port=1234, local_port=5000)
    response = conn.packets[0].hdr
    assert (response.src_port, response.dst_port) == (1234, 5000)
    assert response.buf_alloc == 256 * KIB and response.fwd_cnt == 0
    conn.write_some(b"hello host")
    assert recv_exactly(host, 10) == b"hello host"
    host.sendall(b"hello guest")
    wait_until(lambda: env.guest.dispatch() is not None and conn.data == b"hello guest")
    assert env.device.connections == 1


def test_guest_connect_to_missing_socket_gets_rst(env):
    conn = env.guest.socket(5000, 999)
    env.guest.fill_rx(8)
    conn.connect()
    wait_op(env, conn, VIRTIO_VSOCK_OP_RST)
    assert conn.ops() == [VIRTIO_VSOCK_OP_RST]
    assert env.device.connections == 0


def test_megabyte_each_way_within_credit(env):
    """1 MiB each way at once; the guest advertises only 64 KiB, the device 256 KiB."""
    size = 1 << 20
    conn, host = env.guest_connect(buf_alloc=64 * KIB)
    to_guest = random.Random(1).randbytes(size)
    to_host = memoryview(random.Random(2).randbytes(size))
    received: list[bytes] = []
    writer = threading.Thread(target=host.sendall, args=(to_guest,))
    reader = threading.Thread(target=lambda: received.append(recv_exactly(host, size)))
    writer.start()
    reader.start()
    sent = 0
    deadline = time.monotonic() + 8
    while len(conn.data) < size or sent < size:
        assert time.monotonic() < deadline, (len(conn.data), sent)
        env.guest.dispatch()  # on_packet asserts the device kept within our credit
        conn.consume()
        sent += conn.write_some(bytes(to_host[sent : sent + 256 * KIB]))
        time.sleep(0.0002)
    writer.join(5)
    reader.join(5)
    assert conn.data == to_guest
    assert received == [to_host.tobytes()]
    assert env.device.stats.guest_errors == 0


def test_two_connections_share_the_rx_queue(env):
    first, host1 = env.guest_connect(port=1, local_port=5001)
    second, host2 = env.guest_connect(port=2, local_port=5002)
    data1, data2 = b"a" * 100 * KIB, b"b" * 100 * KIB
    host1.sendall(data1)
    host2.sendall(data2)

    def done() -> bool:
        env.guest.dispatch()
        first.consume()
        second.consume()
        return len(first.data) == len(data1) and len(second.data) == len(data2)

    wait_until(done)
    assert first.data == data1 and second.data == data2


def test_host_eof_is_shutdown_send_and_guest_may_still_send(env):
    conn, host = env.guest_connect()
    host.sendall(b"bye")
    host.shutdown(socket.SHUT_WR)
    wait_op(env, conn, VIRTIO_VSOCK_OP_SHUTDOWN)
    assert conn.data == b"bye"
    assert conn.packets[-1].hdr.flags == VIRTIO_VSOCK_SHUTDOWN_SEND  # half-close only
    conn.write_some(b"late reply")
    assert recv_exactly(host, 10) == b"late reply"
    conn.send(VIRTIO_VSOCK_OP_SHUTDOWN, flags=BOTH)
    wait_op(env, conn, VIRTIO_VSOCK_OP_RST)  # fully closed: the device lets go with RST
    assert recv_until_eof(host) == b""
    assert env.device.connections == 0


def test_guest_half_close_then_host_finishes(env):
    conn, host = env.guest_connect()
    conn.write_some(b"ping")
    conn.send(VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert recv_until_eof(host) == b"ping"  # shutdown(SHUT_WR) reached the host
    host.sendall(b"pong")
    host.close()
    wait_op(env, conn, VIRTIO_VSOCK_OP_RST)
    assert conn.data == b"pong"
    assert conn.ops() == [VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_RST]
    assert env.device.connections == 0


def test_guest_rst_closes_host_socket(env):
    conn, host = env.guest_connect()
    conn.send(VIRTIO_VSOCK_OP_RST)
    assert recv_until_eof(host) == b""
    assert env.device.connections == 0
    assert not [p for p in unrouted_after(env) if p.hdr.op == VIRTIO_VSOCK_OP_RST]


def test_host_close_then_guest_write_gets_rst(env):
    conn, host = env.guest_connect()
    host.close()
    wait_op(env, conn, VIRTIO_VSOCK_OP_SHUTDOWN)
    conn.write_some(b"anyone?")
    wait_op(env, conn, VIRTIO_VSOCK_OP_RST)
    assert env.device.connections == 0


# --- credit ---------------------------------------------------------------------------------------
def test_backpressure_buffers_at_most_buf_alloc_then_resumes(env):
    conn, host = env.guest_connect()
    data = random.Random(3).randbytes(2 << 20)
    sent = 0
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 0.1:  # write until the credit stays at zero
        env.guest.dispatch()
        n = conn.write_some(data[sent : sent + 64 * KIB])
        sent += n
        if n:
            idle_since = time.monotonic()
    assert 256 * KIB <= sent < len(data)
    assert conn.peer_credit() == 0
    held_by_device = sent - host_backlog(host)
    assert 0 < held_by_device <= 256 * KIB
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_exactly(host, len(data))))
    reader.start()
    deadline = time.monotonic() + 5
    while sent < len(data):
        assert time.monotonic() < deadline
        env.guest.dispatch()
        sent += conn.write_some(data[sent : sent + 64 * KIB])
    reader.join(5)
    assert received == [data]
    assert VIRTIO_VSOCK_OP_CREDIT_UPDATE in conn.ops()


def test_credit_update_after_consumption(env):
    conn, host = env.guest_connect()
    chunk = b"x" * 50 * KIB
    for _ in range(3):
        conn.send(VIRTIO_VSOCK_OP_RW, chunk)
        assert recv_exactly(host, len(chunk)) == chunk
    assert env.guest.dispatch() == []  # the guest still believes it has 106 KiB
    conn.send(VIRTIO_VSOCK_OP_RW, chunk)  # now it would believe 56 KiB < 64 KiB
    wait_op(env, conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    update = conn.packets[-1].hdr
    assert (update.buf_alloc, update.fwd_cnt) == (256 * KIB, 200 * KIB)


def test_credit_request_is_answered(env):
    conn, host = env.guest_connect()
    conn.send(VIRTIO_VSOCK_OP_RW, b"12345")
    assert recv_exactly(host, 5) == b"12345"
    conn.send(VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    wait_op(env, conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    assert conn.packets[-1].hdr.fwd_cnt == 5


def test_guest_overrunning_credit_loses_the_connection(env):
    conn, _host = env.guest_connect()  # keep the host end open: it just never reads
    for _ in range(32):  # 2 MiB, ignoring the device's 256 KiB credit; the host reads nothing
        conn.send(VIRTIO_VSOCK_OP_RW, b"z" * 64 * KIB)
        if env.device.connections == 0:
            break
    wait_op(env, conn, VIRTIO_VSOCK_OP_RST)
    assert env.device.connections == 0
    assert env.device.stats.guest_errors >= 1


def test_device_does_not_read_host_without_guest_credit(env):
    conn, host = env.guest_connect(buf_alloc=8 * KIB)
    host.sendall(b"q" * 20 * KIB)
    wait_until(lambda: env.guest.dispatch() is not None and len(conn.data) == 8 * KIB)
    time.sleep(0.05)
    env.guest.dispatch()
    assert len(conn.data) == 8 * KIB  # the rest waits in the host socket
    conn.consume()
    conn.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    wait_until(lambda: env.guest.dispatch() is not None and len(conn.data) == 16 * KIB)


# --- malformed guest packets ----------------------------------------------------------------------
MALFORMED = {
    # name: (send keyword arguments, expected answer)
    "wrong source CID": (dict(op=VIRTIO_VSOCK_OP_REQUEST, src_cid=7), "drop"),
    "wrong destination CID": (dict(op=VIRTIO_VSOCK_OP_REQUEST, dst_cid=1), "drop"),
    "CID with high bits": (dict(op=VIRTIO_VSOCK_OP_RW, src_cid=GUEST_CID | 1 << 40), "drop"),
    "len beyond the buffer": (dict(op=VIRTIO_VSOCK_OP_RW, payload=b"x" * 10, length=100), "rst"),
    "seqpacket type": (dict(op=VIRTIO_VSOCK_OP_REQUEST, type_=2), "rst"),
    "unknown op": (dict(op=42), "rst"),
    "invalid op 0": (dict(op=0), "rst"),
    "RW for no connection": (dict(op=VIRTIO_VSOCK_OP_RW, payload=b"data"), "rst"),
    "RESPONSE for no connection": (dict(op=VIRTIO_VSOCK_OP_RESPONSE), "rst"),
    "SHUTDOWN for no connection": (dict(op=VIRTIO_VSOCK_OP_SHUTDOWN, flags=3), "rst"),
    "CREDIT_UPDATE for no connection": (dict(op=VIRTIO_VSOCK_OP_CREDIT_UPDATE), "rst"),
    "RST for no connection": (dict(op=VIRTIO_VSOCK_OP_RST), "drop"),
    "payload over 64 KiB": (dict(op=VIRTIO_VSOCK_OP_RW, payload=b"y" * (65 * KIB)), "rst"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_packet_is_answered_or_dropped(env, name):
    kwargs, expected = MALFORMED[name]
    env.guest.fill_rx(4)
    op = kwargs.pop("op")
    env.guest.send(op, 4000, 77, **kwargs)
    packets = unrouted_after(env)
    if expected == "drop":
        assert packets == []
    else:
        assert [(p.hdr.op, p.hdr.src_port, p.hdr.dst_port) for p in packets] == [
            (VIRTIO_VSOCK_OP_RST, 77, 4000)
        ]
    assert not env.guest.needs_reset()
    assert env.device.connections == 0


def test_malformed_chains_are_returned_unused(env):
    g = env.guest
    errors = env.device.stats.guest_errors
    g.send_chain([g.tx.readable(b"short header")])  # 12 bytes
    g.send_chain([g.tx.readable(bytes(44)), g.tx.writable(16)])  # TX with a writable buffer
    assert g.tx.used_elem(0)[1] == 0
    # RX chains that cannot carry a packet: one with a readable buffer, one too small.
    bad = [[g.rx.readable(b"r" * 8), g.rx.writable(100)], [g.rx.writable(20)]]
    for bufs in bad:
        g._rx_chains[g.rx.send(bufs)] = bufs
    g.kick(0)
    g.send(VIRTIO_VSOCK_OP_RW, 4000, 77, b"x")  # earns an RST
    assert g.collect() == []  # both bad chains came back with length 0
    g.fill_rx(1)
    assert [p.hdr.op for p in g.collect()] == [VIRTIO_VSOCK_OP_RST]
    assert env.device.stats.guest_errors == errors + 4
    assert not g.needs_reset()


def test_random_packets_never_break_the_device(env):
    rng = random.Random(7)
    env.listen(80)
    g = env.guest
    g.fill_rx(32)
    for _ in range(300):
        payload = rng.randbytes(rng.choice([0, 0, 1, 10, 200]))
        g.send(
            rng.randrange(9),
            rng.randrange(4000, 4004),
            rng.choice([77, 80, 1 << 30]),
            payload,
            flags=rng.randrange(4),
            buf_alloc=rng.choice([0, 1, 4096, 2**32 - 1]),
            fwd_cnt=rng.randrange(2**32),
            length=rng.choice([None, None, rng.randrange(2**32)]),
            type_=rng.choice([1, 1, 1, 2, 0]),
        )
        g.dispatch()
    assert not g.needs_reset()
    assert env.loop_errors == []
    assert env.device.connections <= 4


def test_headers_split_across_buffers(env):
    g = env.guest
    g.rx_sizes = (30, 14, 100)  # the device scatters its header over two buffers
    conn, host = env.guest_connect()
    header = HDR.pack(GUEST_CID, 2, 5000, 1234, 3, 1, VIRTIO_VSOCK_OP_RW, 0, 256 * KIB, 0)
    g.send_chain([g.tx.readable(header[:20]), g.tx.readable(header[20:] + b"abc")])
    assert recv_exactly(host, 3) == b"abc"
    host.sendall(b"x" * 250)
    wait_until(lambda: g.dispatch() is not None and len(conn.data) == 250)
    assert all(len(p.payload) <= 100 for p in conn.packets)


def test_unknown_op_on_a_live_connection_resets_it(env):
    conn, host = env.guest_connect()
    conn.send(42)
    wait_op(env, conn, VIRTIO_VSOCK_OP_RST)
    assert recv_until_eof(host) == b""


def test_request_reusing_a_live_pair_resets_it(env):
    conn, host = env.guest_connect()
    conn.connect()
    wait_op(env, conn, VIRTIO_VSOCK_OP_RST)
    assert recv_until_eof(host) == b""
    assert env.device.connections == 0


# --- limits ---------------------------------------------------------------------------------------
def test_connection_cap(sockdir):
    with vsock_env(sockdir / "v.sock", device_kw={"max_connections": 2}) as env:
        srv = env.listen(80)
        g = env.guest
        g.fill_rx(8)
        conns = [g.socket(5000 + i, 80) for i in range(3)]
        for conn in conns:
            conn.connect()
        wait_until(lambda: g.dispatch() is not None and all(c.packets for c in conns))
        assert [c.ops() for c in conns] == [
            [VIRTIO_VSOCK_OP_RESPONSE],
            [VIRTIO_VSOCK_OP_RESPONSE],
            [VIRTIO_VSOCK_OP_RST],
        ]
        assert env.device.stats.refused == 1
        conns[0].send(VIRTIO_VSOCK_OP_RST)
        conns[2].packets.clear()
        conns[2].connect()
        wait_op(env, conns[2], VIRTIO_VSOCK_OP_RESPONSE)
        srv.close()


def test_tx_waits_while_rsts_are_backed_up(env, monkeypatch):
    monkeypatch.setattr(vsock_module, "RST_BACKLOG_LIMIT", 4)
    g = env.guest
    for port in range(10):  # ten packets that each earn an RST, and no RX buffers yet
        header = HDR.pack(GUEST_CID, 2, 4000 + port, 77, 0, 1, VIRTIO_VSOCK_OP_RW, 0, 0, 0)
        g.tx.send([g.tx.readable(header)])
    g.kick(1)
    assert g.tx.used_idx() == 4  # the rest stays in the ring
    g.fill_rx(16)
    packets = unrouted_after(env)
    assert g.tx.used_idx() == 10
    assert sorted(p.hdr.dst_port for p in packets) == list(range(4000, 4010))


# --- transport reset, device reset, persistence -----------------------------------------------
def test_transport_reset_event_drops_connections(env):
    _conn, host = env.guest_connect()
    irqs = env.guest.irq.count
    env.guest.post_event_buffer()
    assert env.device.send_transport_reset() is True
    assert env.guest.events() == [(4, bytes(4))]  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    assert env.guest.irq.count > irqs
    assert recv_until_eof(host) == b""
    assert env.device.connections == 0
    assert env.device.send_transport_reset() is False  # no event buffer left


def test_driver_reset_closes_connections(env):
    _conn, host = env.guest_connect()
    env.guest.wr(Reg.STATUS, 0)
    assert recv_until_eof(host) == b""
    assert env.device.connections == 0


def test_save_restore(env):
    state = env.device.save()
    assert state == VirtioVsockState(guest_cid=GUEST_CID)
    fresh = VirtioVsock(GUEST_CID, env.backend)
    fresh.restore(state)
    assert fresh.save() == state
    clone = VirtioVsock(GUEST_CID + 1, env.backend)  # a clone restored with its own CID
    clone.restore(state)
    assert clone.save() == VirtioVsockState(guest_cid=GUEST_CID + 1)
    config = bytearray(8)
    clone.read_config(0, memoryview(config))
    assert int.from_bytes(config, "little") == GUEST_CID + 1  # what the guest re-reads
    # Connections do not survive a restore.
    _conn, host = env.guest_connect()
    with env.guest.mmio._lock:  # as the snapshot code would hold it
        env.device.restore(state)
    assert recv_until_eof(host) == b""
    assert env.device.connections == 0
