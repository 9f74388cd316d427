"""A real network namespace joined to the host by a veth pair; ping across it.

Needs ``ip netns`` to work (root: CAP_SYS_ADMIN and CAP_NET_ADMIN); skipped
with the host's reason otherwise. Ping is done with a raw ICMP socket in
Python (no ``ping`` binary needed), from the host into the namespace and,
through :meth:`NetNamespace.run`, from inside it back to the host.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from pyvmm.errors import HostError
from pyvmm.guestkit.netns import NetNamespace, check_netns_name
from pyvmm.host.tap import run_ip

TAG = os.getpid() % 100000
SUBNET = f"10.252.{os.getpid() % 256}"
HOST_CIDR, NS_CIDR = f"{SUBNET}.1/24", f"{SUBNET}.2/24"
HOST_IP, NS_IP = HOST_CIDR.split("/")[0], NS_CIDR.split("/")[0]


def _probe() -> str | None:
    try:
        NetNamespace(f"pyvmm-probe-{TAG}").create().delete()
    except HostError as exc:
        return str(exc)
    return None


_REASON = _probe()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def ping(address: str, timeout: float = 3.0) -> bool:
    """One ICMP echo to ``address`` over a raw socket; True when the reply comes."""
    import os
    import socket
    import struct
    import time

    def checksum(data: bytes) -> int:
        data += b"\0" * (len(data) % 2)
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    ident, seq = os.getpid() & 0xFFFF, 1
    body = struct.pack("!HH", ident, seq) + b"pyvmm netns"
    echo = struct.pack("!BBH", 8, 0, checksum(b"\x08\x00\x00\x00" + body)) + body
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.sendto(echo, (address, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                packet, (source, _port) = sock.recvfrom(2048)
            except TimeoutError:
                break
            icmp = packet[(packet[0] & 0x0F) * 4 :]
            if source == address and icmp[0] == 0 and icmp[4:8] == body[:4]:
                return True
    return False


def ping_from(ns: NetNamespace, address: str) -> bool:
    script = f"{inspect.getsource(ping)}\nraise SystemExit(0 if ping({address!r}) else 1)\n"
    return ns.run([sys.executable, "-c", script], check=False).returncode == 0


def namespaces() -> list[str]:
    return [line.split()[0] for line in run_ip("netns", "list").splitlines() if line.strip()]


def link_exists(name: str) -> bool:
    try:
        run_ip("link", "show", name)
    except HostError:
        return False
    return True


@pytest.fixture
def names():
    """(namespace, host end, namespace end), unique to this test run."""
    return f"pyvmm-t{TAG}", f"pvh{TAG}", f"pvn{TAG}"


def test_ping_across_a_veth_pair(names):
    ns_name, host_end, ns_end = names
    with NetNamespace(ns_name) as ns:
        assert ns_name in namespaces()
        ns.veth_pair(host_end, ns_end, HOST_CIDR, NS_CIDR)
        assert f"inet {NS_CIDR}" in ns.ip("addr", "show", ns_end)
        assert ping(NS_IP), "no echo reply from the namespace"
        assert ping_from(ns, HOST_IP), "no echo reply from the host"
        # The namespace has its own stack: the host's end is not there.
        assert host_end not in ns.ip("link")
    assert ns_name not in namespaces()
    assert not link_exists(host_end)


def test_cleanup_when_the_block_raises(names):
    ns_name, host_end, ns_end = names
    with pytest.raises(RuntimeError), NetNamespace(ns_name) as ns:
        ns.veth_pair(host_end, ns_end, HOST_CIDR, NS_CIDR)
        raise RuntimeError("test failure inside the block")
    assert ns_name not in namespaces()
    assert not link_exists(host_end)
    ns.delete()  # idempotent


def test_veth_pair_failing_midway_leaves_nothing(names, monkeypatch):
    import pyvmm.guestkit.netns as netns

    ns_name, host_end, ns_end = names

    def run_ip_refusing_addresses(*args: str) -> str:
        if "addr" in args:
            raise HostError(f"ip {' '.join(args)}: refused by the test")
        return run_ip(*args)

    with NetNamespace(ns_name) as ns:
        monkeypatch.setattr(netns, "run_ip", run_ip_refusing_addresses)
        with pytest.raises(HostError, match="refused by the test"):
            ns.veth_pair(host_end, ns_end, HOST_CIDR, NS_CIDR)
        monkeypatch.undo()
        assert not link_exists(host_end)
        assert ns_end not in ns.ip("link")
        # The peer's name is taken inside the namespace: refused before anything exists.
        ns.ip("link", "add", ns_end, "type", "veth", "peer", "name", f"pvx{TAG}")
        with pytest.raises(HostError, match="an interface of that name exists"):
            ns.veth_pair(host_end, ns_end, HOST_CIDR, NS_CIDR)
        assert not link_exists(host_end)


def test_run_reports_failures_in_one_line(names):
    with NetNamespace(names[0]) as ns:
        result = ns.run([sys.executable, "-c", "print('inside')"])
        assert result.stdout == "inside\n"
        with pytest.raises(HostError, match=r"in network namespace .*failed: .*boom") as info:
            ns.run([sys.executable, "-c", "raise SystemExit('boom')"])
        assert "\n" not in str(info.value)
        with pytest.raises(HostError, match=r"did not finish within 0.2 s"):
            ns.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)


@pytest.mark.parametrize("name", ["", "a/b", "..", "-x", "x" * 65, "has space", "ünï"])
def test_invalid_namespace_names(name):
    with pytest.raises(HostError, match=r"network namespace name .* is invalid"):
        NetNamespace(name)


def test_valid_namespace_names():
    for name in ("a", "pyvmm-test_1.2", "x" * 64):
        check_netns_name(name)


def test_namespace_that_exists(names):
    with NetNamespace(names[0]):
        with pytest.raises(HostError, match=f"network namespace {names[0]} already exists"):
            NetNamespace(names[0]).create()
        assert names[0] in namespaces()  # the failed attempt did not delete it
    assert names[0] not in namespaces()


def test_veth_argument_errors(names):
    ns_name, host_end, ns_end = names
    with pytest.raises(HostError, match="does not exist"):
        NetNamespace(ns_name).veth_pair(host_end, ns_end, HOST_CIDR, NS_CIDR)
    with NetNamespace(ns_name) as ns:
        with pytest.raises(HostError, match=r"veth name 'x{16}' is invalid"):
            ns.veth_pair("x" * 16, ns_end, HOST_CIDR, NS_CIDR)
        with pytest.raises(HostError, match="veth names must not be empty"):
            ns.veth_pair(host_end, "", HOST_CIDR, NS_CIDR)
        with pytest.raises(HostError, match=r"address '10.0.0.300/24' is not an address"):
            ns.veth_pair(host_end, ns_end, "10.0.0.300/24", NS_CIDR)
        with pytest.raises(HostError, match="an interface of that name exists"):
            ns.veth_pair("lo", ns_end, HOST_CIDR, NS_CIDR)
    assert not link_exists(host_end)


def test_ip_missing(monkeypatch, names):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(HostError, match=r"'ip' command .* is not installed"):
        NetNamespace(names[0]).create()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_no_permission(names):
    """As 'nobody', creating a namespace fails with one line that says why."""
    script = (
        "import os, sys\n"
        "from pyvmm.errors import HostError\n"
        "from pyvmm.guestkit.netns import NetNamespace\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        f"try:\n    NetNamespace({names[0]!r}).create()\n"
        "except HostError as exc:\n    print(exc); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 3, result.stderr
    message = result.stdout.strip()
    assert "\n" not in message
    assert f"cannot create network namespace {names[0]}: permission denied" in message
    assert "root" in message
    assert names[0] not in namespaces()
