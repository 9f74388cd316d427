"""``Machine``: one microVM's lifecycle, and nothing else.

``Machine(config)`` -> :meth:`start` (or :meth:`Machine.restore`) ->
:meth:`pause` / :meth:`resume` / :meth:`snapshot` / device updates ->
:meth:`wait` -> :meth:`close`. What is allowed when is one table
(:mod:`pyvmm.vmm.lifecycle`); how the VM is built is
:mod:`pyvmm.vmm.builder`; how it runs, parks and is torn down is
:class:`~pyvmm.vmm.vmm.Vmm`; devices are :mod:`pyvmm.vmm.device_manager`'s;
what a snapshot holds and in which order it is taken is
:mod:`pyvmm.vmm.snapshots`.

Whatever ends the VM - a guest reset or power-off, a triple fault, a KVM
error, a signal, an exception on any pyvmm thread - becomes one
:class:`StopReason`; the first one wins, and :meth:`close` always joins
every thread and closes every fd. No global state: several machines can
live in one process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.config import MachineConfig, finite_timeout
from pyvmm.errors import ConfigError
from pyvmm.vmm.builder import BuildContext, ConsoleIO, build_for_boot
from pyvmm.vmm.lifecycle import Action, Lifecycle, VmState
from pyvmm.vmm.stop_reason import StopKind, StopReason, explain
from pyvmm.vmm.threads import NO_SETUP, ThreadSetup

if TYPE_CHECKING:
    from pyvmm.boot.configure import BootSetup
    from pyvmm.devices.base import BusDevice
    from pyvmm.devices.rate_limiter import LimiterPatch
    from pyvmm.snapshot.state import MicrovmState
    from pyvmm.vmm.device_manager import DeviceManager
    from pyvmm.vmm.vcpu import VcpuThread
    from pyvmm.vmm.vmm import Vmm

__all__ = ["Machine", "StopKind", "StopReason", "VmState"]

log = logging.getLogger(__name__)


class Machine:
    """One microVM; see the module docstring.

    ``serial_out`` receives the guest's console output (unless the config
    names a ``serial_out`` file), ``console_in`` is an fd whose bytes are
    typed into the guest's UART, ``console_escape`` turns on Ctrl-A X and
    friends (for a terminal). ``thread_setup`` runs on each pyvmm thread
    before it touches anything the guest controls (confinement).
    """

    def __init__(
        self,
        config: MachineConfig,
        serial_out: Callable[[bytes], object] | None = None,
        console_in: int | None = None,
        console_escape: bool = False,
        *,
        thread_setup: ThreadSetup = NO_SETUP,
    ) -> None:
        self.config = config
        self._console = ConsoleIO(serial_out, console_in, console_escape)
        self._thread_setup = thread_setup
        self._lifecycle = Lifecycle()
        self._vmm: Vmm | None = None
        self._extra_pio: list[tuple[int, int, BusDevice, str]] = []
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self._stop_reason: StopReason | None = None
        self._closed = False
        self._restored = False  # the first resume after a restore has work to do
        #: The id of this machine's latest snapshot (or the one it was restored from):
        #: what a diff snapshot is relative to.
        self._base_id: str | None = None
        self.boot: BootSetup | None = None
        self.start_ns = 0
        self.first_run_ns = 0

    # --- the built parts, for front ends and tests ---------------------------------------
    @property
    def state(self) -> VmState:
        return VmState.STOPPED if self._stopped.is_set() else self._lifecycle.state

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop_reason

    @property
    def vmm(self) -> Vmm:
        """The built VM (after :meth:`start` or a restore)."""
        if self._vmm is None:
            raise RuntimeError("the machine is not built yet")
        return self._vmm

    @property
    def devices(self) -> DeviceManager:
        return self.vmm.devices

    @property
    def vcpu_threads(self) -> tuple[VcpuThread, ...]:
        """The vCPU threads (their exit counts feed the metrics)."""
        return tuple(self._vmm.threads) if self._vmm is not None else ()

    def add_pio_device(self, base: int, size: int, device: BusDevice, name: str) -> None:
        """Put an extra port-I/O device on the bus when the machine is built (tools, tests)."""
        self._extra_pio.append((base, size, device, name))

    def _context(self) -> BuildContext:
        return BuildContext(self._console, self._record_stop, self._thread_setup, self.start_ns)

    def _install(self, vmm: Vmm) -> None:
        self._vmm = vmm
        for base, size, device, name in self._extra_pio:
            vmm.devices.pio_bus.add(base, size, device, name)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Build everything and start the vCPUs; on failure nothing is left open."""
        with self._lifecycle.lock:
            self._lifecycle.check(Action.START)
            if self._closed:
                raise RuntimeError("the machine was closed")
            self.start_ns = time.monotonic_ns()
            try:
                vmm, self.boot = build_for_boot(self.config, self._context())
                self._install(vmm)
                vmm.start()
            except BaseException:
                self.close()
                raise
            self.first_run_ns = time.monotonic_ns()
            self._lifecycle.advance(Action.START)

    @classmethod
    def restore(
        cls,
        state_path: str | Path,
        mem_path: str | Path,
        *,
        serial_out: Callable[[bytes], object] | None = None,
        console_in: int | None = None,
        console_escape: bool = False,
        net_overrides: dict[str, str] | None = None,
        vsock_uds: str | Path | None = None,
        track_dirty_pages: bool | None = None,
        resume: bool = False,
        thread_setup: ThreadSetup = NO_SETUP,
        new_generation: bool = True,
    ) -> Machine:
        """A machine continuing from a snapshot, paused (or running with ``resume``).

        Guest RAM is mapped copy-on-write from ``mem_path`` (the file is
        never written); drives are reopened, TAPs renamed through
        ``net_overrides`` ({old TAP name or interface id: new TAP name}),
        the vsock socket created afresh (at ``vsock_uds`` if given) and every
        vsock connection reset, as in Firecracker. The restored machine
        knows its whole config (:attr:`config`).

        ``new_generation`` (the default, as in Firecracker) gives the VM a new
        VM generation id, written before anything runs and announced to the
        guest when it first resumes, so that clones of one snapshot reseed
        their RNGs apart (Linux's vmgenid driver). ``False`` keeps the saved
        id: for a VM that continues where it was rather than a copy.
        """
        from pyvmm.vmm.snapshots import load_snapshot

        state, config, mem_fd = load_snapshot(
            state_path, mem_path, net_overrides or {}, vsock_uds, track_dirty_pages
        )
        machine = cls(config, serial_out, console_in, console_escape, thread_setup=thread_setup)
        machine._restore_from(state, mem_fd, new_generation)
        if resume:
            machine.resume()
        return machine

    def _restore_from(self, state: MicrovmState, mem_fd: int, new_generation: bool = True) -> None:
        from pyvmm.vmm.builder import build_from_snapshot

        with self._lifecycle.lock:
            self._lifecycle.check(Action.RESTORE)
            self.start_ns = time.monotonic_ns()
            try:
                try:
                    vmm = build_from_snapshot(self.config, self._context(), state, mem_fd)
                finally:
                    os.close(mem_fd)
                self._install(vmm)
                if new_generation:
                    vmm.devices.new_generation()
                vmm.start_parked()
            except BaseException:
                self.close()
                raise
            self.first_run_ns = time.monotonic_ns()
            self._restored = True
            self._base_id = state.memory.snapshot_id
            self._lifecycle.advance(Action.RESTORE)
            log.debug("restored in %.3f s", (self.first_run_ns - self.start_ns) / 1e9)

    def pause(self) -> None:
        """Park every vCPU and the device loop; the guest's clock stops. A no-op when paused.

        Returns once nothing runs guest code or touches guest memory. The
        kvmclock value is saved here and restored by :meth:`resume`, so the
        guest sees no jump in its time (QEMU does the same); each vCPU also
        tells its guest it was stopped (``KVM_KVMCLOCK_CTRL``).
        """
        with self._lifecycle.lock:
            self._check(Action.PAUSE)
            if self._lifecycle.is_noop(Action.PAUSE):
                return
            self.vmm.pause(self._stopped.is_set)
            self._lifecycle.advance(Action.PAUSE)
            log.debug("paused")

    def resume(self) -> None:
        """Continue a paused guest where it stopped, its clock where it was (no-op if running)."""
        with self._lifecycle.lock:
            self._check(Action.RESUME)
            if self._lifecycle.is_noop(Action.RESUME):
                return
            if self._restored:
                self._restored = False
                self.vmm.devices.after_restore()
            self.vmm.resume()
            self._lifecycle.advance(Action.RESUME)
            log.debug("resumed")

    def snapshot(self, state_path: str | Path, mem_path: str | Path, *, diff: bool = False) -> None:
        """Save the paused machine: a state file and a memory file (see :mod:`pyvmm.vmm.snapshots`).

        ``diff=True`` writes only the pages changed since this machine's
        previous snapshot (or its restore); it needs ``track_dirty_pages``.
        The machine stays paused.
        """
        from pyvmm.vmm.snapshots import write_snapshot

        with self._lifecycle.lock:
            self._check(Action.SNAPSHOT)
            self._base_id = write_snapshot(
                self.vmm, state_path, mem_path, diff=diff, base_id=self._base_id
            )

    def _check(self, action: Action) -> None:
        if self._stopped.is_set():
            self._lifecycle.stopped()
        self._lifecycle.check(action)

    # --- changes while running (Firecracker's PATCH /drives, /network-interfaces) ----------
    def update_drive(
        self,
        drive_id: str,
        path: str | Path | None = None,
        limiter: LimiterPatch | None = None,
    ) -> None:
        """Point drive ``drive_id`` at another image and/or change its rate limiter.

        The machine's config follows, so a later snapshot saves what runs.
        """
        with self._lifecycle.lock:
            self._check(Action.UPDATE)
            drives = list(self.config.drives)
            index = _index_of(drive_id, self.config.device_ids[: len(drives)], "drive")
            drives[index] = self.vmm.devices.update_drive(
                drive_id, drives[index], Path(path) if path is not None else None, limiter
            )
            self._set_config(drives=tuple(drives))

    def update_net(
        self,
        iface_id: str,
        rx: LimiterPatch | None = None,
        tx: LimiterPatch | None = None,
    ) -> None:
        """Change the RX and/or TX rate limiter of interface ``iface_id`` (config follows)."""
        with self._lifecycle.lock:
            self._check(Action.UPDATE)
            nets = list(self.config.nets)
            first = len(self.config.drives)
            ids = self.config.device_ids[first : first + len(nets)]
            index = _index_of(iface_id, ids, "network interface")
            nets[index] = self.vmm.devices.update_net(iface_id, nets[index], rx, tx)
            self._set_config(nets=tuple(nets))

    def _set_config(self, **changes: object) -> None:
        self.config = dataclasses.replace(self.config, **changes)  # type: ignore[arg-type]
        self.vmm.config = self.config

    def send_ctrl_alt_del(self) -> None:
        """Press Ctrl-Alt-Del on the guest's keyboard."""
        if self._vmm is not None and self._vmm.devices.i8042 is not None:
            self._vmm.devices.i8042.trigger_ctrl_alt_del()

    # --- stopping ------------------------------------------------------------------------
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
        timeout = finite_timeout(timeout)
        self.start()
        try:
            reason = self.wait(timeout)
            if reason is None:
                self.stop(
                    StopReason(StopKind.TIMEOUT, f"the guest did not stop within {timeout:g} s")
                )
                reason = self.wait()
            assert reason is not None
            return reason
        finally:
            self.close()

    def close(self) -> None:
        """Stop and tear down: join threads, close every fd; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._stop_reason is None:
            self._record_stop(StopReason(StopKind.USER_QUIT, "machine closed"))
        if self._vmm is not None:
            self._vmm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record_stop(self, reason: StopReason) -> None:
        tail = self._vmm.devices.serial_tail if self._vmm is not None else None
        reason = explain(reason, tail)
        with self._stop_lock:
            if self._stop_reason is not None:
                return
            self._stop_reason = reason
        log.debug("stopping: %s", reason)
        if self._vmm is not None:
            self._vmm.request_stop()
        self._stopped.set()


def _index_of(wanted: str, ids: tuple[str, ...], kind: str) -> int:
    try:
        return ids.index(wanted)
    except ValueError:
        known = ", ".join(repr(i) for i in ids) or "none"
        raise ConfigError(f"no {kind} {wanted!r} (known: {known})") from None
