"""CPUID entries as plain data, converted to and from ``struct kvm_cpuid2``.

Normalizing CPUID (APIC ids, hidden features) is pure logic on these
entries, so it is tested without KVM.
"""

from __future__ import annotations

from typing import NamedTuple

from pyvmm.kvm._kvm_cffi import ffi

# kvm_cpuid_entry2.flags: the entry depends on ECX (the subleaf index).
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


class CpuidEntry(NamedTuple):
    """One CPUID leaf/subleaf with its register values."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def with_regs(self, **regs: int) -> CpuidEntry:
        return self._replace(**regs)


def entries_from_struct(cpuid: object) -> list[CpuidEntry]:
    """Read the ``nent`` entries of a ``struct kvm_cpuid2 *``."""
    return [
        CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in (cpuid.entries[i] for i in range(cpuid.nent))
    ]


def struct_from_entries(entries: list[CpuidEntry]) -> object:
    """Build a ``struct kvm_cpuid2 *`` holding ``entries``."""
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for slot, entry in zip(cpuid.entries, entries, strict=True):
        slot.function = entry.function
        slot.index = entry.index
        slot.flags = entry.flags
        slot.eax, slot.ebx, slot.ecx, slot.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
    return cpuid
