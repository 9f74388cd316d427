"""``VmResources``: the whole pre-boot configuration, and Firecracker's config file.

The API's PUT requests and a ``--config-file`` both build one of these; it
applies the rules that need more than one request body to check
(Firecracker's ``VmResources`` and device builders):

- a PUT on an existing id replaces that device in place; new ids append;
- at most one drive is the root device; :meth:`VmResources.drive_order`
  puts it first, so it is ``/dev/vda`` as in Firecracker;
- guest MACs and TAP device names are unique across interfaces;
- the files named (kernel, initrd, drive images) exist and can be opened
  as asked, checked when given, as Firecracker opens them when given;
- at most ``layout.MAX_VIRTIO_DEVICES`` virtio devices in all;
- ``mmds-config`` names existing interfaces; metrics are set once.

:meth:`VmResources.to_json` is ``GET /vm/config`` (the config-file shape
with ``null`` for what is unset); :meth:`VmResources.from_json` reads that
shape back, and :meth:`VmResources.from_config_file` a file of it. Error
messages name the top-level key and field (``drives[1]: is_root_device is
required``). Everything here is plain data: no device is opened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyvmm import layout
from pyvmm.api.balloon import BalloonResource, parse_balloon
from pyvmm.api.fields import as_object, read_json_file, show
from pyvmm.api.mmds import DEFAULT_MMDS_SIZE_LIMIT, MmdsStore
from pyvmm.api.models import (
    BootSource,
    Drive,
    Entropy,
    Logger,
    MachineConfigUpdate,
    MachineConfiguration,
    Metrics,
    NetworkInterface,
    PartialDrive,
    PartialNetworkInterface,
    Vsock,
    merge_rate_limiter,
    parse_boot_source,
    parse_drive,
    parse_entropy,
    parse_logger,
    parse_machine_config,
    parse_metrics,
    parse_network_interface,
    parse_vsock,
)
from pyvmm.api.operations import MmdsConfig, parse_mmds_config
from pyvmm.errors import ConfigError

#: The config file's top-level keys, in the order they are applied.
CONFIG_KEYS = (
    "logger",
    "metrics",
    "machine-config",
    "boot-source",
    "drives",
    "network-interfaces",
    "vsock",
    "mmds-config",
    "entropy",
    "balloon",
)
#: Firecracker config-file keys pyvmm has no device for.
UNSUPPORTED_CONFIG_KEYS = {
    "cpu-config": "no custom CPU templates; use a static machine-config cpu_template",
    "pmem": "no virtio-pmem devices",
    "memory-hotplug": "no virtio-mem device",
    "serial": "the serial console is configured on the command line",
}
#: The largest ``--config-file`` read (Firecracker's own are a few KiB).
MAX_CONFIG_FILE_BYTES = 1 << 20

T = TypeVar("T")


def check_file(where: str, field: str, path: str, *, write: bool = False) -> None:
    """Refuse a path that is not a regular file this process can read (and write)."""
    shown = show(path, limit=200)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{where}: {field} {shown}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where}: {field} {shown} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where}: {field} {shown} is not readable")
    if write and not os.access(path, os.W_OK):
        raise ConfigError(
            f"{where}: {field} {shown} is not writable (set is_read_only to use it read-only)"
        )


class VmResources:
    """The pre-boot configuration; see the module docstring for its rules."""

    def __init__(self, mmds_size_limit: int = DEFAULT_MMDS_SIZE_LIMIT) -> None:
        self.boot_source: BootSource | None = None
        self.machine_config = MachineConfiguration()
        self.drives: dict[str, Drive] = {}
        self.nets: dict[str, NetworkInterface] = {}
        self.vsock: Vsock | None = None
        self.entropy: Entropy | None = None
        self.logger: Logger | None = None
        self.metrics: Metrics | None = None
        self.mmds_config: MmdsConfig | None = None
        self.balloon: BalloonResource | None = None
        #: ``PUT /serial``: where the guest's console output goes (None: stdout).
        self.serial_out_path: str | None = None
        #: The metadata document; shared with whoever serves it to the guest.
        self.mmds = MmdsStore(mmds_size_limit)

    # --- setters (one per PUT) --------------------------------------------------------
    def set_boot_source(self, boot: BootSource, where: str = "boot-source") -> None:
        check_file(where, "kernel_image_path", boot.kernel_image_path)
        if boot.initrd_path is not None:
            check_file(where, "initrd_path", boot.initrd_path)
        self.boot_source = boot

    def update_machine_config(
        self, update: MachineConfigUpdate, where: str = "machine-config"
    ) -> None:
        self.machine_config = self.machine_config.updated(update, where)

    def set_drive(self, drive: Drive, where: str = "drive") -> None:
        if drive.is_root_device:
            for other in self.drives.values():
                if other.is_root_device and other.drive_id != drive.drive_id:
                    raise ConfigError(
                        f"{where}: drive {show(drive.drive_id)} cannot be the root device: "
                        f"drive {show(other.drive_id)} already is"
                    )
        check_file(where, "path_on_host", drive.path_on_host, write=not drive.is_read_only)
        if drive.drive_id not in self.drives:
            self._check_device_room(where)
        self.drives[drive.drive_id] = drive

    def set_network_interface(
        self, net: NetworkInterface, where: str = "network-interface"
    ) -> None:
        for other in self.nets.values():
            if other.iface_id == net.iface_id:
                continue
            if net.guest_mac is not None and other.guest_mac == net.guest_mac:
                raise ConfigError(
                    f"{where}: guest_mac {net.guest_mac} is already used by network interface "
                    f"{show(other.iface_id)}"
                )
            if other.host_dev_name == net.host_dev_name:
                raise ConfigError(
                    f"{where}: host_dev_name {show(net.host_dev_name)} is already used by "
                    f"network interface {show(other.iface_id)}"
                )
        if net.iface_id not in self.nets:
            self._check_device_room(where)
        self.nets[net.iface_id] = net

    def set_vsock(self, vsock: Vsock, where: str = "vsock") -> None:
        if self.vsock is None:
            self._check_device_room(where)
        self.vsock = vsock

    def set_entropy(self, entropy: Entropy, where: str = "entropy") -> None:
        if self.entropy is None:
            self._check_device_room(where)
        self.entropy = entropy

    def set_balloon(self, balloon: BalloonResource, where: str = "balloon") -> None:
        if self.balloon is None:
            self._check_device_room(where)
        self.balloon = balloon

    def set_logger(self, logger: Logger) -> None:
        self.logger = logger

    def set_metrics(self, metrics: Metrics, where: str = "metrics") -> None:
        if self.metrics is not None:
            raise ConfigError(f"{where}: the metrics system is already initialized")
        self.metrics = metrics

    def set_mmds_config(self, config: MmdsConfig, where: str = "mmds-config") -> None:
        for iface_id in config.network_interfaces:
            if iface_id not in self.nets:
                raise ConfigError(
                    f"{where}: network_interfaces names {show(iface_id)}, "
                    "which is not a configured network interface"
                )
        self.mmds_config = config

    def _check_device_room(self, where: str) -> None:
        count = (
            len(self.drives)
            + len(self.nets)
            + (self.vsock is not None)
            + (self.entropy is not None)
            + (self.balloon is not None)
        )
        if count >= layout.MAX_VIRTIO_DEVICES:
            raise ConfigError(
                f"{where}: pyvmm supports at most {layout.MAX_VIRTIO_DEVICES} virtio devices"
            )

    # --- post-boot updates (PATCH) ----------------------------------------------------
    def patched_drive(self, patch: PartialDrive, where: str = "drive") -> Drive:
        """The drive as ``patch`` would leave it; checked, not stored (:meth:`replace_drive`)."""
        drive = self.drives.get(patch.drive_id)
        if drive is None:
            raise ConfigError(f"{where}: no drive has drive_id {show(patch.drive_id)}")
        path = drive.path_on_host
        if patch.path_on_host is not None:
            check_file(where, "path_on_host", patch.path_on_host, write=not drive.is_read_only)
            path = patch.path_on_host
        return Drive(
            drive_id=drive.drive_id,
            path_on_host=path,
            is_root_device=drive.is_root_device,
            is_read_only=drive.is_read_only,
            partuuid=drive.partuuid,
            cache_type=drive.cache_type,
            rate_limiter=merge_rate_limiter(drive.rate_limiter, patch.rate_limiter),
            io_engine=drive.io_engine,
        )

    def replace_drive(self, drive: Drive) -> None:
        """Record a drive the running VM now has (after a successful PATCH)."""
        self.drives[drive.drive_id] = drive

    def patched_network_interface(
        self, patch: PartialNetworkInterface, where: str = "network-interface"
    ) -> NetworkInterface:
        """The interface as ``patch`` would leave it (checked; not stored)."""
        net = self.nets.get(patch.iface_id)
        if net is None:
            raise ConfigError(f"{where}: no network interface has iface_id {show(patch.iface_id)}")
        return NetworkInterface(
            iface_id=net.iface_id,
            host_dev_name=net.host_dev_name,
            guest_mac=net.guest_mac,
            rx_rate_limiter=merge_rate_limiter(net.rx_rate_limiter, patch.rx_rate_limiter),
            tx_rate_limiter=merge_rate_limiter(net.tx_rate_limiter, patch.tx_rate_limiter),
        )

    def replace_network_interface(self, net: NetworkInterface) -> None:
        self.nets[net.iface_id] = net

    # --- views ------------------------------------------------------------------------
    def drive_order(self) -> list[Drive]:
        """Drives in device order: the root drive first, the rest as they were added."""
        return sorted(self.drives.values(), key=lambda drive: not drive.is_root_device)

    def to_json(self) -> dict[str, Any]:
        """``GET /vm/config``: the config-file shape, ``null`` for what is unset."""

        def maybe(value: Any) -> Any:
            return None if value is None else value.to_json()

        return {
            "boot-source": maybe(self.boot_source),
            "drives": [drive.to_json() for drive in self.drive_order()],
            "machine-config": self.machine_config.to_json(),
            "network-interfaces": [net.to_json() for net in self.nets.values()],
            "vsock": maybe(self.vsock),
            "entropy": maybe(self.entropy),
            "logger": maybe(self.logger),
            "metrics": maybe(self.metrics),
            "mmds-config": maybe(self.mmds_config),
            "balloon": maybe(self.balloon),
            "cpu-config": None,
            "pmem": [],
            "memory-hotplug": None,
        }

    # --- the config file --------------------------------------------------------------
    @classmethod
    def from_json(cls, value: Any, mmds_size_limit: int = DEFAULT_MMDS_SIZE_LIMIT) -> VmResources:
        """Resources from a parsed config file, applied in Firecracker's order."""
        config = as_object(value, "the configuration")
        for key in config:
            if key in UNSUPPORTED_CONFIG_KEYS and config[key] not in (None, []):
                raise ConfigError(
                    f"{show(key)} is not supported by pyvmm ({UNSUPPORTED_CONFIG_KEYS[key]})"
                )
            if key not in CONFIG_KEYS and key not in UNSUPPORTED_CONFIG_KEYS:
                raise ConfigError(
                    f"unknown key {show(key)} (expected one of {', '.join(CONFIG_KEYS)})"
                )
        if config.get("boot-source") is None:
            raise ConfigError('"boot-source" is required')
        resources = cls(mmds_size_limit)

        def one(key: str, parse: Callable[[Any, str], T], apply: Callable[[T, str], None]) -> None:
            if config.get(key) is not None:
                apply(parse(config[key], key), key)

        def many(key: str, parse: Callable[[Any, str], T], apply: Callable[[T, str], None]) -> None:
            items = config.get(key)
            if items is None:
                return
            if not isinstance(items, list):
                raise ConfigError(f"{key} must be an array, not {show(items)}")
            for index, item in enumerate(items):
                where = f"{key}[{index}]"
                apply(parse(item, where), where)

        one("logger", parse_logger, lambda logger, _: resources.set_logger(logger))
        one("metrics", parse_metrics, resources.set_metrics)
        one("machine-config", parse_machine_config, resources.update_machine_config)
        one("boot-source", parse_boot_source, resources.set_boot_source)
        many("drives", parse_drive, _no_duplicate_id(resources.drives, resources.set_drive))
        many(
            "network-interfaces",
            parse_network_interface,
            _no_duplicate_id(resources.nets, resources.set_network_interface),
        )
        one("vsock", parse_vsock, resources.set_vsock)
        one("mmds-config", parse_mmds_config, resources.set_mmds_config)
        one("entropy", parse_entropy, resources.set_entropy)
        one("balloon", parse_balloon, resources.set_balloon)
        return resources

    @classmethod
    def from_config_file(
        cls, path: str | os.PathLike[str], mmds_size_limit: int = DEFAULT_MMDS_SIZE_LIMIT
    ) -> VmResources:
        """Resources from Firecracker's ``--config-file`` JSON; errors start with the path."""
        path = Path(path)
        value = read_json_file(path, "config file", MAX_CONFIG_FILE_BYTES)
        try:
            return cls.from_json(value, mmds_size_limit)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None


def _no_duplicate_id(
    existing: dict[str, Any], apply: Callable[[Any, str], None]
) -> Callable[[Any, str], None]:
    """In a config file two entries with one id are a mistake, not a replacement."""

    def checked(item: Any, where: str) -> None:
        item_id = getattr(item, "drive_id", None) or getattr(item, "iface_id", None)
        if item_id in existing:
            raise ConfigError(f"{where}: the id {show(item_id)} is used twice")
        apply(item, where)

    return checked
