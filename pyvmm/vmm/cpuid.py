"""Per-vCPU CPUID from what KVM supports: pure logic on :class:`CpuidEntry` lists.

KVM's ``KVM_GET_SUPPORTED_CPUID`` describes the host, not a particular vCPU:
APIC ids and topology must be rewritten per vCPU, and some features hidden.
A :class:`CpuidTemplate` names features to hide as (leaf, register, bit);
:data:`PVM_TEMPLATE` hides CMPXCHG16B, which the PVM emulator cannot run in
guest kernel mode (a PVM host: guest kernel code is emulated).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from pyvmm.kvm.cpuid import CpuidEntry

HYPERVISOR_BIT = 1 << 31  # CPUID.1:ECX, "running under a hypervisor"
KVM_SIGNATURE_LEAF = 0x40000000
TIMING_LEAF = 0x40000010  # EAX: TSC kHz, EBX: LAPIC timer (bus) kHz
LAPIC_BUS_KHZ = 1_000_000  # KVM's emulated LAPIC timer runs at 1 GHz
HTT_BIT = 1 << 28  # CPUID.1:EDX, more than one logical CPU per package


@dataclass(frozen=True)
class HiddenFeature:
    """A feature bit cleared in every vCPU's CPUID."""

    name: str
    function: int
    register: str  # "eax" | "ebx" | "ecx" | "edx"
    bit: int
    index: int = 0


@dataclass(frozen=True)
class CpuidTemplate:
    """A named set of features hidden from the guest."""

    name: str
    hidden: tuple[HiddenFeature, ...] = ()


NO_TEMPLATE = CpuidTemplate("none")
PVM_TEMPLATE = CpuidTemplate(
    "pvm",
    (HiddenFeature("cx16", 1, "ecx", 13),),
)
TEMPLATES = {template.name: template for template in (NO_TEMPLATE, PVM_TEMPLATE)}


@functools.cache
def host_is_pvm() -> bool:
    """True when /dev/kvm is provided by the PVM module (a PVM host: guest kernel code is emulated).

    Asked once per process (a jailed VMM cannot read /sys later; the jailer asks first).
    """
    return os.path.exists("/sys/module/kvm_pvm")


def resolve_template(name: str) -> CpuidTemplate:
    """The CPUID template called ``name``; "auto" picks the one this host needs."""
    if name == "auto":
        return PVM_TEMPLATE if host_is_pvm() else NO_TEMPLATE
    return TEMPLATES[name]


def vcpu_cpuid(
    supported: list[CpuidEntry],
    vcpu_id: int,
    num_vcpus: int,
    template: CpuidTemplate = NO_TEMPLATE,
    tsc_khz: int = 0,
) -> list[CpuidEntry]:
    """CPUID entries for vCPU ``vcpu_id`` of ``num_vcpus`` (APIC id = vCPU id).

    With ``tsc_khz``, the hypervisor timing leaf 0x40000010 tells the guest
    its TSC and LAPIC timer frequencies, so it need not calibrate them
    against the PIT (slow, and unreliable when guest kernel code is emulated).
    """
    result = []
    if tsc_khz:
        supported = _with_timing_leaf(supported, tsc_khz)
    for entry in supported:
        entry = _normalize(entry, vcpu_id, num_vcpus)
        for feature in template.hidden:
            if entry.function == feature.function and entry.index == feature.index:
                value = getattr(entry, feature.register) & ~(1 << feature.bit)
                entry = entry.with_regs(**{feature.register: value})
        result.append(entry)
    return result


def _normalize(entry: CpuidEntry, vcpu_id: int, num_vcpus: int) -> CpuidEntry:
    if entry.function == 1:
        ebx = (entry.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(num_vcpus, 255) << 16)
        edx = entry.edx | HTT_BIT if num_vcpus > 1 else entry.edx & ~HTT_BIT
        return entry.with_regs(ebx=ebx, ecx=entry.ecx | HYPERVISOR_BIT, edx=edx)
    if entry.function == 4:
        # EAX[31:26]: cores per package - 1; one package holds all vCPUs.
        eax = (entry.eax & 0x03FFFFFF) | ((num_vcpus - 1) << 26) if entry.eax & 0x1F else entry.eax
        return entry.with_regs(eax=eax)
    if entry.function in (0xB, 0x1F):
        return _extended_topology(entry, vcpu_id, num_vcpus)
    return entry


def _extended_topology(entry: CpuidEntry, vcpu_id: int, num_vcpus: int) -> CpuidEntry:
    """Leaves 0xB/0x1F: one thread per core, all cores in one package."""
    shift = max(num_vcpus - 1, 0).bit_length()
    if entry.index == 0:  # SMT level
        return entry.with_regs(eax=0, ebx=1, ecx=(1 << 8) | 0, edx=vcpu_id)
    if entry.index == 1:  # core level
        return entry.with_regs(eax=shift, ebx=num_vcpus, ecx=(2 << 8) | 1, edx=vcpu_id)
    return entry.with_regs(eax=0, ebx=0, ecx=entry.index, edx=vcpu_id)


def _with_timing_leaf(supported: list[CpuidEntry], tsc_khz: int) -> list[CpuidEntry]:
    entries = [entry for entry in supported if entry.function != TIMING_LEAF]
    for position, entry in enumerate(entries):
        if entry.function == KVM_SIGNATURE_LEAF:
            entries[position] = entry.with_regs(eax=max(entry.eax, TIMING_LEAF))
            entries.append(CpuidEntry(TIMING_LEAF, 0, 0, tsc_khz, LAPIC_BUS_KHZ, 0, 0))
            break
    return entries
