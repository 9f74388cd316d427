from __future__ import annotations

from pyvmm.kvm.cpuid import CpuidEntry
from pyvmm.vmm.cpuid import PVM_TEMPLATE, CpuidTemplate, HiddenFeature, vcpu_cpuid

SUPPORTED = [
    CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
    CpuidEntry(1, 0, 0, 0x906EA, 0xFF000800, 0x7FFAF3BF | (1 << 13), 0xBFEBFBFF),
    CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 7),
    CpuidEntry(0xB, 1, 1, 4, 8, 0x201, 7),
    CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
]


def entry(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    return next(e for e in entries if e.function == function and e.index == index)


def test_apic_id_and_count_in_leaf1() -> None:
    cpuid = vcpu_cpuid(SUPPORTED, 3, 4)
    leaf1 = entry(cpuid, 1)
    assert leaf1.ebx >> 24 == 3
    assert (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ecx & (1 << 31)  # hypervisor present
    assert leaf1.edx & (1 << 28)  # HTT with more than one CPU
    assert not entry(vcpu_cpuid(SUPPORTED, 0, 1), 1).edx & (1 << 28)


def test_x2apic_topology_leaves() -> None:
    cpuid = vcpu_cpuid(SUPPORTED, 5, 8)
    assert entry(cpuid, 0xB, 0).edx == 5
    core = entry(cpuid, 0xB, 1)
    assert (core.eax, core.ebx, core.edx) == (3, 8, 5)


def test_pvm_template_hides_cx16() -> None:
    assert entry(SUPPORTED, 1).ecx & (1 << 13)
    assert not entry(vcpu_cpuid(SUPPORTED, 0, 1, PVM_TEMPLATE), 1).ecx & (1 << 13)
    assert entry(vcpu_cpuid(SUPPORTED, 0, 1), 1).ecx & (1 << 13)


def test_custom_template_and_untouched_leaves() -> None:
    template = CpuidTemplate("no-kvm-sig", (HiddenFeature("x", 0x40000000, "ebx", 0),))
    cpuid = vcpu_cpuid(SUPPORTED, 0, 1, template)
    assert entry(cpuid, 0x40000000).ebx == 0x4B4D564B & ~1
    assert entry(cpuid, 0) == SUPPORTED[0]


def test_timing_leaf_added_and_announced() -> None:
    cpuid = vcpu_cpuid(SUPPORTED, 0, 1, tsc_khz=2_500_000)
    assert entry(cpuid, 0x40000000).eax == 0x40000010
    timing = entry(cpuid, 0x40000010)
    assert (timing.eax, timing.ebx) == (2_500_000, 1_000_000)
    assert not any(e.function == 0x40000010 for e in vcpu_cpuid(SUPPORTED, 0, 1))


# --- static templates (Firecracker's C3, T2, T2S, T2CL, T2A) ---------------------------------
AMD_LEAF0 = CpuidEntry(0, 0, 0, 0x10, 0x68747541, 0x444D4163, 0x69746E65)  # AuthenticAMD
LEAF7 = CpuidEntry(7, 0, 1, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
EXT1 = CpuidEntry(0x80000001, 0, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF)


def test_static_templates_hide_newer_features_and_check_the_vendor() -> None:
    import pytest

    from pyvmm.errors import ConfigError
    from pyvmm.vmm.cpuid import TEMPLATES, cpu_vendor

    intel = [*SUPPORTED, LEAF7, EXT1]
    amd = [AMD_LEAF0, *SUPPORTED[1:], LEAF7, EXT1]
    assert cpu_vendor(intel) == "GenuineIntel" and cpu_vendor(amd) == "AuthenticAMD"
    t2 = entry(vcpu_cpuid(intel, 0, 1, TEMPLATES["t2"]), 7)
    assert not t2.ebx & (1 << 16)  # AVX512F hidden
    assert t2.ebx & (1 << 5)  # AVX2 kept: Haswell has it
    c3 = vcpu_cpuid(intel, 0, 1, TEMPLATES["c3"])
    assert not entry(c3, 7).ebx & (1 << 5)  # no AVX2 on an Ivy Bridge-class CPU
    assert not entry(c3, 1).ecx & (1 << 12)  # nor FMA
    t2a = vcpu_cpuid(amd, 0, 1, TEMPLATES["t2a"])
    assert not entry(t2a, 0x80000001).ecx & (1 << 11)  # XOP hidden
    for name in ("c3", "t2", "t2s", "t2cl"):
        with pytest.raises(ConfigError, match=f"'{name.upper()}' is for Intel hosts; this host's"):
            vcpu_cpuid(amd, 0, 1, TEMPLATES[name])
    with pytest.raises(ConfigError, match="'T2A' is for AMD hosts; this host's CPU is GenuineI"):
        vcpu_cpuid(intel, 0, 1, TEMPLATES["t2a"])


def test_static_templates_keep_the_pvm_quirks_on_a_pvm_host(monkeypatch) -> None:
    from pyvmm.vmm import cpuid

    monkeypatch.setattr(cpuid, "host_is_pvm", lambda: True)
    template = cpuid.resolve_template("t2")
    assert PVM_TEMPLATE.hidden[0] in template.hidden and template.vendor == "GenuineIntel"
    monkeypatch.setattr(cpuid, "host_is_pvm", lambda: False)
    assert cpuid.resolve_template("t2") is cpuid.TEMPLATES["t2"]
