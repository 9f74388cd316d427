"""``Machine``: builds a VM from a validated config and owns its lifecycle.

configure (``Machine(config)``) -> :meth:`start` -> :meth:`wait` ->
:meth:`stop`/:meth:`close`. A paused machine can be saved with
:meth:`Machine.snapshot` and brought back, in this or another process, with
:meth:`Machine.restore`; those come from the mixin
:class:`~pyvmm.vmm.snapshots.SnapshotSupport`, which orchestrates
saving and restoring (files and format: :mod:`pyvmm.snapshot`). This module
builds and runs the VM; :class:`VmState` lives in :mod:`pyvmm.vmm.lifecycle`,
shared by both, and is re-exported here.

Whatever ends the VM (a guest reset, a triple fault, a KVM error, a signal,
an exception in a vCPU thread) becomes one :class:`StopReason`, the first
one wins, and teardown always joins every thread and closes every fd. No
global state: several machines can live in one process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyvmm import layout
from pyvmm.boot.acpi import write_acpi_tables
from pyvmm.boot.configure import BootSetup, setup_boot
from pyvmm.config import MachineConfig
from pyvmm.devices.legacy.acpi_pm import AcpiPm, PvPanic
from pyvmm.devices.legacy.boot_timer import BootTimer
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.serial import Serial
from pyvmm.devices.rate_limiter import LimiterPatch, parse_rate_limit
from pyvmm.devices.virtio.block import VirtioBlock
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.mmio import MmioTransport
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.vsock import VirtioVsock
from pyvmm.errors import ConfigError, HostError, VmStateError
from pyvmm.host.block_file import BlockFile
from pyvmm.host.console_input import SerialConsoleInput
from pyvmm.host.tap import Tap
from pyvmm.host.vsock_uds import VsockUds
from pyvmm.kvm import Kvm, Vcpu, Vm
from pyvmm.kvm._kvm_cffi import lib
from pyvmm.kvm.signals import install_kick_handler
from pyvmm.memory import DirtyTrackingMemory, GuestMemory
from pyvmm.vmm.bus import Bus
from pyvmm.vmm.cpuid import TEMPLATES, CpuidTemplate
from pyvmm.vmm.event_loop import EventLoop
from pyvmm.vmm.interrupts import EventFdIrq
from pyvmm.vmm.lifecycle import PAUSE_TIMEOUT, VmState
from pyvmm.vmm.serial_tail import SerialTail
from pyvmm.vmm.snapshots import SnapshotSupport
from pyvmm.vmm.stop_reason import StopKind, StopReason
from pyvmm.vmm.vcpu import VcpuThread
from pyvmm.vmm.vcpu_setup import configure_vcpu, set_boot_state
from pyvmm.vmm.virtio_service import (
    patch_limiter,
    queue_kick_handler,
    queue_server,
    watch_net_backend,
)

log = logging.getLogger(__name__)

_REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": lib.KVM_CAP_IRQCHIP,
    "KVM_CAP_USER_MEMORY": lib.KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": lib.KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_EXT_CPUID": lib.KVM_CAP_EXT_CPUID,
    "KVM_CAP_PIT2": lib.KVM_CAP_PIT2,
    "KVM_CAP_IRQFD": lib.KVM_CAP_IRQFD,
    "KVM_CAP_IMMEDIATE_EXIT": lib.KVM_CAP_IMMEDIATE_EXIT,
}
_JOIN_TIMEOUT = 10.0


def host_is_pvm() -> bool:
    """True when /dev/kvm is provided by the PVM module (see ENVIRONMENT.md)."""
    return os.path.exists("/sys/module/kvm_pvm")


def resolve_template(name: str) -> CpuidTemplate:
    """The CPUID template called ``name``; "auto" picks the one this host needs."""
    if name == "auto":
        return TEMPLATES["pvm"] if host_is_pvm() else TEMPLATES["none"]
    return TEMPLATES[name]


class Machine(SnapshotSupport):
    """One microVM: guest memory, KVM objects, devices and threads.

    ``snapshot``, ``restore`` and the first-resume-after-restore work are
    inherited from :class:`~pyvmm.vmm.snapshots.SnapshotSupport`.
    """

    def __init__(
        self,
        config: MachineConfig,
        serial_out: Callable[[bytes], object] | None = None,
        console_in: int | None = None,
        console_escape: bool = False,
    ) -> None:
        config.validate()
        self.config = config
        self._serial_out = serial_out
        self._console_in = console_in
        self._console_escape = console_escape
        # Diff snapshots need every written page logged (config.track_dirty_pages).
        self._track_dirty = config.track_dirty_pages
        self._has_base = False  # a snapshot exists that a diff can be relative to
        self._restored = False  # the first resume after a restore has work to do
        self._serial_append = False
        self._template = resolve_template(config.cpu_template)
        self._stop_lock = threading.Lock()
        self._lifecycle_lock = threading.Lock()
        self._state = VmState.NOT_STARTED
        self._paused_clock: bytes | None = None
        self._stopped = threading.Event()
        self._stop_reason: StopReason | None = None
        self._closed = False
        self._kvm: Kvm | None = None
        self._vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self._vcpus: list[Vcpu] = []
        self._threads: list[VcpuThread] = []
        self._irqs: list[EventFdIrq] = []
        self._loop: EventLoop | None = None
        self._serial_file: int | None = None
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.serial: Serial | None = None
        self.i8042: I8042 | None = None
        self.boot_timer: BootTimer | None = None
        self._acpi_pm: AcpiPm | None = None
        self._pvpanic: PvPanic | None = None
        self.virtio_transports: list[MmioTransport] = []
        self._notify_fds: list[int] = []
        self._block_files: list[BlockFile] = []
        self._servers: list[Callable[[int], None]] = []  # serve(queue) per virtio transport
        self._taps: list[Tap] = []
        self._vsock_backends: list[VsockUds] = []
        self.boot: BootSetup | None = None
        self.serial_tail: SerialTail | None = None
        self.start_ns = 0
        self.first_run_ns = 0

    # --- lifecycle ------------------------------------------------------
    def start(self) -> None:
        """Build everything and start the vCPUs; on failure nothing is left open."""
        with self._lifecycle_lock:
            if self._state is not VmState.NOT_STARTED or self._closed:
                raise VmStateError(f"the VM cannot start: it is {self.state.value.lower()}")
            self.start_ns = time.monotonic_ns()
            try:
                self._build()
            except BaseException:
                self.close()
                raise
            self._loop.start()
            for thread in self._threads:
                thread.start()
            self.first_run_ns = time.monotonic_ns()
            self._state = VmState.RUNNING

    @property
    def vcpu_threads(self) -> tuple[VcpuThread, ...]:
        """The vCPU threads (their exit counts feed the metrics)."""
        return tuple(self._threads)

    @property
    def state(self) -> VmState:
        if self._stopped.is_set():
            return VmState.STOPPED
        return self._state

    def pause(self) -> None:
        """Park every vCPU out of ``KVM_RUN`` and the device loop; the guest's clock stops.

        Returns once nothing runs guest code or touches guest memory. The
        kvmclock value is saved here and restored by :meth:`resume`, so the
        guest sees no jump in its time (QEMU does the same); each vCPU also
        tells its guest it was stopped (``KVM_KVMCLOCK_CTRL``).
        """
        with self._lifecycle_lock:
            if self.state is not VmState.RUNNING:
                raise VmStateError(f"the VM cannot pause: it is {self.state.value.lower()}")
            for thread in self._threads:
                thread.request_pause()
            deadline = time.monotonic() + PAUSE_TIMEOUT
            for thread in self._threads:
                while not thread.parked.wait(0.05):
                    if not thread.alive or self._stopped.is_set():
                        self._resume_threads()
                        raise VmStateError("the VM stopped while pausing")
                    if time.monotonic() > deadline:
                        self._resume_threads()
                        raise HostError(
                            f"vcpu{thread.vcpu.id} did not pause within {PAUSE_TIMEOUT:g} s"
                        )
            try:
                self._loop.pause(PAUSE_TIMEOUT)
            except TimeoutError as exc:
                self._resume_threads()
                raise HostError(str(exc)) from None
            self._paused_clock = self._vm.get_clock()
            self._state = VmState.PAUSED
            log.debug("paused")

    def resume(self) -> None:
        """Continue a paused guest where it stopped, its clock where it was."""
        with self._lifecycle_lock:
            if self.state is not VmState.PAUSED:
                raise VmStateError(f"the VM cannot resume: it is {self.state.value.lower()}")
            if self._paused_clock is not None:
                self._vm.set_clock(self._paused_clock)
                self._paused_clock = None
            if self._restored:
                self._restored = False
                self._after_restore()
            self._loop.resume()
            self._resume_threads()
            self._state = VmState.RUNNING
            log.debug("resumed")

    # --- changes while running (Firecracker's PATCH /drives, /network-interfaces) ----
    def update_drive(
        self,
        drive_id: str,
        path: str | Path | None = None,
        limiter: LimiterPatch | None = None,
    ) -> None:
        """Point drive ``drive_id`` at another image and/or change its rate limiter.

        The new image is opened (and locked) before anything changes, so a
        bad path leaves the drive as it was; the guest is told the new
        capacity by a config-change interrupt. Requests a limiter held back
        are served again at once under the new one.
        """
        with self._lifecycle_lock:
            index = self._index_of(drive_id, [d.drive_id for d in self.config.drives], "drive")
            drive = self.config.drives[index]
            transport = self.virtio_transports[index]
            if path is not None:
                backend = BlockFile(Path(path), read_only=drive.read_only)
                try:
                    old = transport.run_locked(lambda device: device.replace_backend(backend))
                except ValueError as exc:
                    backend.close()
                    raise ConfigError(f"drive {drive_id!r}: {exc}") from None
                self._block_files[index] = backend
                old.close()
                drive = dataclasses.replace(drive, path=Path(path))
            if limiter is not None:
                patch_limiter(transport, "rate_limiter", limiter)
                serve = self._servers[index]
                self._loop.call_soon(lambda: serve(0))
            drives = list(self.config.drives)
            drives[index] = drive
            self.config = dataclasses.replace(self.config, drives=tuple(drives))

    def update_net(
        self,
        iface_id: str,
        rx: LimiterPatch | None = None,
        tx: LimiterPatch | None = None,
    ) -> None:
        """Change the RX and/or TX rate limiter of interface ``iface_id``."""
        with self._lifecycle_lock:
            ids = [n.iface_id for n in self.config.nets]
            index = len(self.config.drives) + self._index_of(iface_id, ids, "network interface")
            transport = self.virtio_transports[index]
            for name, patch in (("rx_rate_limiter", rx), ("tx_rate_limiter", tx)):
                if patch is not None:
                    patch_limiter(transport, name, patch)
            serve = self._servers[index]
            self._loop.call_soon(lambda: (serve(0), serve(1)))

    @staticmethod
    def _index_of(wanted: str, ids: list[str | None], kind: str) -> int:
        try:
            return ids.index(wanted)
        except ValueError:
            known = ", ".join(repr(i) for i in ids if i) or "none"
            raise ConfigError(f"no {kind} {wanted!r} (known: {known})") from None

    def _resume_threads(self) -> None:
        for thread in self._threads:
            thread.resume()

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """Block until the VM stops (or ``timeout`` passes: then None)."""
        if not self._stopped.wait(timeout):
            return None
        return self._stop_reason

    def stop(self, reason: StopReason | None = None) -> None:
        """Ask the VM to stop; the first reason recorded wins. Any thread may call."""
        self._record_stop(reason or StopReason(StopKind.USER_QUIT, "stopped by request"))

    def run(self, timeout: float | None = None) -> StopReason:
        """start + wait + close; a timeout becomes a TIMEOUT stop."""
        self.start()
        try:
            reason = self.wait(timeout)
            if reason is None:
                self.stop(
                    StopReason(StopKind.TIMEOUT, f"the guest did not stop within {timeout:g} s")
                )
                reason = self.wait()
            return reason
        finally:
            self.close()

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop_reason

    def send_ctrl_alt_del(self) -> None:
        """Press Ctrl-Alt-Del on the guest's keyboard."""
        if self.i8042 is not None:
            self.i8042.trigger_ctrl_alt_del()

    def close(self) -> None:
        """Stop and tear down: join threads, close every fd; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._stop_reason is None:
            self._record_stop(StopReason(StopKind.USER_QUIT, "machine closed"))
        for thread in self._threads:
            thread.request_stop()
        for thread in self._threads:
            if not thread.join(_JOIN_TIMEOUT):
                log.error("vcpu%d did not stop within %g s", thread.vcpu.id, _JOIN_TIMEOUT)
        if self._loop is not None:
            self._loop.stop()  # no callback runs from here on
        for backend in self._vsock_backends:
            backend.close()
        self._vsock_backends.clear()
        if self._loop is not None:
            self._loop.close()
        for vcpu in self._vcpus:
            vcpu.close()
        if self._vm is not None:
            self._vm.close()
        for irq in self._irqs:
            irq.close()
        for fd in self._notify_fds:
            os.close(fd)
        self._notify_fds.clear()
        for backend in self._block_files:
            backend.close()
        self._block_files.clear()
        for tap in self._taps:
            tap.close()
        self._taps.clear()
        if self.memory is not None:
            self.memory.close()
        if self._kvm is not None:
            self._kvm.close()
        if self._serial_file is not None:
            os.close(self._serial_file)
            self._serial_file = None

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- building -------------------------------------------------------
    def _build(self, mem_file: int | None = None) -> None:
        """Create memory, KVM objects, devices and vCPU threads.

        Booting (``mem_file`` None): load the kernel and tables and set the
        boot vCPU state. Restoring: map guest RAM from ``mem_file`` and leave
        the vCPUs blank, for :meth:`_load_snapshot` to fill in.
        """
        config = self.config
        memory_type = DirtyTrackingMemory if self._track_dirty else GuestMemory
        if mem_file is None:
            self.memory = memory_type.with_size(config.mem_size)
        else:
            self.memory = memory_type.from_file(config.mem_size, mem_file)
        self._loop = EventLoop()  # host back ends (vsock) subscribe while being built
        virtio_devices = self._virtio_devices()
        slots = [
            (
                layout.VIRTIO_MMIO_START + index * layout.MMIO_DEVICE_WINDOW,
                layout.MMIO_DEVICE_WINDOW,
                layout.VIRTIO_GSI_START + index,
            )
            for index in range(len(virtio_devices))
        ]
        if mem_file is None:
            self.boot = self._load_guest(slots)
        self._kvm = Kvm()
        self._check_capabilities(self._kvm)
        self._vm = vm = self._kvm.create_vm()
        vm.set_tss_address(layout.KVM_TSS_ADDR)
        vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2()
        slot_flags = lib.KVM_MEM_LOG_DIRTY_PAGES if self._track_dirty else 0
        for slot, region in enumerate(self.memory):
            vm.set_user_memory_region(slot, region.guest_addr, region.mapping, slot_flags)
        self._add_devices(vm)
        for device, slot in zip(virtio_devices, slots, strict=True):
            self._add_virtio_device(vm, device, *slot)
        kick_signal = install_kick_handler()
        supported = self._kvm.supported_cpuid()
        msr_indices = set(self._kvm.msr_index_list())
        for vcpu_id in range(config.vcpus):
            vcpu = vm.create_vcpu(vcpu_id)
            self._vcpus.append(vcpu)
            if mem_file is None:
                configure_vcpu(vcpu, supported, msr_indices, config.vcpus, self._template)
                if vcpu_id == 0:
                    set_boot_state(vcpu, self.boot.cpu)
            self._threads.append(
                VcpuThread(vcpu, self.pio_bus, self.mmio_bus, self._record_stop, kick_signal)
            )

    def _load_guest(self, slots: list[tuple[int, int, int]]) -> BootSetup:
        """Write the ACPI tables, kernel, initrd and boot parameters into guest RAM."""
        config = self.config
        rsdp_addr = write_acpi_tables(self.memory, config.vcpus, slots)
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
            self.memory,
            config.kernel,
            config.initrd,
            config.cmdline + announce,
            config.vcpus,
            rsdp_addr=rsdp_addr,
        )

    def _check_capabilities(self, kvm: Kvm) -> None:
        missing = [name for name, cap in _REQUIRED_CAPS.items() if not kvm.check_extension(cap)]
        if missing:
            raise HostError(f"this host's KVM lacks {', '.join(missing)}")
        max_vcpus = kvm.check_extension(lib.KVM_CAP_MAX_VCPUS) or kvm.check_extension(
            lib.KVM_CAP_NR_VCPUS
        )
        if max_vcpus and self.config.vcpus > max_vcpus:
            raise HostError(f"this host's KVM supports at most {max_vcpus} vCPUs")

    def _irq(self, vm: Vm, gsi: int) -> EventFdIrq:
        irq = EventFdIrq(gsi)
        self._irqs.append(irq)
        vm.register_irqfd(irq.fd, gsi)
        return irq

    def _add_devices(self, vm: Vm) -> None:
        self.serial_tail = SerialTail(self._make_serial_writer())
        self.serial = Serial(self._irq(vm, layout.COM1_IRQ), self.serial_tail)
        self.pio_bus.add(layout.COM1_PORT, layout.UART_PORT_COUNT, self.serial, "com1")
        self.i8042 = I8042(self._irq(vm, layout.I8042_IRQ), self._on_guest_reset)
        self.pio_bus.add(layout.I8042_DATA_PORT, 5, self.i8042, "i8042")
        self._acpi_pm = AcpiPm(on_poweroff=self._on_guest_poweroff, on_reset=self._on_acpi_reset)
        self.pio_bus.add(layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_COUNT, self._acpi_pm, "acpi-pm")
        self._pvpanic = PvPanic(self._on_guest_panic)
        self.pio_bus.add(layout.PVPANIC_PORT, layout.PVPANIC_PORT_COUNT, self._pvpanic, "pvpanic")
        self.boot_timer = BootTimer(self.start_ns)
        self.mmio_bus.add(
            layout.BOOT_TIMER_ADDR, layout.MMIO_DEVICE_WINDOW, self.boot_timer, "boot-timer"
        )
        if self._console_in is not None:
            SerialConsoleInput(
                self._loop,
                self._console_in,
                self.serial,
                on_quit=lambda: self.stop(StopReason(StopKind.USER_QUIT, "Ctrl-A X pressed")),
                escape=self._console_escape,
            ).start()

    def _virtio_devices(self) -> list[VirtioDevice]:
        """The configured virtio devices, drives first (so drive n is /dev/vd<a+n>)."""
        devices: list[VirtioDevice] = []
        for index, drive in enumerate(self.config.drives):
            backend = BlockFile(drive.path, read_only=drive.read_only)
            self._block_files.append(backend)
            limiter = parse_rate_limit(drive.rate_limit) if drive.rate_limit else None
            serial = f"pyvmm-vd{chr(ord('a') + index)}"
            devices.append(VirtioBlock(backend, serial=serial, rate_limiter=limiter))
        for net in self.config.nets:
            tap = Tap.open(net.tap)
            self._taps.append(tap)
            rx_limiter = parse_rate_limit(net.rx_rate_limit) if net.rx_rate_limit else None
            tx_limiter = parse_rate_limit(net.tx_rate_limit) if net.tx_rate_limit else None
            devices.append(VirtioNet(tap, net.mac_bytes(), rx_limiter, tx_limiter))
        if self.config.rng:
            rng_rate = self.config.rng_rate_limit
            devices.append(VirtioRng(rate_limiter=parse_rate_limit(rng_rate) if rng_rate else None))
        if self.config.vsock is not None:
            backend = VsockUds(self._loop, self.config.vsock.uds_path)
            self._vsock_backends.append(backend)
            devices.append(VirtioVsock(self.config.vsock.guest_cid, backend))
        if len(devices) > layout.MAX_VIRTIO_DEVICES:
            raise ConfigError(f"at most {layout.MAX_VIRTIO_DEVICES} virtio devices are supported")
        return devices

    def _add_virtio_device(
        self, vm: Vm, device: VirtioDevice, base: int, size: int, gsi: int
    ) -> None:
        """Put ``device`` behind a virtio-mmio window; queue kicks reach the event loop.

        Each queue's QueueNotify write is an ioeventfd (no exit to Python on
        the vCPU thread); the event loop thread processes the queue, and the
        device interrupts the guest through an irqfd.
        """
        transport = MmioTransport(device, self._irq(vm, gsi), self.memory)
        self.mmio_bus.add(base, size, transport, f"virtio-mmio@{base:#x}")
        serve = queue_server(self._loop, transport, device)
        self._servers.append(serve)
        for index in range(len(device.queue_max_sizes)):
            notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._notify_fds.append(notify)
            vm.register_ioeventfd(notify, base + layout.VIRTIO_MMIO_NOTIFY_OFFSET, 4, index)
            self._loop.add_reader(notify, queue_kick_handler(notify, serve, index))
        if isinstance(device, VirtioNet):
            watch_net_backend(self._loop, device, serve)
        elif isinstance(device, VirtioVsock):
            # Host sockets with news: the device collects them on its RX queue.
            device.backend.attach(lambda: serve(0))
        self.virtio_transports.append(transport)

    def _make_serial_writer(self) -> Callable[[bytes], object]:
        if self.config.serial_out is not None:
            path = Path(self.config.serial_out)
            mode = os.O_APPEND if self._serial_append else os.O_TRUNC
            self._serial_file = os.open(path, os.O_WRONLY | os.O_CREAT | mode | os.O_CLOEXEC)
            fd = self._serial_file
            return lambda data: os.write(fd, data)
        if self._serial_out is not None:
            return self._serial_out
        return lambda data: None

    # --- stopping -------------------------------------------------------
    def _explain(self, reason: StopReason) -> StopReason:
        """Add what the serial console shows: a panic, or the last line printed."""
        tail = self.serial_tail
        if tail is None:
            return reason
        if reason.kind is StopKind.RESET:
            panic = tail.panic_line()
            if panic is not None:
                return StopReason(StopKind.GUEST_CRASH, f"guest kernel panicked: {panic}")
        if reason.kind is StopKind.TIMEOUT:
            last = tail.last_line()
            shown = f"the guest last printed: {last[:200]!r}" if last else "it printed nothing"
            return StopReason(reason.kind, f"{reason.message}; {shown}")
        return reason

    def _on_guest_reset(self) -> None:
        self._record_stop(StopReason(StopKind.RESET, "guest reset (i8042)"))

    def _on_acpi_reset(self) -> None:
        self._record_stop(StopReason(StopKind.RESET, "guest reset (ACPI reset register)"))

    def _on_guest_poweroff(self) -> None:
        self._record_stop(StopReason(StopKind.POWEROFF, "guest powered off (ACPI S5)"))

    def _on_guest_panic(self) -> None:
        panic = self.serial_tail.panic_line() if self.serial_tail else None
        detail = f": {panic}" if panic else ""
        self._record_stop(
            StopReason(StopKind.GUEST_CRASH, f"guest kernel panicked (pvpanic){detail}")
        )

    def _record_stop(self, reason: StopReason) -> None:
        reason = self._explain(reason)
        with self._stop_lock:
            if self._stop_reason is not None:
                return
            self._stop_reason = reason
        log.debug("stopping: %s", reason)
        for thread in self._threads:
            thread.request_stop()
        self._stopped.set()
