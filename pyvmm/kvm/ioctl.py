"""The single place where ioctls are issued, and the error they raise.

Every KVM wrapper calls :func:`ioctl_ptr` or :func:`ioctl_val` with the
request's *name*; a failure raises :class:`KvmIoctlError` naming the ioctl
and the errno, so a log line always says which call the kernel refused.
cffi releases the GIL around each call, so a vCPU blocked in ``KVM_RUN``
never stalls the other Python threads.
"""

from __future__ import annotations

import errno as errno_module
import os

from pyvmm.errors import HostError
from pyvmm.kvm._kvm_cffi import ffi, lib


class KvmIoctlError(HostError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, request: str, err: int) -> None:
        self.request = request
        self.errno = err
        name = errno_module.errorcode.get(err, str(err))
        super().__init__(f"{request} failed: {name} ({os.strerror(err)})")


def ioctl_ptr(fd: int, request: str, arg: object = ffi.NULL) -> int:
    """Issue ``request`` with a pointer argument (a cffi object or NULL)."""
    result = lib.pyvmm_ioctl_ptr(fd, getattr(lib, request), arg)
    if result < 0:
        raise KvmIoctlError(request, ffi.errno)
    return result


def ioctl_val(fd: int, request: str, arg: int = 0) -> int:
    """Issue ``request`` with an integer argument."""
    result = lib.pyvmm_ioctl_val(fd, getattr(lib, request), arg)
    if result < 0:
        raise KvmIoctlError(request, ffi.errno)
    return result


def get_blob(fd: int, request: str, ctype: str, **fields: int) -> bytes:
    """Run a ``KVM_GET_*`` ioctl filling a ``ctype`` struct; return its raw bytes.

    Snapshot-only state (LAPIC, XSAVE, PIT, irqchip, ...) is kept as opaque
    bytes: pyvmm never interprets it, only hands it back to KVM.
    """
    value = ffi.new(f"{ctype} *", fields or None)
    ioctl_ptr(fd, request, value)
    return bytes(ffi.buffer(value))


def set_blob(fd: int, request: str, ctype: str, state: bytes) -> None:
    """Run a ``KVM_SET_*`` ioctl with raw bytes from :func:`get_blob`."""
    value = ffi.new(f"{ctype} *")
    if len(state) != ffi.sizeof(ctype):
        raise ValueError(f"{request}: state is {len(state)} bytes, {ctype} is {ffi.sizeof(ctype)}")
    ffi.buffer(value)[:] = state
    ioctl_ptr(fd, request, value)
