"""The DSDT: the devices a guest cannot find by probing, in AML.

Under hardware-reduced ACPI Linux sets up no legacy interrupts on its own
(no 8259, no default ISA IRQ table), so every device that needs an
interrupt has to be described here with its ``_CRS``:

* ``COM1`` (``PNP0501``): the 16550 UART at 0x3F8, ISA IRQ 4;
* ``PS2K`` (``PNP0303``): the i8042 keyboard controller at 0x60/0x64, IRQ 1
  (Linux's i8042 driver takes its ports and IRQ from this device);
* ``PEVT`` (``QEMU0001``): the pvpanic port, found by Linux's pvpanic-mmio
  driver, which accepts an I/O as well as a memory resource;
* ``Vnnn`` (``LNRO0005``): one per virtio-mmio transport. Debian's kernels
  find virtio-mmio devices only this way (no ``virtio_mmio.device=`` on
  the command line without ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``);
* ``VGEN`` (``VM_Gen_Counter``) and ``GED_`` (``ACPI0013``): the VM
  generation id and the interrupt that announces a new one (see
  :func:`vm_generation_id` and :func:`generic_event_device`).

Plus ``\\_S5`` at the root, which tells OSPM what SLP_TYP to write to the
FADT's sleep control register to power off; without it Linux has no ACPI
power-off and ``poweroff`` just halts.

ISA devices use ``IRQNoFlags`` (an ISA IRQ, edge-triggered and active-high
by definition, mapped to a GSI through the MADT), virtio devices the
extended ``Interrupt`` descriptor with an edge-triggered, active-high GSI:
pyvmm signals them through irqfds without a resample fd, which are edge
interrupts (a level interrupt would stay asserted until the VMM saw the
guest's EOI). Firecracker and cloud-hypervisor describe theirs the same
way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from pyvmm import layout
from pyvmm.boot.acpi.aml import (
    IO,
    Aml,
    Arg,
    Device,
    EisaId,
    If,
    Interrupt,
    IRQNoFlags,
    LEqual,
    Memory32Fixed,
    Method,
    Name,
    Notify,
    Package,
    ResourceTemplate,
    Return,
    Scope,
)
from pyvmm.boot.acpi.tables import build_table
from pyvmm.errors import ConfigError

DSDT_REVISION = 2  # 2 and up: AML integers are 64-bit

STA_PRESENT_ENABLED_SHOWN_FUNCTIONING = 0x0F
CCA_COHERENT = 1
VIRTIO_MMIO_HID = "LNRO0005"
PVPANIC_HID = "QEMU0001"
MAX_VIRTIO_DEVICES = 0x1000  # names V000..VFFF

# (MMIO base, window size, GSI) of one virtio-mmio transport.
VirtioMmioDevice = tuple[int, int, int]

VMGENID_HID = "QEMUVGID"  # the _HID QEMU gives it; Linux and Windows match the _CID
VMGENID_CID = "VM_Gen_Counter"  # what Microsoft's spec requires (ACPI upper-cases it)
VMGENID_NOTIFY = 0x80  # "the generation id changed"
GED_HID = "ACPI0013"


class VmGenIdAcpi(NamedTuple):
    """What the DSDT says about the VM generation id: where its 16 bytes are, which GSI
    announces a new one."""

    guid_addr: int
    gsi: int


def com1() -> Device:
    return Device(
        "COM1",
        [
            Name("_HID", EisaId("PNP0501")),
            Name("_UID", 0),
            Name(
                "_CRS",
                ResourceTemplate(
                    [
                        IO(layout.COM1_PORT, layout.COM1_PORT, 1, layout.UART_PORT_COUNT),
                        IRQNoFlags(layout.COM1_IRQ),
                    ]
                ),
            ),
        ],
    )


def ps2_keyboard() -> Device:
    """The i8042: data port first, then command/status, as Linux's i8042 PNP code expects."""
    return Device(
        "PS2K",
        [
            Name("_HID", EisaId("PNP0303")),
            Name(
                "_CRS",
                ResourceTemplate(
                    [
                        IO(layout.I8042_DATA_PORT, layout.I8042_DATA_PORT, 1, 1),
                        IO(layout.I8042_COMMAND_PORT, layout.I8042_COMMAND_PORT, 1, 1),
                        IRQNoFlags(layout.I8042_IRQ),
                    ]
                ),
            ),
        ],
    )


def pvpanic() -> Device:
    """The pvpanic port.

    ``_STA`` (present, enabled, functioning) is what ACPI assumes without
    one as well; it is spelled out because the ACPI pvpanic driver of Linux
    before 5.11 checked those bits.
    """
    return Device(
        "PEVT",
        [
            Name("_HID", PVPANIC_HID),
            Name(
                "_CRS",
                ResourceTemplate(
                    [IO(layout.PVPANIC_PORT, layout.PVPANIC_PORT, 1, layout.PVPANIC_PORT_COUNT)]
                ),
            ),
            Method("_STA", [Return(STA_PRESENT_ENABLED_SHOWN_FUNCTIONING)]),
        ],
    )


def check_virtio_devices(devices: Sequence[VirtioMmioDevice]) -> None:
    """Raise :class:`ConfigError` unless every device fits a DSDT entry."""
    if len(devices) > MAX_VIRTIO_DEVICES:
        raise ConfigError(
            f"{len(devices)} virtio-mmio devices; ACPI names allow {MAX_VIRTIO_DEVICES}"
        )
    for index, (base, size, gsi) in enumerate(devices):
        if base < 0 or size <= 0 or base + size > 1 << 32:
            raise ConfigError(
                f"virtio-mmio device {index}: window {base:#x}+{size:#x} must lie below 4 GiB"
            )
        if not 0 <= gsi < layout.IOAPIC_NUM_PINS:
            raise ConfigError(
                f"virtio-mmio device {index}: GSI {gsi} is not an IOAPIC pin "
                f"(0-{layout.IOAPIC_NUM_PINS - 1})"
            )


def virtio_mmio_devices(devices: Sequence[VirtioMmioDevice]) -> list[Device]:
    """``LNRO0005`` devices ``V000``, ``V001``, ... for ``(base, size, gsi)`` triples.

    ``_CCA`` 1: DMA is cache-coherent (guest RAM is plain host memory), so
    the guest needs no bounce buffers or cache maintenance.
    """
    check_virtio_devices(devices)
    return [
        Device(
            f"V{index:03X}",
            [
                Name("_HID", VIRTIO_MMIO_HID),
                Name("_UID", index),
                Name("_CCA", CCA_COHERENT),
                Name(
                    "_CRS",
                    ResourceTemplate(
                        [
                            Memory32Fixed(base, size),
                            Interrupt(gsi, edge=True, active_low=False, shared=False),
                        ]
                    ),
                ),
            ],
        )
        for index, (base, size, gsi) in enumerate(devices)
    ]


def vm_generation_id(guid_addr: int) -> Device:
    """``VGEN``: Microsoft's "Virtual Machine Generation ID" device.

    The guest finds the 16-byte generation id at the address ``ADDR``
    returns: a Package of two integers, the low and the high 32 bits (the
    spec's format, which Linux's ``vmgenid`` driver checks). ``ADDR`` is a
    method as the spec words it; the address never changes, so it returns a
    constant. Linux binds through the ``_CID`` (its id table has
    ``VM_GEN_COUNTER``: ACPICA upper-cases ``_CID`` strings); the ``_HID`` is
    QEMU's, so a guest sees the same device under pyvmm as under QEMU.
    """
    if guid_addr % 8 or not 0 < guid_addr < 1 << 64:
        raise ConfigError(f"VM generation id address {guid_addr:#x} must be 8-byte aligned")
    return Device(
        "VGEN",
        [
            Name("_HID", VMGENID_HID),
            Name("_CID", VMGENID_CID),
            Name("_DDN", VMGENID_CID),
            Method("ADDR", [Return(Package([guid_addr & 0xFFFF_FFFF, guid_addr >> 32]))]),
        ],
    )


def generic_event_device(gsi: int, target: str) -> Device:
    """``GED_`` (``ACPI0013``): turns an interrupt into ``Notify (target, 0x80)``.

    A hardware-reduced platform has no SCI and no GPE blocks, so a device
    notification needs a Generic Event Device (ACPI 6.x, 5.6.9): the OS
    requests the interrupts in its ``_CRS`` and, on each, evaluates
    ``_EVT`` with the interrupt number. Linux's driver (``evged``) is built
    into every ACPI kernel. The interrupt is edge-triggered and active-high,
    like the virtio ones: pyvmm raises it through an irqfd.
    """
    if not 0 <= gsi < layout.IOAPIC_NUM_PINS:
        raise ConfigError(f"GED GSI {gsi} is not an IOAPIC pin (0-{layout.IOAPIC_NUM_PINS - 1})")
    return Device(
        "GED",
        [
            Name("_HID", GED_HID),
            Name("_CRS", ResourceTemplate([Interrupt(gsi, edge=True)])),
            Method(
                "_EVT",
                [If(LEqual(Arg(0), gsi), [Notify(target, VMGENID_NOTIFY)])],
                args=1,
            ),
        ],
    )


def sleep_states() -> list[Aml]:
    """``\\_S5``: SLP_TYPa, SLP_TYPb (the second is ignored without a PM1b block)."""
    return [Name("_S5", Package([layout.ACPI_S5_SLP_TYP, 0]))]


def build_dsdt(
    virtio_devices: Sequence[VirtioMmioDevice] = (), vmgenid: VmGenIdAcpi | None = None
) -> bytes:
    """The whole DSDT, header and checksum included (``VGEN`` and ``GED_`` with ``vmgenid``)."""
    devices = [com1(), ps2_keyboard(), pvpanic(), *virtio_mmio_devices(virtio_devices)]
    if vmgenid is not None:
        devices += [
            vm_generation_id(vmgenid.guid_addr),
            generic_event_device(vmgenid.gsi, "\\_SB.VGEN"),
        ]
    system_bus = Scope("\\_SB", devices)
    return build_table(b"DSDT", DSDT_REVISION, b"".join([system_bus, *sleep_states()]))
