"""The boot CPU state a loader asks for, as plain data.

Loaders and configurators decide *what* the boot vCPU must look like (mode,
segments, control registers, entry point); :mod:`pyvmm.vmm.vcpu_setup` turns
this into KVM register writes. Keeping it as data lets unit tests check the
exact values without KVM.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from pyvmm.kvm.registers import DescriptorTable, Segment

__all__ = ["BootCpuState", "BootMode", "DescriptorTable", "Segment"]


class BootMode(Enum):
    """How the kernel is entered."""

    LINUX_64 = "linux64"  # 64-bit boot protocol: long mode, rsi = zero page
    PVH_32 = "pvh32"  # PVH: 32-bit flat protected mode, ebx = hvm_start_info


class BootCpuState(NamedTuple):
    """Registers of the boot vCPU at the kernel's entry point."""

    mode: BootMode
    rip: int
    rsp: int = 0
    rsi: int = 0  # LINUX_64: guest-physical address of the zero page
    rbx: int = 0  # PVH_32: guest-physical address of hvm_start_info
    rflags: int = 0x2
    cs: Segment = Segment()
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment()
    ldt: Segment = Segment()
    gdt: DescriptorTable = DescriptorTable()
    idt: DescriptorTable = DescriptorTable()
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
