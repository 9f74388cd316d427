"""Apply a boot CPU state, CPUID, MSRs, FPU and LAPIC settings to a vCPU.

Loaders describe the boot vCPU as data (:class:`BootCpuState`); this module
is the one that turns it into KVM register writes.
"""

from __future__ import annotations

import struct

from pyvmm.boot.cpu_state import BootCpuState, Segment
from pyvmm.kvm.cpuid import CpuidEntry
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.vmm.cpuid import CpuidTemplate, vcpu_cpuid

# MSR numbers (Intel SDM vol. 4).
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE_WRITEBACK = (1 << 11) | 6

# LAPIC register offsets and delivery modes, for LINT0/LINT1.
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4


def boot_msrs(supported: set[int]) -> dict[int, int]:
    """MSR values for a vCPU at boot, limited to what KVM reports it handles."""
    wanted = {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK,
    }
    return {index: value for index, value in wanted.items() if index in supported}


def set_lint_modes(lapic: bytes) -> bytes:
    """LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves them."""
    regs = bytearray(lapic)
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", regs, offset)
        value = (value & ~0x700) | (mode << 8)
        struct.pack_into("<I", regs, offset, value)
    return bytes(regs)


def configure_vcpu(
    vcpu: Vcpu,
    supported_cpuid: list[CpuidEntry],
    msr_indices: set[int],
    num_vcpus: int,
    template: CpuidTemplate,
) -> None:
    """Settings every vCPU needs before its first ``KVM_RUN``."""
    tsc_khz = vcpu.get_tsc_khz()
    vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, vcpu.id, num_vcpus, template, tsc_khz))
    vcpu.set_msrs(boot_msrs(msr_indices))
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
    vcpu.set_lapic(set_lint_modes(vcpu.get_lapic()))


def _copy_segment(target: object, segment: Segment) -> None:
    target.base = segment.base
    target.limit = segment.limit
    target.selector = segment.selector
    target.type = segment.type
    target.present = segment.present
    target.dpl = segment.dpl
    target.db = segment.db
    target.s = segment.s
    target.l = segment.l
    target.g = segment.g
    target.avl = segment.avl
    target.unusable = segment.unusable


def set_boot_state(vcpu: Vcpu, state: BootCpuState) -> None:
    """Put the boot vCPU at the kernel's entry point."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        _copy_segment(getattr(sregs, name), getattr(state, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rbp = state.rip, state.rsp, state.rsp
    regs.rsi, regs.rbx, regs.rflags = state.rsi, state.rbx, state.rflags
    vcpu.set_regs(regs)
