"""The x86_64 guest-physical memory layout: every fixed guest address lives here.

Why one module: loaders, table builders, devices and the VMM must agree on
where things are. Keeping the numbers together makes overlaps visible in one
screen and keeps magic numbers out of the rest of the code.

Low memory (below 1 MiB)::

    0x0000_0500  GDT (boot-time, 4 entries)
    0x0000_0520  IDT (empty, limit 0: the kernel installs its own)
    0x0000_6000  PVH hvm_start_info (+ module list, + e820-style memmap)
    0x0000_7000  Linux zero page (struct boot_params)
    0x0000_8000  free (the probe guest puts its AP trampoline here)
    0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. page directories (identity map)
    0x0002_0000  kernel command line
    0x0008_f000  boot stack top (grows down)
    0x0009_fc00  MP floating pointer + MP config table (EBDA)
    0x000a_0000  legacy VGA/ROM hole up to 1 MiB (not RAM in the e820 map);
                 its first page holds the VM generation id (16 bytes)
    0x000e_0000  ACPI: RSDP, then XSDT, FADT, MADT, DSDT

High memory: the kernel at 1 MiB, RAM up to the 32-bit MMIO hole at 3 GiB,
device MMIO windows from 0xd000_0000, IOAPIC and LAPIC near 4 GiB, and RAM
above 4 GiB when the guest has more than 3 GiB.
"""

from __future__ import annotations

PAGE_SIZE = 0x1000

# --- low memory -----------------------------------------------------------
BOOT_GDT_START = 0x500
BOOT_GDT_MAX_ENTRIES = 4
BOOT_IDT_START = 0x520
PVH_INFO_START = 0x6000
PVH_MODLIST_START = 0x6040
PVH_MEMMAP_START = 0x6100
PVH_MEMMAP_MAX_ENTRIES = 128
ZERO_PAGE_START = 0x7000
AP_TRAMPOLINE_START = 0x8000
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000  # 4 page directories: identity map of the first 4 GiB
PDE_PAGES = 4  # page directories at PDE_START (2 MiB pages, 1 GiB each)
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 2048  # Linux x86 COMMAND_LINE_SIZE, NUL included
CMDLINE_AREA_SIZE = 0x10000  # room reserved at CMDLINE_START, NUL included
BOOT_STACK_POINTER = 0x8FF00
EBDA_START = 0x9FC00
MPTABLE_START = EBDA_START
LOW_RAM_END = 0xA0000  # e820: usable RAM below 640 KiB ends here
BIOS_AREA_START = 0xA0000  # reserved up to HIMEM_START
RSDP_ADDR = 0xE0000  # ACPI RSDP (used once ACPI tables are built)
# ACPI tables follow the RSDP inside [RSDP_ADDR, ACPI_TABLES_END): the BIOS
# area Linux searches for an RSDP, and never RAM in the e820 map.
ACPI_TABLES_END = 0x100000
# The VM generation id (pyvmm.devices.legacy.vmgenid, described by the DSDT's
# VGEN device): 16 bytes at the start of the 640 KiB - 1 MiB hole, which is
# guest RAM to KVM but absent from the e820 map, so the guest kernel never
# allocates it, while its memremap() of a non-RAM range just maps it. Why
# there and not carved from RAM: nothing to mark reserved, and nothing else
# is at 0xA0000 (the FADT says there is no VGA). 8-byte aligned, as the
# spec asks; the rest of the page stays unused.
VMGENID_ADDR = BIOS_AREA_START
VMGENID_SIZE = 16

# --- kernel ---------------------------------------------------------------
HIMEM_START = 0x100000  # 1 MiB: where kernels are loaded

# --- the 32-bit MMIO hole --------------------------------------------------
MMIO_HOLE_START = 0xC000_0000  # 3 GiB; RAM above this moves to 4 GiB
MMIO_HOLE_END = 0x1_0000_0000
MMIO32_DEVICES_START = 0xD000_0000  # device windows, 4 KiB each
MMIO_DEVICE_WINDOW = 0x1000
BOOT_TIMER_ADDR = MMIO32_DEVICES_START  # Firecracker's boot-timer address
VIRTIO_MMIO_START = MMIO32_DEVICES_START + MMIO_DEVICE_WINDOW
VIRTIO_MMIO_NOTIFY_OFFSET = 0x50  # QueueNotify: an ioeventfd per queue here
MAX_VIRTIO_DEVICES = 16
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000  # one page, needed by KVM on Intel
KVM_TSS_ADDR = 0xFFFB_D000  # three pages, needed by KVM on Intel
HIGH_RAM_START = MMIO_HOLE_END

# --- ISA ports and IRQs --------------------------------------------------
COM1_PORT = 0x3F8
COM1_IRQ = 4
UART_PORT_COUNT = 8
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_IRQ = 1
ISA_IRQ_COUNT = 16
PIT_IRQ = 0
# ISA IRQ 0 (the PIT) reaches IOAPIC pin 0: KVM's default GSI routing is the
# identity, and the MP table must describe the routing KVM really has. (PC
# hardware and QEMU use pin 2 with KVM_SET_GSI_ROUTING; Firecracker, like us,
# keeps the identity.)
PIT_IOAPIC_PIN = 0
# virtio-mmio device n gets IOAPIC pin VIRTIO_GSI_START + n: above the ISA
# IRQs in use (0 PIT, 1 i8042, 3-4 COM ports, 8 RTC), below the 24 pins.
VIRTIO_GSI_START = 5
IOAPIC_NUM_PINS = 24
# The Generic Event Device's interrupt (ACPI notifications: a new VM
# generation id): the last IOAPIC pin, above every virtio device's.
GED_GSI = IOAPIC_NUM_PINS - 1
BOOT_TIMER_MAGIC = 123  # value the guest writes to BOOT_TIMER_ADDR
# Hardware-reduced ACPI registers the FADT points at (pyvmm.devices.legacy.acpi_pm):
# one byte each, in an I/O range nothing on a PC or in KVM claims. Sleep
# control takes SLP_TYP (bits 2-4) | SLP_EN (bit 5); writing SLP_TYP =
# ACPI_S5_SLP_TYP with SLP_EN powers off. Writing ACPI_RESET_VALUE to the
# reset register resets (0x06 is what PCs write to 0xCF9 for a hard reset;
# any byte would do, the FADT tells the guest which).
ACPI_PM_PORT = 0x600
ACPI_PM_PORT_COUNT = 3
ACPI_SLEEP_CONTROL_PORT = ACPI_PM_PORT
ACPI_SLEEP_STATUS_PORT = ACPI_PM_PORT + 1
ACPI_RESET_PORT = ACPI_PM_PORT + 2
ACPI_RESET_VALUE = 0x06
ACPI_S5_SLP_TYP = 5  # the \_S5 package in the DSDT hands this to the guest
# QEMU's ISA pvpanic protocol: one byte; reads give the supported events,
# the guest writes an event bit when it panics. Described in the DSDT.
PVPANIC_PORT = 0x505
PVPANIC_PORT_COUNT = 1

# --- limits ---------------------------------------------------------------
MAX_VCPUS = 32
MIN_MEMORY_SIZE = 16 << 20
MAX_MEMORY_SIZE = 1 << 40  # 1 TiB; further limited by host RAM at config time


def ram_regions(mem_size: int) -> list[tuple[int, int]]:
    """Split ``mem_size`` bytes of guest RAM around the 32-bit MMIO hole.

    Returns ``(guest_address, size)`` pairs, lowest first.
    """
    if mem_size <= MMIO_HOLE_START:
        return [(0, mem_size)]
    return [(0, MMIO_HOLE_START), (HIGH_RAM_START, mem_size - MMIO_HOLE_START)]
