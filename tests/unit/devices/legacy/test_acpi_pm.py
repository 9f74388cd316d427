"""The hardware-reduced ACPI PM registers and the pvpanic port."""

from __future__ import annotations

import dataclasses

import pytest

from pyvmm import layout
from pyvmm.boot.acpi.tables import FADT_BODY, GAS, HEADER, build_fadt
from pyvmm.devices.legacy import acpi_pm as pm
from pyvmm.devices.legacy.acpi_pm import AcpiPm, AcpiPmState, PvPanic, PvPanicState
from pyvmm.vmm.bus import Bus
from tests.support.device_harness import RegisterAccess

S5_REQUEST = (layout.ACPI_S5_SLP_TYP << pm.SLP_TYP_SHIFT) | pm.SLP_EN  # 0x34


class PmHarness(RegisterAccess):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.dev = AcpiPm(
            lambda: self.events.append("poweroff"), lambda: self.events.append("reset")
        )


class PanicHarness(RegisterAccess):
    def __init__(self, crash_loaded: bool = True) -> None:
        self.events: list[str] = []
        self.dev = PvPanic(
            lambda: self.events.append("panic"),
            (lambda: self.events.append("crash-loaded")) if crash_loaded else None,
        )


@pytest.fixture
def h() -> PmHarness:
    return PmHarness()


# --- AcpiPm ---------------------------------------------------------------------------


def test_linux_s5_sequence_powers_off(h: PmHarness) -> None:
    # acpi_hw_extended_sleep(): clear WAK_STS, then write SLP_TYP | SLP_EN.
    h.wr(pm.SLEEP_STATUS, pm.WAK_STS)
    assert h.events == []
    h.wr(pm.SLEEP_CONTROL, S5_REQUEST)
    assert h.events == ["poweroff"]


def test_s5_without_slp_en_only_sets_the_type(h: PmHarness) -> None:
    h.wr(pm.SLEEP_CONTROL, layout.ACPI_S5_SLP_TYP << pm.SLP_TYP_SHIFT)
    assert h.events == []
    # SLP_TYP reads back; SLP_EN is write-only.
    h.wr(pm.SLEEP_CONTROL, S5_REQUEST)
    assert h.rd(pm.SLEEP_CONTROL) == layout.ACPI_S5_SLP_TYP << pm.SLP_TYP_SHIFT


@pytest.mark.parametrize("slp_typ", [0, 1, 3, 4, 7])
def test_other_sleep_types_do_nothing(h: PmHarness, slp_typ: int) -> None:
    h.wr(pm.SLEEP_CONTROL, (slp_typ << pm.SLP_TYP_SHIFT) | pm.SLP_EN)
    assert h.events == []


def test_sleep_status_reads_zero(h: PmHarness) -> None:
    h.wr(pm.SLEEP_STATUS, 0xFF)
    assert h.rd(pm.SLEEP_STATUS) == 0
    assert h.events == []


def test_reset_register(h: PmHarness) -> None:
    for value in (0x00, 0x01, 0x0E, 0xFF):
        if value != layout.ACPI_RESET_VALUE:
            h.wr(pm.RESET, value)
    assert h.events == []
    h.wr(pm.RESET, layout.ACPI_RESET_VALUE)
    assert h.events == ["reset"]
    assert h.rd(pm.RESET) == 0


def test_wide_accesses_cover_each_register(h: PmHarness) -> None:
    h.dev.write(0, memoryview(bytes((S5_REQUEST, pm.WAK_STS, layout.ACPI_RESET_VALUE))))
    assert h.events == ["poweroff", "reset"]
    buf = bytearray(b"\xff" * 3)
    h.dev.read(0, memoryview(buf))
    assert buf == bytes((layout.ACPI_S5_SLP_TYP << pm.SLP_TYP_SHIFT, 0, 0))
    buf = bytearray(b"\xff" * 2)
    h.dev.read(1, memoryview(buf))
    assert buf == b"\0\0"


def test_callbacks_run_without_the_device_lock(h: PmHarness) -> None:
    states = []
    dev = AcpiPm(lambda: states.append(dev.save()), lambda: states.append(dev.save()))
    dev.write(pm.SLEEP_CONTROL, memoryview(bytes((S5_REQUEST,))))
    dev.write(pm.RESET, memoryview(bytes((layout.ACPI_RESET_VALUE,))))
    assert states == [AcpiPmState(sleep_type=layout.ACPI_S5_SLP_TYP)] * 2


def test_the_fadt_points_at_these_registers() -> None:
    fadt = FADT_BODY.unpack(build_fadt(0), HEADER.size)

    def offset_of(register: str) -> int:
        gas = GAS.unpack(fadt[register])
        assert (gas["bit_width"], gas["bit_offset"]) == (8, 0)
        return gas["address"] - layout.ACPI_PM_PORT

    assert offset_of("sleep_control_reg") == pm.SLEEP_CONTROL
    assert offset_of("sleep_status_reg") == pm.SLEEP_STATUS
    assert offset_of("reset_reg") == pm.RESET
    assert max(pm.SLEEP_CONTROL, pm.SLEEP_STATUS, pm.RESET) < pm.WINDOW_SIZE


def test_acpi_pm_save_restore_round_trip(h: PmHarness) -> None:
    h.wr(pm.SLEEP_CONTROL, 3 << pm.SLP_TYP_SHIFT)
    state = h.dev.save()
    assert state == AcpiPmState(sleep_type=3)
    other = PmHarness()
    other.dev.restore(state)
    assert other.rd(pm.SLEEP_CONTROL) == 3 << pm.SLP_TYP_SHIFT
    assert other.dev.save() == state
    assert other.events == []


@pytest.mark.parametrize("bad", [-1, 8, True, "5", None])
def test_acpi_pm_restore_rejects_invalid_state(h: PmHarness, bad: object) -> None:
    with pytest.raises(ValueError):
        h.dev.restore(AcpiPmState(sleep_type=bad))  # type: ignore[arg-type]
    assert h.dev.save() == AcpiPmState(sleep_type=0)


# --- PvPanic -----------------------------------------------------------------------------


def test_pvpanic_reports_its_supported_events() -> None:
    p = PanicHarness()
    assert p.rd(0) == pm.PVPANIC_PANICKED | pm.PVPANIC_CRASH_LOADED == 0x03
    buf = bytearray(b"\xff" * 4)
    p.dev.read(0, memoryview(buf))
    assert buf == b"\x03\0\0\0"


def test_pvpanic_panicked_calls_on_panic() -> None:
    p = PanicHarness()
    p.wr(0, pm.PVPANIC_PANICKED)
    assert p.events == ["panic"]
    assert p.dev.events == pm.PVPANIC_PANICKED


def test_pvpanic_crash_loaded_is_not_a_panic() -> None:
    p = PanicHarness()
    p.wr(0, pm.PVPANIC_CRASH_LOADED)
    assert p.events == ["crash-loaded"]
    quiet = PanicHarness(crash_loaded=False)
    quiet.wr(0, pm.PVPANIC_CRASH_LOADED)
    assert quiet.events == []
    assert quiet.dev.events == pm.PVPANIC_CRASH_LOADED


def test_pvpanic_ignores_unsupported_bits() -> None:
    p = PanicHarness()
    p.wr(0, 0x04)  # PVPANIC_SHUTDOWN in newer specs: not advertised, so not ours
    p.wr(0, 0x00)
    assert p.events == []
    assert p.dev.events == 0
    p.wr(0, 0xFD)  # PANICKED among unsupported bits still counts
    assert p.events == ["panic"]


def test_pvpanic_save_restore_round_trip() -> None:
    p = PanicHarness()
    p.wr(0, pm.PVPANIC_CRASH_LOADED)
    p.wr(0, pm.PVPANIC_PANICKED)
    state = p.dev.save()
    assert state == PvPanicState(events=0x03)
    fresh = PanicHarness()
    fresh.dev.restore(state)
    assert fresh.dev.save() == state
    assert fresh.events == []
    with pytest.raises(ValueError):
        fresh.dev.restore(dataclasses.replace(state, events=0x04))
    with pytest.raises(ValueError):
        fresh.dev.restore(PvPanicState(events=-1))


# --- on the port bus ------------------------------------------------------------------------


def test_devices_fit_on_the_port_bus_beside_the_others() -> None:
    """The chosen ports collide with nothing pyvmm already places."""
    h = PmHarness()
    p = PanicHarness()
    bus = Bus("pio")
    bus.add(layout.COM1_PORT, layout.UART_PORT_COUNT, AcpiPm(lambda: None, lambda: None), "com1")
    bus.add(layout.I8042_DATA_PORT, 5, AcpiPm(lambda: None, lambda: None), "i8042")
    bus.add(layout.ACPI_PM_PORT, pm.WINDOW_SIZE, h.dev, "acpi-pm")
    bus.add(layout.PVPANIC_PORT, layout.PVPANIC_PORT_COUNT, p.dev, "pvpanic")

    assert bus.write(layout.ACPI_SLEEP_CONTROL_PORT, memoryview(bytes((S5_REQUEST,))))
    assert bus.write(layout.ACPI_RESET_PORT, memoryview(bytes((layout.ACPI_RESET_VALUE,))))
    assert h.events == ["poweroff", "reset"]
    buf = bytearray(1)
    assert bus.read(layout.PVPANIC_PORT, memoryview(buf))
    assert buf[0] == 0x03
    assert bus.write(layout.PVPANIC_PORT, memoryview(b"\x01"))
    assert p.events == ["panic"]
