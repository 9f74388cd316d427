"""The minimal i8042: reset, command byte, self tests, Ctrl-Alt-Del, IRQ edges."""

from __future__ import annotations

import dataclasses

import pytest

from pyvmm.devices.legacy import i8042 as kbc
from pyvmm.devices.legacy.i8042 import I8042, I8042State
from tests.support.device_harness import CountingIrq, RegisterAccess


class Harness(RegisterAccess):
    def __init__(self) -> None:
        self.irq = CountingIrq()
        self.resets = 0
        self.dev = I8042(self.irq, self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def command(self, cmd: int, *args: int) -> None:
        self.wr(kbc.COMMAND, cmd)
        for arg in args:
            self.wr(kbc.DATA, arg)

    def status(self) -> int:
        return self.rd(kbc.COMMAND)

    def drain(self) -> bytes:
        out = bytearray()
        while self.status() & kbc.STATUS_OBF:
            out.append(self.rd(kbc.DATA))
        return bytes(out)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_power_on_status(h: Harness) -> None:
    status = h.status()
    assert not status & kbc.STATUS_OBF
    assert not status & kbc.STATUS_IBF
    assert status & kbc.STATUS_SYS
    assert status & kbc.STATUS_UNLOCKED


def test_reset_command_calls_on_reset(h: Harness) -> None:
    h.command(kbc.CMD_RESET)
    assert h.resets == 1


@pytest.mark.parametrize("cmd", [0xF0, 0xF2, 0xFC])
def test_other_pulses_of_line_zero_also_reset(h: Harness, cmd: int) -> None:
    h.command(cmd)
    assert h.resets == 1


@pytest.mark.parametrize("cmd", [0xFF, 0xF1, 0xFD])
def test_pulses_without_line_zero_do_not_reset(h: Harness, cmd: int) -> None:
    h.command(cmd)
    assert h.resets == 0


def test_output_port_write_with_reset_bit_clear_resets(h: Harness) -> None:
    h.command(kbc.CMD_WRITE_OUTPUT_PORT, 0x03)
    assert h.resets == 0
    h.command(kbc.CMD_WRITE_OUTPUT_PORT, 0x02)
    assert h.resets == 1
    h.command(kbc.CMD_READ_OUTPUT_PORT)
    assert h.drain() == b"\x02"


def test_read_and_write_command_byte(h: Harness) -> None:
    h.command(kbc.CMD_READ_CTR)
    assert h.status() & kbc.STATUS_OBF
    assert h.rd(kbc.DATA) == kbc.CTR_DEFAULT
    assert not h.status() & kbc.STATUS_OBF
    h.command(kbc.CMD_WRITE_CTR, 0x65)
    h.command(kbc.CMD_READ_CTR)
    assert h.drain() == b"\x65"


def test_sys_status_bit_follows_command_byte(h: Harness) -> None:
    h.command(kbc.CMD_WRITE_CTR, 0x00)
    assert not h.status() & kbc.STATUS_SYS
    h.command(kbc.CMD_WRITE_CTR, kbc.CTR_SYS)
    assert h.status() & kbc.STATUS_SYS


def test_cmd_status_bit_tracks_last_port_written(h: Harness) -> None:
    h.wr(kbc.COMMAND, kbc.CMD_WRITE_CTR)
    assert h.status() & kbc.STATUS_CMD
    h.wr(kbc.DATA, kbc.CTR_DEFAULT)
    assert not h.status() & kbc.STATUS_CMD


def test_self_test_and_interface_test(h: Harness) -> None:
    h.command(kbc.CMD_SELF_TEST)
    assert h.drain() == b"\x55"
    h.command(kbc.CMD_KBD_TEST)
    assert h.drain() == b"\x00"


@pytest.mark.parametrize(
    ("cmd", "bit", "is_set"),
    [
        (kbc.CMD_DISABLE_KBD, kbc.CTR_KBD_DISABLED, True),
        (kbc.CMD_DISABLE_AUX, kbc.CTR_AUX_DISABLED, True),
    ],
)
def test_enable_disable_commands_edit_command_byte(
    h: Harness, cmd: int, bit: int, is_set: bool
) -> None:
    h.command(cmd)
    h.command(kbc.CMD_READ_CTR)
    assert bool(h.drain()[0] & bit) is is_set
    h.command(cmd + 1)  # the matching enable (0xAE, 0xA8)
    h.command(kbc.CMD_READ_CTR)
    assert not h.drain()[0] & bit


def test_controller_mode_read_write(h: Harness) -> None:
    h.command(kbc.CMD_READ_MODE)
    assert h.drain() == bytes((kbc.MODE_DEFAULT,))
    h.command(kbc.CMD_WRITE_MODE, 0x00)
    h.command(kbc.CMD_READ_MODE)
    assert h.drain() == b"\x00"


def test_unknown_commands_are_ignored(h: Harness) -> None:
    for cmd in (0x00, 0xA9, 0xC0, 0xE0):
        h.command(cmd)
    assert h.drain() == b""
    assert h.resets == 0


def test_aux_writes_are_swallowed(h: Harness) -> None:
    h.command(kbc.CMD_WRITE_AUX_BUFFER, 0x5A)  # AUX loop test: no mouse, no echo
    h.command(kbc.CMD_WRITE_AUX, 0xFF)
    assert h.drain() == b""


def test_write_keyboard_buffer_echoes_as_keyboard_data(h: Harness) -> None:
    h.command(kbc.CMD_WRITE_KBD_BUFFER, 0x1C)
    assert h.irq.count == 1
    assert h.drain() == b"\x1c"


def test_new_command_abandons_missing_argument(h: Harness) -> None:
    h.wr(kbc.COMMAND, kbc.CMD_WRITE_CTR)
    h.command(kbc.CMD_READ_CTR)
    assert h.drain() == bytes((kbc.CTR_DEFAULT,))


def test_reply_replaces_unread_output(h: Harness) -> None:
    h.dev.send_scancodes(b"\x1c\xf0\x1c")
    h.command(kbc.CMD_SELF_TEST)
    assert h.drain() == b"\x55"


# --- the keyboard ------------------------------------------------------------------


def test_keyboard_commands_are_acknowledged(h: Harness) -> None:
    h.wr(kbc.DATA, 0xF4)  # enable scanning
    assert h.drain() == b"\xfa"
    h.wr(kbc.DATA, kbc.KBD_RESET)
    assert h.drain() == b"\xfa\xaa"
    h.wr(kbc.DATA, kbc.KBD_GET_ID)
    assert h.drain() == b"\xfa\xab\x83"
    h.wr(kbc.DATA, kbc.KBD_ECHO)
    assert h.drain() == b"\xee"


def test_keyboard_command_arguments(h: Harness) -> None:
    h.wr(kbc.DATA, kbc.KBD_SET_LEDS)
    assert h.drain() == b"\xfa"
    h.wr(kbc.DATA, 0x07)
    assert h.drain() == b"\xfa"
    h.wr(kbc.DATA, kbc.KBD_SCANCODE_SET)
    h.wr(kbc.DATA, 0x00)  # query the current set
    assert h.drain() == b"\xfa\x02"
    h.wr(kbc.DATA, kbc.KBD_RESET)  # no longer an argument
    assert h.drain() == b"\xfa\xaa"


def test_keyboard_ack_raises_irq(h: Harness) -> None:
    h.wr(kbc.DATA, 0xF4)
    assert h.irq.count == 1


# --- Ctrl-Alt-Del and interrupt edges ----------------------------------------------


def test_ctrl_alt_del_set2_sequence(h: Harness) -> None:
    assert h.dev.trigger_ctrl_alt_del()
    assert h.drain() == bytes.fromhex("14 11 e071 e0f071 f011 f014")


def test_ctrl_alt_del_set1_when_translating(h: Harness) -> None:
    h.command(kbc.CMD_WRITE_CTR, kbc.CTR_DEFAULT | kbc.CTR_TRANSLATE)
    assert h.dev.trigger_ctrl_alt_del()
    assert h.drain() == bytes.fromhex("1d 38 e053 e0d3 b8 9d")


def test_one_irq_edge_per_byte(h: Harness) -> None:
    h.dev.trigger_ctrl_alt_del()
    assert h.irq.count == 1
    n = len(kbc.CTRL_ALT_DEL_SET2)
    for i in range(n):
        h.rd(kbc.DATA)
        # Every read that leaves a byte behind raises the next edge.
        assert h.irq.count == min(i + 2, n)
    assert not h.status() & kbc.STATUS_OBF


def test_status_reads_do_not_raise_irq(h: Harness) -> None:
    h.dev.trigger_ctrl_alt_del()
    for _ in range(5):
        h.status()
    assert h.irq.count == 1


def test_no_irq_when_keyboard_interrupt_disabled(h: Harness) -> None:
    h.command(kbc.CMD_WRITE_CTR, kbc.CTR_SYS)
    assert h.dev.trigger_ctrl_alt_del()
    assert h.status() & kbc.STATUS_OBF  # still pollable
    assert h.irq.count == 0
    h.command(kbc.CMD_WRITE_CTR, kbc.CTR_SYS | kbc.CTR_KBD_INT)
    assert h.irq.count == 1  # enabling with data waiting is an edge


def test_buffer_is_capped_all_or_nothing(h: Harness) -> None:
    assert h.dev.send_scancodes(bytes(kbc.BUFFER_SIZE - 4))
    assert not h.dev.trigger_ctrl_alt_del()
    assert len(h.drain()) == kbc.BUFFER_SIZE - 4
    assert h.dev.trigger_ctrl_alt_del()
    assert h.dev.send_scancodes(bytes(kbc.BUFFER_SIZE - len(kbc.CTRL_ALT_DEL_SET2)))
    assert not h.dev.send_scancodes(b"\x00")


def test_empty_data_read_returns_zero(h: Harness) -> None:
    assert h.rd(kbc.DATA) == 0


def test_unused_offsets(h: Harness) -> None:
    for offset in (1, 2, 3):
        h.wr(offset, 0xFE)
        assert h.rd(offset) == 0
    assert h.resets == 0


def test_wide_access(h: Harness) -> None:
    buf = bytearray(b"\xaa\xaa")
    h.dev.read(kbc.COMMAND, memoryview(buf))
    assert buf[1] == 0 and buf[0] & kbc.STATUS_SYS
    h.dev.write(kbc.COMMAND, memoryview(b"\xfe\x00"))
    assert h.resets == 1
    h.dev.write(kbc.COMMAND, memoryview(b""))
    h.dev.read(kbc.COMMAND, memoryview(bytearray()))


# --- snapshots ----------------------------------------------------------------------


def test_save_restore_round_trip_mid_interaction() -> None:
    a = Harness()
    a.command(kbc.CMD_WRITE_CTR, kbc.CTR_DEFAULT | kbc.CTR_AUX_DISABLED)
    a.command(kbc.CMD_WRITE_MODE, 0x00)
    a.dev.trigger_ctrl_alt_del()
    a.rd(kbc.DATA)
    a.wr(kbc.COMMAND, kbc.CMD_WRITE_OUTPUT_PORT)  # argument still to come
    state = a.dev.save()
    assert state == I8042State(**dataclasses.asdict(state))
    assert state.pending_command == kbc.CMD_WRITE_OUTPUT_PORT

    b = Harness()
    b.dev.restore(state)
    assert b.dev.save() == state
    assert b.irq.count == 0
    for dev in (a, b):
        dev.wr(kbc.DATA, 0x00)  # completes the pending command: reset
        assert dev.resets == 1
    assert a.drain() == b.drain() == kbc.CTRL_ALT_DEL_SET2[1:]
    for dev in (a, b):
        dev.command(kbc.CMD_READ_MODE)
    assert a.drain() == b.drain() == b"\x00"


def test_state_is_plain_data(h: Harness) -> None:
    h.dev.trigger_ctrl_alt_del()
    values = dataclasses.asdict(h.dev.save()).values()
    assert all(isinstance(v, int | bytes) for v in values)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("control", 256),
        ("pending_command", 0x20),
        ("pending_kbd_command", 0xF4),
        ("output_buffer", bytes(kbc.BUFFER_SIZE + 1)),
    ],
)
def test_restore_rejects_invalid_state(h: Harness, field: str, value: object) -> None:
    state = dataclasses.replace(h.dev.save(), **{field: value})
    with pytest.raises(ValueError):
        h.dev.restore(state)
