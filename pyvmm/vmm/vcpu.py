"""vCPU threads: the only callers of ``KVM_RUN``.

Each vCPU runs in its own thread. :func:`handle_exit` is a pure dispatcher
from a decoded exit to the buses; it returns a :class:`StopReason` when the
exit ends the VM. Stopping and pausing are cooperative: :meth:`VcpuThread.kick` sets
``immediate_exit`` and sends the kick signal, so a thread inside
``KVM_RUN`` (or about to enter it) returns promptly and sees its flags.

A pause takes effect only on an *interrupted* exit: KVM completes a pending
port or MMIO read into the guest's registers on the ``KVM_RUN`` that returns
EINTR, so a parked vCPU never has an instruction half done, and its state
can be saved.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable

from pyvmm.kvm import exits
from pyvmm.kvm.constants import SystemEventKind
from pyvmm.kvm.ioctl import KvmIoctlError
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.vmm.bus import Bus
from pyvmm.vmm.stop_reason import StopKind, StopReason
from pyvmm.vmm.threads import NO_SETUP, ThreadRole, ThreadSetup, spawn

log = logging.getLogger(__name__)

_SYSTEM_EVENTS = {
    SystemEventKind.SHUTDOWN: StopReason(StopKind.POWEROFF, "guest powered off"),
    SystemEventKind.RESET: StopReason(StopKind.RESET, "guest reset"),
    SystemEventKind.CRASH: StopReason(StopKind.GUEST_CRASH, "guest crashed"),
}


def handle_exit(  # noqa: C901 - one match over the exit kinds
    exit: exits.VcpuExit, pio_bus: Bus, mmio_bus: Bus
) -> StopReason | None:
    """Dispatch one exit; return why the VM must stop, or None to keep running."""
    match exit:
        case exits.IoOut(port, size, count, data):
            if count == 1:
                pio_bus.write(port, data)
            else:  # string I/O (rep outs): one access per item
                for item in range(count):
                    pio_bus.write(port, data[item * size : (item + 1) * size])
        case exits.IoIn(port, size, count, data):
            if count == 1:
                pio_bus.read(port, data)
            else:
                for item in range(count):
                    pio_bus.read(port, data[item * size : (item + 1) * size])
        case exits.MmioWrite(addr, data):
            mmio_bus.write(addr, data)
        case exits.MmioRead(addr, data):
            mmio_bus.read(addr, data)
        case exits.Interrupted():
            pass
        case exits.Shutdown():
            return StopReason(StopKind.TRIPLE_FAULT, "guest triple fault (KVM_EXIT_SHUTDOWN)")
        case exits.SystemEvent(kind):
            return _SYSTEM_EVENTS.get(
                kind, StopReason(StopKind.INTERNAL_ERROR, f"unknown system event {kind}")
            )
        case exits.InternalError(suberror, data):
            words = " ".join(f"{word:#x}" for word in data)
            return StopReason(
                StopKind.INTERNAL_ERROR,
                f"KVM internal error, suberror {suberror}" + (f" [{words}]" if words else ""),
            )
        case exits.FailEntry(reason, cpu):
            return StopReason(
                StopKind.INTERNAL_ERROR, f"KVM entry failed: reason {reason:#x} on cpu {cpu}"
            )
        case exits.Halt():
            pass  # only seen without an in-kernel irqchip; re-entering waits
        case exits.Unknown(reason):
            return StopReason(StopKind.INTERNAL_ERROR, f"unhandled KVM exit reason {reason}")
    return None


#: Metric names of the exit kinds a VcpuThread counts, in counter order.
EXIT_KINDS = (
    "exit_io_out",
    "exit_io_in",
    "exit_mmio_write",
    "exit_mmio_read",
    "exit_interrupted",
    "exit_other",
)


class VcpuThread:
    """Runs one vCPU until it stops, reporting the reason to ``on_stop``."""

    def __init__(
        self,
        vcpu: Vcpu,
        pio_bus: Bus,
        mmio_bus: Bus,
        on_stop: Callable[[StopReason], None],
        kick_signal: int,
        setup: ThreadSetup = NO_SETUP,
    ) -> None:
        self.vcpu = vcpu
        self._pio_bus = pio_bus
        self._mmio_bus = mmio_bus
        self._on_stop = on_stop
        self._kick_signal = kick_signal
        self._stop_requested = False
        self._pause_requested = False
        self._wake = threading.Condition()
        #: Set while the thread is parked by :meth:`request_pause`.
        self.parked = threading.Event()
        # Exits by kind (see EXIT_KINDS), counted in place by the run loop and
        # read by the metrics writer from another thread.
        self._exit_counts = [0] * len(EXIT_KINDS)
        self._thread = spawn(
            ThreadRole.VCPU,
            f"vcpu{vcpu.id}",
            self._run,
            on_error=lambda message: on_stop(StopReason(StopKind.VMM_ERROR, message)),
            setup=setup,
            start=False,
        )

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to leave ``KVM_RUN`` and end (any thread may call)."""
        self._stop_requested = True
        with self._wake:
            self._wake.notify_all()
        self.kick()

    def request_pause(self) -> None:
        """Ask the thread to leave ``KVM_RUN`` and park; :attr:`parked` says when it has."""
        self._pause_requested = True
        self.kick()

    def resume(self) -> None:
        """Let a parked (or parking) thread enter the guest again."""
        with self._wake:
            self._pause_requested = False
            self._wake.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def kick(self) -> None:
        self.vcpu.set_immediate_exit(True)
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            # The thread may end between the check and the kill.
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(ident, self._kick_signal)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has ended."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        vcpu, pio_bus, mmio_bus = self.vcpu, self._pio_bus, self._mmio_bus
        run, pio_write, pio_read = vcpu.run, pio_bus.write, pio_bus.read
        mmio_write, mmio_read = mmio_bus.write, mmio_bus.read
        io_out, io_in, mmio_out, mmio_in = exits.IoOut, exits.IoIn, exits.MmioWrite, exits.MmioRead
        interrupted = exits.Interrupted
        counts = self._exit_counts
        log.debug("vcpu%d: entering the guest", vcpu.id)  # boot benchmarks time this line
        while not self._stop_requested:
            exit = run()
            # Fast paths for the common exits (same effect as handle_exit,
            # without the pattern matching); everything else goes there.
            kind = type(exit)
            if kind is io_out and exit.count == 1:
                counts[0] += 1
                pio_write(exit.port, exit.data)
            elif kind is io_in and exit.count == 1:
                counts[1] += 1
                pio_read(exit.port, exit.data)
            elif kind is mmio_out:
                counts[2] += 1
                mmio_write(exit.addr, exit.data)
            elif kind is mmio_in:
                counts[3] += 1
                mmio_read(exit.addr, exit.data)
            elif kind is interrupted:
                counts[4] += 1
                if self._pause_requested and not self._stop_requested:
                    self._park()
            else:
                counts[5] += 1
                reason = handle_exit(exit, pio_bus, mmio_bus)
                if reason is not None:
                    self._on_stop(reason)
                    return

    def exit_counts(self) -> dict[str, int]:
        """Exits so far by kind (Firecracker's vCPU metric names); any thread may ask."""
        return dict(zip(EXIT_KINDS, self._exit_counts, strict=True))

    def _park(self) -> None:
        """Wait, out of ``KVM_RUN``, until resumed or stopped.

        ``immediate_exit`` is cleared only after waking, and the pause flag
        read again after that: a pause requested in between has either
        already set the flag (we park again) or will set ``immediate_exit``
        after our clear (the next ``KVM_RUN`` returns at once).
        """
        vcpu = self.vcpu
        while True:
            # The guest's kvmclock learns it was stopped, so its soft-lockup
            # watchdog does not fire on resume; a guest without kvmclock
            # (the probe) makes KVM answer EINVAL, which is fine.
            with contextlib.suppress(KvmIoctlError):
                vcpu.kvmclock_ctrl()
            self.parked.set()
            with self._wake:
                while self._pause_requested and not self._stop_requested:
                    self._wake.wait()
            self.parked.clear()
            vcpu.set_immediate_exit(False)
            if self._stop_requested or not self._pause_requested:
                return
