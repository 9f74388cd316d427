"""``Kvm``: the /dev/kvm system file descriptor."""

from __future__ import annotations

import os

from pyvmm.errors import HostError
from pyvmm.kvm._kvm_cffi import ffi, lib
from pyvmm.kvm.cpuid import CpuidEntry, entries_from_struct
from pyvmm.kvm.ioctl import ioctl_ptr, ioctl_val
from pyvmm.kvm.vm import Vm

KVM_DEVICE = "/dev/kvm"
_MAX_CPUID_ENTRIES = 256
_MAX_MSR_INDICES = 1024


class Kvm:
    """An open ``/dev/kvm``: capabilities, supported CPUID/MSRs, VM creation."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostError(f"{path} does not exist: KVM is not available on this host") from None
        except PermissionError:
            raise HostError(
                f"no permission to open {path}: add your user to the 'kvm' group or run as root"
            ) from None
        except OSError as err:
            raise HostError(f"cannot open {path}: {err.strerror}") from None
        version = ioctl_val(self.fd, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise HostError(f"KVM API version {version} is not the supported {lib.KVM_API_VERSION}")
        self.api_version = version

    def check_extension(self, capability: int) -> int:
        """The value KVM reports for ``capability`` (0 = not supported)."""
        return ioctl_val(self.fd, "KVM_CHECK_EXTENSION", capability)

    def vcpu_mmap_size(self) -> int:
        return ioctl_val(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: what the host can offer a guest."""
        cpuid = ffi.new(
            "struct kvm_cpuid2 *", {"nent": _MAX_CPUID_ENTRIES, "entries": _MAX_CPUID_ENTRIES}
        )
        ioctl_ptr(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return entries_from_struct(cpuid)

    def msr_index_list(self) -> list[int]:
        """MSRs that KVM saves/restores for a vCPU (``KVM_GET_MSR_INDEX_LIST``)."""
        return self._index_list("KVM_GET_MSR_INDEX_LIST")

    def _index_list(self, request: str) -> list[int]:
        msrs = ffi.new(
            "struct kvm_msr_list *", {"nmsrs": _MAX_MSR_INDICES, "indices": _MAX_MSR_INDICES}
        )
        ioctl_ptr(self.fd, request, msrs)
        return [msrs.indices[i] for i in range(msrs.nmsrs)]

    def create_vm(self) -> Vm:
        vm_fd = ioctl_val(self.fd, "KVM_CREATE_VM", 0)
        return Vm(vm_fd, self.vcpu_mmap_size())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
