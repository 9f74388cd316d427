"""The device manager: a machine's devices by id, with their buses, interrupts and back ends.

It owns what the guest can touch besides RAM and vCPUs:

* the legacy platform (COM1 + console input, i8042, ACPI PM, pvpanic, the
  boot timer) on the port-I/O and MMIO buses, under fixed names, and the
  VM generation id (``vmgenid``: in guest memory, on no bus), which a
  restored clone changes (:meth:`new_generation`);
* the virtio devices, each in its virtio-mmio window with an irqfd line,
  one ioeventfd per queue and its host back end, under its config id
  (``drive_id``, ``iface_id``, ``rng``, ``vsock``);
* their persistence (:meth:`save` / :meth:`restore`, matched by name) and
  the live changes Firecracker allows after boot (:meth:`update_drive`,
  :meth:`update_net`).

Back ends wire themselves: each has ``subscribe(loop, wake)`` (see
:class:`pyvmm.host.events.Backend`) and the manager never asks what kind
it is. Every fd and back end it opens is registered on the machine's
``ExitStack``, so teardown closes each exactly once, on every path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pyvmm import layout
from pyvmm.config import DriveConfig, NetConfig
from pyvmm.devices.legacy.acpi_pm import AcpiPm, PvPanic
from pyvmm.devices.legacy.boot_timer import BootTimer
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.serial import Serial
from pyvmm.devices.legacy.vmgenid import VmGenId
from pyvmm.devices.virtio.ids import (
    VIRTIO_ID_BALLOON,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
    VIRTIO_ID_VSOCK,
)
from pyvmm.errors import ConfigError
from pyvmm.vmm.bus import Bus
from pyvmm.vmm.interrupts import EventFdIrq
from pyvmm.vmm.serial_tail import SerialTail
from pyvmm.vmm.stop_reason import StopKind, StopReason

if TYPE_CHECKING:  # the virtio side is imported when a machine has a virtio device
    from pyvmm.devices.rate_limiter import LimiterPatch
    from pyvmm.devices.virtio.device import VirtioDevice
    from pyvmm.devices.virtio.mmio import MmioTransport
    from pyvmm.host.events import Backend
    from pyvmm.kvm import Vm
    from pyvmm.memory import GuestMemory
    from pyvmm.snapshot.device_states import DevicesState
    from pyvmm.vmm.event_loop import EventLoop

log = logging.getLogger(__name__)

StopSink = Callable[[StopReason], None]


class MmioWindow(NamedTuple):
    """Where a virtio device sits: its MMIO window and interrupt line."""

    base: int
    size: int
    gsi: int


def virtio_windows(count: int) -> list[MmioWindow]:
    """The windows of ``count`` virtio devices, in device order (ACPI and the cmdline need them
    before any device exists)."""
    return [
        MmioWindow(
            layout.VIRTIO_MMIO_START + index * layout.MMIO_DEVICE_WINDOW,
            layout.MMIO_DEVICE_WINDOW,
            layout.VIRTIO_GSI_START + index,
        )
        for index in range(count)
    ]


@dataclass
class VirtioSlot:
    """One virtio device as the machine holds it."""

    device_id: str
    transport: MmioTransport
    backend: Backend | None
    serve: Callable[[int], None]  # process queue n on the event loop
    notify_fds: tuple[int, ...]
    window: MmioWindow

    @property
    def device(self) -> VirtioDevice:
        return self.transport.device


class DeviceManager:
    """Devices by id; see the module docstring."""

    def __init__(
        self,
        vm: Vm,
        memory: GuestMemory,
        loop: EventLoop,
        resources: contextlib.ExitStack,
        on_stop: StopSink,
    ) -> None:
        self._vm = vm
        self._memory = memory
        self._loop = loop
        self._resources = resources
        self._on_stop = on_stop
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.legacy: dict[str, object] = {}
        self.virtio: dict[str, VirtioSlot] = {}
        self.serial: Serial | None = None
        self.i8042: I8042 | None = None
        self.serial_tail: SerialTail | None = None
        self.vmgenid: VmGenId | None = None

    # --- building -------------------------------------------------------------------
    def _irq(self, gsi: int) -> EventFdIrq:
        irq = EventFdIrq(gsi)
        self._resources.callback(irq.close)
        self._vm.register_irqfd(irq.fd, gsi)
        return irq

    def add_legacy_devices(self, serial_out: Callable[[bytes], object], start_ns: int) -> None:
        """COM1 (its output through a :class:`SerialTail`), i8042, ACPI PM, pvpanic, boot timer."""
        self.serial_tail = tail = SerialTail(serial_out)
        self.serial = Serial(self._irq(layout.COM1_IRQ), tail)
        self.i8042 = I8042(self._irq(layout.I8042_IRQ), self._guest_reset("i8042"))
        acpi_pm = AcpiPm(
            on_poweroff=lambda: self._on_stop(
                StopReason(StopKind.POWEROFF, "guest powered off (ACPI S5)")
            ),
            on_reset=self._guest_reset("ACPI reset register"),
        )
        pvpanic = PvPanic(self._guest_panic)
        boot_timer = BootTimer(start_ns)
        pio = [
            ("serial", layout.COM1_PORT, layout.UART_PORT_COUNT, self.serial),
            ("i8042", layout.I8042_DATA_PORT, 5, self.i8042),
            ("acpi_pm", layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_COUNT, acpi_pm),
            ("pvpanic", layout.PVPANIC_PORT, layout.PVPANIC_PORT_COUNT, pvpanic),
        ]
        for name, base, size, device in pio:
            self.pio_bus.add(base, size, device, name)
            self.legacy[name] = device
        self.mmio_bus.add(
            layout.BOOT_TIMER_ADDR, layout.MMIO_DEVICE_WINDOW, boot_timer, "boot_timer"
        )
        self.legacy["boot_timer"] = boot_timer

    def add_vmgenid(self) -> VmGenId:
        """The VM generation id at ``layout.VMGENID_ADDR``, announced on ``layout.GED_GSI``.

        On no bus: the guest reads it from memory, at the address the DSDT's
        ``VGEN`` gives. Its ids come from the host kernel's CSPRNG.
        """
        irq = self._irq(layout.GED_GSI)
        self.vmgenid = VmGenId(self._memory, layout.VMGENID_ADDR, irq, os.getrandom)
        self.legacy["vmgenid"] = self.vmgenid
        return self.vmgenid

    def new_generation(self) -> bytes | None:
        """A new VM generation id, written into guest memory, and its interrupt raised.

        On a restored machine whose vCPUs are parked, the interrupt waits in
        the LAPIC state the snapshot restored (a snapshot taken before the
        resume keeps it pending too): the guest takes it as it resumes.
        None for a snapshot taken without the device (an older pyvmm): that
        guest's DSDT has no ``VGEN`` to tell.
        """
        if self.vmgenid is None:
            log.warning("the snapshot has no VM generation id device: the clone keeps its RNG")
            return None
        return self.vmgenid.new_generation()

    def attach_console(self, fd: int, *, escape: bool, on_quit: Callable[[], None]) -> None:
        """Feed ``fd`` (stdin, a pty, a pipe) into COM1; with ``escape``, Ctrl-A X quits."""
        from pyvmm.host.console_input import SerialConsoleInput

        assert self.serial is not None, "add_legacy_devices first"
        SerialConsoleInput(self._loop, fd, self.serial, on_quit=on_quit, escape=escape).start()

    def add_virtio(
        self, device_id: str, device: VirtioDevice, backend: Backend | None, window: MmioWindow
    ) -> VirtioSlot:
        """Put ``device`` behind a virtio-mmio window; kicks and back-end news reach the loop.

        Each queue's QueueNotify write is an ioeventfd (no exit to Python on
        the vCPU thread); the event loop serves the queue, and the device
        interrupts the guest through an irqfd.
        """
        from pyvmm.devices.virtio.mmio import MmioTransport
        from pyvmm.vmm.virtio_service import queue_kick_handler, queue_server

        if backend is not None:
            self._resources.callback(backend.close)
        transport = MmioTransport(device, self._irq(window.gsi), self._memory)
        self.mmio_bus.add(window.base, window.size, transport, f"virtio-mmio@{window.base:#x}")
        serve = queue_server(self._loop, transport, device)
        notify_fds = []
        for index in range(len(device.queue_max_sizes)):
            notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._resources.callback(os.close, notify)
            notify_fds.append(notify)
            self._vm.register_ioeventfd(
                notify, window.base + layout.VIRTIO_MMIO_NOTIFY_OFFSET, 4, index
            )
            self._loop.add_reader(notify, queue_kick_handler(notify, serve, index))
        if backend is not None:
            queue = device.backend_queue
            backend.subscribe(self._loop, lambda: serve(queue))
        slot = VirtioSlot(device_id, transport, backend, serve, tuple(notify_fds), window)
        self.virtio[device_id] = slot
        if device.device_type == VIRTIO_ID_BALLOON and device.stats_interval_s:
            self._loop.call_later(device.stats_interval_s, lambda: self._poll_balloon_stats(slot))
        return slot

    # --- guest events ------------------------------------------------------------------
    def _guest_reset(self, source: str) -> Callable[[], None]:
        return lambda: self._on_stop(StopReason(StopKind.RESET, f"guest reset ({source})"))

    def _guest_panic(self) -> None:
        panic = self.serial_tail.panic_line() if self.serial_tail else None
        detail = f": {panic}" if panic else ""
        self._on_stop(StopReason(StopKind.GUEST_CRASH, f"guest kernel panicked (pvpanic){detail}"))

    # --- persistence ---------------------------------------------------------------------
    def save(self) -> DevicesState:
        """Every device's state (call while the VM is paused)."""
        from pyvmm.snapshot.device_states import DevicesState

        return DevicesState(
            legacy={name: device.save() for name, device in self.legacy.items()},
            virtio={device_id: slot.transport.save() for device_id, slot in self.virtio.items()},
        )

    def restore(self, state: DevicesState) -> None:
        """Load ``state`` into the devices built from the same config; SnapshotError if it
        does not fit (a device missing on either side, or a state its device refuses)."""
        from pyvmm.snapshot.files import SnapshotError

        for kind, saved, built in (
            ("legacy device", state.legacy, self.legacy),
            ("virtio device", state.virtio, self.virtio),
        ):
            if set(saved) != set(built):
                missing = sorted(set(built) - set(saved)) or sorted(set(saved) - set(built))
                raise SnapshotError(
                    f"the snapshot's {kind}s ({', '.join(sorted(saved)) or 'none'}) differ from "
                    f"the machine's ({', '.join(sorted(built)) or 'none'}): {missing[0]!r}"
                )
        parts: list[tuple[str, object, object]] = [
            (name, self.legacy[name], saved) for name, saved in state.legacy.items()
        ]
        parts += [
            (f"{device_id} (virtio type {self.virtio[device_id].device.device_type})",
             self.virtio[device_id].transport, saved)
            for device_id, saved in state.virtio.items()
        ]  # fmt: skip
        for name, device, saved in parts:
            try:
                device.restore(saved)
            except (ValueError, TypeError) as exc:
                raise SnapshotError(f"cannot restore device {name}: {exc}") from None

    def after_restore(self) -> None:
        """First resume after a restore: reset vsock connections, re-kick every queue.

        A queue kick the old process had not processed yet was lost with its
        eventfd; kicking each queue once more is harmless for the others.
        """
        for slot in self.virtio.values():
            if slot.device.device_type == VIRTIO_ID_VSOCK:
                slot.transport.run_locked(lambda device: device.send_transport_reset())
            for fd in slot.notify_fds:
                os.eventfd_write(fd, 1)

    # --- live changes (Firecracker's PATCH /drives and /network-interfaces) ----------------
    def _slot(self, device_id: str, device_type: int, what: str) -> VirtioSlot:
        slot = self.virtio.get(device_id)
        if slot is None or slot.device.device_type != device_type:
            known = [i for i, s in self.virtio.items() if s.device.device_type == device_type]
            raise ConfigError(
                f"no {what} {device_id!r} (known: {', '.join(map(repr, known)) or 'none'})"
            )
        return slot

    def update_drive(
        self,
        drive_id: str,
        drive: DriveConfig,
        path: Path | None,
        limiter: LimiterPatch | None,
    ) -> DriveConfig:
        """Point drive ``drive_id`` at another image and/or patch its limiter; the new config.

        The new image is opened (and locked) before anything changes, so a
        bad path leaves the drive as it was; the guest learns the new
        capacity from a config-change interrupt. The same file again (an
        orchestrator re-asserting the path, or a file resized in place) is
        reopened without fighting our own lock.
        """
        from pyvmm.host.block_file import BlockFile
        from pyvmm.vmm.virtio_service import patch_limiter

        slot = self._slot(drive_id, VIRTIO_ID_BLOCK, "drive")
        if path is not None:
            old = slot.backend
            assert isinstance(old, BlockFile)
            same = old.same_file(path)
            backend = old.reopen() if same else BlockFile(path, drive.read_only)
            try:
                slot.transport.run_locked(lambda device: device.replace_backend(backend))
            except ValueError as exc:
                backend.close()
                raise ConfigError(f"drive {drive_id!r}: {exc}") from None
            slot.backend = backend
            self._resources.callback(backend.close)
            old.close()
            if same:
                try:
                    backend.take_lock()
                except ConfigError as exc:  # someone grabbed it in between: keep serving
                    log.warning("%s", exc)
            drive = dataclasses.replace(drive, path=Path(path))
        if limiter is not None:
            patch_limiter(slot.transport, "rate_limiter", limiter)
            drive = dataclasses.replace(drive, rate_limit=limiter.apply_to_spec(drive.rate_limit))
            self._loop.call_soon(lambda: slot.serve(0))
        return drive

    def update_net(
        self,
        iface_id: str,
        net: NetConfig,
        rx: LimiterPatch | None,
        tx: LimiterPatch | None,
    ) -> NetConfig:
        """Patch the RX and/or TX limiter of interface ``iface_id``; the new config."""
        from pyvmm.vmm.virtio_service import patch_limiter

        slot = self._slot(iface_id, VIRTIO_ID_NET, "network interface")
        if rx is not None:
            patch_limiter(slot.transport, "rx_rate_limiter", rx)
            net = dataclasses.replace(net, rx_rate_limit=rx.apply_to_spec(net.rx_rate_limit))
        if tx is not None:
            patch_limiter(slot.transport, "tx_rate_limiter", tx)
            net = dataclasses.replace(net, tx_rate_limit=tx.apply_to_spec(net.tx_rate_limit))
        self._loop.call_soon(lambda: (slot.serve(0), slot.serve(1)))
        return net

    # --- the balloon (Firecracker's PATCH /balloon and /balloon/statistics) -----------------
    def _balloon(self) -> VirtioSlot:
        return self._slot("balloon", VIRTIO_ID_BALLOON, "balloon device")

    def set_balloon_target(self, amount_mib: int) -> None:
        """A new balloon target; the guest's driver inflates or deflates towards it."""
        from pyvmm.devices.virtio.balloon import PAGES_PER_MIB

        pages = amount_mib * PAGES_PER_MIB
        self._balloon().transport.run_locked(lambda device: device.set_target_pages(pages))

    def balloon_stats(self) -> dict[str, int]:
        """The balloon's sizes and the guest's latest memory statistics."""
        return self._balloon().transport.run_locked(lambda device: device.stats())

    def set_balloon_stats_interval(self, seconds: int) -> None:
        """Refresh statistics every ``seconds`` from now on (the next refresh is immediate)."""
        slot = self._balloon()
        slot.transport.run_locked(lambda device: setattr(device, "stats_interval_s", seconds))
        self._loop.call_soon(lambda: self._poll_balloon_stats(slot, reschedule=False))

    def _poll_balloon_stats(self, slot: VirtioSlot, *, reschedule: bool = True) -> None:
        """Ask the driver for fresh statistics; runs on the event loop every interval."""
        device = slot.device
        assert device.device_type == VIRTIO_ID_BALLOON
        if device.activated:
            slot.transport.run_locked(lambda device: device.request_stats())
        if reschedule and device.stats_interval_s:
            self._loop.call_later(device.stats_interval_s, lambda: self._poll_balloon_stats(slot))

    # --- observability --------------------------------------------------------------------
    def device_stats(self) -> dict[str, dict[str, int]]:
        """Every virtio device's counters, as Firecracker names its metric groups.

        ``block_<drive id>``, ``net_<iface id>``, ``entropy`` and ``vsock``.
        """
        groups: dict[str, dict[str, int]] = {}
        for device_id, slot in self.virtio.items():
            device = slot.device
            if device.device_type == VIRTIO_ID_BALLOON:
                groups["balloon"] = dataclasses.asdict(device.counters)
                continue
            if device.device_type == VIRTIO_ID_BLOCK:
                name = f"block_{device_id}"
            elif device.device_type == VIRTIO_ID_NET:
                name = f"net_{device_id}"
            else:
                name = "entropy" if device_id == "rng" else device_id
            stats = getattr(device, "stats", None)
            if dataclasses.is_dataclass(stats):
                groups[name] = dataclasses.asdict(stats)
            elif hasattr(device, "bytes_served"):
                groups[name] = {"bytes": device.bytes_served}
        return groups
