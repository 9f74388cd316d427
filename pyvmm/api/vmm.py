"""``MachineController``: the API's :class:`VmmController` on top of :class:`Machine`.

One controller drives at most one machine over the process's life, as a
Firecracker process does: InstanceStart (or a snapshot load) creates it,
and once the guest stopped, :attr:`MachineController.finished` tells the
serving loop to exit with the machine's exit code.

The machine is imported only when one is made (``pyvmm.vmm.machine`` and
everything under it: ~125 ms), so the API socket answers queries before
the VM machinery has loaded.

It also owns what Firecracker configures beside the VM: the logger
(:mod:`pyvmm.logs`) and the metrics file (:mod:`pyvmm.metrics`), whose
lines gather the router's request counters, the vCPUs' exits, every
virtio device's counters and the latencies of pause, resume and snapshots.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pyvmm.api.controller import InstanceInfo
from pyvmm.api.machine_config import to_machine_config, to_vm_resources
from pyvmm.api.version import vmm_version
from pyvmm.errors import ConfigError, VmStateError
from pyvmm.logs import configure_logging
from pyvmm.metrics import MetricsWriter
from pyvmm.vmm.lifecycle import VmState
from pyvmm.vmm.threads import NO_SETUP, ThreadSetup

if TYPE_CHECKING:
    from pyvmm.api.models import Logger, Metrics, RateLimiterConfig
    from pyvmm.api.operations import SnapshotCreateParams, SnapshotLoadParams
    from pyvmm.api.vm_config import VmResources
    from pyvmm.vmm.machine import Machine
    from pyvmm.vmm.stop_reason import StopReason


class MachineController:
    """Implements :class:`pyvmm.api.controller.VmmController`; see the module docstring."""

    def __init__(
        self,
        instance_id: str,
        *,
        serial_out: Callable[[bytes], object] | None = None,
        console_in: int | None = None,
        thread_setup: ThreadSetup = NO_SETUP,
    ) -> None:
        """``thread_setup`` confines each thread of the machine it will make (seccomp)."""
        self.instance_id = instance_id
        self._serial_out = serial_out
        self._console_in = console_in
        self._thread_setup = thread_setup
        #: The router's request counters; set once the router (which needs
        #: this controller) exists.
        self.api_counters: Callable[[], Mapping[str, Any]] | None = None
        self.machine: Machine | None = None
        self.metrics: MetricsWriter | None = None
        self._latencies_us: dict[str, int] = {}
        self._log_handler: logging.Handler | None = None
        self._version = vmm_version()

    # --- state ------------------------------------------------------------------------
    @property
    def state(self) -> VmState:
        return self.machine.state if self.machine is not None else VmState.NOT_STARTED

    def instance_info(self) -> InstanceInfo:
        return InstanceInfo(id=self.instance_id, state=self.state, vmm_version=self._version)

    @property
    def finished(self) -> bool:
        """The machine ran and stopped (the guest or the host ended it)."""
        return self.machine is not None and self.machine.state is VmState.STOPPED

    @property
    def stop_reason(self) -> StopReason | None:
        return self.machine.stop_reason if self.machine is not None else None

    # --- pre-boot ---------------------------------------------------------------------
    def start(self, resources: VmResources) -> None:
        from pyvmm.vmm.machine import Machine

        config = to_machine_config(resources)
        machine = Machine(
            config,
            serial_out=self._serial_out,
            console_in=self._console_in,
            thread_setup=self._thread_setup,
        )
        with self._timed("start_vm"):
            machine.start()  # on failure it has closed itself
        self.machine = machine

    def load_snapshot(self, params: SnapshotLoadParams, resources: VmResources) -> None:
        """Restore in this process: a File memory backend only (no userfaultfd)."""
        from pyvmm.vmm.machine import Machine

        if params.mem_backend.backend_type != "File":
            raise ConfigError(
                f"memory backend {params.mem_backend.backend_type!r} is not supported; use File"
            )
        if params.clock_realtime:
            raise ConfigError("clock_realtime is not supported: the guest clock resumes as saved")
        with self._timed("load_snapshot"):
            machine = Machine.restore(
                params.snapshot_path,
                params.mem_backend.backend_path,
                serial_out=self._serial_out,
                console_in=self._console_in,
                net_overrides={o.iface_id: o.host_dev_name for o in params.network_overrides},
                vsock_uds=params.vsock_override,
                track_dirty_pages=params.track_dirty_pages,
                resume=params.resume_vm,
                thread_setup=self._thread_setup,
                new_generation=True,  # as in Firecracker: every load gets a new VM generation id
            )
        self.machine = machine
        to_vm_resources(machine.config, resources)  # GET /vm/config shows what was restored

    def configure_logger(self, config: Logger) -> None:
        self._log_handler = configure_logging(
            self.instance_id,
            config.log_path,
            config.level or "Info",
            show_level=bool(config.show_level),
            show_origin=bool(config.show_log_origin),
            module=config.module,
        )

    def configure_metrics(self, config: Metrics) -> None:
        """Open the metrics file; the serving loop calls :meth:`tick` to flush periodically."""
        self.metrics = MetricsWriter(config.metrics_path, [self._metrics])

    def tick(self) -> None:
        """Periodic work of the VMM thread: a metrics line when one is due."""
        if self.metrics is not None:
            self.metrics.flush_if_due()

    # --- post-boot --------------------------------------------------------------------
    def pause(self) -> None:
        with self._timed("pause_vm"):
            self._machine().pause()

    def resume(self) -> None:
        with self._timed("resume_vm"):
            self._machine().resume()

    def send_ctrl_alt_del(self) -> None:
        self._machine().send_ctrl_alt_del()

    def flush_metrics(self) -> None:
        """A metrics line now; without metrics configured there is nothing to write
        (Firecracker answers 204 then too)."""
        if self.metrics is not None:
            self.metrics.flush()

    def create_snapshot(self, params: SnapshotCreateParams) -> None:
        diff = params.snapshot_type == "Diff"
        with self._timed("diff_create_snapshot" if diff else "full_create_snapshot"):
            self._machine().snapshot(params.snapshot_path, params.mem_file_path, diff=diff)

    def patch_drive(
        self, drive_id: str, path_on_host: str | None, rate_limiter: RateLimiterConfig | None
    ) -> None:
        patch = rate_limiter.to_patch() if rate_limiter is not None else None
        self._machine().update_drive(drive_id, path_on_host, patch)

    def patch_net(
        self, iface_id: str, rx: RateLimiterConfig | None, tx: RateLimiterConfig | None
    ) -> None:
        self._machine().update_net(
            iface_id,
            rx.to_patch() if rx is not None else None,
            tx.to_patch() if tx is not None else None,
        )

    def set_balloon_target(self, amount_mib: int) -> None:
        self._machine().devices.set_balloon_target(amount_mib)

    def balloon_stats(self) -> dict[str, int]:
        return self._machine().devices.balloon_stats()

    def set_balloon_stats_interval(self, seconds: int) -> None:
        self._machine().devices.set_balloon_stats_interval(seconds)

    # --- helpers ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the machine and write a last metrics line; idempotent."""
        if self.machine is not None:
            self.machine.close()
        if self.metrics is not None:
            self.metrics.close()

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        """Record how long the block took, in µs, as latency ``name`` (only if it succeeds)."""
        started = time.monotonic_ns()
        yield
        self._latencies_us[name] = (time.monotonic_ns() - started) // 1000

    def _machine(self) -> Machine:
        if self.machine is None:
            raise VmStateError("the microVM is not started")
        return self.machine

    def _metrics(self) -> dict[str, Any]:
        """One metrics snapshot: API counters, vCPU exits, devices, latencies."""
        data: dict[str, Any] = {}
        if self.api_counters is not None:
            data.update(self.api_counters())
        machine = self.machine
        if machine is not None:
            data.update(machine_metrics(machine))
        data["latencies_us"] = dict(self._latencies_us)
        sink = getattr(self._log_handler, "stream", None)
        if sink is not None and hasattr(sink, "missed"):  # lines a full log FIFO dropped
            data["logger"] = {"missed_log_count": sink.missed}
        return data


def machine_metrics(machine: Machine) -> dict[str, Any]:
    """Counters of one machine: ``vcpu`` exits by kind, and one group per virtio device.

    Device groups are named as Firecracker names them (``block_rootfs``,
    ``net_eth0``, ``entropy``, ``vsock``).
    """
    groups: dict[str, Any] = {}
    exits: dict[str, int] = {}
    for thread in machine.vcpu_threads:
        for kind, count in thread.exit_counts().items():
            exits[kind] = exits.get(kind, 0) + count
    if exits:
        groups["vcpu"] = exits
    if machine.state is not VmState.NOT_STARTED:
        groups.update(machine.devices.device_stats())
    return groups
