"""Typed vCPU register sets: ``struct kvm_regs``, ``kvm_sregs`` and ``kvm_fpu`` as dataclasses.

:class:`~pyvmm.kvm.vcpu.Vcpu` converts between these and the C structs, so
nothing outside this package handles a cffi object: callers read fields by
name and change them with :func:`dataclasses.replace`. Pure data; importing
this module does not load the cffi extension.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Regs:
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


@dataclass(frozen=True)
class Segment:
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


@dataclass(frozen=True)
class DescriptorTable:
    """GDTR/IDTR: base and limit (``struct kvm_dtable``)."""

    base: int = 0
    limit: int = 0


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass(frozen=True)
class Sregs:
    """Segments, descriptor tables and control registers (``struct kvm_sregs``)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class Fpu:
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
