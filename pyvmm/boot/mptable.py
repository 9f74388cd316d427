"""An Intel MultiProcessor Specification 1.4 table.

Without ACPI, this is how a Linux guest learns how many CPUs it has, where
the IOAPIC is, and how ISA interrupts are wired to it. Linux looks for the
"_MP_" floating pointer in the last KiB of base memory (0x9FC00), which is
where ``layout.MPTABLE_START`` puts it; the configuration table follows it
directly. The e820 map reports that KiB as reserved.

Wiring declared here (the VMM's interrupt routing must match it):

* ISA IRQ n -> IOAPIC pin n, except IRQ 0 (PIT) -> ``layout.PIT_IOAPIC_PIN``
  (pin 0: KVM's default identity routing); the cascade IRQ 2 has no entry.
* LAPIC LINT0 = ExtINT (the 8259 PIC, virtual-wire mode), LINT1 = NMI.
"""

from __future__ import annotations

import struct

from pyvmm import layout
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory

MP_SPEC_REVISION = 4  # 1.4

# Floating pointer: signature, config table address, length in 16-byte
# units, spec revision, checksum, feature bytes 1-5.
FLOATING_POINTER = struct.Struct("<4sIBBBBB3s")
# Configuration table header: signature, base table length, revision,
# checksum, OEM id, product id, OEM table pointer and size, entry count,
# LAPIC address, extended table length and checksum, reserved.
CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
# Entries: processor, bus, IOAPIC, I/O interrupt, local interrupt.
PROCESSOR_ENTRY = struct.Struct("<BBBBII8s")
BUS_ENTRY = struct.Struct("<BB6s")
IOAPIC_ENTRY = struct.Struct("<BBBBI")
INTERRUPT_ENTRY = struct.Struct("<BBHBBBB")

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4

CPU_ENABLED = 0x01
CPU_BOOTSTRAP = 0x02
IOAPIC_ENABLED = 0x01
INT_TYPE_INT = 0  # vectored, through the IOAPIC redirection table
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
INT_FLAGS_CONFORMING = 0  # polarity and trigger as the bus defines (ISA: edge, high)
ALL_LAPICS = 0xFF

LAPIC_VERSION = 0x14  # what KVM's in-kernel LAPIC reports
IOAPIC_VERSION = 0x11  # what KVM's in-kernel IOAPIC reports
# Family 6, model 0, stepping 0; features FPU | APIC. Linux takes the real
# values from CPUID; these only need to look like a modern APIC CPU.
CPU_SIGNATURE = 6 << 8
CPU_FEATURES = (1 << 0) | (1 << 9)
ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "
OEM_ID = b"PYVMM   "
PRODUCT_ID = b"KVM GUEST   "

_CASCADE_IRQ = 2


def _checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with it included) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def table_size(num_cpus: int) -> int:
    """Bytes the floating pointer plus configuration table take."""
    interrupts = (layout.ISA_IRQ_COUNT - 1) + 2
    return (
        FLOATING_POINTER.size
        + CONFIG_HEADER.size
        + num_cpus * PROCESSOR_ENTRY.size
        + BUS_ENTRY.size
        + IOAPIC_ENTRY.size
        + interrupts * INTERRUPT_ENTRY.size
    )


def _isa_pin(irq: int) -> int:
    return layout.PIT_IOAPIC_PIN if irq == layout.PIT_IRQ else irq


def build_mptable(num_cpus: int, base: int = layout.MPTABLE_START) -> bytes:
    """The MP floating pointer at ``base`` followed by the configuration table."""
    if not 1 <= num_cpus <= layout.MAX_VCPUS:
        raise ConfigError(f"{num_cpus} vCPUs requested; pyvmm supports 1 to {layout.MAX_VCPUS}")
    if base + table_size(num_cpus) > layout.LOW_RAM_END:
        raise ConfigError(f"MP table for {num_cpus} vCPUs does not fit below 640 KiB")
    ioapic_id = num_cpus  # the first APIC id after the CPUs'
    entries = [
        PROCESSOR_ENTRY.pack(
            ENTRY_PROCESSOR,
            cpu,
            LAPIC_VERSION,
            CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0),
            CPU_SIGNATURE,
            CPU_FEATURES,
            b"",
        )
        for cpu in range(num_cpus)
    ]
    entries.append(BUS_ENTRY.pack(ENTRY_BUS, ISA_BUS_ID, ISA_BUS_TYPE))
    entries.append(
        IOAPIC_ENTRY.pack(
            ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, layout.IOAPIC_ADDR
        )
    )
    for irq in range(layout.ISA_IRQ_COUNT):
        if irq == _CASCADE_IRQ:
            continue
        entries.append(
            INTERRUPT_ENTRY.pack(
                ENTRY_IO_INTERRUPT,
                INT_TYPE_INT,
                INT_FLAGS_CONFORMING,
                ISA_BUS_ID,
                irq,
                ioapic_id,
                _isa_pin(irq),
            )
        )
    for lint, kind in ((0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)):
        entries.append(
            INTERRUPT_ENTRY.pack(
                ENTRY_LOCAL_INTERRUPT, kind, INT_FLAGS_CONFORMING, ISA_BUS_ID, 0, ALL_LAPICS, lint
            )
        )
    body = b"".join(entries)
    config_addr = base + FLOATING_POINTER.size
    header_fields = (
        b"PCMP",
        CONFIG_HEADER.size + len(body),
        MP_SPEC_REVISION,
        0,  # checksum, filled in below
        OEM_ID,
        PRODUCT_ID,
        0,
        0,
        len(entries),
        layout.LAPIC_ADDR,
        0,
        0,
        0,
    )
    unsummed = CONFIG_HEADER.pack(*header_fields) + body
    header = CONFIG_HEADER.pack(*header_fields[:3], _checksum(unsummed), *header_fields[4:])
    # Feature byte 1 = 0: a configuration table is present. Feature byte 2 = 0
    # (IMCRP clear): virtual-wire mode, there is no IMCR to program.
    pointer_fields = [b"_MP_", config_addr, 1, MP_SPEC_REVISION, 0, 0, 0, b"\0\0\0"]
    pointer_sum = _checksum(FLOATING_POINTER.pack(*pointer_fields))
    pointer_fields[4] = pointer_sum
    return FLOATING_POINTER.pack(*pointer_fields) + header + body


def write_mptable(mem: GuestMemory, table: bytes, base: int = layout.MPTABLE_START) -> None:
    mem.write(base, table)
