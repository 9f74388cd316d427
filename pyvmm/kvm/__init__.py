"""Thin wrappers over the KVM API: one class per file descriptor.

This package is the only place in pyvmm that issues ioctls.
"""

from pyvmm.kvm.ioctl import KvmIoctlError
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import Vm

__all__ = ["Kvm", "KvmIoctlError", "Vcpu", "Vm"]
