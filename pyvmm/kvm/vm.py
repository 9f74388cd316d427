"""``Vm``: a KVM virtual machine file descriptor."""

from __future__ import annotations

import mmap
import os

from pyvmm.kvm._kvm_cffi import ffi, lib
from pyvmm.kvm.ioctl import get_blob, ioctl_ptr, ioctl_val, set_blob
from pyvmm.kvm.vcpu import Vcpu


class Vm:
    """Memory slots, the in-kernel irqchip and PIT, interrupt lines, vCPUs."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self._vcpu_mmap_size = vcpu_mmap_size
        self._memory_buffers: dict[int, object] = {}

    def check_extension(self, capability: int) -> int:
        return ioctl_val(self.fd, "KVM_CHECK_EXTENSION", capability)

    def set_user_memory_region(
        self, slot: int, guest_addr: int, buffer: mmap.mmap | bytearray, flags: int = 0
    ) -> None:
        """Back guest-physical ``[guest_addr, +len(buffer))`` with ``buffer``.

        ``buffer`` must be a writable mapping that outlives the VM (guest
        RAM); the VM keeps a reference so it cannot be unmapped under KVM.
        """
        host = ffi.from_buffer(buffer, require_writable=True)
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_addr,
                "memory_size": len(host),
                "userspace_addr": int(ffi.cast("uintptr_t", host)),
            },
        )
        ioctl_ptr(self.fd, "KVM_SET_USER_MEMORY_REGION", region)
        self._memory_buffers[slot] = host

    def set_tss_address(self, addr: int) -> None:
        ioctl_val(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_address(self, addr: int) -> None:
        ioctl_ptr(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and per-vCPU LAPICs (before any vCPU)."""
        ioctl_val(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        flags = lib.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0
        ioctl_ptr(self.fd, "KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def set_irq_line(self, gsi: int, level: bool) -> None:
        line = ffi.new("struct kvm_irq_level *", {"irq": gsi, "level": int(level)})
        ioctl_ptr(self.fd, "KVM_IRQ_LINE", line)

    def register_irqfd(self, event_fd: int, gsi: int) -> None:
        """Writes to ``event_fd`` inject an edge on ``gsi``, without a vCPU exit."""
        ioctl_ptr(self.fd, "KVM_IRQFD", ffi.new("struct kvm_irqfd *", {"fd": event_fd, "gsi": gsi}))

    def register_ioeventfd(
        self,
        event_fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """Guest writes to ``addr`` signal ``event_fd`` instead of exiting to us."""
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        request = ffi.new(
            "struct kvm_ioeventfd *",
            {
                "datamatch": datamatch or 0,
                "addr": addr,
                "len": length,
                "fd": event_fd,
                "flags": flags,
            },
        )
        ioctl_ptr(self.fd, "KVM_IOEVENTFD", request)

    def get_irqchip(self, chip_id: int) -> bytes:
        """Raw ``struct kvm_irqchip`` of PIC master/slave or IOAPIC (for snapshots)."""
        return get_blob(self.fd, "KVM_GET_IRQCHIP", "struct kvm_irqchip", chip_id=chip_id)

    def set_irqchip(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_IRQCHIP", "struct kvm_irqchip", state)

    def get_pit2(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_PIT2", "struct kvm_pit_state2")

    def set_pit2(self, state: bytes) -> None:
        set_blob(self.fd, "KVM_SET_PIT2", "struct kvm_pit_state2", state)

    def get_clock(self) -> bytes:
        return get_blob(self.fd, "KVM_GET_CLOCK", "struct kvm_clock_data")

    def set_clock(self, state: bytes) -> None:
        """Set kvmclock from :meth:`get_clock` bytes (only the clock value is used)."""
        clock = bytearray(state)
        clock[8:12] = bytes(4)  # flags: KVM accepts only the value on set
        set_blob(self.fd, "KVM_SET_CLOCK", "struct kvm_clock_data", bytes(clock))

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """Bitmap of the pages of ``slot`` the guest wrote since the last call (bit n = page n).

        Needs the slot registered with ``KVM_MEM_LOG_DIRTY_PAGES``; KVM clears
        the log as it returns it. Writes by the VMM itself are not in it.
        """
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64 or 1)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        ioctl_ptr(self.fd, "KVM_GET_DIRTY_LOG", log)
        return bytes(ffi.buffer(bitmap))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        vcpu_fd = ioctl_val(self.fd, "KVM_CREATE_VCPU", vcpu_id)
        return Vcpu(vcpu_fd, vcpu_id, self._vcpu_mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._memory_buffers.clear()
