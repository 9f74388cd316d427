"""vCPU exits decoded from ``struct kvm_run`` into small values.

The raw union is read in exactly one place (:meth:`pyvmm.kvm.vcpu.Vcpu.run`);
everything above sees these classes and dispatches with ``match``. The
``data`` views point into the shared ``kvm_run`` page: a device fills an
input's data in place, and KVM copies it into the guest register on the
next ``KVM_RUN``, so no bytes objects are made per exit.
"""

from __future__ import annotations

from dataclasses import dataclass


class VcpuExit:
    """Base class of every decoded exit."""

    __slots__ = ()


@dataclass(slots=True)
class IoIn(VcpuExit):
    """``in`` from ``port``: fill ``data`` (``count`` items of ``size`` bytes)."""

    port: int
    size: int
    count: int
    data: memoryview


@dataclass(slots=True)
class IoOut(VcpuExit):
    """``out`` to ``port`` of ``count`` items of ``size`` bytes in ``data``."""

    port: int
    size: int
    count: int
    data: memoryview


@dataclass(slots=True)
class MmioRead(VcpuExit):
    """A load from unbacked guest-physical ``addr``: fill ``data``."""

    addr: int
    data: memoryview


@dataclass(slots=True)
class MmioWrite(VcpuExit):
    """A store to unbacked guest-physical ``addr`` of ``data``."""

    addr: int
    data: memoryview


@dataclass(slots=True)
class Halt(VcpuExit):
    """``hlt`` with the irqchip in user space (not used with an in-kernel one)."""


@dataclass(slots=True)
class Shutdown(VcpuExit):
    """The vCPU triple-faulted (``KVM_EXIT_SHUTDOWN``)."""


@dataclass(slots=True)
class Interrupted(VcpuExit):
    """``KVM_RUN`` returned early (a kick signal or ``immediate_exit``)."""


@dataclass(slots=True)
class SystemEvent(VcpuExit):
    """``KVM_EXIT_SYSTEM_EVENT``: shutdown, reset or crash requested."""

    kind: int


@dataclass(slots=True)
class InternalError(VcpuExit):
    """KVM could not emulate something (``KVM_EXIT_INTERNAL_ERROR``)."""

    suberror: int
    data: tuple[int, ...]


@dataclass(slots=True)
class FailEntry(VcpuExit):
    """The hardware refused to enter the guest (``KVM_EXIT_FAIL_ENTRY``)."""

    reason: int
    cpu: int


@dataclass(slots=True)
class Unknown(VcpuExit):
    """An exit reason pyvmm does not handle."""

    reason: int
