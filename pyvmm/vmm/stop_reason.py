"""Why a VM stopped, and the exit status ``pyvmm run`` turns it into."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pyvmm.vmm.serial_tail import SerialTail


class StopKind(Enum):
    RESET = "reset"  # guest asked for a reset (i8042, ACPI, KVM system event)
    POWEROFF = "poweroff"  # guest powered off
    USER_QUIT = "user-quit"  # Ctrl-A X on the console, or stop() from a program
    TRIPLE_FAULT = "triple-fault"
    GUEST_CRASH = "guest-crash"  # KVM_SYSTEM_EVENT_CRASH (guest panic notifier)
    INTERNAL_ERROR = "internal-error"  # KVM could not run the guest
    HOST_SIGNAL = "host-signal"  # SIGINT/SIGTERM to pyvmm
    TIMEOUT = "timeout"
    VMM_ERROR = "vmm-error"  # a bug or host failure inside pyvmm


_CLEAN = {StopKind.RESET, StopKind.POWEROFF, StopKind.USER_QUIT}


class StopReason(NamedTuple):
    kind: StopKind
    message: str

    @property
    def clean(self) -> bool:
        """True if the guest (or the user) ended the VM on purpose."""
        return self.kind in _CLEAN

    @property
    def exit_code(self) -> int:
        """0 for a clean stop; 130/143 for signals; 1 otherwise."""
        if self.clean:
            return 0
        if self.kind is StopKind.HOST_SIGNAL:
            return 143 if "SIGTERM" in self.message else 130
        return 1

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


def explain(reason: StopReason, tail: SerialTail | None) -> StopReason:
    """``reason`` with what the serial console shows: a panic, or the last line printed."""
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
