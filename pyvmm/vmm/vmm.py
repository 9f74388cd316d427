"""``Vmm``: a built microVM - its KVM objects, guest memory, devices and threads.

Made by :mod:`pyvmm.vmm.builder` (for a boot or from a snapshot) and owned
by a :class:`~pyvmm.vmm.machine.Machine`, which decides *when* things
happen; this class knows *how*: start the threads, park and unpark them,
keep the guest's clock across a pause, collect the state a snapshot needs,
and tear everything down. Everything it opened sits on one ``ExitStack``,
so :meth:`close` frees all of it on every path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmm.config import MachineConfig
from pyvmm.errors import HostError, VmStateError
from pyvmm.kvm import Kvm, Vcpu, Vm
from pyvmm.memory import GuestMemory
from pyvmm.vmm.device_manager import DeviceManager
from pyvmm.vmm.event_loop import EventLoop
from pyvmm.vmm.lifecycle import PAUSE_TIMEOUT
from pyvmm.vmm.vcpu import VcpuThread

log = logging.getLogger(__name__)

_JOIN_TIMEOUT = 10.0


@dataclass
class Vmm:
    """A built microVM; see the module docstring."""

    config: MachineConfig
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    devices: DeviceManager
    loop: EventLoop
    vcpus: list[Vcpu]
    threads: list[VcpuThread]
    resources: contextlib.ExitStack
    #: kvmclock saved at pause (or from a snapshot), set again on resume.
    paused_clock: bytes | None = None
    _closed: bool = field(default=False, repr=False)

    # --- running --------------------------------------------------------------------
    def start(self) -> None:
        """Start the event loop and every vCPU."""
        self.loop.start()
        for thread in self.threads:
            thread.start()

    def start_parked(self) -> None:
        """Start the threads but keep them out of the guest (a restored VM waits paused)."""
        self.loop.start()
        self.loop.pause(PAUSE_TIMEOUT)
        for thread in self.threads:
            thread.request_pause()  # enters KVM_RUN with immediate_exit: parks at once
            thread.start()
        for thread in self.threads:
            if not thread.parked.wait(PAUSE_TIMEOUT):
                raise HostError(f"vcpu{thread.vcpu.id} did not start within the timeout")

    def pause(self, is_stopped: Callable[[], bool]) -> None:
        """Park every vCPU out of ``KVM_RUN`` and the event loop; save kvmclock.

        vCPUs park only on an interrupted exit, so a pending port or MMIO
        read is completed first. ``is_stopped()`` tells whether the VM
        ended meanwhile (then this gives up with VmStateError).
        """
        for thread in self.threads:
            thread.request_pause()
        deadline = time.monotonic() + PAUSE_TIMEOUT
        for thread in self.threads:
            while not thread.parked.wait(0.05):
                if not thread.alive or is_stopped():
                    self._resume_vcpus()
                    raise VmStateError("the VM stopped while pausing")
                if time.monotonic() > deadline:
                    self._resume_vcpus()
                    raise HostError(
                        f"vcpu{thread.vcpu.id} did not pause within {PAUSE_TIMEOUT:g} s"
                    )
        try:
            self.loop.pause(PAUSE_TIMEOUT)
        except TimeoutError as exc:
            self._resume_vcpus()
            raise HostError(str(exc)) from None
        self.paused_clock = self.vm.get_clock()

    def resume(self) -> None:
        """Continue where the guest was parked, its clock where it was."""
        if self.paused_clock is not None:
            self.vm.set_clock(self.paused_clock)
            self.paused_clock = None
        self.loop.resume()
        self._resume_vcpus()

    def _resume_vcpus(self) -> None:
        for thread in self.threads:
            thread.resume()

    def request_stop(self) -> None:
        """Ask every vCPU to leave the guest (any thread may call)."""
        for thread in self.threads:
            thread.request_stop()

    # --- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        """Join every thread, then close every fd and mapping; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.request_stop()
        for thread in self.threads:
            if not thread.join(_JOIN_TIMEOUT):
                log.error("vcpu%d did not stop within %g s", thread.vcpu.id, _JOIN_TIMEOUT)
        self.loop.stop()  # no device callback runs from here on
        self.resources.close()
