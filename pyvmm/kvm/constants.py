"""KVM's numbers that the rest of pyvmm names: capabilities, system events, irqchips.

Values come from ``<linux/kvm.h>`` through the cffi build, so they cannot
drift from the kernel headers; everything outside :mod:`pyvmm.kvm` uses
these enums instead of the cffi module.
"""

from __future__ import annotations

from enum import IntEnum

from pyvmm.kvm._kvm_cffi import lib


class Cap(IntEnum):
    """The capabilities pyvmm asks ``KVM_CHECK_EXTENSION`` about."""

    IRQCHIP = lib.KVM_CAP_IRQCHIP
    USER_MEMORY = lib.KVM_CAP_USER_MEMORY
    SET_TSS_ADDR = lib.KVM_CAP_SET_TSS_ADDR
    EXT_CPUID = lib.KVM_CAP_EXT_CPUID
    PIT2 = lib.KVM_CAP_PIT2
    IRQFD = lib.KVM_CAP_IRQFD
    IOEVENTFD = lib.KVM_CAP_IOEVENTFD
    IMMEDIATE_EXIT = lib.KVM_CAP_IMMEDIATE_EXIT
    MAX_VCPUS = lib.KVM_CAP_MAX_VCPUS
    NR_VCPUS = lib.KVM_CAP_NR_VCPUS


#: Every capability the VMM cannot run without.
REQUIRED_CAPS = (
    Cap.IRQCHIP,
    Cap.USER_MEMORY,
    Cap.SET_TSS_ADDR,
    Cap.EXT_CPUID,
    Cap.PIT2,
    Cap.IRQFD,
    Cap.IMMEDIATE_EXIT,
)


class SystemEventKind(IntEnum):
    """``kvm_run.system_event.type``: what the guest asked for."""

    SHUTDOWN = lib.KVM_SYSTEM_EVENT_SHUTDOWN
    RESET = lib.KVM_SYSTEM_EVENT_RESET
    CRASH = lib.KVM_SYSTEM_EVENT_CRASH


class IrqChip(IntEnum):
    """``KVM_GET_IRQCHIP``'s chip ids."""

    PIC_MASTER = lib.KVM_IRQCHIP_PIC_MASTER
    PIC_SLAVE = lib.KVM_IRQCHIP_PIC_SLAVE
    IOAPIC = lib.KVM_IRQCHIP_IOAPIC


#: A memory slot flag: KVM logs the guest's writes (diff snapshots read the log).
MEM_LOG_DIRTY_PAGES = lib.KVM_MEM_LOG_DIRTY_PAGES


def all_capabilities() -> dict[str, int]:
    """Every ``KVM_CAP_*`` the headers define, by lower-case name (for ``pyvmm doctor``)."""
    return {
        name[len("KVM_CAP_") :].lower(): getattr(lib, name)
        for name in dir(lib)
        if name.startswith("KVM_CAP_")
    }
