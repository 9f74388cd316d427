"""The boot vCPU's registers for each boot mode, as :class:`BootCpuState`.

LINUX_64 (Documentation/arch/x86/boot.rst, "64-bit boot protocol"): long
mode with paging on an identity map, flat 64-bit code, ``rsi`` = zero page,
interrupts off.

PVH_32 (Xen's PVH ABI, xen/include/public/arch-x86/hvm/start_info.h): 32-bit
protected mode, paging off, flat 4 GiB code and data, a valid busy TSS in
TR, ``ebx`` = hvm_start_info.

Segments come from the GDT the mode writes (see :mod:`pyvmm.boot.gdt`).
"""

from __future__ import annotations

from pyvmm import layout
from pyvmm.boot import gdt
from pyvmm.boot.cpu_state import BootCpuState, BootMode, Segment

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4  # hard-wired to 1 on every CPU since the 486
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads 1; IF stays clear

# An LDT register nobody uses, in the state a CPU comes out of reset with.
_NULL_LDT = Segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, s=0)


def boot_cpu_state(mode: BootMode, entry: int, boot_info_addr: int) -> BootCpuState:
    """Registers to enter ``entry`` in ``mode``.

    ``boot_info_addr`` is the zero page (LINUX_64) or hvm_start_info (PVH_32).
    """
    entries = gdt.boot_gdt(mode)
    code = gdt.segment_from_entry(entries[1], gdt.CODE_SELECTOR)
    data = gdt.segment_from_entry(entries[2], gdt.DATA_SELECTOR)
    tss = gdt.segment_from_entry(entries[3], gdt.TSS_SELECTOR)
    common = dict(
        mode=mode,
        rip=entry,
        rsp=layout.BOOT_STACK_POINTER,
        rflags=RFLAGS_RESERVED,
        cs=code,
        ds=data,
        es=data,
        fs=data,
        gs=data,
        ss=data,
        tr=tss,
        ldt=_NULL_LDT,
        gdt=gdt.gdt_register(entries),
        idt=gdt.idt_register(),
    )
    if mode is BootMode.LINUX_64:
        return BootCpuState(
            **common,
            rsi=boot_info_addr,
            cr0=X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
            cr3=layout.PML4_START,
            cr4=X86_CR4_PAE,
            efer=EFER_LME | EFER_LMA,
        )
    return BootCpuState(
        **common,
        rbx=boot_info_addr,
        cr0=X86_CR0_PE | X86_CR0_ET,
        cr3=0,
        cr4=0,
        efer=0,
    )
