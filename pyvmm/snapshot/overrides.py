"""The saved machine config with the host-side names a restore may change.

A snapshot names host resources (TAP devices, the vsock socket) that may
not exist, or may be taken, where it is restored; Firecracker lets the
loader rename them (``network_overrides``, ``vsock_override``). Clones of
one snapshot running side by side (sandboxes) also need their own drive
images and vsock CID: :class:`CloneOverrides`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.config import MachineConfig, NetConfig
from pyvmm.snapshot.state import SnapshotError


@dataclass(frozen=True)
class CloneOverrides:
    """What differs between clones of one snapshot, beyond TAP names and the socket.

    ``drives``: {drive id: image path}, each clone's own copy of a writable
    image (the same bytes: the guest's page cache holds the old one's blocks);
    ``vsock_cid``: the guest reads it again at the transport reset that every
    restore sends. (A MAC stays the snapshot's: the guest's driver read it at
    boot; a sandbox's agent changes the guest interface's address instead.)
    """

    drives: Mapping[str, Path] = field(default_factory=dict)
    vsock_cid: int | None = None


def restored_config(
    config: MachineConfig,
    net_overrides: dict[str, str],
    vsock_uds: str | Path | None,
    clone: CloneOverrides | None = None,
) -> MachineConfig:
    """The saved config with host-side names replaced (TAPs, the vsock socket)
    and, for a clone, its own drives, MACs and CID."""
    names = {net.tap for net in config.nets} | {n.iface_id for n in config.nets if n.iface_id}
    unknown = set(net_overrides) - names
    if unknown:
        raise SnapshotError(
            f"net override {sorted(unknown)[0]!r} names no saved interface (saved: "
            f"{', '.join(sorted(names)) or 'none'})"
        )

    def new_tap(net: NetConfig) -> str | None:
        return net_overrides.get(net.iface_id or "") or net_overrides.get(net.tap)

    nets = tuple(
        dataclasses.replace(net, tap=tap, mac=net.mac or net.mac_bytes().hex(":"))
        if (tap := new_tap(net)) is not None
        else net
        for net in config.nets
    )
    vsock = config.vsock
    if vsock_uds is not None:
        if vsock is None:
            raise SnapshotError("a vsock socket was given, but the snapshot has no vsock device")
        vsock = dataclasses.replace(vsock, uds_path=Path(vsock_uds))
    config = dataclasses.replace(config, nets=nets, vsock=vsock)
    return config if clone is None else _apply_clone(config, clone)


def _apply_clone(config: MachineConfig, clone: CloneOverrides) -> MachineConfig:
    drive_ids = config.device_ids[: len(config.drives)]
    unknown = set(clone.drives) - set(drive_ids)
    if unknown:
        raise SnapshotError(
            f"drive override {sorted(unknown)[0]!r} names no saved drive (saved: "
            f"{', '.join(drive_ids) or 'none'})"
        )
    drives = tuple(
        dataclasses.replace(drive, path=Path(clone.drives[drive_id]))
        if drive_id in clone.drives
        else drive
        for drive_id, drive in zip(drive_ids, config.drives, strict=True)
    )
    vsock = config.vsock
    if clone.vsock_cid is not None:
        if vsock is None:
            raise SnapshotError("a vsock CID was given, but the snapshot has no vsock device")
        vsock = dataclasses.replace(vsock, guest_cid=clone.vsock_cid)
    return dataclasses.replace(config, drives=drives, vsock=vsock)
