"""The devices' part of a snapshot: every device's saved state, by the device's id.

Legacy devices are saved under fixed names (``serial``, ``i8042``,
``acpi_pm``, ``pvpanic``, ``boot_timer``, ``vmgenid``), virtio devices under their
config ids (``drive_id``, ``iface_id``, ``rng``, ``vsock``), so a restore
matches parts by name, never by position. :data:`DEVICE_STATE_TYPES` is
the only set of classes a state file may name: the codec refuses any other.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.devices.legacy.acpi_pm import AcpiPmState, PvPanicState
from pyvmm.devices.legacy.boot_timer import BootTimerState
from pyvmm.devices.legacy.i8042 import I8042State
from pyvmm.devices.legacy.serial import SerialState
from pyvmm.devices.legacy.vmgenid import VmGenIdState
from pyvmm.devices.virtio.balloon import VirtioBalloonState
from pyvmm.devices.virtio.block import VirtioBlockState
from pyvmm.devices.virtio.mmio import MmioTransportState
from pyvmm.devices.virtio.net import VirtioNetState
from pyvmm.devices.virtio.rng import VirtioRngState
from pyvmm.devices.virtio.vsock import VirtioVsockState

DEVICE_STATE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        SerialState,
        I8042State,
        AcpiPmState,
        PvPanicState,
        BootTimerState,
        VmGenIdState,
        VirtioBlockState,
        VirtioNetState,
        VirtioRngState,
        VirtioVsockState,
        VirtioBalloonState,
    )
}


@dataclass(frozen=True)
class DevicesState:
    """``legacy``: name -> the device's state; ``virtio``: device id -> its transport's state."""

    legacy: dict[str, object]
    virtio: dict[str, MmioTransportState]
