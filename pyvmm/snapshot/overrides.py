"""The saved machine config with the host-side names a restore may change.

A snapshot names host resources (TAP devices, the vsock socket) that may
not exist, or may be taken, where it is restored; Firecracker lets the
loader rename them (``network_overrides``, ``vsock_override``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pyvmm.config import MachineConfig, NetConfig
from pyvmm.snapshot.state import SnapshotError


def restored_config(
    config: MachineConfig, net_overrides: dict[str, str], vsock_uds: str | Path | None
) -> MachineConfig:
    """The saved config with host-side names replaced (TAPs, the vsock socket)."""
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
    return dataclasses.replace(config, nets=nets, vsock=vsock)
