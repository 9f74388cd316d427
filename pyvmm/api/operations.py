"""Firecracker's API request bodies that act on a VM or its metadata: MMDS,
snapshots, the VM's state and actions.

The same rules as :mod:`pyvmm.api.models` (the devices' and the machine's
bodies): one ``parse_*`` per body shape, unknown fields refused, one-line
errors naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyvmm.api.fields import Fields, is_valid_id, show
from pyvmm.api.models import DEFAULT_MMDS_IPV4, tap_name
from pyvmm.errors import ConfigError

# --- MMDS -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MmdsConfig:
    """``PUT /mmds/config``: which interfaces reach the metadata service, and where."""

    network_interfaces: tuple[str, ...]
    version: str = "V1"
    ipv4_address: str | None = None
    imds_compat: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "network_interfaces": list(self.network_interfaces),
            "ipv4_address": self.ipv4_address or DEFAULT_MMDS_IPV4,
            "imds_compat": self.imds_compat,
        }


def _link_local(fields: Fields, name: str) -> str | None:
    address = fields.string(name)
    if address is None:
        return None
    parts = address.split(".")
    ok = (
        len(parts) == 4
        and all(p.isdigit() and p.isascii() and (p == "0" or not p.startswith("0")) for p in parts)
        and parts[:2] == ["169", "254"]
        and 1 <= int(parts[2]) <= 254
        and 0 <= int(parts[3]) <= 255
    )
    if not ok:
        raise fields.error(
            name,
            "must be a link-local IPv4 address (169.254.1.0 to 169.254.254.255), "
            f"not {show(address)}",
        )
    return address


def parse_mmds_config(value: Any, where: str = "mmds-config") -> MmdsConfig:
    fields = Fields(value, where, ("version", "network_interfaces", "ipv4_address", "imds_compat"))
    ids = fields.array("network_interfaces", required=True) or []
    if not ids:
        raise fields.error("network_interfaces", "must list at least one network interface id")
    for item in ids:
        if not isinstance(item, str) or not is_valid_id(item):
            raise fields.error("network_interfaces", f"has an invalid id {show(item)}")
    return MmdsConfig(
        network_interfaces=tuple(ids),
        version=fields.choice("version", ("V1", "V2"), "V1") or "V1",
        ipv4_address=_link_local(fields, "ipv4_address"),
        imds_compat=fields.boolean("imds_compat"),
    )


def parse_mmds_contents(value: Any, where: str = "mmds") -> dict[str, Any]:
    """A PUT or PATCH ``/mmds`` body: any JSON object (its size is the store's business)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: the metadata must be a JSON object, not {show(value)}")
    return dict(value)


# --- snapshots, VM state and actions --------------------------------------------------


@dataclass(frozen=True)
class SnapshotCreateParams:
    """``PUT /snapshot/create``: write the VM state and guest memory to two files."""

    snapshot_path: str
    mem_file_path: str
    snapshot_type: str = "Full"


def parse_snapshot_create(value: Any, where: str = "snapshot-create") -> SnapshotCreateParams:
    fields = Fields(value, where, ("snapshot_type", "snapshot_path", "mem_file_path"))
    return SnapshotCreateParams(
        snapshot_path=fields.required_string("snapshot_path"),
        mem_file_path=fields.required_string("mem_file_path"),
        snapshot_type=fields.choice("snapshot_type", ("Full", "Diff"), "Full") or "Full",
    )


@dataclass(frozen=True)
class MemBackend:
    """Where restored guest memory comes from: a file, or a userfaultfd handler's socket."""

    backend_type: str
    backend_path: str


@dataclass(frozen=True)
class NetworkOverride:
    """On restore, back interface ``iface_id`` with another TAP device."""

    iface_id: str
    host_dev_name: str


@dataclass(frozen=True)
class SnapshotLoadParams:
    """``PUT /snapshot/load``, with the deprecated spellings resolved.

    ``mem_file_path`` becomes a File ``mem_backend`` and
    ``enable_diff_snapshots`` becomes ``track_dirty_pages``;
    ``deprecated_fields`` names any such field the request used.
    """

    snapshot_path: str
    mem_backend: MemBackend
    track_dirty_pages: bool = False
    resume_vm: bool = False
    network_overrides: tuple[NetworkOverride, ...] = ()
    vsock_override: str | None = None
    clock_realtime: bool = False
    deprecated_fields: tuple[str, ...] = ()


def parse_snapshot_load(value: Any, where: str = "snapshot-load") -> SnapshotLoadParams:
    fields = Fields(
        value,
        where,
        (
            "snapshot_path",
            "mem_backend",
            "mem_file_path",
            "enable_diff_snapshots",
            "track_dirty_pages",
            "resume_vm",
            "network_overrides",
            "vsock_override",
            "clock_realtime",
        ),
        unsupported={"huge_pages": "guest memory is never backed by huge pages"},
    )
    backend_obj = fields.object("mem_backend")
    mem_file_path = fields.string("mem_file_path")
    if backend_obj is not None and mem_file_path is not None:
        raise ConfigError(f"{where}: give either mem_backend or mem_file_path, not both")
    if backend_obj is not None:
        backend_fields = Fields(
            backend_obj, f"{where}: mem_backend", ("backend_type", "backend_path")
        )
        backend = MemBackend(
            backend_type=backend_fields.choice("backend_type", ("File", "Uffd"), required=True)
            or "File",
            backend_path=backend_fields.required_string("backend_path"),
        )
    elif mem_file_path is not None:
        backend = MemBackend("File", mem_file_path)
    else:
        raise ConfigError(f"{where}: mem_backend (or the deprecated mem_file_path) is required")
    overrides: list[NetworkOverride] = []
    for index, item in enumerate(fields.array("network_overrides") or ()):
        item_fields = Fields(  # Firecracker's NetworkOverride takes unknown fields
            item,
            f"{where}: network_overrides[{index}]",
            ("iface_id", "host_dev_name"),
            ignore_unknown=True,
        )
        override = NetworkOverride(
            item_fields.ident("iface_id"), tap_name(item_fields, "host_dev_name")
        )
        if any(o.iface_id == override.iface_id for o in overrides):
            raise ConfigError(
                f"{where}: network_overrides names iface_id {show(override.iface_id)} twice"
            )
        overrides.append(override)
    vsock_obj = fields.object("vsock_override")
    vsock_override = (
        Fields(
            vsock_obj, f"{where}: vsock_override", ("uds_path",), ignore_unknown=True
        ).required_string("uds_path")
        if vsock_obj is not None
        else None
    )
    used = {"mem_file_path": mem_file_path is not None}
    used["enable_diff_snapshots"] = fields.boolean("enable_diff_snapshots")
    deprecated = tuple(name for name, given in used.items() if given)
    return SnapshotLoadParams(
        snapshot_path=fields.required_string("snapshot_path"),
        mem_backend=backend,
        track_dirty_pages=fields.boolean("enable_diff_snapshots")
        or fields.boolean("track_dirty_pages"),
        resume_vm=fields.boolean("resume_vm"),
        network_overrides=tuple(overrides),
        vsock_override=vsock_override,
        clock_realtime=fields.boolean("clock_realtime"),
        deprecated_fields=deprecated,
    )


def parse_vm_state(value: Any, where: str = "vm") -> str:
    """``PATCH /vm``: "Paused" or "Resumed"."""
    fields = Fields(value, where, ("state",))
    return fields.choice("state", ("Paused", "Resumed"), required=True) or ""


def parse_instance_action(value: Any, where: str = "actions") -> str:
    """``PUT /actions``: "InstanceStart", "SendCtrlAltDel" or "FlushMetrics"."""
    fields = Fields(value, where, ("action_type",))
    return (
        fields.choice(
            "action_type", ("InstanceStart", "SendCtrlAltDel", "FlushMetrics"), required=True
        )
        or ""
    )
