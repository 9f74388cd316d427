"""Per-vCPU CPUID from what KVM supports: pure logic on :class:`CpuidEntry` lists.

KVM's ``KVM_GET_SUPPORTED_CPUID`` describes the host, not a particular vCPU:
APIC ids and topology must be rewritten per vCPU, and some features hidden.
A :class:`CpuidTemplate` names features to hide as (leaf, register, bit);
:data:`PVM_TEMPLATE` hides CMPXCHG16B, which the PVM emulator cannot run in
guest kernel mode (a PVM host: guest kernel code is emulated).

Firecracker's static templates (``C3``, ``T2``, ``T2S``, ``T2CL``, ``T2A``)
exist so that one guest sees the same CPU on a fleet of different hosts
(and a snapshot restores on any of them): each hides the features newer
than the instance generation it is named after. pyvmm's versions are its
own lists of such features (below), by that intent: ``c3`` presents an Ivy
Bridge-class Intel CPU, ``t2``/``t2s``/``t2cl`` a Haswell-class Intel CPU
(``t2s`` and ``t2cl`` in Firecracker also rewrite MSRs, which pyvmm's
templates do not), ``t2a`` the same level on AMD. A template made for one
vendor is refused on the other's CPU, with one line. On a PVM host every
template also hides what PVM cannot emulate (CX16).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

from pyvmm.errors import ConfigError
from pyvmm.kvm.cpuid import CpuidEntry

HYPERVISOR_BIT = 1 << 31  # CPUID.1:ECX, "running under a hypervisor"
KVM_SIGNATURE_LEAF = 0x40000000
TIMING_LEAF = 0x40000010  # EAX: TSC kHz, EBX: LAPIC timer (bus) kHz
LAPIC_BUS_KHZ = 1_000_000  # KVM's emulated LAPIC timer runs at 1 GHz
HTT_BIT = 1 << 28  # CPUID.1:EDX, more than one logical CPU per package


class HiddenFeature(NamedTuple):
    """A feature bit cleared in every vCPU's CPUID."""

    name: str
    function: int
    register: str  # "eax" | "ebx" | "ecx" | "edx"
    bit: int
    index: int = 0


INTEL = "GenuineIntel"
AMD = "AuthenticAMD"


class CpuidTemplate(NamedTuple):
    """A named set of features hidden from the guest; ``vendor``: the only CPU it fits."""

    name: str
    hidden: tuple[HiddenFeature, ...] = ()
    vendor: str | None = None

    def plus(self, other: CpuidTemplate) -> CpuidTemplate:
        """This template also hiding ``other``'s features (the PVM quirks)."""
        extra = tuple(f for f in other.hidden if f not in self.hidden)
        return CpuidTemplate(self.name, self.hidden + extra, self.vendor)


def _features(leaf: int, register: str, bits: dict[str, int], index: int = 0) -> tuple:
    return tuple(HiddenFeature(name, leaf, register, bit, index) for name, bit in bits.items())


# Leaf 7 (structured extended features), subleaf 0: AVX-512 and friends, newer than
# every template's generation.
_AVX512 = _features(7, "ebx", {"avx512f": 16, "avx512dq": 17, "avx512ifma": 21,
                               "avx512pf": 26, "avx512er": 27, "avx512cd": 28,
                               "avx512bw": 30, "avx512vl": 31}) + _features(
    7, "ecx", {"avx512vbmi": 1, "avx512vbmi2": 6, "avx512vnni": 11, "avx512bitalg": 12,
               "avx512vpopcntdq": 14}) + _features(7, "edx", {"avx512_4vnniw": 2,
                                                             "avx512_4fmaps": 3})  # fmt: skip
# Newer than Haswell/Broadwell, Intel and AMD alike.
_AFTER_HASWELL = _features(7, "ebx", {"mpx": 14, "sgx": 2, "clflushopt": 23, "clwb": 24,
                                      "sha": 29}) + _features(
    7, "ecx", {"pku": 3, "ospke": 4, "waitpkg": 5, "gfni": 8, "vaes": 9, "vpclmulqdq": 10,
               "rdpid": 22, "movdiri": 27, "movdir64b": 28}) + _features(
    0xD, "eax", {"xsavec": 1, "xgetbv_ecx1": 2, "xsaves": 3}, index=1)  # fmt: skip
# Newer than Ivy Bridge.
_AFTER_IVY_BRIDGE = _features(1, "ecx", {"fma": 12, "movbe": 22}) + _features(
    7, "ebx", {"bmi1": 3, "hle": 4, "avx2": 5, "bmi2": 8, "invpcid": 10, "rtm": 11,
               "rdseed": 18, "adx": 19, "smap": 20}) + _features(
    0x80000001, "ecx", {"abm": 5, "3dnowprefetch": 8})  # fmt: skip
# AMD-only extensions a Haswell-class guest never saw.
_AMD_EXTRAS = _features(0x80000001, "ecx", {"sse4a": 6, "misalignsse": 7, "xop": 11,
                                            "fma4": 16, "tbm": 21, "perfctr_core": 23})  # fmt: skip

NO_TEMPLATE = CpuidTemplate("none")
PVM_TEMPLATE = CpuidTemplate(
    "pvm",
    (HiddenFeature("cx16", 1, "ecx", 13),),
)
_T2 = _AVX512 + _AFTER_HASWELL
TEMPLATES = {
    template.name: template
    for template in (
        NO_TEMPLATE,
        PVM_TEMPLATE,
        CpuidTemplate("c3", _T2 + _AFTER_IVY_BRIDGE, INTEL),
        CpuidTemplate("t2", _T2, INTEL),
        CpuidTemplate("t2s", _T2, INTEL),
        CpuidTemplate("t2cl", _T2, INTEL),
        CpuidTemplate("t2a", _T2 + _AMD_EXTRAS, AMD),
    )
}


@functools.cache
def host_is_pvm() -> bool:
    """True when /dev/kvm is provided by the PVM module (a PVM host: guest kernel code is emulated).

    Asked once per process (a jailed VMM cannot read /sys later; the jailer asks first).
    """
    return os.path.exists("/sys/module/kvm_pvm")


def resolve_template(name: str) -> CpuidTemplate:
    """The CPUID template called ``name``; "auto" picks the one this host needs.

    On a PVM host the static templates also hide what PVM cannot emulate.
    """
    if name == "auto":
        return PVM_TEMPLATE if host_is_pvm() else NO_TEMPLATE
    template = TEMPLATES[name]
    if template.vendor is not None and host_is_pvm():
        return template.plus(PVM_TEMPLATE)
    return template


def cpu_vendor(supported: list[CpuidEntry]) -> str:
    """The vendor string of leaf 0 (``GenuineIntel``, ``AuthenticAMD``...)."""
    for entry in supported:
        if entry.function == 0:
            raw = b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx))
            return raw.decode("ascii", "replace")
    return "unknown"


def check_vendor(template: CpuidTemplate, supported: list[CpuidEntry]) -> None:
    """ConfigError (one line) when ``template`` was made for another vendor's CPUs."""
    vendor = cpu_vendor(supported)
    if template.vendor is not None and vendor != template.vendor:
        maker = "Intel" if template.vendor == INTEL else "AMD"
        raise ConfigError(
            f"CPU template {template.name.upper()!r} is for {maker} hosts; "
            f"this host's CPU is {vendor}"
        )


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
    check_vendor(template, supported)
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
