"""Building a :class:`~pyvmm.vmm.vmm.Vmm`: two ways, one set of parts.

:func:`build_for_boot` makes fresh guest RAM, loads the kernel, the initrd
and the platform tables into it and puts the boot vCPU at the kernel's
entry; :func:`build_from_snapshot` maps guest RAM from a memory file and
loads every saved state in the order KVM needs. Both share the same steps
for what the two have in common (KVM objects, memory slots, devices,
vCPU threads), as Firecracker's ``build_microvm_for_boot`` and
``build_microvm_from_snapshot`` do, so there is no flag that quietly
switches one into the other.

Whatever fails, nothing stays open: every resource is registered on one
``ExitStack`` as soon as it exists, and the stack is closed on error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from pyvmm import layout
from pyvmm.boot.acpi import VmGenIdAcpi, write_acpi_tables
from pyvmm.boot.configure import BootSetup, setup_boot
from pyvmm.config import MachineConfig
from pyvmm.errors import HostError
from pyvmm.host.serial_output import fd_writer, open_serial_output
from pyvmm.kvm import Kvm
from pyvmm.kvm.constants import MEM_LOG_DIRTY_PAGES, REQUIRED_CAPS, Cap
from pyvmm.kvm.signals import install_kick_handler
from pyvmm.memory import DirtyTrackingMemory, GuestMemory
from pyvmm.vmm.cpuid import resolve_template
from pyvmm.vmm.device_manager import DeviceManager, MmioWindow, virtio_windows
from pyvmm.vmm.event_loop import EventLoop
from pyvmm.vmm.stop_reason import StopKind, StopReason
from pyvmm.vmm.threads import NO_SETUP, ThreadSetup
from pyvmm.vmm.vcpu import VcpuThread
from pyvmm.vmm.vcpu_setup import configure_vcpu, set_boot_state
from pyvmm.vmm.vmm import Vmm

if TYPE_CHECKING:
    from pyvmm.config import BalloonConfig, DriveConfig, NetConfig, VsockConfig
    from pyvmm.devices.legacy.vmgenid import VmGenId
    from pyvmm.devices.virtio.device import VirtioDevice
    from pyvmm.host.events import Backend
    from pyvmm.snapshot.state import MicrovmState

StopSink = Callable[[StopReason], None]


class ConsoleIO(NamedTuple):
    """The host side of the guest's serial console.

    ``out`` receives what the guest prints (unless the config names a
    ``serial_out`` file); ``input_fd`` is read into the guest's UART;
    ``escape`` enables Ctrl-A X and friends (a terminal, not a pipe).
    """

    out: Callable[[bytes], object] | None = None
    input_fd: int | None = None
    escape: bool = False


class BuildContext(NamedTuple):
    """What every build needs besides the config: the console, where stops go, thread setup."""

    console: ConsoleIO
    on_stop: StopSink
    thread_setup: ThreadSetup = NO_SETUP
    start_ns: int = 0


def build_for_boot(config: MachineConfig, context: BuildContext) -> tuple[Vmm, BootSetup]:
    """A machine ready to boot ``config``'s kernel (threads not started yet)."""
    memory_type = DirtyTrackingMemory if config.track_dirty_pages else GuestMemory
    with _building() as stack:
        memory = memory_type.with_size(config.mem_size, huge_pages=config.huge_pages)
        stack.callback(memory.close)
        vmm, windows = _build(config, context, memory, stack, append_serial=False, vmgenid=True)
        boot = _load_guest(config, memory, windows, vmm.devices.vmgenid)
        supported = vmm.kvm.supported_cpuid()
        msr_indices = set(vmm.kvm.msr_index_list())
        template = resolve_template(config.cpu_template)
        for vcpu in vmm.vcpus:
            configure_vcpu(vcpu, supported, msr_indices, config.vcpus, template)
        set_boot_state(vmm.vcpus[0], boot.cpu)
        return vmm, boot


def build_from_snapshot(
    config: MachineConfig, context: BuildContext, state: MicrovmState, mem_fd: int
) -> Vmm:
    """A machine restored from a snapshot, its vCPUs and devices loaded (threads not started).

    ``state`` is the :class:`~pyvmm.snapshot.state.MicrovmState` read from
    the state file; ``mem_fd`` the memory file checked against it. Guest RAM
    is mapped copy-on-write from the file; the fd may be closed afterwards.
    """
    from pyvmm.snapshot.files import SnapshotError
    from pyvmm.snapshot.kvm_state import restore_vcpu, restore_vm

    memory_type = DirtyTrackingMemory if config.track_dirty_pages else GuestMemory
    with _building() as stack:
        memory = memory_type.from_file(config.mem_size, mem_fd)
        stack.callback(memory.close)
        regions = tuple((r.guest_addr, r.size) for r in memory.regions)
        if regions != state.memory.regions:
            raise SnapshotError("the snapshot's memory layout differs from this pyvmm's")
        if len(state.vcpus) != config.vcpus:
            raise SnapshotError(
                f"the snapshot has {len(state.vcpus)} vCPU states for {config.vcpus}"
            )
        # A snapshot from before the VM generation id keeps its device set (and its DSDT).
        has_vmgenid = "vmgenid" in state.devices.legacy
        vmm, _ = _build(config, context, memory, stack, append_serial=True, vmgenid=has_vmgenid)
        restore_vm(vmm.vm, state.vm)
        for vcpu, vcpu_state in zip(vmm.vcpus, state.vcpus, strict=True):
            restore_vcpu(vcpu, vcpu_state)
        vmm.devices.restore(state.devices)
        vmm.paused_clock = state.vm.clock
        return vmm


@contextlib.contextmanager
def _building() -> Iterator[contextlib.ExitStack]:
    """An ExitStack that is closed if the build fails and handed over if it succeeds."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    except BaseException:
        stack.close()
        raise


def _build(
    config: MachineConfig,
    context: BuildContext,
    memory: GuestMemory,
    stack: contextlib.ExitStack,
    *,
    append_serial: bool,
    vmgenid: bool,
) -> tuple[Vmm, list[MmioWindow]]:
    """KVM objects, memory slots, devices and vCPU threads: what boot and restore share."""
    kvm = Kvm()
    stack.callback(kvm.close)
    _check_capabilities(kvm, config)
    vm = kvm.create_vm()
    stack.callback(vm.close)
    vm.set_tss_address(layout.KVM_TSS_ADDR)
    vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDR)
    vm.create_irqchip()
    vm.create_pit2()
    slot_flags = MEM_LOG_DIRTY_PAGES if config.track_dirty_pages else 0
    for slot, region in enumerate(memory):
        vm.set_user_memory_region(slot, region.guest_addr, region.mapping, slot_flags)
    if isinstance(memory, DirtyTrackingMemory):
        memory.attach_dirty_log(vm.get_dirty_log)

    def loop_failed(message: str) -> None:
        context.on_stop(StopReason(StopKind.VMM_ERROR, message))

    loop = EventLoop(on_error=loop_failed, setup=context.thread_setup)
    stack.callback(loop.close)
    devices = DeviceManager(vm, memory, loop, stack, context.on_stop)
    devices.add_legacy_devices(
        _serial_sink(config, context.console, stack, append_serial), context.start_ns
    )
    if vmgenid:
        devices.add_vmgenid()
    if context.console.input_fd is not None:
        devices.attach_console(
            context.console.input_fd,
            escape=context.console.escape,
            on_quit=lambda: context.on_stop(StopReason(StopKind.USER_QUIT, "Ctrl-A X pressed")),
        )
    windows = virtio_windows(len(config.device_ids))
    for device_id, window in zip(config.device_ids, windows, strict=True):
        device, backend = _open_virtio_device(config, device_id, stack)
        devices.add_virtio(device_id, device, backend, window)
    kick_signal = install_kick_handler()
    vcpus = []
    threads = []
    for vcpu_id in range(config.vcpus):
        vcpu = vm.create_vcpu(vcpu_id)
        stack.callback(vcpu.close)
        vcpus.append(vcpu)
        threads.append(
            VcpuThread(
                vcpu,
                devices.pio_bus,
                devices.mmio_bus,
                context.on_stop,
                kick_signal,
                context.thread_setup,
            )
        )
    vmm = Vmm(config, kvm, vm, memory, devices, loop, vcpus, threads, stack)
    return vmm, windows


def _check_capabilities(kvm: Kvm, config: MachineConfig) -> None:
    missing = [f"KVM_CAP_{cap.name}" for cap in REQUIRED_CAPS if not kvm.check_extension(cap)]
    if missing:
        raise HostError(f"this host's KVM lacks {', '.join(missing)}")
    max_vcpus = kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS)
    if max_vcpus and config.vcpus > max_vcpus:
        raise HostError(f"this host's KVM supports at most {max_vcpus} vCPUs")


def _serial_sink(
    config: MachineConfig, console: ConsoleIO, stack: contextlib.ExitStack, append: bool
) -> Callable[[bytes], object]:
    if config.serial_out is not None:
        fd = open_serial_output(
            config.serial_out, append=append, drives=[d.path for d in config.drives]
        )
        stack.callback(os.close, fd)
        return fd_writer(fd)
    if console.out is not None:
        return console.out
    return lambda data: None


def _open_virtio_device(
    config: MachineConfig, device_id: str, stack: contextlib.ExitStack
) -> tuple[VirtioDevice, Backend | None]:
    """The device called ``device_id`` in ``config`` and its opened back end.

    Each kind's model and back end are imported here, when a machine has one:
    a boot without that device never loads its code.
    """
    for index, drive in enumerate(config.drives):
        if (drive.drive_id or f"drive{index}") == device_id:
            return _block(drive, index)
    for index, net in enumerate(config.nets):
        if (net.iface_id or f"net{index}") == device_id:
            return _net(net)
    if device_id == "rng" and config.rng:
        from pyvmm.devices.rate_limiter import RateLimiter
        from pyvmm.devices.virtio.rng import VirtioRng

        limiter = RateLimiter.from_spec(config.rng_rate_limit)
        return VirtioRng(os.getrandom, rate_limiter=limiter), None
    if device_id == "balloon" and config.balloon is not None:
        return _balloon(config.balloon), None
    if device_id == "vsock" and config.vsock is not None:
        return _vsock(config.vsock)
    raise AssertionError(f"config has no device {device_id!r}")  # device_ids come from config


#: What a build imports only for a config that has it (see :func:`_open_virtio_device`).
ON_DEMAND_MODULES = (
    "pyvmm.devices.rate_limiter",
    "pyvmm.devices.virtio.mmio",
    "pyvmm.vmm.virtio_service",
    "pyvmm.devices.virtio.block",
    "pyvmm.host.block_file",
    "pyvmm.devices.virtio.net",
    "pyvmm.host.tap",
    "pyvmm.devices.virtio.rng",
    "pyvmm.devices.virtio.balloon",
    "pyvmm.devices.virtio.vsock",
    "pyvmm.host.vsock_uds",
    "pyvmm.vmm.snapshots",
    "pyvmm.snapshot.device_states",
)


def import_on_demand_modules() -> None:
    """Import every device model and the snapshot code now.

    For a process with time to spare before its VM is configured
    (``pyvmm-firecracker`` waiting for API requests): InstanceStart or a
    snapshot load then imports nothing. ``pyvmm run`` never calls it.
    """
    import importlib

    for name in ON_DEMAND_MODULES:
        importlib.import_module(name)


def _block(drive: DriveConfig, index: int) -> tuple[VirtioDevice, Backend]:
    from pyvmm.devices.rate_limiter import RateLimiter
    from pyvmm.devices.virtio.block import VirtioBlock
    from pyvmm.host.block_file import BlockFile

    block = BlockFile(drive.path, read_only=drive.read_only)
    serial = f"pyvmm-vd{chr(ord('a') + index)}"
    limiter = RateLimiter.from_spec(drive.rate_limit)
    return VirtioBlock(block, serial=serial, rate_limiter=limiter), block


def _net(net: NetConfig) -> tuple[VirtioDevice, Backend]:
    from pyvmm.devices.rate_limiter import RateLimiter
    from pyvmm.devices.virtio.net import VirtioNet
    from pyvmm.host.tap import Tap

    tap = Tap.open(net.tap)
    rx = RateLimiter.from_spec(net.rx_rate_limit)
    tx = RateLimiter.from_spec(net.tx_rate_limit)
    return VirtioNet(tap, net.mac_bytes(), rx, tx), tap


def _balloon(balloon: BalloonConfig) -> VirtioDevice:
    from pyvmm.devices.virtio.balloon import PAGES_PER_MIB, VirtioBalloon

    return VirtioBalloon(
        balloon.amount_mib * PAGES_PER_MIB,
        deflate_on_oom=balloon.deflate_on_oom,
        stats_interval_s=balloon.stats_polling_interval_s,
    )


def _vsock(vsock: VsockConfig) -> tuple[VirtioDevice, Backend]:
    from pyvmm.devices.virtio.vsock import VirtioVsock
    from pyvmm.host.vsock_uds import VsockUds

    uds = VsockUds(vsock.uds_path)
    return VirtioVsock(vsock.guest_cid, uds), uds


def _load_guest(
    config: MachineConfig,
    memory: GuestMemory,
    windows: list[MmioWindow],
    vmgenid: VmGenId | None,
) -> BootSetup:
    """Write the ACPI tables, the VM generation id, kernel, initrd and boot parameters."""
    slots = [(w.base, w.size, w.gsi) for w in windows]
    acpi_vmgenid = VmGenIdAcpi(vmgenid.address, layout.GED_GSI) if vmgenid else None
    rsdp_addr = write_acpi_tables(memory, config.vcpus, slots, vmgenid=acpi_vmgenid)
    if vmgenid is not None:
        vmgenid.publish()
    # Kernels built with VIRTIO_MMIO_CMDLINE_DEVICES find devices here;
    # the others (Debian's) through the DSDT.
    announce = "".join(
        f" virtio_mmio.device={size >> 10}K@{base:#x}:{gsi}" for base, size, gsi in slots
    )
    for index, drive in enumerate(config.drives):
        if drive.root:
            mode = "ro" if drive.read_only else "rw"
            announce += f" root=/dev/vd{chr(ord('a') + index)} {mode}"
    return setup_boot(
        memory, config.kernel, config.initrd, config.cmdline + announce, config.vcpus,
        rsdp_addr=rsdp_addr,
    )  # fmt: skip
