"""A TAP interface on the host: the back end of virtio-net.

:class:`Tap` is the only part of the network device that touches a file
descriptor; the device model (``pyvmm.devices.virtio.net``) hands it lists of
``memoryview`` objects over guest RAM. Each ``writev`` sends one Ethernet
frame, each ``readv`` receives one.

With ``vnet_hdr=True`` (the default) every frame is preceded by a 12-byte
``struct virtio_net_hdr_v1`` (flags, gso_type, hdr_len, gso_size,
csum_start, csum_offset, num_buffers): the very header a virtio 1.x driver
puts in front of its frames, so TX passes guest buffers through untouched
and checksum/segmentation offloads work end to end once
:meth:`Tap.set_offload` has told the kernel what the guest accepts. The
kernel reads and writes the first 10 bytes; ``num_buffers`` is the device's.
The header is little-endian, which is the host order on x86-64 (the only
host pyvmm runs on), so TUNSETVNETLE is not needed.

Errors: opening raises :class:`~pyvmm.errors.HostError` with one line that
says what is wrong (no /dev/net/tun, no CAP_NET_ADMIN, the name is taken or
invalid). ``readv``/``writev`` raise plain ``OSError`` (``BlockingIOError``
when there is nothing to read), which the device counts and survives.

The ioctls here are on a TUN fd, not a KVM fd, so they use ``fcntl.ioctl``
rather than ``pyvmm.kvm.ioctl``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import struct
import subprocess

from pyvmm.devices.virtio.net import VNET_HDR_SIZE, RxOffloads
from pyvmm.errors import HostError
from pyvmm.host.events import EventOps, Wake

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16

# --- ioctl request numbers (linux/if_tun.h) ----------------------------------------
# _IOW(type, nr, size) = 1 << 30 | size << 16 | type << 8 | nr, with type 'T' = 0x54
# and size = sizeof(int) = 4; _IOR uses 2 << 30.
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETVNETHDRSZ = 0x800454D7  # _IOR('T', 215, int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)

# --- TUNSETIFF flags --------------------------------------------------------------------
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix
IFF_VNET_HDR = 0x4000  # frames carry a virtio_net_hdr

# --- TUNSETOFFLOAD flags: what the reader (the guest) accepts -------------------------
TUN_F_CSUM = 0x01  # partial checksums
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10


#: struct ifreq: char ifr_name[16]; then a union, of which we use short ifr_flags;
#: the whole struct is 40 bytes on x86-64.
IFREQ = struct.Struct("16sH22x")


def _ifreq(name: str, flags: int) -> bytearray:
    return bytearray(IFREQ.pack(name.encode("ascii"), flags))


def check_name(name: str, kind: str = "TAP") -> None:
    """Reject an interface name the kernel would refuse, with a clear message.

    ``""`` passes (the kernel picks a TAP name); ``kind`` names the interface
    in the message ("TAP", "veth").
    """
    if not name:
        return
    if (
        not name.isascii()
        or len(name) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in name for c in "/:")
        or any(c.isspace() for c in name)
    ):
        raise HostError(
            f"{kind} name {name!r} is invalid (ASCII, at most {IFNAMSIZ - 1} characters, "
            "no '/', ':' or spaces)"
        )


class Tap:
    """One open TAP interface; see the module docstring."""

    def __init__(self, fd: int, name: str, vnet_hdr: bool) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr

    @classmethod
    def open(cls, name: str = "", vnet_hdr: bool = True) -> Tap:
        """Create (or attach to a persistent) TAP named ``name``; ``""`` lets the kernel pick."""
        check_name(name)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostError(f"{TUN_PATH} does not exist: load the tun module") from None
        except PermissionError:
            raise HostError(f"cannot open {TUN_PATH}: permission denied") from None
        except OSError as exc:
            raise HostError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            ifr = _ifreq(name, flags)
            try:
                fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as exc:
                raise HostError(_setiff_message(name, exc)) from None
            actual = bytes(ifr[:IFNAMSIZ]).split(b"\0", 1)[0].decode("ascii")
            if vnet_hdr:
                try:
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
                except OSError as exc:
                    raise HostError(f"TAP {actual}: TUNSETVNETHDRSZ: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, actual, vnet_hdr)

    def set_offload(self, offloads: RxOffloads) -> None:
        """Tell the kernel which offloads the reader (the guest) accepts."""
        flags = (
            (TUN_F_CSUM if offloads.csum else 0)
            | (TUN_F_TSO4 if offloads.tso4 else 0)
            | (TUN_F_TSO6 if offloads.tso6 else 0)
        )
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            raise HostError(f"TAP {self.name}: TUNSETOFFLOAD {flags:#x}: {exc.strerror}") from None

    def readv(self, buffers: list[memoryview]) -> int:
        """Receive one frame into ``buffers``; ``BlockingIOError`` if none is queued."""
        return os.readv(self.fd, buffers)

    def writev(self, buffers: list[memoryview]) -> int:
        """Send the concatenation of ``buffers`` as one frame."""
        if len(buffers) > _IOV_MAX:
            return os.write(self.fd, b"".join(buffers))
        return os.writev(self.fd, buffers)

    def subscribe(self, ops: EventOps, wake: Wake) -> None:
        """Frames for the guest: ``wake()`` on every new one (edge-triggered).

        Edge-triggered because a frame waiting for guest buffers keeps the fd
        readable; the guest's next RX kick drains the TAP, and a throttled RX
        side is retried by the device's own timer.
        """
        ops.add_reader(self.fd, lambda events: wake(), select.EPOLLIN | select.EPOLLET)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - always defined on Linux
    _IOV_MAX = 1024
if _IOV_MAX <= 0:  # pragma: no cover
    _IOV_MAX = 1024


def _setiff_message(name: str, exc: OSError) -> str:
    shown = name or "(kernel-chosen name)"
    if exc.errno in (errno.EPERM, errno.EACCES):
        return f"cannot create TAP {shown}: permission denied (needs CAP_NET_ADMIN)"
    if exc.errno == errno.EBUSY:
        return f"TAP name {shown} is taken: another process has it open"
    if exc.errno == errno.EINVAL:
        return f"TAP name {shown} is taken by a device that is not a TAP, or is invalid"
    return f"cannot create TAP {shown}: TUNSETIFF: {exc.strerror}"


_NOT_PERMITTED = ("Operation not permitted", "Permission denied")


def run_ip(*args: str) -> str:
    """Run ``ip ARGS...`` (iproute2) and return its stdout.

    Failures are one-line :class:`HostError`: ``ip`` missing, or ``ip ARGS:
    <its first error line>``, with the capability hint when the kernel said
    "not permitted".
    """
    ip = shutil.which("ip")
    if ip is None:
        raise HostError("the 'ip' command (iproute2) is not installed")
    result = subprocess.run([ip, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        detail = lines[0].strip() if lines else f"exit status {result.returncode}"
        if any(text in detail for text in _NOT_PERMITTED):
            detail += " (needs CAP_NET_ADMIN: run as root)"
        raise HostError(f"ip {' '.join(args)}: {detail}")
    return result.stdout


def create_tap_with_address(name: str, cidr: str, vnet_hdr: bool = True) -> Tap:
    """Open TAP ``name``, give it ``cidr`` (e.g. ``"10.0.0.1/24"``) and bring it up."""
    tap = Tap.open(name, vnet_hdr)
    try:
        run_ip("addr", "add", cidr, "dev", tap.name)
        run_ip("link", "set", tap.name, "up")
    except BaseException:
        tap.close()
        raise
    return tap
