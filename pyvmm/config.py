"""A machine configuration: typed values, checked once, when they are made.

Every dataclass here validates itself in ``__post_init__``: a
:class:`MachineConfig` that exists is one pyvmm can build (what is left to
find out - a drive image that cannot be opened, a TAP that cannot be
created - shows when the machine is built, as a one-line error too). Front
ends make configs from their own grammar: :func:`build_machine_config`
for the CLI's strings and the library's keyword arguments, the API's
models for Firecracker's JSON; nothing downstream parses text again.

Rate limits are :class:`RateLimitSpec` values (Firecracker's token-bucket
shape); the devices turn them into running limiters
(:mod:`pyvmm.devices.rate_limiter`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm import layout
from pyvmm.errors import ConfigError

DEFAULT_MEMORY_SIZE = 128 << 20
DEFAULT_LINUX_CMDLINE = "console=ttyS0 reboot=k panic=1 pci=off"
#: The CPUID templates a config may name ("auto": "pvm" on PVM hosts, else "none").
CPU_TEMPLATES = ("auto", "none", "pvm", "c3", "t2", "t2s", "t2cl", "t2a")

U64_MAX = (1 << 64) - 1
#: vsock CIDs 0-2 are reserved; 2**32 - 1 means "any".
MIN_GUEST_CID = 3
GUEST_CID_LIMIT = (1 << 32) - 1
#: ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_UDS_PATH_BYTES = 107


# --- rate limits -------------------------------------------------------------------


def _check_count(name: str, value: object, minimum: int, maximum: int = U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, not {value!r}")
    if not minimum <= value <= maximum:
        bound = "positive" if minimum == 1 else f"at least {minimum}"
        if value > maximum:
            raise ConfigError(f"{name} is too large (at most {maximum})")
        raise ConfigError(f"{name} must be {bound}, not {value}")
    return value


@dataclass(frozen=True)
class TokenBucketSpec:
    """``size`` tokens refilled linearly over ``refill_time_ms``, plus a one-time burst."""

    size: int
    refill_time_ms: int
    one_time_burst: int = 0

    def __post_init__(self) -> None:
        _check_count("token bucket size", self.size, 1)
        _check_count("token bucket refill_time", self.refill_time_ms, 1)
        _check_count("token bucket one_time_burst", self.one_time_burst, 0)

    def describe(self, unit: str) -> str:
        burst = f" (+{self.one_time_burst} once)" if self.one_time_burst else ""
        return f"{self.size}{unit}/{self.refill_time_ms}ms{burst}"


@dataclass(frozen=True)
class RateLimitSpec:
    """A bandwidth bucket (bytes) and an ops bucket (requests); at least one of them."""

    bandwidth: TokenBucketSpec | None = None
    ops: TokenBucketSpec | None = None

    def __post_init__(self) -> None:
        if self.bandwidth is None and self.ops is None:
            raise ConfigError("a rate limit needs a bandwidth or an ops bucket")

    def __str__(self) -> str:
        parts = [
            f"{name}={bucket.describe(unit)}"
            for name, unit, bucket in (("bw", "B", self.bandwidth), ("ops", "", self.ops))
            if bucket is not None
        ]
        return ",".join(parts)


def _check_limit(name: str, value: object) -> None:
    if value is not None and not isinstance(value, RateLimitSpec):
        raise ConfigError(
            f"{name} must be a RateLimitSpec (parse_rate_limit() reads the bw=/ops= text), "
            f"not {type(value).__name__}"
        )


_RATE_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_RATE_TIME_UNITS = {"ms": 1, "s": 1000}
# Patterns as strings: compiled (and cached by re) only when a value is parsed.
_RATE_SIZE_RE = r"(?i)(\d{1,20})([KMG]?)(?:i?B)?"
_RATE_TIME_RE = r"(\d{1,20})(ms|s)"


def parse_rate_limit(text: str) -> RateLimitSpec:
    """``bw=SIZE[/TIME],ops=N[/TIME]``: the CLI's shorthand for a :class:`RateLimitSpec`.

    Grammar (whitespace around items ignored, each key at most once, at
    least one key)::

        spec  := item ("," item)*
        item  := "bw=" SIZE ["/" TIME] | "ops=" N ["/" TIME]
        SIZE  := DIGITS [K|M|G] [B|iB]     binary units: 10M = 10 * 2**20 bytes
        N     := DIGITS [K|M|G]            same multipliers (1K = 1024 ops)
        TIME  := DIGITS ("ms" | "s")       the refill time; default 1s

    So ``bw=10M/1s,ops=1000/1s`` allows 10 MiB and 1000 requests a second.
    No one-time burst here (Firecracker's JSON form has it).
    """
    if not text or not text.strip():
        raise ConfigError("empty rate limit (expected e.g. bw=10M/1s,ops=1000/1s)")
    buckets: dict[str, TokenBucketSpec] = {}
    for raw in text.split(","):
        item = raw.strip()
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("bw", "ops"):
            raise ConfigError(f"rate limit item {item!r}: expected bw=SIZE[/TIME] or ops=N[/TIME]")
        if key in buckets:
            raise ConfigError(f"rate limit gives {key}= twice")
        amount, slash, period = value.strip().partition("/")
        size = _rate_size(key, amount.strip())
        refill_ms = _rate_time(key, period.strip()) if slash else 1000
        buckets[key] = TokenBucketSpec(size, refill_ms)
    return RateLimitSpec(buckets.get("bw"), buckets.get("ops"))


def _rate_size(key: str, text: str) -> int:
    match = re.fullmatch(_RATE_SIZE_RE, text)
    if match is None or (key == "ops" and text.lower().endswith("b")):
        what = "SIZE like 10M" if key == "bw" else "a count like 1000"
        raise ConfigError(f"rate limit {key}={text[:40]!r}: expected {what}")
    value = int(match.group(1)) * _RATE_SIZE_UNITS[match.group(2).upper()]
    if value <= 0:
        raise ConfigError(f"rate limit {key}= must be positive, got {text!r}")
    if value > U64_MAX:
        raise ConfigError(f"rate limit {key}={text[:40]!r} is too large")
    return value


def _rate_time(key: str, text: str) -> int:
    match = re.fullmatch(_RATE_TIME_RE, text)
    if match is None:
        raise ConfigError(f"rate limit {key}: time {text[:40]!r} should be like 100ms or 1s")
    value = int(match.group(1)) * _RATE_TIME_UNITS[match.group(2)]
    if value <= 0:
        raise ConfigError(f"rate limit {key}: time must be positive, got {text!r}")
    if value > U64_MAX:
        raise ConfigError(f"rate limit {key}: time {text[:40]!r} is too long")
    return value


# --- sizes -----------------------------------------------------------------------

_SIZE_UNITS = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = r"(?i)^\s*(\d{1,16}(?:\.\d{1,9})?)\s*([bkmgt]?)(?:i?b)?\s*$"


def parse_memory_size(text: str | int) -> int:
    """Bytes from ``128`` (MiB), ``512M``, ``1G``, ``1.5G`` or ``4096B``; an int is MiB."""
    if isinstance(text, int) and not isinstance(text, bool):
        if not 0 < text <= layout.MAX_MEMORY_SIZE >> 20:
            raise ConfigError(f"memory size {text} MiB is out of range")
        return text << 20
    match = re.match(_SIZE_RE, str(text))
    if not match:
        raise ConfigError(f"memory size {str(text)[:40]!r} is not a size (examples: 128, 512M, 2G)")
    number, unit = match.groups()
    whole, _, fraction = number.partition(".")
    scale = _SIZE_UNITS[unit.lower()]
    parts = int(fraction or 0) * scale
    if parts % 10 ** len(fraction):
        raise ConfigError(f"memory size {text!r} is not a whole number of bytes")
    return int(whole) * scale + parts // 10 ** len(fraction)


def host_memory_size() -> int:
    """Physical RAM of the host in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_count(text: str | int, name: str) -> int:
    """A whole number from the CLI (``2``, ``0x10``) or the library (an int)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        if len(str(text)) > 20:  # no 400-digit numbers: they only lead to overflow later
            raise ValueError
        return int(str(text), 0)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {str(text)[:40]!r}") from None


# --- devices -------------------------------------------------------------------------


@dataclass(frozen=True)
class DriveConfig:
    """A raw disk image behind a virtio-blk device."""

    path: Path
    read_only: bool = False
    root: bool = False  # boot from it: root=/dev/vdX on the kernel command line
    rate_limit: RateLimitSpec | None = None
    drive_id: str | None = None  # the API's name for it (PATCH /drives/{id})

    def __post_init__(self) -> None:
        _check_limit("drive rate_limit", self.rate_limit)


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
                f"drive option {item[:40]!r} is not one of path=IMG, ro, root, bw=RATE, ops=RATE"
            )
    if not path:
        raise ConfigError(f"drive {text[:60]!r} has no path=IMG")
    limit = parse_rate_limit(",".join(limits)) if limits else None
    return DriveConfig(Path(path), read_only, root, limit)


_MAC_RE = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"


def check_mac(mac: str) -> str:
    """``mac`` if it is six hex bytes like 02:00:00:00:00:01, else ConfigError."""
    if not isinstance(mac, str) or not re.match(_MAC_RE, mac):
        raise ConfigError(
            f"MAC address {str(mac)[:40]!r} is not six hex bytes like 02:00:00:00:00:01"
        )
    return mac


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device backed by a host TAP device.

    ``rx_rate_limit`` and ``tx_rate_limit`` limit the bytes and frames the
    guest may receive and send (Firecracker's ``rx_rate_limiter`` and
    ``tx_rate_limiter``).
    """

    tap: str
    mac: str | None = None  # default: derived from the TAP name, locally administered
    rx_rate_limit: RateLimitSpec | None = None
    tx_rate_limit: RateLimitSpec | None = None
    iface_id: str | None = None  # the API's name for it (PATCH, network overrides)

    def __post_init__(self) -> None:
        if not self.tap:
            raise ConfigError("a network interface needs a TAP device name")
        if self.mac is not None:
            check_mac(self.mac)
        _check_limit("network rx_rate_limit", self.rx_rate_limit)
        _check_limit("network tx_rate_limit", self.tx_rate_limit)

    def mac_bytes(self) -> bytes:
        if self.mac is not None:
            return bytes(int(part, 16) for part in self.mac.split(":"))
        import hashlib

        digest = hashlib.sha256(self.tap.encode()).digest()
        return bytes([0x02, *digest[:5]])  # unicast, locally administered


_NET_RATE_KEYS = ("rx_bw", "rx_ops", "tx_bw", "tx_ops")


def parse_net(text: str) -> NetConfig:
    """``tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,rx_bw=RATE][,rx_ops=RATE][,tx_bw=RATE][,tx_ops=RATE]``.

    RATE is ``AMOUNT[/TIME]`` as in drives (``10M/1s``, ``1000/100ms``).
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
            mac = check_mac(value)
        elif key in _NET_RATE_KEYS and value:
            if key in seen:
                raise ConfigError(f"network option {key}= is given twice")
            seen.add(key)
            direction, kind = key.split("_")
            rates[direction].append(f"{kind}={value}")
        else:
            raise ConfigError(
                f"network option {item[:40]!r} is not one of tap=NAME, mac=MAC, "
                "rx_bw=RATE, rx_ops=RATE, tx_bw=RATE, tx_ops=RATE"
            )
    if not tap:
        raise ConfigError(f"network interface {text[:60]!r} has no tap=NAME")
    for direction in ("rx", "tx"):
        for item in rates[direction]:
            kind, _, value = item.partition("=")
            try:
                parse_rate_limit(item)
            except ConfigError as exc:
                raise ConfigError(
                    f"network {tap} option {direction}_{kind}={value[:40]!r}: {exc}"
                ) from None
    rx, tx = (parse_rate_limit(",".join(rates[d])) if rates[d] else None for d in ("rx", "tx"))
    return NetConfig(tap, mac, rx, tx)


def check_guest_cid(cid: object) -> int:
    """``cid`` if it can be a guest CID (3 <= cid < 2**32 - 1), else ConfigError."""
    if isinstance(cid, bool) or not isinstance(cid, int):
        raise ConfigError(f"vsock guest CID must be an integer, not {cid!r}")
    if not MIN_GUEST_CID <= cid < GUEST_CID_LIMIT:
        raise ConfigError(
            f"vsock guest CID {cid} is out of range: it must be >= {MIN_GUEST_CID} "
            f"and < {GUEST_CID_LIMIT} (0-2 are reserved, {GUEST_CID_LIMIT} means any)"
        )
    return cid


@dataclass(frozen=True)
class VsockConfig:
    """A virtio-vsock device whose host side is Unix sockets (Firecracker's convention).

    Host programs connect to ``uds_path`` and send ``CONNECT <port>\\n``;
    guest connections to host port P go to ``<uds_path>_P``.
    """

    guest_cid: int
    uds_path: Path

    def __post_init__(self) -> None:
        check_guest_cid(self.guest_cid)
        raw = os.fsencode(self.uds_path)
        if not raw:
            raise ConfigError("vsock uds_path is empty")
        if len(raw) > MAX_UDS_PATH_BYTES:
            raise ConfigError(
                f"vsock uds_path {str(self.uds_path)[:60]!r} is {len(raw)} bytes; a Unix "
                f"socket path holds at most {MAX_UDS_PATH_BYTES}"
            )


def parse_vsock(text: str) -> VsockConfig:
    """``cid=N,uds=PATH`` (``uds_path=`` is accepted too, as Firecracker names it)."""
    cid: int | None = None
    uds: str | None = None
    for item in (part.strip() for part in text.split(",")):
        key, _, value = item.partition("=")
        if key == "cid" and value:
            try:
                cid = parse_count(value, "vsock cid")
            except ConfigError:
                raise ConfigError(f"vsock cid={value[:40]!r} is not a number") from None
        elif key in ("uds", "uds_path") and value:
            uds = value
        else:
            raise ConfigError(f"vsock option {item[:40]!r} is not one of cid=N, uds=PATH")
    if cid is None:
        raise ConfigError(f"vsock {text[:60]!r} has no cid=N")
    if uds is None:
        raise ConfigError(f"vsock {text[:60]!r} has no uds=PATH")
    return VsockConfig(cid, Path(uds))


@dataclass(frozen=True)
class BalloonConfig:
    """A virtio-balloon device (Firecracker's ``/balloon``): the host asks for memory back.

    ``amount_mib`` is the initial target; ``stats_polling_interval_s`` > 0
    turns the statistics queue on and says how often to refresh them.
    """

    amount_mib: int = 0
    deflate_on_oom: bool = False
    stats_polling_interval_s: int = 0

    def __post_init__(self) -> None:
        _check_count("balloon amount_mib", self.amount_mib, 0, (1 << 32) // 256 - 1)
        _check_count("balloon stats_polling_interval_s", self.stats_polling_interval_s, 0, 1 << 16)


# --- the machine -------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineConfig:
    """What to boot and with how much hardware; checked when made (see the module doc)."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_LINUX_CMDLINE
    vcpus: int = 1
    mem_size: int = DEFAULT_MEMORY_SIZE
    serial_out: Path | None = None
    cpu_template: str = "auto"
    rng: bool = False  # a virtio-rng device fed by os.getrandom
    rng_rate_limit: RateLimitSpec | None = None
    drives: tuple[DriveConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    vsock: VsockConfig | None = None
    track_dirty_pages: bool = False  # log written pages: diff snapshots need it
    balloon: BalloonConfig | None = None
    huge_pages: bool = False  # back guest RAM with 2 MiB hugetlb pages
    #: Set by ``__post_init__``: one id per virtio device, in device order.
    device_ids: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.vcpus, bool)
            or not isinstance(self.vcpus, int)
            or not 1 <= self.vcpus <= layout.MAX_VCPUS
        ):
            raise ConfigError(f"cpus must be between 1 and {layout.MAX_VCPUS}, not {self.vcpus!r}")
        self._check_memory()
        if self.cpu_template not in CPU_TEMPLATES:
            raise ConfigError(
                f"unknown CPU template {self.cpu_template!r}; choose one of "
                + ", ".join(CPU_TEMPLATES)
            )
        if sum(drive.root for drive in self.drives) > 1:
            raise ConfigError("only one drive can be the root drive")
        _check_limit("rng_rate_limit", self.rng_rate_limit)
        if self.rng_rate_limit is not None and not self.rng:
            raise ConfigError("an rng rate limit needs the rng device")
        ids = self._device_ids()
        if len(ids) > layout.MAX_VIRTIO_DEVICES:
            raise ConfigError(f"at most {layout.MAX_VIRTIO_DEVICES} virtio devices are supported")
        object.__setattr__(self, "device_ids", ids)

    def _check_memory(self) -> None:
        size = self.mem_size
        _check_count("memory size", size, 1, layout.MAX_MEMORY_SIZE)
        mib = size / (1 << 20)
        if size % layout.PAGE_SIZE:
            raise ConfigError(
                f"memory size {size} bytes is not a multiple of the "
                f"{layout.PAGE_SIZE}-byte page size"
            )
        if self.huge_pages and size % (2 << 20):
            raise ConfigError(f"memory size {mib:g} MiB is not a multiple of the 2 MiB huge page")
        if size < layout.MIN_MEMORY_SIZE:
            raise ConfigError(
                f"memory size {mib:g} MiB is too small; the minimum is "
                f"{layout.MIN_MEMORY_SIZE >> 20} MiB"
            )
        limit = min(layout.MAX_MEMORY_SIZE, host_memory_size())
        if size > limit:
            raise ConfigError(
                f"memory size {mib:g} MiB is too large; this host allows at most {limit >> 20} MiB"
            )

    def _device_ids(self) -> tuple[str, ...]:
        """Virtio device ids, drives first (so drive n is /dev/vd<a+n>): unique, never empty."""
        ids = [drive.drive_id or f"drive{n}" for n, drive in enumerate(self.drives)]
        ids += [net.iface_id or f"net{n}" for n, net in enumerate(self.nets)]
        ids += ["rng"] * self.rng + ["vsock"] * (self.vsock is not None)
        ids += ["balloon"] * (self.balloon is not None)
        duplicates = {name for name in ids if ids.count(name) > 1}
        if duplicates:
            raise ConfigError(f"device id {sorted(duplicates)[0]!r} is used twice")
        return tuple(ids)


def build_machine_config(
    *,
    kernel: str | os.PathLike[str],
    initrd: str | os.PathLike[str] | None = None,
    cmdline: str | None = None,
    vcpus: int | str = 1,
    memory: int | str = DEFAULT_MEMORY_SIZE >> 20,
    drives: Iterable[DriveConfig | str] = (),
    nets: Iterable[NetConfig | str] = (),
    vsock: VsockConfig | str | None = None,
    rng: bool = False,
    rng_rate: RateLimitSpec | str | None = None,
    cpu_template: str = "auto",
    serial_out: str | os.PathLike[str] | None = None,
    track_dirty_pages: bool = False,
) -> MachineConfig:
    """The one constructor the CLI and the library share: their values, parsed and checked.

    Strings use the CLI's grammar (``parse_drive``, ``parse_net``,
    ``parse_vsock``, ``parse_rate_limit``); ``memory`` is MiB as an int or a
    size string (``512M``); an rng rate implies the rng device.
    """
    if isinstance(rng_rate, str):
        try:
            rng_rate = parse_rate_limit(rng_rate)
        except ConfigError as exc:
            raise ConfigError(f"rng rate {rng_rate[:40]!r}: {exc}") from None
    return MachineConfig(
        kernel=Path(kernel),
        initrd=Path(initrd) if initrd is not None else None,
        cmdline=DEFAULT_LINUX_CMDLINE if cmdline is None else cmdline,
        vcpus=parse_count(vcpus, "cpus"),
        mem_size=parse_memory_size(memory),
        serial_out=Path(serial_out) if serial_out is not None else None,
        cpu_template=cpu_template,
        rng=rng or rng_rate is not None,
        rng_rate_limit=rng_rate,
        drives=tuple(parse_drive(d) if isinstance(d, str) else d for d in drives),
        nets=tuple(parse_net(n) if isinstance(n, str) else n for n in nets),
        vsock=parse_vsock(vsock) if isinstance(vsock, str) else vsock,
        track_dirty_pages=track_dirty_pages,
    )


def finite_timeout(value: float | None, name: str = "timeout") -> float | None:
    """``value`` if it is a usable number of seconds (> 0, finite), else ConfigError."""
    if value is None:
        return None
    if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    if math.isinf(value) or value > 10**9:
        raise ConfigError(f"{name} {value!r} is too large (at most 1e9 seconds)")
    return float(value)
