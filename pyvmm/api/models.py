"""Firecracker's API request bodies as typed dataclasses, and their parsers.

One ``parse_*`` function per body shape of Firecracker's OpenAPI description
(``src/firecracker/swagger/firecracker.yaml``). Each takes the decoded JSON
value and a ``where`` prefix for its messages (the resource name by
default; ``drives[1]`` and the like when reading a config file) and returns
a frozen dataclass, or raises :class:`~pyvmm.errors.ConfigError` with one
line naming the field and the problem. Unknown fields are refused, as
Firecracker's ``deny_unknown_fields`` does; ``null`` means absent.

What pyvmm cannot do is refused here, at the request, with a message that
says so, rather than accepted and ignored: the aarch64 CPU template V1N1,
vhost-user drives (``socket``) and a GDB stub. What it can do differently
is accepted and said so in :mod:`pyvmm.api.machine_config`: the x86 static
CPU templates, 2 MiB huge pages (hugetlbfs, when the host has them free),
the ``Async`` io_engine (served by pyvmm's one I/O model) and ``mtu``.

Each dataclass's ``to_json()`` gives the object in the shape ``GET
/vm/config`` prints (``null`` for unset options), which its parser reads
back unchanged.

Only shapes are checked here; rules that need the rest of the
configuration (one root drive, unique MACs, files that exist) live in
:mod:`pyvmm.api.vm_config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pyvmm import layout
from pyvmm.api.fields import Fields, show
from pyvmm.api.rate_limiters import (
    RateLimiterConfig,
    TokenBucketConfig,
    merge_rate_limiter,
    parse_rate_limiter,
    parse_token_bucket,
)
from pyvmm.errors import ConfigError

__all__ = [
    "RateLimiterConfig",
    "TokenBucketConfig",
    "merge_rate_limiter",
    "parse_rate_limiter",
    "parse_token_bucket",
]

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

MAX_VCPUS = layout.MAX_VCPUS
MIN_MEM_SIZE_MIB = layout.MIN_MEMORY_SIZE >> 20
MAX_MEM_SIZE_MIB = layout.MAX_MEMORY_SIZE >> 20
DEFAULT_MEM_SIZE_MIB = 128
#: Firecracker's x86_64 static CPU templates ("None": no template).
STATIC_CPU_TEMPLATES = ("None", "C3", "T2", "T2S", "T2CL", "T2A")
#: Firecracker's net ``mtu`` range (the smallest IPv4 MTU up to the 16-bit maximum).
MIN_MTU, MAX_MTU = 576, 65535

#: The MMDS address when ``mmds-config`` gives none (Firecracker's default).
DEFAULT_MMDS_IPV4 = "169.254.169.254"
LOG_LEVELS = ("Off", "Trace", "Debug", "Info", "Warn", "Error")

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_PARTUUID_RE = re.compile(r"^[0-9A-Fa-f]+(-[0-9A-Fa-f]+)*$")
_IFNAMSIZ = 16


def _json_or_none(value: Any) -> Any:
    return None if value is None else value.to_json()


# --- rate limiters (shapes in pyvmm.api.rate_limiters) --------------------------------


def _device_rate_limiter(fields: Fields, name: str) -> RateLimiterConfig | None:
    """A device's limiter: disabled buckets dropped, None when unlimited."""
    limiter = parse_rate_limiter(fields.obj.get(name), f"{fields.where}: {name}")
    return limiter.enabled_only() if limiter is not None else None


# --- boot source and machine configuration --------------------------------------------


@dataclass(frozen=True)
class BootSource:
    """``PUT /boot-source``: the kernel, its command line and an initrd.

    ``boot_args`` None means "the default command line", which
    :mod:`pyvmm.api.machine_config` chooses.
    """

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel_image_path": self.kernel_image_path,
            "initrd_path": self.initrd_path,
            "boot_args": self.boot_args,
        }


def parse_boot_source(value: Any, where: str = "boot-source") -> BootSource:
    fields = Fields(value, where, ("kernel_image_path", "boot_args", "initrd_path"))
    return BootSource(
        kernel_image_path=fields.required_string("kernel_image_path"),
        boot_args=fields.string("boot_args", empty=True),
        initrd_path=fields.string("initrd_path"),
    )


@dataclass(frozen=True)
class MachineConfiguration:
    """The vCPU count and memory size (``GET /machine-config``), with defaults.

    ``smt`` is recorded and reported; ``cpu_template`` is one of
    :data:`STATIC_CPU_TEMPLATES` ("None": pyvmm's own CPUID filtering).
    """

    vcpu_count: int = 1
    mem_size_mib: int = DEFAULT_MEM_SIZE_MIB
    smt: bool = False
    track_dirty_pages: bool = False
    huge_pages: str = "None"
    cpu_template: str = "None"

    def updated(
        self, update: MachineConfigUpdate, where: str = "machine-config"
    ) -> MachineConfiguration:
        """This configuration with ``update`` applied, checked as a whole."""
        merged = MachineConfiguration(
            vcpu_count=_pick(update.vcpu_count, self.vcpu_count),
            mem_size_mib=_pick(update.mem_size_mib, self.mem_size_mib),
            smt=_pick(update.smt, self.smt),
            track_dirty_pages=_pick(update.track_dirty_pages, self.track_dirty_pages),
            huge_pages=_pick(update.huge_pages, self.huge_pages),
            cpu_template=_pick(
                update.cpu_template, "None" if update.replaces else self.cpu_template
            ),
        )
        if merged.smt and merged.vcpu_count > 1 and merged.vcpu_count % 2:
            raise ConfigError(
                f"{where}: vcpu_count must be 1 or an even number when smt is enabled, "
                f"not {merged.vcpu_count}"
            )
        return merged

    def to_json(self) -> dict[str, Any]:
        data = {
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "smt": self.smt,
            "track_dirty_pages": self.track_dirty_pages,
            "huge_pages": self.huge_pages,
        }
        if self.cpu_template != "None":  # as Firecracker: shown only when one is set
            data["cpu_template"] = self.cpu_template
        return data


def _pick(new: Any, old: Any) -> Any:
    return old if new is None else new


@dataclass(frozen=True)
class MachineConfigUpdate:
    """A PUT or PATCH ``/machine-config`` body: the fields to change (None: keep).

    The router flags ``cpu_template`` as deprecated, as Firecracker does.
    """

    vcpu_count: int | None = None
    mem_size_mib: int | None = None
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    huge_pages: str | None = None
    cpu_template: str | None = None
    #: A PUT: what it does not name goes back to its default (a template too).
    replaces: bool = False

    @property
    def empty(self) -> bool:
        return self == MachineConfigUpdate()


_MACHINE_FIELDS = (
    "vcpu_count",
    "mem_size_mib",
    "smt",
    "track_dirty_pages",
    "cpu_template",
    "huge_pages",
)


def _machine_fields(value: Any, where: str, *, full: bool) -> MachineConfigUpdate:
    fields = Fields(
        value,
        where,
        _MACHINE_FIELDS,
        unsupported={"gdb_socket_path": "no GDB stub"},
    )
    cpu_template = fields.string("cpu_template")
    if cpu_template == "V1N1":
        raise fields.error("cpu_template", '"V1N1" is an aarch64 template; pyvmm runs on x86_64')
    if cpu_template is not None and cpu_template not in STATIC_CPU_TEMPLATES:
        choices = ", ".join(f'"{name}"' for name in STATIC_CPU_TEMPLATES)
        raise fields.error("cpu_template", f"must be one of {choices}, not {show(cpu_template)}")
    huge_pages = fields.choice("huge_pages", ("None", "2M"))
    default_flag = False if full else None
    return MachineConfigUpdate(
        vcpu_count=fields.integer("vcpu_count", 1, MAX_VCPUS, required=full),
        mem_size_mib=fields.integer(
            "mem_size_mib", MIN_MEM_SIZE_MIB, MAX_MEM_SIZE_MIB, required=full
        ),
        smt=fields.boolean("smt") if fields.has("smt") else default_flag,
        track_dirty_pages=(
            fields.boolean("track_dirty_pages") if fields.has("track_dirty_pages") else default_flag
        ),
        huge_pages=huge_pages if huge_pages is not None else ("None" if full else None),
        cpu_template=cpu_template,
        replaces=full,
    )


def parse_machine_config(value: Any, where: str = "machine-config") -> MachineConfigUpdate:
    """``PUT /machine-config``: vcpu_count and mem_size_mib required; others reset."""
    return _machine_fields(value, where, full=True)


def parse_machine_config_update(value: Any, where: str = "machine-config") -> MachineConfigUpdate:
    """``PATCH /machine-config``: any subset of the fields (may be empty: caller checks)."""
    return _machine_fields(value, where, full=False)


# --- block devices --------------------------------------------------------------------


@dataclass(frozen=True)
class Drive:
    """``PUT /drives/{drive_id}``: a raw disk image behind virtio-blk."""

    drive_id: str
    path_on_host: str
    is_root_device: bool
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: str = "Unsafe"
    rate_limiter: RateLimiterConfig | None = None
    io_engine: str = "Sync"

    def to_json(self) -> dict[str, Any]:
        return {
            "drive_id": self.drive_id,
            "partuuid": self.partuuid,
            "is_root_device": self.is_root_device,
            "cache_type": self.cache_type,
            "is_read_only": self.is_read_only,
            "path_on_host": self.path_on_host,
            "rate_limiter": _json_or_none(self.rate_limiter),
            "io_engine": self.io_engine,
            "socket": None,
        }


def parse_drive(value: Any, where: str = "drive") -> Drive:
    fields = Fields(
        value,
        where,
        (
            "drive_id",
            "path_on_host",
            "is_root_device",
            "is_read_only",
            "partuuid",
            "cache_type",
            "rate_limiter",
            "io_engine",
        ),
        unsupported={"socket": "vhost-user block devices"},
    )
    partuuid = fields.string("partuuid")
    if partuuid is not None and (len(partuuid) > 64 or not _PARTUUID_RE.match(partuuid)):
        raise fields.error(
            "partuuid", f"must be a partition UUID (hex digits and dashes), not {show(partuuid)}"
        )
    io_engine = fields.choice("io_engine", ("Sync", "Async"), "Sync") or "Sync"
    return Drive(
        drive_id=fields.ident("drive_id"),
        path_on_host=fields.required_string("path_on_host"),
        is_root_device=fields.boolean("is_root_device", required=True),
        is_read_only=fields.boolean("is_read_only"),
        partuuid=partuuid,
        cache_type=fields.choice("cache_type", ("Unsafe", "Writeback"), "Unsafe") or "Unsafe",
        rate_limiter=_device_rate_limiter(fields, "rate_limiter"),
        io_engine=io_engine,
    )


@dataclass(frozen=True)
class PartialDrive:
    """``PATCH /drives/{drive_id}`` (post-boot): a new image and/or rate limiter.

    ``rate_limiter`` keeps PATCH semantics (see :class:`RateLimiterConfig`).
    """

    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiterConfig | None = None


def parse_partial_drive(value: Any, where: str = "drive") -> PartialDrive:
    fields = Fields(value, where, ("drive_id", "path_on_host", "rate_limiter"))
    return PartialDrive(
        drive_id=fields.ident("drive_id"),
        path_on_host=fields.string("path_on_host"),
        rate_limiter=parse_rate_limiter(fields.obj.get("rate_limiter"), f"{where}: rate_limiter"),
    )


# --- network interfaces ---------------------------------------------------------------


@dataclass(frozen=True)
class NetworkInterface:
    """``PUT /network-interfaces/{iface_id}``: virtio-net on a host TAP device.

    ``guest_mac`` is stored in lower case, so uniqueness checks compare
    like with like.
    """

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None
    #: Recorded and reported; pyvmm's virtio-net does not offer VIRTIO_NET_F_MTU yet,
    #: so the guest keeps its own default (1500).
    mtu: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "iface_id": self.iface_id,
            "host_dev_name": self.host_dev_name,
            "guest_mac": self.guest_mac,
            "mtu": self.mtu,
            "rx_rate_limiter": _json_or_none(self.rx_rate_limiter),
            "tx_rate_limiter": _json_or_none(self.tx_rate_limiter),
        }


def tap_name(fields: Fields, name: str) -> str:
    value = fields.required_string(name)
    if (
        not value.isascii()
        or len(value) >= _IFNAMSIZ
        or value in (".", "..")
        or any(c in value for c in "/:")
        or any(c.isspace() for c in value)
    ):
        raise fields.error(
            name,
            f"must be a TAP device name (ASCII, at most {_IFNAMSIZ - 1} characters, "
            f"no '/', ':' or spaces), not {show(value)}",
        )
    return value


def _guest_mac(fields: Fields) -> str | None:
    mac = fields.string("guest_mac")
    if mac is None:
        return None
    if not _MAC_RE.match(mac):
        raise fields.error(
            "guest_mac", f"must be six hex bytes like 06:00:ac:10:00:02, not {show(mac)}"
        )
    return mac.lower()


def parse_network_interface(value: Any, where: str = "network-interface") -> NetworkInterface:
    fields = Fields(
        value,
        where,
        ("iface_id", "host_dev_name", "guest_mac", "rx_rate_limiter", "tx_rate_limiter", "mtu"),
    )
    return NetworkInterface(
        iface_id=fields.ident("iface_id"),
        host_dev_name=tap_name(fields, "host_dev_name"),
        guest_mac=_guest_mac(fields),
        mtu=fields.integer("mtu", MIN_MTU, MAX_MTU),
        rx_rate_limiter=_device_rate_limiter(fields, "rx_rate_limiter"),
        tx_rate_limiter=_device_rate_limiter(fields, "tx_rate_limiter"),
    )


@dataclass(frozen=True)
class PartialNetworkInterface:
    """``PATCH /network-interfaces/{iface_id}`` (post-boot): new rate limiters.

    Both keep PATCH semantics (see :class:`RateLimiterConfig`).
    """

    iface_id: str
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None


def parse_partial_network_interface(
    value: Any, where: str = "network-interface"
) -> PartialNetworkInterface:
    fields = Fields(value, where, ("iface_id", "rx_rate_limiter", "tx_rate_limiter"))
    return PartialNetworkInterface(
        iface_id=fields.ident("iface_id"),
        rx_rate_limiter=parse_rate_limiter(
            fields.obj.get("rx_rate_limiter"), f"{where}: rx_rate_limiter"
        ),
        tx_rate_limiter=parse_rate_limiter(
            fields.obj.get("tx_rate_limiter"), f"{where}: tx_rate_limiter"
        ),
    )


# --- other devices --------------------------------------------------------------------


@dataclass(frozen=True)
class Vsock:
    """``PUT /vsock``: virtio-vsock proxied to Unix sockets at ``uds_path``.

    CIDs 0-2 are reserved (hypervisor, local, host) and 2**32-1 means "any".
    ``vsock_id`` is deprecated in Firecracker; kept only to report it.
    """

    guest_cid: int
    uds_path: str
    vsock_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"guest_cid": self.guest_cid, "uds_path": self.uds_path}
        if self.vsock_id is not None:
            data["vsock_id"] = self.vsock_id
        return data


def parse_vsock(value: Any, where: str = "vsock") -> Vsock:
    fields = Fields(value, where, ("vsock_id", "guest_cid", "uds_path"))
    return Vsock(
        guest_cid=fields.required_integer("guest_cid", 3, U32_MAX - 1),
        uds_path=fields.required_string("uds_path"),
        vsock_id=fields.string("vsock_id"),
    )


@dataclass(frozen=True)
class Entropy:
    """``PUT /entropy``: a virtio-rng device, optionally rate-limited."""

    rate_limiter: RateLimiterConfig | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rate_limiter": _json_or_none(self.rate_limiter)}


def parse_entropy(value: Any, where: str = "entropy") -> Entropy:
    fields = Fields(value, where, ("rate_limiter",))
    return Entropy(rate_limiter=_device_rate_limiter(fields, "rate_limiter"))


# --- logging and metrics --------------------------------------------------------------


@dataclass(frozen=True)
class Logger:
    """``PUT /logger``: where and how much the VMM logs (level names canonical)."""

    log_path: str | None = None
    level: str | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "log_path": self.log_path,
            "level": self.level,
            "show_level": self.show_level,
            "show_log_origin": self.show_log_origin,
            "module": self.module,
        }


def parse_logger(value: Any, where: str = "logger") -> Logger:
    fields = Fields(value, where, ("log_path", "level", "show_level", "show_log_origin", "module"))
    level = fields.choice("level", (*LOG_LEVELS, "Warning"), case_insensitive=True)
    return Logger(
        log_path=fields.string("log_path"),
        level="Warn" if level == "Warning" else level,
        show_level=fields.optional_boolean("show_level"),
        show_log_origin=fields.optional_boolean("show_log_origin"),
        module=fields.string("module"),
    )


@dataclass(frozen=True)
class Metrics:
    """``PUT /metrics``: the file or FIFO the JSON metrics lines are written to."""

    metrics_path: str
    emit_id: bool = False
    properties: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"metrics_path": self.metrics_path, "emit_id": self.emit_id}
        if self.properties:
            data["properties"] = dict(self.properties)
        return data


def parse_metrics(value: Any, where: str = "metrics") -> Metrics:
    fields = Fields(value, where, ("metrics_path", "emit_id", "properties"), ignore_unknown=True)
    properties = fields.object("properties") or {}
    for key, item in properties.items():
        if not isinstance(item, str):
            raise fields.error(f"properties[{show(key)}]", f"must be a string, not {show(item)}")
    return Metrics(
        metrics_path=fields.required_string("metrics_path"),
        emit_id=fields.boolean("emit_id"),
        properties=tuple(sorted(properties.items())),
    )
