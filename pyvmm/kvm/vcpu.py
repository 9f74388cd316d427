"""``Vcpu``: a KVM vCPU file descriptor and its mmap'ed ``kvm_run``."""

from __future__ import annotations

import errno
import mmap
import os
import struct

from pyvmm.kvm import exits
from pyvmm.kvm._kvm_cffi import ffi, lib
from pyvmm.kvm.cpuid import CpuidEntry, entries_from_struct, struct_from_entries
from pyvmm.kvm.ioctl import KvmIoctlError, get_blob, ioctl_ptr, ioctl_val, set_blob
from pyvmm.kvm.registers import SEGMENT_NAMES, DescriptorTable, Fpu, Regs, Segment, Sregs

_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
_INTERNAL = struct.Struct("<II")  # suberror, ndata (then data[16] u64)
_FAIL_ENTRY = struct.Struct("<QI")  # hardware_entry_failure_reason, cpu
_U32 = struct.Struct("<I")
_MAX_MSRS = 256
_INTERRUPTED = exits.Interrupted()
_SHUTDOWN = exits.Shutdown()
_HALT = exits.Halt()
_REGS_FIELDS = Regs._fields
_SEGMENT_FIELDS = Segment._fields


def _segment(raw: object) -> Segment:
    return Segment(**{name: getattr(raw, name) for name in _SEGMENT_FIELDS})


class Vcpu:
    """Register access and the ``KVM_RUN`` call of one vCPU.

    Only the vCPU's own thread may call :meth:`run`; :meth:`kick_prepare`
    (setting ``immediate_exit``) is safe from any thread.
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._run = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_view = memoryview(self._run)
        self._views: dict[tuple[int, int], memoryview] = {}
        self._run_request = lib.KVM_RUN
        self._exit_reason_offset = lib.PYVMM_RUN_EXIT_REASON
        self._io_offset = lib.PYVMM_RUN_IO
        self._mmio_offset = lib.PYVMM_RUN_MMIO
        self._immediate_exit_offset = lib.PYVMM_RUN_IMMEDIATE_EXIT

    # --- running --------------------------------------------------------
    def run(self) -> exits.VcpuExit:
        """Enter the guest until the next exit that user space must handle."""
        if lib.pyvmm_ioctl_val(self.fd, self._run_request, 0) < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                return _INTERRUPTED
            raise KvmIoctlError("KVM_RUN", err)
        reason = _U32.unpack_from(self._run, self._exit_reason_offset)[0]
        if reason == lib.KVM_EXIT_IO:
            direction, size, port, count, data_offset = _IO.unpack_from(self._run, self._io_offset)
            data = self._view(data_offset, size * count)
            if direction == lib.KVM_EXIT_IO_OUT:
                return exits.IoOut(port, size, count, data)
            return exits.IoIn(port, size, count, data)
        if reason == lib.KVM_EXIT_MMIO:
            addr, _, length, is_write = _MMIO.unpack_from(self._run, self._mmio_offset)
            data = self._view(self._mmio_offset + 8, min(length, 8))
            if is_write:
                return exits.MmioWrite(addr, data)
            return exits.MmioRead(addr, data)
        return self._decode_rare(reason)

    def _view(self, offset: int, length: int) -> memoryview:
        """A cached view into ``kvm_run`` (offsets repeat, so views are reused)."""
        key = (offset, length)
        view = self._views.get(key)
        if view is None:
            if offset + length > len(self._run):
                raise KvmIoctlError("KVM_RUN (data outside kvm_run)", errno.EFAULT)
            view = self._views[key] = self._run_view[offset : offset + length]
        return view

    def _decode_rare(self, reason: int) -> exits.VcpuExit:
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == lib.KVM_EXIT_HLT:
            return _HALT
        if reason == lib.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            return exits.SystemEvent(_U32.unpack_from(self._run, lib.PYVMM_RUN_SYSTEM_EVENT)[0])
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = _INTERNAL.unpack_from(self._run, lib.PYVMM_RUN_INTERNAL)
            count = min(ndata, 16)
            data = struct.unpack_from(f"<{count}Q", self._run, lib.PYVMM_RUN_INTERNAL + 8)
            return exits.InternalError(suberror, data)
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return exits.FailEntry(*_FAIL_ENTRY.unpack_from(self._run, lib.PYVMM_RUN_FAIL_ENTRY))
        return exits.Unknown(reason)

    def set_immediate_exit(self, value: bool) -> None:
        """While set, ``KVM_RUN`` returns at once with EINTR (closes the kick race)."""
        self._run[self._immediate_exit_offset] = int(value)

    # --- registers --------------------------------------------------------
    def get_regs(self) -> Regs:
        """The general registers."""
        regs = ffi.new("struct kvm_regs *")
        ioctl_ptr(self.fd, "KVM_GET_REGS", regs)
        return Regs(**{name: getattr(regs, name) for name in _REGS_FIELDS})

    def set_regs(self, regs: Regs) -> None:
        ioctl_ptr(
            self.fd,
            "KVM_SET_REGS",
            ffi.new("struct kvm_regs *", {name: getattr(regs, name) for name in _REGS_FIELDS}),
        )

    def get_sregs(self) -> Sregs:
        """Segments, descriptor tables and control registers."""
        raw = ffi.new("struct kvm_sregs *")
        ioctl_ptr(self.fd, "KVM_GET_SREGS", raw)
        segments = {name: _segment(getattr(raw, name)) for name in SEGMENT_NAMES}
        return Sregs(
            **segments,
            gdt=DescriptorTable(raw.gdt.base, raw.gdt.limit),
            idt=DescriptorTable(raw.idt.base, raw.idt.limit),
            cr0=raw.cr0,
            cr2=raw.cr2,
            cr3=raw.cr3,
            cr4=raw.cr4,
            cr8=raw.cr8,
            efer=raw.efer,
            apic_base=raw.apic_base,
            interrupt_bitmap=tuple(raw.interrupt_bitmap),
        )

    def set_sregs(self, sregs: Sregs) -> None:
        raw = ffi.new("struct kvm_sregs *")
        for name in SEGMENT_NAMES:
            target, segment = getattr(raw, name), getattr(sregs, name)
            for key in _SEGMENT_FIELDS:
                setattr(target, key, getattr(segment, key))
        raw.gdt.base, raw.gdt.limit = sregs.gdt.base, sregs.gdt.limit
        raw.idt.base, raw.idt.limit = sregs.idt.base, sregs.idt.limit
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
            setattr(raw, name, getattr(sregs, name))
        raw.interrupt_bitmap = list(sregs.interrupt_bitmap)
        ioctl_ptr(self.fd, "KVM_SET_SREGS", raw)

    def get_fpu(self) -> Fpu:
        raw = ffi.new("struct kvm_fpu *")
        ioctl_ptr(self.fd, "KVM_GET_FPU", raw)
        return Fpu(
            fpr=bytes(ffi.buffer(raw.fpr)),
            fcw=raw.fcw,
            fsw=raw.fsw,
            ftwx=raw.ftwx,
            last_opcode=raw.last_opcode,
            last_ip=raw.last_ip,
            last_dp=raw.last_dp,
            xmm=bytes(ffi.buffer(raw.xmm)),
            mxcsr=raw.mxcsr,
        )

    def set_fpu(self, fpu: Fpu) -> None:
        if len(fpu.fpr) != 128 or len(fpu.xmm) != 256:
            raise ValueError("FPU state: fpr must be 128 bytes and xmm 256 bytes")
        raw = ffi.new("struct kvm_fpu *")
        ffi.buffer(raw.fpr)[:] = fpu.fpr
        ffi.buffer(raw.xmm)[:] = fpu.xmm
        for name in ("fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "mxcsr"):
            setattr(raw, name, getattr(fpu, name))
        ioctl_ptr(self.fd, "KVM_SET_FPU", raw)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Values of the MSRs in ``indices`` that KVM could read."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for entry, index in zip(msrs.entries, indices, strict=True):
            entry.index = index
        count = ioctl_ptr(self.fd, "KVM_GET_MSRS", msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def set_msrs(self, values: dict[int, int]) -> None:
        """Write every MSR in ``values``; raises if KVM accepts fewer."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for entry, (index, data) in zip(msrs.entries, values.items(), strict=True):
            entry.index = index
            entry.data = data
        written = ioctl_ptr(self.fd, "KVM_SET_MSRS", msrs)
        if written != len(values):
            failed = list(values)[written]
            raise KvmIoctlError(f"KVM_SET_MSRS (MSR {failed:#x} refused)", errno.EINVAL)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        ioctl_ptr(self.fd, "KVM_SET_CPUID2", struct_from_entries(entries))

    def get_cpuid(self) -> list[CpuidEntry]:
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": _MAX_MSRS, "entries": _MAX_MSRS})
        ioctl_ptr(self.fd, "KVM_GET_CPUID2", cpuid)
        return entries_from_struct(cpuid)

    def get_lapic(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_LAPIC", "struct kvm_lapic_state")

    def set_lapic(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_LAPIC", "struct kvm_lapic_state", state)

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl_ptr(self.fd, "KVM_GET_MP_STATE", state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = ffi.new("struct kvm_mp_state *", {"mp_state": mp_state})
        ioctl_ptr(self.fd, "KVM_SET_MP_STATE", state)

    def get_xsave(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_XSAVE", "struct kvm_xsave")

    def set_xsave(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_XSAVE", "struct kvm_xsave", state)

    def get_xcrs(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_XCRS", "struct kvm_xcrs")

    def set_xcrs(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_XCRS", "struct kvm_xcrs", state)

    def get_vcpu_events(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def set_vcpu_events(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events", state)

    def restore_vcpu_events(self, state: bytes) -> None:
        """Set :meth:`get_vcpu_events` bytes, pending NMI and SIPI vector included.

        KVM reports those two without their "valid" flags, and ignores them
        on set unless the flags are there (QEMU adds them the same way).
        """
        events = ffi.new("struct kvm_vcpu_events *")
        if len(state) != ffi.sizeof(events[0]):
            raise ValueError(
                f"KVM_SET_VCPU_EVENTS: state is {len(state)} bytes, "
                f"struct kvm_vcpu_events is {ffi.sizeof(events[0])}"
            )
        ffi.buffer(events)[:] = state
        events.flags |= lib.KVM_VCPUEVENT_VALID_NMI_PENDING | lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR
        ioctl_ptr(self.fd, "KVM_SET_VCPU_EVENTS", events)

    def get_tsc_khz(self) -> int:
        return ioctl_val(self.fd, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """Scale the guest's TSC to ``khz`` (restoring on a host with another TSC rate)."""
        ioctl_val(self.fd, "KVM_SET_TSC_KHZ", khz)

    # --- snapshot state: raw struct bytes, never interpreted ------------------
    def get_regs_bytes(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_REGS", "struct kvm_regs")

    def set_regs_bytes(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_REGS", "struct kvm_regs", state)

    def get_sregs_bytes(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_SREGS", "struct kvm_sregs")

    def set_sregs_bytes(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_SREGS", "struct kvm_sregs", state)

    def get_fpu_bytes(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_FPU", "struct kvm_fpu")

    def set_fpu_bytes(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_FPU", "struct kvm_fpu", state)

    def get_debugregs(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_DEBUGREGS", "struct kvm_debugregs")

    def set_debugregs(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_DEBUGREGS", "struct kvm_debugregs", state)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest's kvmclock it was paused (no soft-lockup warnings)."""
        ioctl_val(self.fd, "KVM_KVMCLOCK_CTRL")

    def close(self) -> None:
        if self.fd < 0:
            return
        for view in self._views.values():
            view.release()
        self._views.clear()
        self._run_view.release()
        self._run.close()
        os.close(self.fd)
        self.fd = -1
