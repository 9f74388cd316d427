"""Power-off, reset and panic signals from the guest: the ACPI PM registers and pvpanic.

:class:`AcpiPm` models the three one-byte registers that a hardware-reduced
ACPI platform's FADT points at (:mod:`pyvmm.boot.acpi.tables`), in a window of
``layout.ACPI_PM_PORT_COUNT`` I/O ports at ``layout.ACPI_PM_PORT``:

* offset 0, sleep control (ACPI 6.x, 4.8.3.7): the guest writes
  ``SLP_TYP << 2 | SLP_EN``. With SLP_TYP = ``layout.ACPI_S5_SLP_TYP`` (the
  value the DSDT's ``\\_S5`` gives it) that is a power-off request, and
  ``on_poweroff()`` is called. We describe no other sleep state, so other
  SLP_TYP values are remembered (SLP_TYP reads back, as the spec says) but
  do nothing. SLP_EN itself is write-only and reads as 0.
* offset 1, sleep status: WAK_STS (bit 7) is write-1-to-clear and is set
  only by waking from a sleep state, which never happens here, so the
  register reads 0 and writes are ignored. (Linux clears WAK_STS before
  sleeping and then polls for it; after power-off the VMM has stopped the
  vCPU, so the poll never runs for long.)
* offset 2, reset: writing ``layout.ACPI_RESET_VALUE`` calls ``on_reset()``;
  other values are ignored. Reads return 0.

Linux uses these when booted with the FADT: ``poweroff`` goes through
sleep control, and ``reboot`` tries the ACPI reset register first (its
default ``reboot=acpi``), then the i8042, so the VMM can get two reset
requests for one reboot; the first one wins.

:class:`PvPanic` is QEMU's ISA pvpanic device, a single I/O port
(``layout.PVPANIC_PORT``, described to the guest in the DSDT as
``QEMU0001``): a read returns the events the device supports
(:data:`PVPANIC_PANICKED` | :data:`PVPANIC_CRASH_LOADED`), and the guest
writes one of them from its panic notifier: PANICKED when it has just
panicked (``on_panic()``), CRASH_LOADED when it panicked but is about to
boot a kdump kernel, so the VM should keep running (``on_crash_loaded()``,
if given). Event bits the device does not support are ignored.

Both are sans-IO register files: every access may span several registers
(a 2-byte write at offset 0 writes sleep control and sleep status), and
each byte is handled as its own one-byte register. The callbacks are
called after the device's lock is released, like the i8042's ``on_reset``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm import layout

# --- AcpiPm offsets in the window ----------------------------------------------
SLEEP_CONTROL = layout.ACPI_SLEEP_CONTROL_PORT - layout.ACPI_PM_PORT
SLEEP_STATUS = layout.ACPI_SLEEP_STATUS_PORT - layout.ACPI_PM_PORT
RESET = layout.ACPI_RESET_PORT - layout.ACPI_PM_PORT
WINDOW_SIZE = layout.ACPI_PM_PORT_COUNT

# Sleep control register bits (ACPI 6.x, table 4.21).
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x07
SLP_EN = 1 << 5
# Sleep status register bits (table 4.22).
WAK_STS = 1 << 7

# --- pvpanic events (QEMU docs/specs/pvpanic.rst; Linux uapi/misc/pvpanic.h) -----
PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1
PVPANIC_SUPPORTED = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED

_ZEROS = tuple(bytes(n) for n in range(9))


def _zero(data: memoryview) -> None:
    size = len(data)
    data[:] = _ZEROS[size] if size <= 8 else bytes(size)


@dataclass(frozen=True)
class AcpiPmState:
    """What the guest can observe of an :class:`AcpiPm`: the SLP_TYP it last wrote."""

    sleep_type: int


class AcpiPm:
    """Sleep control, sleep status and reset registers; see the module docstring."""

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._sleep_type = 0

    def read(self, offset: int, data: memoryview) -> None:
        """Sleep control reads back SLP_TYP; everything else reads 0."""
        _zero(data)
        index = SLEEP_CONTROL - offset
        if 0 <= index < len(data):
            with self._lock:
                data[index] = self._sleep_type << SLP_TYP_SHIFT

    def write(self, offset: int, data: memoryview) -> None:
        poweroff = reset = False
        with self._lock:
            for register, value in enumerate(data, start=offset):
                if register == SLEEP_CONTROL:
                    self._sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
                    if value & SLP_EN and self._sleep_type == layout.ACPI_S5_SLP_TYP:
                        poweroff = True
                elif register == RESET and value == layout.ACPI_RESET_VALUE:
                    reset = True
                # SLEEP_STATUS: WAK_STS is never set, so clearing it is a no-op.
        if poweroff:
            self._on_poweroff()
        if reset:
            self._on_reset()

    def save(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(sleep_type=self._sleep_type)

    def restore(self, state: AcpiPmState) -> None:
        """Load ``state`` (from :meth:`save`); raises ValueError if it is invalid."""
        value = state.sleep_type
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SLP_TYP_MASK:
            raise ValueError(f"ACPI PM state: sleep_type={value!r} is not a 3-bit SLP_TYP")
        with self._lock:
            self._sleep_type = value


@dataclass(frozen=True)
class PvPanicState:
    """The events the guest has reported so far (a PVPANIC_* bitmask)."""

    events: int


class PvPanic:
    """QEMU's ISA pvpanic port; see the module docstring."""

    def __init__(
        self,
        on_panic: Callable[[], None],
        on_crash_loaded: Callable[[], None] | None = None,
    ) -> None:
        self._on_panic = on_panic
        self._on_crash_loaded = on_crash_loaded
        self._lock = threading.Lock()
        self._events = 0

    @property
    def events(self) -> int:
        """Every supported event bit the guest has written, ORed together."""
        with self._lock:
            return self._events

    def read(self, offset: int, data: memoryview) -> None:
        """Offset 0 returns the supported events; any other byte reads 0."""
        _zero(data)
        if offset == 0 and data:
            data[0] = PVPANIC_SUPPORTED

    def write(self, offset: int, data: memoryview) -> None:
        if offset != 0 or not data:
            return
        value = data[0] & PVPANIC_SUPPORTED
        with self._lock:
            self._events |= value
        if value & PVPANIC_PANICKED:
            self._on_panic()
        elif value & PVPANIC_CRASH_LOADED and self._on_crash_loaded is not None:
            self._on_crash_loaded()

    def save(self) -> PvPanicState:
        with self._lock:
            return PvPanicState(events=self._events)

    def restore(self, state: PvPanicState) -> None:
        """Load ``state``; raises ValueError if it holds unsupported event bits."""
        value = state.events
        if isinstance(value, bool) or not isinstance(value, int) or value & ~PVPANIC_SUPPORTED:
            raise ValueError(f"pvpanic state: events={value!r} is not a PVPANIC_* mask")
        with self._lock:
            self._events = value
