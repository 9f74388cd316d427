"""Snapshot and restore orchestration for :class:`pyvmm.vmm.machine.Machine`.

:class:`SnapshotSupport` is a mixin that ``Machine`` inherits: it gives
``Machine.snapshot()`` (save a paused machine to a state file and a memory
file) and ``Machine.restore()`` (build a paused machine from them), and
decides the order: check the lifecycle, collect the dirty pages, write the
files; or read the state, build the machine on the saved memory, load KVM
and device state, park the vCPUs. What is saved and how lives in the
sibling modules (see :mod:`pyvmm.snapshot`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from pyvmm.devices.virtio.queue import avail_ring_bytes, desc_table_bytes, used_ring_bytes
from pyvmm.devices.virtio.vsock import VirtioVsock
from pyvmm.errors import HostError, VmStateError
from pyvmm.snapshot.files import atomic_files, write_all
from pyvmm.snapshot.kvm_state import restore_vcpu, restore_vm, save_vcpu, save_vm
from pyvmm.snapshot.memory_file import (
    PAGE,
    bitmap_pages,
    open_memory_file,
    write_diff,
    write_full,
)
from pyvmm.snapshot.overrides import restored_config
from pyvmm.snapshot.state import (
    DevicesState,
    MicrovmState,
    SnapshotError,
    pack_state,
    pyvmm_version,
    read_state,
)
from pyvmm.vmm.lifecycle import PAUSE_TIMEOUT, VmState

log = logging.getLogger(__name__)


class SnapshotSupport:
    """Saving and restoring, mixed into :class:`pyvmm.vmm.machine.Machine`.

    It relies on what ``Machine`` sets up (``__init__`` and ``_build``):

    * reads ``config``, ``memory``, ``serial``, ``i8042``, ``boot_timer``,
      ``virtio_transports``, ``state``, ``_kvm``, ``_vm``, ``_vcpus``,
      ``_threads``, ``_loop``, ``_notify_fds``, ``_acpi_pm``, ``_pvpanic``,
      ``_track_dirty``, ``_closed`` and ``_paused_clock``;
    * holds ``_lifecycle_lock`` while it snapshots or restores, as the
      lifecycle methods do;
    * sets ``_state``, ``_paused_clock``, ``_has_base``, ``_base_id``, ``_restored``,
      ``_serial_append``, ``start_ns`` and ``first_run_ns``;
    * calls ``cls(config, serial_out, console_in, console_escape)``,
      ``_build(mem_file=fd)``, ``resume()`` and ``close()``.

    ``Machine.resume`` calls :meth:`_after_restore` on the first resume
    after a restore.
    """

    def snapshot(self, state_path: str | Path, mem_path: str | Path, *, diff: bool = False) -> None:
        """Save the paused machine: a state file and a memory file, each written atomically.

        ``diff=True`` writes only the pages changed since this machine's
        previous snapshot (or since it was restored); it needs
        ``track_dirty_pages=True``. Merge a diff onto its base with
        :func:`pyvmm.snapshot.merge_diff`. The machine stays paused.
        """
        with self._lifecycle_lock:
            if self.state is not VmState.PAUSED:
                raise VmStateError(
                    f"the VM cannot be snapshotted: it is {self.state.value.lower()}; pause it"
                )
            if diff and not self._track_dirty:
                raise VmStateError("a diff snapshot needs a machine with track_dirty_pages")
            if diff and not self._has_base:
                raise VmStateError(
                    "a diff snapshot needs a full snapshot of this VM first (its base)"
                )
            started = time.monotonic()
            dirty = self._take_dirty_pages() if self._track_dirty else set()
            try:
                with atomic_files(mem_path, state_path) as (mem_fd, state_fd):
                    if diff:
                        memory = write_diff(self.memory, dirty, mem_fd, self._base_id)
                    else:
                        memory = write_full(self.memory, mem_fd)
                    write_all(state_fd, self._save_state(memory))
            except BaseException:
                if self._track_dirty:  # the next diff must still see these pages
                    self.memory.dirty_pages |= dirty
                raise
            self._has_base = True
            self._base_id = memory.snapshot_id  # what the next diff is relative to
            log.debug(
                "%s snapshot written in %.3f s",
                "diff" if diff else "full",
                time.monotonic() - started,
            )

    def _save_state(self, memory: object) -> bytes:
        msr_indices = self._kvm.msr_index_list()
        state = MicrovmState(
            pyvmm_version=pyvmm_version(),
            config=self.config,
            memory=memory,
            vcpus=tuple(save_vcpu(vcpu, msr_indices) for vcpu in self._vcpus),
            vm=save_vm(self._vm, self._paused_clock),
            devices=DevicesState(
                serial=self.serial.save(),
                i8042=self.i8042.save(),
                acpi_pm=self._acpi_pm.save(),
                pvpanic=self._pvpanic.save(),
                boot_timer=self.boot_timer.save(),
                virtio=tuple(transport.save() for transport in self.virtio_transports),
            ),
        )
        return pack_state(state)

    def _take_dirty_pages(self) -> set[int]:
        """Guest pages written since the last call: by the guest, by devices, and the rings.

        Reading KVM's log clears it. The virtqueues keep their rings' host
        buffers across calls, so those pages are always counted.
        """
        pages = self.memory.take_dirty()
        for slot, region in enumerate(self.memory):
            bitmap = self._vm.get_dirty_log(slot, region.size // PAGE)
            pages.update(bitmap_pages(bitmap, region.guest_addr // PAGE))
        for transport in self.virtio_transports:
            for queue in transport.queues:
                if not queue.ready:
                    continue
                for addr, length in (
                    (queue.desc_table, desc_table_bytes(queue.size)),
                    (queue.avail_ring, avail_ring_bytes(queue.size)),
                    (queue.used_ring, used_ring_bytes(queue.size)),
                ):
                    pages.update(range(addr // PAGE, (addr + max(length, 1) - 1) // PAGE + 1))
        return pages

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
    ) -> Self:
        """A machine continuing from a snapshot, paused (or running with ``resume``).

        Guest RAM is mapped copy-on-write from ``mem_path`` (pages load on
        first touch; the file is never written). Drives are reopened from
        their saved paths; TAP devices by name, renamed through
        ``net_overrides`` ({old TAP name or interface id: new TAP name}, the
        MAC kept); ``track_dirty_pages`` (None: as saved) allows diff
        snapshots of the restored machine;
        the vsock Unix socket is created afresh (at ``vsock_uds`` if given)
        and, as in Firecracker, every vsock connection is reset. A saved
        ``serial_out`` file is appended to. Refused with
        :class:`~pyvmm.snapshot.SnapshotError` if the files are not a
        snapshot, are corrupt, or do not fit this pyvmm or host.
        """
        state = read_state(state_path)
        config = restored_config(state.config, net_overrides or {}, vsock_uds)
        if track_dirty_pages is not None:
            config = dataclasses.replace(config, track_dirty_pages=track_dirty_pages)
        machine = cls(config, serial_out, console_in, console_escape)
        machine._serial_append = True
        machine._load_snapshot(state, state_path, mem_path)
        if resume:
            machine.resume()
        return machine

    def _load_snapshot(
        self, state: MicrovmState, state_path: str | Path, mem_path: str | Path
    ) -> None:
        with self._lifecycle_lock:
            if self._state is not VmState.NOT_STARTED or self._closed:
                raise VmStateError(f"cannot restore into a VM that is {self.state.value.lower()}")
            self.start_ns = time.monotonic_ns()
            try:
                if len(state.vcpus) != self.config.vcpus:
                    raise SnapshotError(
                        f"the snapshot has {len(state.vcpus)} vCPU states for {self.config.vcpus}"
                    )
                mem_fd = open_memory_file(mem_path, state.memory, state_path)
                try:
                    self._build(mem_file=mem_fd)
                finally:
                    os.close(mem_fd)
                regions = tuple((r.guest_addr, r.size) for r in self.memory.regions)
                if regions != state.memory.regions:
                    raise SnapshotError("the snapshot's memory layout differs from this pyvmm's")
                restore_vm(self._vm, state.vm)
                for vcpu, vcpu_state in zip(self._vcpus, state.vcpus, strict=True):
                    restore_vcpu(vcpu, vcpu_state)
                self._restore_devices(state)
                self._loop.start()
                self._loop.pause(PAUSE_TIMEOUT)
                for thread in self._threads:
                    thread.request_pause()  # enters KVM_RUN with immediate_exit: parks at once
                    thread.start()
                for thread in self._threads:
                    if not thread.parked.wait(PAUSE_TIMEOUT):
                        raise HostError(f"vcpu{thread.vcpu.id} did not start within the timeout")
            except BaseException:
                self.close()
                raise
            self.first_run_ns = time.monotonic_ns()
            self._paused_clock = state.vm.clock
            self._state = VmState.PAUSED
            self._restored = True
            self._has_base = True
            self._base_id = state.memory.snapshot_id
            log.debug("restored in %.3f s", (self.first_run_ns - self.start_ns) / 1e9)

    def _restore_devices(self, state: MicrovmState) -> None:
        devices = state.devices
        if len(devices.virtio) != len(self.virtio_transports):
            raise SnapshotError(
                f"the snapshot has {len(devices.virtio)} virtio devices, the machine "
                f"{len(self.virtio_transports)}"
            )
        parts = [
            ("serial port", self.serial, devices.serial),
            ("i8042", self.i8042, devices.i8042),
            ("ACPI PM", self._acpi_pm, devices.acpi_pm),
            ("pvpanic", self._pvpanic, devices.pvpanic),
            ("boot timer", self.boot_timer, devices.boot_timer),
        ]
        parts += [
            (f"virtio device {index} (type {transport.device.device_type})", transport, saved)
            for index, (transport, saved) in enumerate(
                zip(self.virtio_transports, devices.virtio, strict=True)
            )
        ]
        for name, device, saved in parts:
            try:
                device.restore(saved)
            except (ValueError, TypeError) as exc:
                raise SnapshotError(f"cannot restore the {name}: {exc}") from None

    def _after_restore(self) -> None:
        """First resume after a restore: reset vsock connections, re-kick every queue.

        A queue kick the old process had not processed yet was lost with its
        eventfd; kicking each queue once more is harmless for the others.
        """
        for transport in self.virtio_transports:
            if isinstance(transport.device, VirtioVsock):
                transport.run_locked(lambda device: device.send_transport_reset())
        for fd in self._notify_fds:
            os.eventfd_write(fd, 1)
