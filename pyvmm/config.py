"""A validated machine configuration.

Everything a user can get wrong is checked here, before any KVM object
exists, and reported as a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pyvmm import layout
from pyvmm.errors import ConfigError

DEFAULT_MEMORY_SIZE = 128 << 20
DEFAULT_LINUX_CMDLINE = "console=ttyS0 reboot=k panic=1 pci=off"

_SIZE_UNITS = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_memory_size(text: str) -> int:
    """Bytes from ``128`` (MiB), ``512M``, ``1G``, ``1.5G`` or ``4096B``."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"memory size {text!r} is not a size (examples: 128, 512M, 2G)")
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[unit.lower()]
    if size != int(size):
        raise ConfigError(f"memory size {text!r} is not a whole number of bytes")
    return int(size)


def host_memory_size() -> int:
    """Physical RAM of the host in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class DriveConfig:
    """A raw disk image behind a virtio-blk device."""

    path: Path
    read_only: bool = False
    root: bool = False  # boot from it: root=/dev/vdX on the kernel command line
    rate_limit: str | None = None  # "bw=10M/1s,ops=1000/1s" (pyvmm.devices.rate_limiter grammar)
    drive_id: str | None = None  # the API's name for it (PATCH /drives/{id})


def parse_drive(text: str) -> DriveConfig:
    """``path=IMG[,ro][,root][,bw=SIZE/TIME][,ops=N/TIME]`` (a bare first item is the path)."""
    path: str | None = None
    read_only = root = False
    limits: list[str] = []
    if not text.strip():
        raise ConfigError("drive '' has no path=IMG")
    for index, item in enumerate(part.strip() for part in text.split(",")):
        key, _, value = item.partition("=")
        if key == "path" and value:
            path = value
        elif item == "ro":
            read_only = True
        elif item == "root":
            root = True
        elif key in ("bw", "ops") and value:
            limits.append(item)
        elif index == 0 and "=" not in item and item:
            path = item
        else:
            raise ConfigError(
                f"drive option {item!r} is not one of path=IMG, ro, root, bw=RATE, ops=RATE"
            )
    if not path:
        raise ConfigError(f"drive {text!r} has no path=IMG")
    return DriveConfig(Path(path), read_only, root, ",".join(limits) or None)


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device backed by a host TAP device.

    The rate limits use the drive grammar (``"bw=10M/1s,ops=1000/1s"``, see
    ``pyvmm.devices.rate_limiter.parse_rate_limit``): bytes and frames the guest may
    receive (rx) and send (tx), as Firecracker's ``rx_rate_limiter`` and
    ``tx_rate_limiter``.
    """

    tap: str
    mac: str | None = None  # default: derived from the TAP name, locally administered
    rx_rate_limit: str | None = None
    tx_rate_limit: str | None = None
    iface_id: str | None = None  # the API's name for it (network overrides on restore)

    def mac_bytes(self) -> bytes:
        if self.mac is not None:
            return bytes(int(part, 16) for part in self.mac.split(":"))
        digest = hashlib.sha256(self.tap.encode()).digest()
        return bytes([0x02, *digest[:5]])  # unicast, locally administered

    def validate(self) -> None:
        """Check the rate limits, naming the option (``rx_bw`` ...) that is wrong."""
        from pyvmm.devices.rate_limiter import parse_rate_limit

        for direction, spec in (("rx", self.rx_rate_limit), ("tx", self.tx_rate_limit)):
            if spec is None:
                continue
            for item in spec.split(","):
                key, _, value = item.strip().partition("=")
                try:
                    parse_rate_limit(item)
                except ConfigError as exc:
                    raise ConfigError(
                        f"network {self.tap} option {direction}_{key}={value!r}: {exc}"
                    ) from None
            try:
                parse_rate_limit(spec)  # the whole: a key given twice
            except ConfigError as exc:
                raise ConfigError(f"network {self.tap} {direction} rate limit: {exc}") from None


_NET_RATE_KEYS = ("rx_bw", "rx_ops", "tx_bw", "tx_ops")


def parse_net(text: str) -> NetConfig:
    """``tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,rx_bw=RATE][,rx_ops=RATE][,tx_bw=RATE][,tx_ops=RATE]``.

    RATE is ``AMOUNT[/TIME]`` as in drives (``10M/1s``, ``1000/100ms``);
    :meth:`NetConfig.validate` checks it.
    """
    tap: str | None = None
    mac: str | None = None
    rates: dict[str, list[str]] = {"rx": [], "tx": []}  # direction -> ["bw=10M/1s", ...]
    seen: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        key, _, value = item.partition("=")
        if key == "tap" and value:
            tap = value
        elif key == "mac" and value:
            if not _MAC_RE.match(value):
                raise ConfigError(
                    f"MAC address {value!r} is not six hex bytes like 02:00:00:00:00:01"
                )
            if int(value[:2], 16) & 1:
                raise ConfigError(f"MAC address {value} is a multicast address")
            mac = value
        elif key in _NET_RATE_KEYS and value:
            if key in seen:
                raise ConfigError(f"network option {key}= is given twice")
            seen.add(key)
            direction, kind = key.split("_")
            rates[direction].append(f"{kind}={value}")
        else:
            raise ConfigError(
                f"network option {item!r} is not one of tap=NAME, mac=MAC, "
                "rx_bw=RATE, rx_ops=RATE, tx_bw=RATE, tx_ops=RATE"
            )
    if not tap:
        raise ConfigError(f"network interface {text!r} has no tap=NAME")
    return NetConfig(tap, mac, ",".join(rates["rx"]) or None, ",".join(rates["tx"]) or None)


@dataclass(frozen=True)
class VsockConfig:
    """A virtio-vsock device whose host side is Unix sockets (Firecracker's convention).

    Host programs connect to ``uds_path`` and send ``CONNECT <port>\\n``;
    guest connections to host port P go to ``<uds_path>_P``.
    """

    guest_cid: int
    uds_path: Path

    def validate(self) -> None:
        from pyvmm.devices.virtio.vsock import check_guest_cid
        from pyvmm.host.vsock_uds import check_uds_path

        check_guest_cid(self.guest_cid)
        check_uds_path(self.uds_path)


def parse_vsock(text: str) -> VsockConfig:
    """``cid=N,uds=PATH`` (``uds_path=`` is accepted too, as Firecracker names it)."""
    cid: int | None = None
    uds: str | None = None
    for item in (part.strip() for part in text.split(",")):
        key, _, value = item.partition("=")
        if key == "cid" and value:
            try:
                cid = int(value, 0)
            except ValueError:
                raise ConfigError(f"vsock cid={value!r} is not a number") from None
        elif key in ("uds", "uds_path") and value:
            uds = value
        else:
            raise ConfigError(f"vsock option {item!r} is not one of cid=N, uds=PATH")
    if cid is None:
        raise ConfigError(f"vsock {text!r} has no cid=N")
    if uds is None:
        raise ConfigError(f"vsock {text!r} has no uds=PATH")
    return VsockConfig(cid, Path(uds))


@dataclass(frozen=True)
class MachineConfig:
    """What to boot and with how much hardware."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_LINUX_CMDLINE
    vcpus: int = 1
    mem_size: int = DEFAULT_MEMORY_SIZE
    serial_out: Path | None = None
    cpu_template: str = "auto"  # "auto": "pvm" on PVM hosts, else "none"
    rng: bool = False  # a virtio-rng device fed by os.getrandom
    rng_rate_limit: str | None = None  # entropy bytes/requests: "bw=1K/1s,ops=100/1s"
    drives: tuple[DriveConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    vsock: VsockConfig | None = None
    track_dirty_pages: bool = False  # log written pages: diff snapshots need it

    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first problem found."""
        if not 1 <= self.vcpus <= layout.MAX_VCPUS:
            raise ConfigError(f"cpus must be between 1 and {layout.MAX_VCPUS}, not {self.vcpus}")
        mib = self.mem_size / (1 << 20)
        if self.mem_size % layout.PAGE_SIZE:
            raise ConfigError(
                f"memory size {self.mem_size} bytes is not a multiple of the "
                f"{layout.PAGE_SIZE}-byte page size"
            )
        if self.mem_size < layout.MIN_MEMORY_SIZE:
            raise ConfigError(
                f"memory size {mib:g} MiB is too small; the minimum is "
                f"{layout.MIN_MEMORY_SIZE >> 20} MiB"
            )
        limit = min(layout.MAX_MEMORY_SIZE, host_memory_size())
        if self.mem_size > limit:
            raise ConfigError(
                f"memory size {mib:g} MiB is too large; this host allows at most {limit >> 20} MiB"
            )
        from pyvmm.vmm.cpuid import TEMPLATES

        if self.cpu_template != "auto" and self.cpu_template not in TEMPLATES:
            names = ", ".join(["auto", *TEMPLATES])
            raise ConfigError(f"unknown CPU template {self.cpu_template!r}; choose one of {names}")
        if sum(drive.root for drive in self.drives) > 1:
            raise ConfigError("only one drive can be the root drive")
        for drive in self.drives:
            if not drive.path.is_file():
                raise ConfigError(f"drive image {drive.path} does not exist or is not a file")
            if drive.rate_limit is not None:
                from pyvmm.devices.rate_limiter import parse_rate_limit

                parse_rate_limit(drive.rate_limit)
        for net in self.nets:
            net.validate()
        if self.rng_rate_limit is not None:
            from pyvmm.devices.rate_limiter import parse_rate_limit

            if not self.rng:
                raise ConfigError("an rng rate limit needs the rng device")
            try:
                parse_rate_limit(self.rng_rate_limit)
            except ConfigError as exc:
                raise ConfigError(f"rng rate {self.rng_rate_limit!r}: {exc}") from None
        if self.vsock is not None:
            self.vsock.validate()
        if self.serial_out is not None and self.serial_out.is_dir():
            raise ConfigError(f"serial output {self.serial_out} is a directory")
