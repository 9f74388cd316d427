"""Thin wrappers over the KVM API: one class per file descriptor.

``Kvm`` (/dev/kvm), ``Vm`` (a VM fd) and ``Vcpu`` (a vCPU fd and its
``kvm_run``), typed register sets (:mod:`pyvmm.kvm.registers`), decoded exits
(:mod:`pyvmm.kvm.exits`) and KVM's numbers as enums
(:mod:`pyvmm.kvm.constants`). This package is the only importer of the cffi
extension and the only caller of ioctls on KVM file descriptors (the TUN
ioctls of a TAP device live with the TAP, in :mod:`pyvmm.host.tap`).

The names below load on first use, so importing a pure submodule (the
register dataclasses, say) does not load the C extension.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmm.kvm.ioctl import KvmIoctlError
    from pyvmm.kvm.system import Kvm
    from pyvmm.kvm.vcpu import Vcpu
    from pyvmm.kvm.vm import Vm

__all__ = ["Kvm", "KvmIoctlError", "Vcpu", "Vm"]

_HOMES = {
    "Kvm": "pyvmm.kvm.system",
    "KvmIoctlError": "pyvmm.kvm.ioctl",
    "Vcpu": "pyvmm.kvm.vcpu",
    "Vm": "pyvmm.kvm.vm",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pyvmm.kvm' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
