"""The KVM bindings against the host's /dev/kvm, with a tiny real-mode guest."""

from __future__ import annotations

import threading
import time

import pytest

from pyvmm.kvm import Kvm, KvmIoctlError, exits
from pyvmm.kvm._kvm_cffi import ffi, lib
from pyvmm.kvm.signals import install_kick_handler
from tests.conftest import requires_kvm

# Real mode at 0x1000:
#   mov dx, 0x3f8 ; mov al, 'H' ; out dx, al ; in al, dx ; out dx, al ; jmp $
GUEST_CODE = bytes.fromhex("baf803b048eeeceeebfe")


def test_abi_facts_match_the_header() -> None:
    # The build verifies every declared struct against <linux/kvm.h>; these
    # spot checks pin down the ABI that never changes.
    assert lib.KVM_RUN == 0xAE80
    assert lib.KVM_API_VERSION == 12
    assert ffi.sizeof("struct kvm_regs") == 144
    assert ffi.sizeof("struct kvm_segment") == 24
    assert ffi.sizeof("struct kvm_sregs") == 312
    assert ffi.sizeof("struct kvm_userspace_memory_region") == 32
    assert ffi.sizeof("struct kvm_cpuid_entry2") == 40
    assert ffi.offsetof("struct kvm_sregs", "efer") == 8 * 24 + 2 * 16 + 5 * 8
    assert lib.PYVMM_RUN_EXIT_REASON == 8
    assert lib.PYVMM_RUN_IO == lib.PYVMM_RUN_MMIO == 32


@pytest.fixture
def kvm() -> Kvm:
    with Kvm() as handle:
        yield handle


@requires_kvm
def test_system_queries(kvm: Kvm) -> None:
    assert kvm.api_version == 12
    assert kvm.check_extension(lib.KVM_CAP_IRQCHIP)
    assert kvm.vcpu_mmap_size() >= 4096
    cpuid = kvm.supported_cpuid()
    assert any(entry.function == 0 for entry in cpuid)
    assert 0x10 in kvm.msr_index_list()  # IA32_TSC


@requires_kvm
def test_real_mode_guest_io_exits_and_kick(kvm: Kvm) -> None:
    import mmap

    vm = kvm.create_vm()
    memory = mmap.mmap(-1, 0x10000)
    memory[0x1000 : 0x1000 + len(GUEST_CODE)] = GUEST_CODE
    vm.set_user_memory_region(0, 0, memory)
    vcpu = vm.create_vcpu(0)
    try:
        sregs = vcpu.get_sregs()
        vcpu.set_sregs(sregs._replace(cs=sregs.cs._replace(base=0, selector=0)))
        vcpu.set_regs(vcpu.get_regs()._replace(rip=0x1000, rflags=2))

        out = vcpu.run()
        assert isinstance(out, exits.IoOut)
        assert (out.port, out.size, bytes(out.data)) == (0x3F8, 1, b"H")
        read = vcpu.run()
        assert isinstance(read, exits.IoIn) and read.port == 0x3F8
        read.data[0] = 0x5A  # the device's answer lands in AL
        echo = vcpu.run()
        assert isinstance(echo, exits.IoOut) and bytes(echo.data) == b"Z"

        signo = install_kick_handler()
        ident = threading.get_ident()

        def kick() -> None:
            time.sleep(0.2)
            vcpu.set_immediate_exit(True)
            import signal

            signal.pthread_kill(ident, signo)

        kicker = threading.Thread(target=kick)
        kicker.start()
        start = time.monotonic()
        assert isinstance(vcpu.run(), exits.Interrupted)  # the guest spins on jmp $
        assert time.monotonic() - start < 5
        kicker.join()
        assert isinstance(vcpu.run(), exits.Interrupted)  # immediate_exit still set
        vcpu.set_immediate_exit(False)
    finally:
        vcpu.close()
        vm.close()


@requires_kvm
def test_failed_ioctl_names_request_and_errno(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    try:
        with pytest.raises(KvmIoctlError, match=r"KVM_CREATE_VCPU failed: EEXIST"):
            vm.create_vcpu(0)
    finally:
        vcpu.close()
        vm.close()


@requires_kvm
def test_vcpu_state_roundtrips(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vm.create_irqchip()
    vm.create_pit2()
    vcpu = vm.create_vcpu(0)
    try:
        for get, put in [
            (vcpu.get_lapic, vcpu.set_lapic),
            (vcpu.get_xsave, vcpu.set_xsave),
            (vcpu.get_xcrs, vcpu.set_xcrs),
            (vcpu.get_vcpu_events, vcpu.set_vcpu_events),
        ]:
            state = get()
            put(state)
            assert get() == state
        vcpu.set_msrs({0x10: 12345})
        assert vcpu.get_msrs([0x174])[0x174] == 0
        assert vcpu.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE
        pit = vm.get_pit2()
        vm.set_pit2(pit)
        chip = vm.get_irqchip(lib.KVM_IRQCHIP_IOAPIC)
        vm.set_irqchip(chip)
        vm.set_irq_line(4, True)
        vm.set_irq_line(4, False)
    finally:
        vcpu.close()
        vm.close()


@requires_kvm
def test_clock_roundtrip_and_wrong_sized_state(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        clock = vm.get_clock()
        vm.set_clock(clock)
        with pytest.raises(ValueError, match="KVM_SET_PIT2: state is 3 bytes"):
            vm.set_pit2(b"abc")
    finally:
        vm.close()
