"""A complete, small MicrovmState for the snapshot unit tests."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from pyvmm.config import DriveConfig, MachineConfig, NetConfig, VsockConfig
from pyvmm.devices.base import NoIrq
from pyvmm.devices.legacy.acpi_pm import AcpiPm, PvPanic
from pyvmm.devices.legacy.boot_timer import BootTimer
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.serial import Serial
from pyvmm.devices.virtio.mmio import MmioTransport
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from pyvmm.snapshot.state import (
    FORMAT_VERSION,
    MAGIC,
    DevicesState,
    MemoryState,
    MicrovmState,
    VcpuState,
    VmKvmState,
)

MiB = 1 << 20
ID_A = "a" * 32
ID_B = "b" * 32


def make_state(memory: MemoryState | None = None) -> MicrovmState:
    mem = GuestMemory([(0, MiB)])
    serial = Serial(NoIrq(), lambda data: None)
    serial.enqueue_input(b"typed")
    transport = MmioTransport(VirtioRng(os.getrandom), NoIrq(), mem)
    return MicrovmState(
        pyvmm_version="0.1.0",
        config=MachineConfig(
            kernel=Path("/k"),
            vcpus=2,
            drives=(DriveConfig(Path("/d.img"), read_only=True),),
            nets=(NetConfig("tap0", mac="02:00:00:00:00:01"),),
            vsock=VsockConfig(3, Path("/tmp/v.sock")),
        ),
        memory=memory or MemoryState(size=MiB, regions=((0, MiB),), snapshot_id=ID_A),
        vcpus=(
            VcpuState(
                id=0,
                cpuid=((0, 0, 0, 0xD, 1, 2, 3),),
                tsc_khz=2_000_000,
                mp_state=0,
                regs=b"\x01" * 144,
                sregs=b"\x02" * 312,
                fpu=b"\x03" * 416,
                xsave=None,
                xcrs=b"x",
                debugregs=None,
                lapic=bytes(1024),
                msrs={0x10: 12345, 0xC0000080: 0x500},
                vcpu_events=bytes(64),
            ),
        ),
        vm=VmKvmState(b"pm", b"ps", b"io", b"pit", b"clock"),
        devices=DevicesState(
            legacy={
                "serial": serial.save(),
                "i8042": I8042(NoIrq(), lambda: None).save(),
                "acpi_pm": AcpiPm(lambda: None, lambda: None).save(),
                "pvpanic": PvPanic(lambda: None).save(),
                "boot_timer": BootTimer(0).save(),
            },
            virtio={"rng": transport.save()},
        ),
    )


def pack_json(payload: Any, *, version: int = FORMAT_VERSION, flags: int = 0) -> bytes:
    """A state file around ``payload`` (JSON values) with a valid checksum: to test what
    the loader does with values no pyvmm would write."""
    data = json.dumps(payload).encode()
    header = struct.pack(
        "<8sII32sQ", MAGIC, version, flags, hashlib.sha256(data).digest(), len(data)
    )
    return header + data
