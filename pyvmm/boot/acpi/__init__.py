"""ACPI tables for x86_64 microVMs: RSDP, XSDT, FADT, MADT and DSDT.

One entry point, :func:`write_acpi_tables`, lays the tables out in guest
memory and returns the RSDP address, which the boot configurator hands to
the kernel (zero page ``acpi_rsdp_addr`` at offset 0x070, or PVH
``rsdp_paddr``). :func:`build_acpi_tables` does the same without memory,
for tests and tools.

Placement: the RSDP at ``layout.RSDP_ADDR`` (0xE0000, inside the BIOS area
Linux also scans for it), then XSDT, FADT, MADT and DSDT, each 16-byte
aligned, all below ``layout.ACPI_TABLES_END`` (1 MiB). That area is not RAM
in the guest's e820 map, so the kernel never hands it out as free memory.

What the rest of the VMM must do (see :mod:`pyvmm.devices.legacy.acpi_pm`): put
an ``AcpiPm`` at ``layout.ACPI_PM_PORT`` and a ``PvPanic`` at
``layout.PVPANIC_PORT`` on the port-I/O bus, and wire their callbacks to
power-off, reset and panic. With a :class:`VmGenIdAcpi`, the DSDT describes a
VM generation id: the VMM keeps its 16 bytes at that address
(:mod:`pyvmm.devices.legacy.vmgenid`) and raises that GSI when they change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from pyvmm import layout
from pyvmm.boot.acpi.dsdt import VirtioMmioDevice, VmGenIdAcpi, build_dsdt
from pyvmm.boot.acpi.tables import build_fadt, build_madt, build_rsdp, build_xsdt
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory

__all__ = [
    "AcpiTables",
    "VirtioMmioDevice",
    "VmGenIdAcpi",
    "build_acpi_tables",
    "write_acpi_tables",
]

TABLE_ALIGNMENT = 16


def _align(addr: int) -> int:
    return (addr + TABLE_ALIGNMENT - 1) & -TABLE_ALIGNMENT


class AcpiTables(NamedTuple):
    """Every table and where it goes; ``rsdp_addr`` is what the guest is told."""

    rsdp_addr: int
    xsdt_addr: int
    fadt_addr: int
    madt_addr: int
    dsdt_addr: int
    rsdp: bytes
    xsdt: bytes
    fadt: bytes
    madt: bytes
    dsdt: bytes

    def chunks(self) -> list[tuple[int, bytes]]:
        """``(guest address, bytes)`` pairs, in address order."""
        return [
            (self.rsdp_addr, self.rsdp),
            (self.xsdt_addr, self.xsdt),
            (self.fadt_addr, self.fadt),
            (self.madt_addr, self.madt),
            (self.dsdt_addr, self.dsdt),
        ]

    @property
    def end(self) -> int:
        """First address after the last table."""
        return self.dsdt_addr + len(self.dsdt)


def build_acpi_tables(
    num_cpus: int,
    virtio_devices: Sequence[VirtioMmioDevice] = (),
    base: int = layout.RSDP_ADDR,
    vmgenid: VmGenIdAcpi | None = None,
) -> AcpiTables:
    """Build every table for a VM, addresses resolved; raises ConfigError if they do not fit.

    ``virtio_devices`` are ``(MMIO base, window size, GSI)`` triples. ``base``
    must be 16-byte aligned: that is where OSes scanning for an RSDP look.
    ``vmgenid`` adds the VM generation id device and its Generic Event Device.
    """
    if base % TABLE_ALIGNMENT:
        raise ValueError(f"RSDP address {base:#x} is not 16-byte aligned")
    # The tables that hold addresses have fixed sizes, so placing everything
    # needs only the sizes of the MADT and DSDT, which hold none.
    madt = build_madt(num_cpus)
    dsdt = build_dsdt(virtio_devices, vmgenid)
    rsdp = build_rsdp(0)
    xsdt_size = len(build_xsdt([0, 0]))  # two entries: FADT, MADT
    fadt_size = len(build_fadt(0))

    xsdt_addr = _align(base + len(rsdp))
    fadt_addr = _align(xsdt_addr + xsdt_size)
    madt_addr = _align(fadt_addr + fadt_size)
    dsdt_addr = _align(madt_addr + len(madt))
    end = dsdt_addr + len(dsdt)
    if end > layout.ACPI_TABLES_END:
        raise ConfigError(
            f"ACPI tables need {end - base:#x} bytes from {base:#x}, past "
            f"{layout.ACPI_TABLES_END:#x}; fewer virtio devices would fit"
        )
    return AcpiTables(
        rsdp_addr=base,
        xsdt_addr=xsdt_addr,
        fadt_addr=fadt_addr,
        madt_addr=madt_addr,
        dsdt_addr=dsdt_addr,
        rsdp=build_rsdp(xsdt_addr),
        xsdt=build_xsdt([fadt_addr, madt_addr]),
        fadt=build_fadt(dsdt_addr),
        madt=madt,
        dsdt=dsdt,
    )


def write_acpi_tables(
    mem: GuestMemory,
    num_cpus: int,
    virtio_devices: Sequence[VirtioMmioDevice] = (),
    vmgenid: VmGenIdAcpi | None = None,
) -> int:
    """Write the tables at ``layout.RSDP_ADDR`` and return the RSDP address.

    Nothing is written unless every table was built and fits.
    """
    tables = build_acpi_tables(num_cpus, virtio_devices, vmgenid=vmgenid)
    if not mem.is_valid(tables.rsdp_addr, tables.end - tables.rsdp_addr):
        raise ConfigError(
            f"guest RAM must cover {tables.rsdp_addr:#x}-{tables.end:#x} for the ACPI tables"
        )
    mem.fill(tables.rsdp_addr, tables.end - tables.rsdp_addr)
    for addr, data in tables.chunks():
        mem.write(addr, data)
    return tables.rsdp_addr
