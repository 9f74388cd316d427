"""The boot-timer: magic write records and logs once, everything is counted."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from pyvmm import layout
from pyvmm.devices.legacy.boot_timer import BootTimer, BootTimerState, format_boot_time
from pyvmm.vmm.bus import Bus


class FakeClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


MAGIC = bytes((layout.BOOT_TIMER_MAGIC,))


def make(start: int = 1_000, now: int = 1_000) -> tuple[BootTimer, FakeClock, list[str]]:
    clock = FakeClock(now)
    lines: list[str] = []
    return BootTimer(start, clock, lines.append), clock, lines


def test_magic_write_records_and_logs() -> None:
    timer, clock, lines = make(start=5_000_000)
    clock.now = 5_000_000 + 123_456_789
    timer.write(0, memoryview(MAGIC))
    assert timer.boot_time_ns == 123_456_789
    assert lines == ["Guest-boot-time = 123456 us 123 ms"]


def test_format_pads_microseconds() -> None:
    assert format_boot_time(42_000) == "Guest-boot-time =     42 us 0 ms"


def test_only_first_magic_write_is_recorded() -> None:
    timer, clock, lines = make()
    clock.now = 3_000
    timer.write(0, memoryview(MAGIC))
    clock.now = 9_000
    timer.write(0, memoryview(MAGIC))
    assert timer.boot_time_ns == 2_000
    assert len(lines) == 1
    assert timer.writes == 2


@pytest.mark.parametrize(
    ("offset", "payload"),
    [(0, b"\x7a"), (1, MAGIC), (8, MAGIC), (0, b""), (0, b"\x00\x7b")],
)
def test_other_writes_are_counted_not_recorded(offset: int, payload: bytes) -> None:
    timer, _, lines = make()
    timer.write(offset, memoryview(payload))
    assert timer.writes == 1
    assert timer.boot_time_ns is None
    assert lines == []


def test_wide_write_with_magic_first_byte_counts_as_magic() -> None:
    timer, _, lines = make()
    timer.write(0, memoryview(MAGIC + b"\x00\x00\x00"))
    assert timer.boot_time_ns == 0
    assert len(lines) == 1


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16])
def test_reads_return_zero(size: int) -> None:
    timer, _, _ = make()
    buf = bytearray(b"\xff" * size)
    timer.read(0x10, memoryview(buf))
    assert buf == bytes(size)


def test_default_log_uses_logging(caplog: pytest.LogCaptureFixture) -> None:
    timer = BootTimer(0, lambda: 2_000_000)
    with caplog.at_level(logging.INFO, logger="pyvmm.boot_timer"):
        timer.write(0, memoryview(MAGIC))
    assert [r.name for r in caplog.records] == ["pyvmm.boot_timer"]
    assert caplog.records[0].getMessage() == "Guest-boot-time =   2000 us 2 ms"


def test_on_the_mmio_bus() -> None:
    timer, clock, lines = make(start=0)
    bus = Bus("mmio")
    bus.add(layout.BOOT_TIMER_ADDR, layout.MMIO_DEVICE_WINDOW, timer, "boot-timer")
    clock.now = 7_000_000
    assert bus.write(layout.BOOT_TIMER_ADDR, memoryview(MAGIC))
    assert lines == ["Guest-boot-time =   7000 us 7 ms"]


def test_save_restore_round_trip() -> None:
    timer, clock, _ = make(start=0)
    timer.write(4, memoryview(b"\x01"))
    clock.now = 55_000
    timer.write(0, memoryview(MAGIC))
    state = timer.save()
    assert state == BootTimerState(writes=2, boot_time_ns=55_000)
    assert BootTimerState(**dataclasses.asdict(state)) == state

    other, _, lines = make()
    other.restore(state)
    assert other.save() == state
    other.write(0, memoryview(MAGIC))  # already booted: not logged again
    assert lines == []
    assert other.writes == 3


def test_restore_before_boot_keeps_waiting() -> None:
    timer, _, _ = make()
    timer.write(8, memoryview(b"\x00"))
    other, clock, lines = make(start=100)
    other.restore(timer.save())
    clock.now = 600
    other.write(0, memoryview(MAGIC))
    assert other.boot_time_ns == 500
    assert len(lines) == 1


def test_restore_rejects_invalid_state() -> None:
    timer, _, _ = make()
    with pytest.raises(ValueError):
        timer.restore(BootTimerState(writes=-1, boot_time_ns=None))
    with pytest.raises(ValueError):
        timer.restore(BootTimerState(writes=0, boot_time_ns="soon"))  # type: ignore[arg-type]
