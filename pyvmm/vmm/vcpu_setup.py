"""Apply a boot CPU state, CPUID, MSRs, FPU and LAPIC settings to a vCPU.

Loaders describe the boot vCPU as data (:class:`BootCpuState`); this module
is the one that turns it into KVM register writes.
"""

from __future__ import annotations

import struct

from pyvmm.boot.cpu_state import BootCpuState
from pyvmm.kvm.cpuid import CpuidEntry
from pyvmm.kvm.registers import SEGMENT_NAMES
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
    vcpu.set_fpu(vcpu.get_fpu()._replace(fcw=0x37F, mxcsr=0x1F80))
    vcpu.set_lapic(set_lint_modes(vcpu.get_lapic()))


def set_boot_state(vcpu: Vcpu, state: BootCpuState) -> None:
    """Put the boot vCPU at the kernel's entry point."""
    segments = {name: getattr(state, name) for name in SEGMENT_NAMES}
    vcpu.set_sregs(
        vcpu.get_sregs()._replace(
            **segments,
            gdt=state.gdt,
            idt=state.idt,
            cr0=state.cr0,
            cr3=state.cr3,
            cr4=state.cr4,
            efer=state.efer,
        )
    )
    vcpu.set_regs(
        vcpu.get_regs()._replace(
            rip=state.rip,
            rsp=state.rsp,
            rbp=state.rsp,
            rsi=state.rsi,
            rbx=state.rbx,
            rflags=state.rflags,
        )
    )
