"""A real TAP device: the kernel answers ARP and ping through our framing.

Needs /dev/net/tun and CAP_NET_ADMIN (root); skipped with the host's reason
otherwise. Frames carry the zeroed 12-byte virtio_net_hdr_v1, so a reply
proves the header size and the framing the device relies on.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest

from pyvmm.devices.virtio.net import VNET_HDR_SIZE, RxOffloads
from pyvmm.errors import HostError
from pyvmm.host.tap import Tap, create_tap_with_address, run_ip

HOST_IP = bytes([10, 251, 0, 1])
GUEST_IP = bytes([10, 251, 0, 2])
GUEST_MAC = bytes.fromhex("525400abcdef")
BROADCAST = b"\xff" * 6


def _probe() -> str | None:
    try:
        Tap.open().close()
    except HostError as exc:
        return str(exc)
    return None


_REASON = _probe()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture
def tap():
    name = f"pyvt{os.getpid() % 100000}"
    with create_tap_with_address(name, "10.251.0.1/24") as tap:
        yield tap


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_request() -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), HOST_IP)
    return BROADCAST + GUEST_MAC + b"\x08\x06" + arp


def icmp_echo(dst_mac: bytes, ident: int, seq: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, GUEST_IP, HOST_IP)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + ip + icmp


def send(tap: Tap, eth: bytes) -> None:
    assert tap.writev([memoryview(bytes(VNET_HDR_SIZE)), memoryview(eth)]) == (
        VNET_HDR_SIZE + len(eth)
    )


def receive(tap: Tap, match, timeout: float = 3.0) -> tuple[bytes, bytes]:
    """(vnet header, frame) of the first frame ``match`` accepts (others: IPv6 noise)."""
    buf = bytearray(VNET_HDR_SIZE + 65562)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([tap.fd], [], [], left)
        if not ready:
            continue
        n = tap.readv([memoryview(buf)])
        header, eth = bytes(buf[:VNET_HDR_SIZE]), bytes(buf[VNET_HDR_SIZE:n])
        if match(eth):
            return header, eth
    raise AssertionError("no matching frame from the kernel")


def test_kernel_answers_arp_and_ping(tap):
    with pytest.raises(BlockingIOError):
        tap.readv([memoryview(bytearray(2048))])
    send(tap, arp_request())
    header, reply = receive(tap, lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02")
    assert header[:10] == bytes(10)  # no offload flags on a plain ARP frame
    host_mac = reply[22:28]
    assert reply[:6] == GUEST_MAC and reply[28:32] == HOST_IP and reply[38:42] == GUEST_IP

    payload = b"pyvmm virtio-net" * 4
    send(tap, icmp_echo(host_mac, 0x1234, 1, payload))
    _header, echo = receive(tap, lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0)
    assert echo[26:30] == HOST_IP and echo[30:34] == GUEST_IP
    assert struct.unpack("!HH", echo[38:42]) == (0x1234, 1)
    assert echo[42 : 42 + len(payload)] == payload


def test_name_collision_is_a_clear_host_error(tap):
    with pytest.raises(HostError, match="taken"):
        Tap.open(tap.name)
    with pytest.raises(HostError, match="taken"):
        Tap.open("lo")  # exists, and is not a TAP
    with pytest.raises(HostError, match="invalid"):
        Tap.open("x" * 16)


def test_kernel_picks_a_name_and_offloads_are_accepted():
    with Tap.open() as tap:
        assert tap.name and tap.fd >= 0
        tap.set_offload(RxOffloads(csum=True, tso4=True, tso6=True))
        tap.set_offload(RxOffloads())
    assert tap.fd == -1


def test_ip_failure_is_a_host_error():
    with pytest.raises(HostError, match="ip addr add"):
        create_tap_with_address(f"pyvb{os.getpid() % 100000}", "not-an-address")


def test_ip_missing_is_a_host_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(HostError, match=r"'ip' command .* is not installed"):
        run_ip("link")


def test_rx_rate_limit_over_a_real_tap(tap):
    """Frames the host sends reach the guest ring paced by the RX limiter.

    Wired as the machine wires it (edge-triggered TAP fd, one retry timer
    per queue): the datagrams are all queued in the TAP at once, so after
    the first throttle only the retry timer can deliver the rest.
    """
    from pyvmm.memory import GuestMemory
    from pyvmm.vmm.event_loop import EventLoop
    from pyvmm.vmm.virtio_service import queue_server
    from tests.support.device_harness import limiter
    from tests.unit.devices.virtio.test_net import Guest

    count, port = 8, 40_009
    guest_mac = ":".join(f"{b:02x}" for b in GUEST_MAC)
    run_ip("neigh", "replace", "10.251.0.2", "lladdr", guest_mac, "dev", tap.name)
    with GuestMemory([(0, 0x80_0000)]) as mem:
        g = Guest(mem, size=64, backend=tap, rx_limiter=limiter("ops=1/40ms"))
        posted = dict(g.post_rx(*[2048] * 64, kick=False))
        loop = EventLoop()
        loop.start()
        try:
            serve = queue_server(loop, g.mmio, g.net)
            tap.subscribe(loop, lambda: serve(g.net.backend_queue))
            start = time.monotonic()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for i in range(count):
                    sock.sendto(b"pyvmm %d" % i, ("10.251.0.2", port))
            udp: list[bytes] = []
            deadline = time.monotonic() + 5
            while len(udp) < count and time.monotonic() < deadline:
                for head, length in g.rx_completions():
                    eth = g.read_chain(posted[head], length)[VNET_HDR_SIZE:]
                    is_udp = eth[12:14] == b"\x08\x00" and eth[23] == 17
                    if is_udp and struct.unpack("!H", eth[36:38])[0] == port:
                        udp.append(eth[42:])
                time.sleep(0.01)
            elapsed = time.monotonic() - start
        finally:
            loop.close()
    assert udp == [b"pyvmm %d" % i for i in range(count)]
    assert elapsed >= (count - 1) * 0.04 * 0.9  # paced: one frame per 40 ms
    assert g.net.stats.rx_throttled >= 1
