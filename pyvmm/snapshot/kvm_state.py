"""Save and restore what KVM holds: vCPU registers and the in-kernel devices.

Saving happens while every vCPU thread is parked (out of ``KVM_RUN``, see
:mod:`pyvmm.vmm.vcpu`); vCPU ioctls other than ``KVM_RUN`` may come from any
thread. Restoring happens on fresh vCPUs before their first ``KVM_RUN``,
in the order KVM needs:

1. CPUID (it decides which MSRs and XSAVE features exist), then the TSC rate;
2. MP state, general registers, special registers (CR0/CR4/EFER and the
   APIC base, which the LAPIC state depends on);
3. FPU, XSAVE, XCRs, debug registers;
4. the LAPIC, then the MSRs (the TSC-deadline MSR needs the LAPIC mode);
5. pending events last (an exception to inject refers to all of the above).

Errors become :class:`SnapshotError` naming the vCPU and the part KVM
refused: usually a snapshot taken on a different kind of host.
"""

from __future__ import annotations

import errno

from pyvmm.kvm import KvmIoctlError, Vcpu, Vm
from pyvmm.kvm.constants import IrqChip
from pyvmm.kvm.cpuid import CpuidEntry
from pyvmm.snapshot.state import SnapshotError, VcpuState, VmKvmState

# A host whose TSC differs by less than this runs the guest without scaling.
_TSC_KHZ_TOLERANCE = 250e-6


def read_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """Every MSR in ``indices`` KVM can read (``KVM_GET_MSRS`` stops at the first it cannot)."""
    values: dict[int, int] = {}
    pending = list(indices)
    while pending:
        got = vcpu.get_msrs(pending)
        values.update(got)
        pending = pending[len(got) + 1 :]  # skip the one KVM refused
    return values


def _optional(read, *args: object) -> bytes | None:
    """``read()``, or None where this host's KVM lacks the ioctl."""
    try:
        return read(*args)
    except KvmIoctlError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTTY, errno.ENXIO):
            return None
        raise


def save_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    """The state of a parked vCPU."""
    return VcpuState(
        id=vcpu.id,
        cpuid=tuple(
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in vcpu.get_cpuid()
        ),
        tsc_khz=vcpu.get_tsc_khz(),
        mp_state=vcpu.get_mp_state(),
        regs=vcpu.get_regs_bytes(),
        sregs=vcpu.get_sregs_bytes(),
        fpu=vcpu.get_fpu_bytes(),
        xsave=_optional(vcpu.get_xsave),
        xcrs=_optional(vcpu.get_xcrs),
        debugregs=_optional(vcpu.get_debugregs),
        lapic=vcpu.get_lapic(),
        msrs=read_msrs(vcpu, msr_indices),
        vcpu_events=vcpu.get_vcpu_events(),
    )


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Load ``state`` into a vCPU that has never run; see the module docstring for the order."""
    steps = [
        ("CPUID", lambda: vcpu.set_cpuid([CpuidEntry(*entry) for entry in state.cpuid])),
        ("TSC frequency", lambda: _restore_tsc_khz(vcpu, state.tsc_khz)),
        ("MP state", lambda: vcpu.set_mp_state(state.mp_state)),
        ("registers", lambda: vcpu.set_regs_bytes(state.regs)),
        ("special registers", lambda: vcpu.set_sregs_bytes(state.sregs)),
        ("FPU", lambda: vcpu.set_fpu_bytes(state.fpu)),
    ]
    if state.xsave is not None:
        steps.append(("XSAVE state", lambda: vcpu.set_xsave(state.xsave)))
    if state.xcrs is not None:
        steps.append(("XCRs", lambda: vcpu.set_xcrs(state.xcrs)))
    if state.debugregs is not None:
        steps.append(("debug registers", lambda: vcpu.set_debugregs(state.debugregs)))
    steps += [
        ("LAPIC", lambda: vcpu.set_lapic(state.lapic)),
        ("MSRs", lambda: vcpu.set_msrs(state.msrs)),
        ("pending events", lambda: vcpu.restore_vcpu_events(state.vcpu_events)),
    ]
    for what, step in steps:
        try:
            step()
        except (KvmIoctlError, ValueError) as exc:
            raise SnapshotError(
                f"vcpu{state.id}: this host's KVM refused the saved {what} ({exc}); "
                "was the snapshot taken on a different kind of host?"
            ) from None


def _restore_tsc_khz(vcpu: Vcpu, khz: int) -> None:
    """Scale the guest TSC if this host's differs from the snapshot's (its clock relies on it)."""
    here = vcpu.get_tsc_khz()
    if abs(here - khz) <= khz * _TSC_KHZ_TOLERANCE:
        return
    try:
        vcpu.set_tsc_khz(khz)
    except KvmIoctlError as exc:
        raise ValueError(
            f"the snapshot's TSC runs at {khz} kHz, this host's at {here} kHz, and scaling failed: "
            f"{exc}"
        ) from None


def save_vm(vm: Vm, clock: bytes) -> VmKvmState:
    """The in-kernel irqchip and PIT; ``clock`` is the kvmclock saved at pause."""
    return VmKvmState(
        pic_master=vm.get_irqchip(IrqChip.PIC_MASTER),
        pic_slave=vm.get_irqchip(IrqChip.PIC_SLAVE),
        ioapic=vm.get_irqchip(IrqChip.IOAPIC),
        pit=vm.get_pit2(),
        clock=clock,
    )


def restore_vm(vm: Vm, state: VmKvmState) -> None:
    """Load the irqchip and PIT (kvmclock is set when the guest resumes)."""
    for what, step in (
        ("PIC (master)", lambda: vm.set_irqchip(state.pic_master)),
        ("PIC (slave)", lambda: vm.set_irqchip(state.pic_slave)),
        ("IOAPIC", lambda: vm.set_irqchip(state.ioapic)),
        ("PIT", lambda: vm.set_pit2(state.pit)),
    ):
        try:
            step()
        except (KvmIoctlError, ValueError) as exc:
            raise SnapshotError(f"this host's KVM refused the saved {what} ({exc})") from None
    if len(state.clock) != len(vm.get_clock()):
        raise SnapshotError(
            f"the saved kvmclock is {len(state.clock)} bytes, this host's KVM uses "
            f"{len(vm.get_clock())}"
        )
