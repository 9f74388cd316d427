"""Byte layouts of the ACPI tables a microVM needs, and their builders.

Each layout is declared once, as a list of named fields turned into a
``struct`` format (:class:`Layout`), so builders fill fields by name and
tests decode by name; nothing else knows an offset.

The platform described is *hardware-reduced* ACPI (ACPI 6.x, 4.1): no PM1
event/control blocks, no GPEs, no SCI, no FACS. What the guest needs from
the fixed hardware of a PC, it gets elsewhere:

* power off: the FADT's sleep control/status registers (ACPI 6.x 4.8.3.7),
  with the ``\\_S5`` package in the DSDT giving the SLP_TYP to write;
* reset: the FADT's reset register;
* CPUs and interrupt controllers: the MADT;
* devices: the DSDT (:mod:`pyvmm.boot.acpi.dsdt`).

Hardware-reduced also makes Linux skip the 8259 PIC and the PIT/HPET timer
setup (``acpi_generic_reduced_hw_init``), which suits a KVM guest that uses
the LAPIC timer and kvmclock.

Revisions follow ACPI 6.3, the newest the ``iasl`` in Debian 12 knows.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from pyvmm import layout
from pyvmm.errors import ConfigError


class Layout:
    """A little-endian, packed structure declared as ``(name, struct code)`` fields."""

    def __init__(self, fields: Sequence[tuple[str, str]]) -> None:
        self.fields = tuple(fields)
        self.struct = struct.Struct("<" + "".join(code for _, code in self.fields))
        self.size = self.struct.size
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, code in self.fields:
            self._offsets[name] = offset
            offset += struct.calcsize("<" + code)

    def offset(self, name: str) -> int:
        return self._offsets[name]

    def pack(self, **values: object) -> bytes:
        """Pack by name; fields not given are zero (or empty)."""
        unknown = set(values) - set(self._offsets)
        if unknown:
            raise TypeError(f"unknown fields {sorted(unknown)}")
        args = [values.get(name, b"" if code.endswith("s") else 0) for name, code in self.fields]
        return self.struct.pack(*args)

    def unpack(self, data: bytes, offset: int = 0) -> dict[str, object]:
        values = self.struct.unpack_from(data, offset)
        return dict(zip((name for name, _ in self.fields), values, strict=True))


# --- common pieces ---------------------------------------------------------------

OEM_ID = b"PYVMM "
OEM_REVISION = 1
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1

# System Description Table Header (ACPI 6.x, 5.2.6).
HEADER = Layout(
    [
        ("signature", "4s"),
        ("length", "I"),
        ("revision", "B"),
        ("checksum", "B"),
        ("oem_id", "6s"),
        ("oem_table_id", "8s"),
        ("oem_revision", "I"),
        ("creator_id", "4s"),
        ("creator_revision", "I"),
    ]
)
CHECKSUM_OFFSET = HEADER.offset("checksum")

# Generic Address Structure (5.2.3.2).
GAS = Layout(
    [
        ("space_id", "B"),
        ("bit_width", "B"),
        ("bit_offset", "B"),
        ("access_size", "B"),
        ("address", "Q"),
    ]
)
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with it included) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def io_port_register(port: int) -> bytes:
    """A GAS for a one-byte register at I/O ``port``."""
    return GAS.pack(
        space_id=GAS_SYSTEM_IO, bit_width=8, bit_offset=0, access_size=GAS_ACCESS_BYTE, address=port
    )


def build_table(signature: bytes, revision: int, body: bytes) -> bytes:
    """Header + ``body`` with length and checksum filled in.

    The OEM table id is ``PYVM`` + the signature, so each table of ours is
    named differently in a dump.
    """
    table = bytearray(
        HEADER.pack(
            signature=signature,
            length=HEADER.size + len(body),
            revision=revision,
            oem_id=OEM_ID,
            oem_table_id=b"PYVM" + signature,
            oem_revision=OEM_REVISION,
            creator_id=CREATOR_ID,
            creator_revision=CREATOR_REVISION,
        )
        + body
    )
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


# --- RSDP (5.2.5) ------------------------------------------------------------------

RSDP = Layout(
    [
        ("signature", "8s"),
        ("checksum", "B"),  # over the first 20 bytes (the ACPI 1.0 part)
        ("oem_id", "6s"),
        ("revision", "B"),
        ("rsdt_address", "I"),
        ("length", "I"),
        ("xsdt_address", "Q"),
        ("extended_checksum", "B"),  # over all 36 bytes
        ("reserved", "3s"),
    ]
)
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has the XSDT address
RSDP_V1_SIZE = 20


def build_rsdp(xsdt_addr: int) -> bytes:
    """The RSDP pointing at the XSDT only (no RSDT: every 64-bit OS reads the XSDT)."""
    rsdp = bytearray(
        RSDP.pack(
            signature=RSDP_SIGNATURE,
            oem_id=OEM_ID,
            revision=RSDP_REVISION,
            length=RSDP.size,
            xsdt_address=xsdt_addr,
        )
    )
    rsdp[RSDP.offset("checksum")] = checksum(rsdp[:RSDP_V1_SIZE])
    rsdp[RSDP.offset("extended_checksum")] = checksum(rsdp)
    return bytes(rsdp)


# --- XSDT (5.2.8) ------------------------------------------------------------------

XSDT_REVISION = 1


def build_xsdt(table_addrs: Iterable[int]) -> bytes:
    """The XSDT: 64-bit addresses of every table but the DSDT (the FADT has that)."""
    addrs = list(table_addrs)
    return build_table(b"XSDT", XSDT_REVISION, struct.pack(f"<{len(addrs)}Q", *addrs))


# --- FADT (5.2.9), signature FACP ------------------------------------------------

FADT_BODY = Layout(
    [
        ("firmware_ctrl", "I"),
        ("dsdt", "I"),
        ("reserved0", "B"),
        ("preferred_pm_profile", "B"),
        ("sci_int", "H"),
        ("smi_cmd", "I"),
        ("acpi_enable", "B"),
        ("acpi_disable", "B"),
        ("s4bios_req", "B"),
        ("pstate_cnt", "B"),
        ("pm1a_evt_blk", "I"),
        ("pm1b_evt_blk", "I"),
        ("pm1a_cnt_blk", "I"),
        ("pm1b_cnt_blk", "I"),
        ("pm2_cnt_blk", "I"),
        ("pm_tmr_blk", "I"),
        ("gpe0_blk", "I"),
        ("gpe1_blk", "I"),
        ("pm1_evt_len", "B"),
        ("pm1_cnt_len", "B"),
        ("pm2_cnt_len", "B"),
        ("pm_tmr_len", "B"),
        ("gpe0_blk_len", "B"),
        ("gpe1_blk_len", "B"),
        ("gpe1_base", "B"),
        ("cst_cnt", "B"),
        ("p_lvl2_lat", "H"),
        ("p_lvl3_lat", "H"),
        ("flush_size", "H"),
        ("flush_stride", "H"),
        ("duty_offset", "B"),
        ("duty_width", "B"),
        ("day_alrm", "B"),
        ("mon_alrm", "B"),
        ("century", "B"),
        ("iapc_boot_arch", "H"),
        ("reserved1", "B"),
        ("flags", "I"),
        ("reset_reg", "12s"),
        ("reset_value", "B"),
        ("arm_boot_arch", "H"),
        ("minor_version", "B"),
        ("x_firmware_ctrl", "Q"),
        ("x_dsdt", "Q"),
        ("x_pm1a_evt_blk", "12s"),
        ("x_pm1b_evt_blk", "12s"),
        ("x_pm1a_cnt_blk", "12s"),
        ("x_pm1b_cnt_blk", "12s"),
        ("x_pm2_cnt_blk", "12s"),
        ("x_pm_tmr_blk", "12s"),
        ("x_gpe0_blk", "12s"),
        ("x_gpe1_blk", "12s"),
        ("sleep_control_reg", "12s"),
        ("sleep_status_reg", "12s"),
        ("hypervisor_vendor_id", "8s"),
    ]
)
FADT_REVISION = 6
FADT_MINOR_VERSION = 3
FADT_SIZE = HEADER.size + FADT_BODY.size  # 276

# FADT flags (table 5.10).
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4  # 1: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # 1: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
# Why these: HW_REDUCED_ACPI is the platform model (see the module
# docstring); RESET_REG_SUP makes Linux's default reboot path (reboot=acpi,
# tried before the i8042) write our reset register; PWR_BUTTON/SLP_BUTTON
# say there are no fixed-feature buttons, which is what hardware-reduced
# means; WBINVD is required of every ACPI 2.0+ x86 platform and KVM
# executes it.
FADT_FLAGS = (
    FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI
)

# IA-PC boot architecture flags (table 5.11).
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
# 8042: there is an i8042 (Linux otherwise marks it "firmware absent" and,
# should PNP not find the DSDT's PNP0303, gives up on it, losing reboot=k
# and Ctrl-Alt-Del). VGA_NOT_PRESENT: nothing answers at 0x3C0-0x3DF or
# 0xA0000. CMOS_RTC_NOT_PRESENT: pyvmm has no RTC at 0x70/0x71 (KVM does
# not emulate one in the kernel); Linux then registers no rtc_cmos and
# takes the wall clock from kvmclock. Left clear: LEGACY_DEVICES (it only
# makes Linux probe for a PnP BIOS), MSI_NOT_SUPPORTED (KVM delivers MSIs;
# there is just no PCI bus yet, and the flag would silently disable MSI
# the day one appears), PCIE_ASPM_CONTROLS (no PCIe).
IAPC_BOOT_ARCH = IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT

PM_PROFILE_UNSPECIFIED = 0
P_LVL2_LAT_NONE = 101  # > 100 us: C2 not supported
P_LVL3_LAT_NONE = 1001  # > 1000 us: C3 not supported
HYPERVISOR_VENDOR_ID = b"PYVMMPYV"


def build_fadt(dsdt_addr: int) -> bytes:
    """The FADT: hardware-reduced, with reset and sleep registers in I/O space.

    Only ``X_DSDT`` holds the DSDT address: ACPI 6 says the 32-bit ``DSDT``
    field must be zero when ``X_DSDT`` is set. There is no FACS (allowed
    when hardware-reduced: both FIRMWARE_CTRL fields zero).
    """
    body = FADT_BODY.pack(
        preferred_pm_profile=PM_PROFILE_UNSPECIFIED,
        p_lvl2_lat=P_LVL2_LAT_NONE,
        p_lvl3_lat=P_LVL3_LAT_NONE,
        iapc_boot_arch=IAPC_BOOT_ARCH,
        flags=FADT_FLAGS,
        reset_reg=io_port_register(layout.ACPI_RESET_PORT),
        reset_value=layout.ACPI_RESET_VALUE,
        minor_version=FADT_MINOR_VERSION,
        x_dsdt=dsdt_addr,
        sleep_control_reg=io_port_register(layout.ACPI_SLEEP_CONTROL_PORT),
        sleep_status_reg=io_port_register(layout.ACPI_SLEEP_STATUS_PORT),
        hypervisor_vendor_id=HYPERVISOR_VENDOR_ID,
    )
    return build_table(b"FACP", FADT_REVISION, body)


# --- MADT (5.2.12), signature APIC --------------------------------------------

MADT_REVISION = 5
MADT_BODY = Layout([("local_apic_address", "I"), ("flags", "I")])
# PCAT_COMPAT: KVM's in-kernel irqchip does include the dual 8259 PIC, so an
# OS that uses the IOAPIC must mask it; the flag says so.
MADT_PCAT_COMPAT = 1 << 0

MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
MADT_TYPE_INTERRUPT_OVERRIDE = 2
MADT_TYPE_LOCAL_APIC_NMI = 4

MADT_LOCAL_APIC = Layout(
    [
        ("type", "B"),
        ("length", "B"),
        ("processor_uid", "B"),
        ("apic_id", "B"),
        ("flags", "I"),
    ]
)
MADT_IO_APIC = Layout(
    [
        ("type", "B"),
        ("length", "B"),
        ("io_apic_id", "B"),
        ("reserved", "B"),
        ("address", "I"),
        ("gsi_base", "I"),
    ]
)
MADT_INTERRUPT_OVERRIDE = Layout(
    [
        ("type", "B"),
        ("length", "B"),
        ("bus", "B"),
        ("source", "B"),
        ("gsi", "I"),
        ("flags", "H"),
    ]
)
MADT_LOCAL_APIC_NMI = Layout(
    [
        ("type", "B"),
        ("length", "B"),
        ("processor_uid", "B"),
        ("flags", "H"),
        ("lint", "B"),
    ]
)
LOCAL_APIC_ENABLED = 1 << 0
ISA_BUS = 0
MPS_INTI_CONFORMING = 0  # polarity and trigger as the bus defines (ISA: edge, high)
ALL_PROCESSORS = 0xFF
NMI_LINT = 1


def build_madt(num_cpus: int) -> bytes:
    """The MADT: one enabled Local APIC per vCPU, the IOAPIC, IRQ 0 override, LINT1 NMI.

    Kept consistent with :mod:`pyvmm.boot.mptable` (an OS uses one or the
    other): APIC ids are the vCPU indexes, the IOAPIC id is ``num_cpus``,
    and ISA IRQ 0 (the PIT) goes to IOAPIC pin ``layout.PIT_IOAPIC_PIN``.

    Why an override for IRQ 0 at all when it is the identity: ACPI's rule
    is that ISA IRQs map 1:1 onto GSIs unless an Interrupt Source Override
    says otherwise, and KVM's default GSI routing is the identity too, so
    for a spec-following OS the entry changes nothing. But every PC's
    firmware ships "IRQ 0 -> GSI 2" (the 8254 is wired to pin 2 there), so
    an OS, a reader of the table or a later pyvmm change could take pin 2
    for granted; stating IRQ 0's GSI explicitly, from the same layout
    constant the MP table uses, keeps the two tables and the routing KVM
    really has in one place. No other ISA IRQ needs an entry: they are
    identity-mapped and edge/high, which is what "conforming" means on ISA.
    (Under hardware-reduced ACPI Linux does not even use the PIT's IRQ;
    the ISA devices' IRQs come from their ``_CRS`` in the DSDT.)
    """
    if not 1 <= num_cpus <= layout.MAX_VCPUS:
        raise ConfigError(f"{num_cpus} vCPUs requested; pyvmm supports 1 to {layout.MAX_VCPUS}")
    entries = [
        MADT_LOCAL_APIC.pack(
            type=MADT_TYPE_LOCAL_APIC,
            length=MADT_LOCAL_APIC.size,
            processor_uid=cpu,
            apic_id=cpu,
            flags=LOCAL_APIC_ENABLED,
        )
        for cpu in range(num_cpus)
    ]
    entries.append(
        MADT_IO_APIC.pack(
            type=MADT_TYPE_IO_APIC,
            length=MADT_IO_APIC.size,
            io_apic_id=num_cpus,  # as in the MP table: the first id after the CPUs'
            address=layout.IOAPIC_ADDR,
            gsi_base=0,
        )
    )
    entries.append(
        MADT_INTERRUPT_OVERRIDE.pack(
            type=MADT_TYPE_INTERRUPT_OVERRIDE,
            length=MADT_INTERRUPT_OVERRIDE.size,
            bus=ISA_BUS,
            source=layout.PIT_IRQ,
            gsi=layout.PIT_IOAPIC_PIN,
            flags=MPS_INTI_CONFORMING,
        )
    )
    entries.append(
        MADT_LOCAL_APIC_NMI.pack(
            type=MADT_TYPE_LOCAL_APIC_NMI,
            length=MADT_LOCAL_APIC_NMI.size,
            processor_uid=ALL_PROCESSORS,
            flags=MPS_INTI_CONFORMING,
            lint=NMI_LINT,
        )
    )
    body = MADT_BODY.pack(local_apic_address=layout.LAPIC_ADDR, flags=MADT_PCAT_COMPAT)
    return build_table(b"APIC", MADT_REVISION, body + b"".join(entries))
