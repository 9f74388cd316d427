"""Typed vCPU register sets: ``struct kvm_regs``, ``kvm_sregs`` and ``kvm_fpu`` as named tuples.

:class:`~pyvmm.kvm.vcpu.Vcpu` converts between these and the C structs, so
nothing outside this package handles a cffi object: callers read fields by
name and change them with ``_replace``. Pure data; importing this module does
not load the cffi extension. Named tuples rather than frozen dataclasses: the
same immutable records, made at import for a sixth of the cost (every start of
pyvmm imports this module).
"""

from __future__ import annotations

from typing import NamedTuple


class Regs(NamedTuple):
    """The general registers (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


class Segment(NamedTuple):
    """A segment register as ``struct kvm_segment`` holds it."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the field's name in struct kvm_segment
    g: int = 0
    avl: int = 0
    unusable: int = 0


class DescriptorTable(NamedTuple):
    """GDTR/IDTR: base and limit (``struct kvm_dtable``)."""

    base: int = 0
    limit: int = 0


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class Sregs(NamedTuple):
    """Segments, descriptor tables and control registers (``struct kvm_sregs``)."""

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
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)


class Fpu(NamedTuple):
    """The legacy FPU and SSE state (``struct kvm_fpu``); ``fpr``/``xmm`` as raw bytes."""

    fpr: bytes = bytes(128)  # 8 registers x 16 bytes
    fcw: int = 0
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: bytes = bytes(256)  # 16 registers x 16 bytes
    mxcsr: int = 0
