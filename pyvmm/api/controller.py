"""What the API needs from the VMM: the :class:`VmmController` protocol.

The router (:mod:`pyvmm.api.routes`) parses requests, enforces the
pre-boot/post-boot rules and keeps the configuration; everything that acts
on a VM goes through this protocol, which
:class:`pyvmm.api.vmm.MachineController` implements on top of
:class:`pyvmm.vmm.machine.Machine` (and tests implement with a fake).

Contract for implementers:

- Calls that act are serialized: they run on the VMM thread, one request
  at a time; :attr:`state`, :meth:`instance_info`, :meth:`flush_metrics`
  and :meth:`balloon_stats` are queries and may run on an API thread at
  the same time.
- The router calls each method only in the state where Firecracker allows
  it (see the method docs); a method still validates what only it can know.
- Report failure by raising :class:`~pyvmm.errors.PyvmmError` (or
  ``OSError``) with a one-line message: it becomes a 400 response whose
  ``fault_message`` is that message behind Firecracker's prefix for the
  action ("Start microvm error: ..."). Any other exception is a bug and
  becomes a 500.
- :attr:`state` is the machine's :class:`~pyvmm.vmm.lifecycle.VmState`
  (the lifecycle's own vocabulary): ``NOT_STARTED`` until :meth:`start` or
  :meth:`load_snapshot` succeeds, and never again afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pyvmm.vmm.lifecycle import VmState

if TYPE_CHECKING:
    from pyvmm.api.models import Logger, Metrics, RateLimiterConfig
    from pyvmm.api.operations import SnapshotCreateParams, SnapshotLoadParams
    from pyvmm.api.vm_config import VmResources


@dataclass(frozen=True)
class InstanceInfo:
    """``GET /``: who this VMM is and what state its VM is in."""

    id: str
    state: VmState
    vmm_version: str
    app_name: str = "pyvmm"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            # Firecracker never reports a stopped VM: its process exits with the guest.
            "state": (VmState.RUNNING if self.state is VmState.STOPPED else self.state).value,
            # Firecracker 0.2x's field, still what Kata Containers' vendored client reads
            # to know the VM runs (fc.go, vmRunning).
            "started": self.state is not VmState.NOT_STARTED,
            "vmm_version": self.vmm_version,
            "app_name": self.app_name,
        }


class VmmController(Protocol):
    """The VMM side of the API; see the module docstring for the contract."""

    @property
    def state(self) -> VmState:
        """Where the machine is in its lifecycle."""
        ...

    def instance_info(self) -> InstanceInfo:
        """``GET /`` and ``GET /version`` (its ``vmm_version``); any state."""
        ...

    # --- pre-boot ---------------------------------------------------------------------
    def start(self, resources: VmResources) -> None:
        """``InstanceStart``: build and boot the VM ``resources`` describe.

        Called only while "Not started" and with a boot source set. Map the
        configuration with :func:`pyvmm.api.machine_config.to_machine_config`.
        On success the state is "Running"; on failure nothing is left running
        and the state stays "Not started".
        """
        ...

    def load_snapshot(self, params: SnapshotLoadParams, resources: VmResources) -> None:
        """``PUT /snapshot/load``: restore a VM (then "Paused", or "Running" if
        ``params.resume_vm``). Called only while "Not started" and before any
        boot-specific resource was configured."""
        ...

    def configure_logger(self, config: Logger) -> None:
        """``PUT /logger``: set up logging as asked; pre-boot only."""
        ...

    def configure_metrics(self, config: Metrics) -> None:
        """``PUT /metrics``: open the metrics file or FIFO; pre-boot only, once."""
        ...

    # --- post-boot --------------------------------------------------------------------
    def pause(self) -> None:
        """``PATCH /vm {"state": "Paused"}``: stop the vCPUs; state "Paused"."""
        ...

    def resume(self) -> None:
        """``PATCH /vm {"state": "Resumed"}``: run the vCPUs again; state "Running"."""
        ...

    def send_ctrl_alt_del(self) -> None:
        """``SendCtrlAltDel``: press Ctrl-Alt-Del on the guest's i8042 keyboard."""
        ...

    def flush_metrics(self) -> None:
        """``FlushMetrics``: write a metrics line now (the router's request
        counters are in ``Router.counters``)."""
        ...

    def create_snapshot(self, params: SnapshotCreateParams) -> None:
        """``PUT /snapshot/create``: called only while "Paused"."""
        ...

    def patch_drive(
        self, drive_id: str, path_on_host: str | None, rate_limiter: RateLimiterConfig | None
    ) -> None:
        """``PATCH /drives/{id}``: a new backing file and/or rate limiter.

        ``drive_id`` exists; ``path_on_host`` (if not None) is a readable
        regular file. ``rate_limiter`` has PATCH semantics: None changes
        nothing, a bucket left None is kept, a disabled bucket (size or
        refill_time 0) is removed, any other bucket replaces the current one.
        """
        ...

    def patch_net(
        self, iface_id: str, rx: RateLimiterConfig | None, tx: RateLimiterConfig | None
    ) -> None:
        """``PATCH /network-interfaces/{id}``: new RX/TX rate limiters
        (PATCH semantics as in :meth:`patch_drive`); ``iface_id`` exists."""
        ...

    def set_balloon_target(self, amount_mib: int) -> None:
        """``PATCH /balloon`` after boot (the VM has a balloon)."""
        ...

    def balloon_stats(self) -> dict[str, int]:
        """``GET /balloon/statistics`` after boot (the balloon polls statistics)."""
        ...

    def set_balloon_stats_interval(self, seconds: int) -> None:
        """``PATCH /balloon/statistics`` after boot (never turns them on or off)."""
        ...
