"""A minimal i8042 keyboard controller, enough for reboot and Ctrl-Alt-Del.

Why a microVM has one at all (as Firecracker does): a Linux guest reboots by
pulsing the CPU reset line through the i8042 (command 0xFE on port 0x64), and
the host asks the guest to shut down cleanly by "typing" Ctrl-Alt-Del on its
keyboard. Nothing else about a PS/2 keyboard is worth modelling, so there is
no mouse (AUX) port, no typematic timing and no key state.

The device owns a 5-byte port window at ``layout.I8042_DATA_PORT`` (0x60):
offset 0 is the data port, offset 4 the command/status port (0x64). Offsets
1..3 (0x61..0x63) read as zero and ignore writes; the speaker port 0x61 is
handled by KVM's in-kernel PIT, so it never reaches us anyway.

Output buffer and interrupt: bytes for the guest (keyboard scancodes, replies
to commands) wait in one small FIFO capped at :data:`BUFFER_SIZE`; the head
is what the data port returns. As on the real chip, the keyboard interrupt
output is "output buffer full" gated by the command byte's keyboard-interrupt
bit, and IRQ 1 is edge-triggered, so we call ``kbd_irq.trigger()`` on each
rising edge of that level: when a byte arrives in an empty buffer, and after
each data-port read that leaves another byte behind (the next byte "moves
into" the output register). A command (to the controller or the keyboard)
discards unread output before its reply is queued, as the real single-byte
output register would, so a reply is always the next byte the guest reads.

Threads: the vCPU thread calls :meth:`read`/:meth:`write`; the API thread
calls :meth:`trigger_ctrl_alt_del`. State is guarded by one lock; the
injected ``kbd_irq.trigger`` and ``on_reset`` are called after releasing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.base import IrqTrigger

# --- offsets in the window ----------------------------------------------------
DATA = 0  # port 0x60
COMMAND = 4  # port 0x64: status on read, command on write
WINDOW_SIZE = 5

# --- status register (read at 0x64) -----------------------------------------
STATUS_OBF = 0x01  # output buffer full: the data port has a byte
STATUS_IBF = 0x02  # input buffer full: never, we consume writes at once
STATUS_SYS = 0x04  # system flag (mirrors the command byte's SYS bit)
STATUS_CMD = 0x08  # the last write went to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited by a key lock

# --- command byte ("controller configuration byte") ----------------------
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLED = 0x10
CTR_AUX_DISABLED = 0x20
CTR_TRANSLATE = 0x40  # deliver set-1 scancodes instead of set 2
CTR_DEFAULT = CTR_KBD_INT | CTR_SYS

# --- controller commands (written to 0x64) ------------------------------
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_MODE = 0xCA
CMD_WRITE_MODE = 0xCB
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_BUFFER = 0xD2
CMD_WRITE_AUX_BUFFER = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE_FIRST = 0xF0  # 0xF0..0xFF pulse output lines whose bit is 0 in the low nibble
CMD_RESET = 0xFE  # the usual one: pulse line 0, the CPU reset
# Controller commands whose argument follows on the data port.
_CMDS_WITH_ARGUMENT = frozenset(
    (
        CMD_WRITE_CTR,
        CMD_WRITE_MODE,
        CMD_WRITE_OUTPUT_PORT,
        CMD_WRITE_KBD_BUFFER,
        CMD_WRITE_AUX_BUFFER,
        CMD_WRITE_AUX,
    )
)

SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00
MODE_DEFAULT = 0x01  # PS/2 interface
OUTPUT_PORT_RESET = 0x01  # active low: 0 holds the CPU in reset
OUTPUT_PORT_A20 = 0x02
OUTPUT_PORT_DEFAULT = OUTPUT_PORT_RESET | OUTPUT_PORT_A20

# --- the keyboard behind the controller (commands written to 0x60) ------------
KBD_ACK = 0xFA
KBD_BAT_PASSED = 0xAA
KBD_ECHO = 0xEE
KBD_RESET = 0xFF
KBD_GET_ID = 0xF2
KBD_SET_LEDS = 0xED
KBD_SCANCODE_SET = 0xF0
KBD_TYPEMATIC = 0xF3
KBD_ID = b"\xab\x83"  # a standard MF2 keyboard
_KBD_CMDS_WITH_ARGUMENT = frozenset((KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_TYPEMATIC))

# Ctrl, Alt, Del pressed, then released in reverse order.
# Set 2: Ctrl 14, Alt 11, Del E0 71; a release is F0 before the last byte.
CTRL_ALT_DEL_SET2 = bytes((0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14))
# Set 1 (what a translating controller delivers): release = make | 0x80.
CTRL_ALT_DEL_SET1 = bytes((0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D))

BUFFER_SIZE = 16  # the guest reads one byte per interrupt; more is just memory

_ZEROS = tuple(bytes(n) for n in range(9))


def _fill_tail(data: memoryview) -> None:
    """Zero everything after the first byte (wide accesses to byte ports)."""
    size = len(data)
    if size > 1:
        data[1:] = _ZEROS[size - 1] if size <= 9 else bytes(size - 1)


@dataclass(frozen=True)
class I8042State:
    """Everything the guest can observe of an :class:`I8042`, as plain values."""

    control: int
    output_port: int
    mode: int
    last_write_was_command: bool
    pending_command: int  # controller command waiting for its data byte, or 0
    pending_kbd_command: int  # keyboard command waiting for its argument, or 0
    output_buffer: bytes


class I8042:
    """The controller; see the module docstring for the model and threading."""

    def __init__(self, kbd_irq: IrqTrigger, on_reset: Callable[[], None]) -> None:
        """``on_reset`` is called when the guest pulses the CPU reset line."""
        self._irq = kbd_irq
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._buffer = bytearray()
        self._control = CTR_DEFAULT
        self._output_port = OUTPUT_PORT_DEFAULT
        self._mode = MODE_DEFAULT
        self._last_was_command = False
        self._pending_command = 0
        self._pending_kbd_command = 0
        self._irq_level = False

    # --- the guest side -----------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        """Guest read: offset 0 pops the output buffer, offset 4 is status."""
        if not data:
            return
        rising = False
        with self._lock:
            if offset == DATA:
                buffer = self._buffer
                if buffer:
                    value = buffer[0]
                    del buffer[0]
                    # The output register empties (the level drops); a byte
                    # behind it refills it at once, which is a new edge.
                    self._irq_level = False
                    rising = self._update_irq()
                else:
                    value = 0
            elif offset == COMMAND:
                value = STATUS_UNLOCKED
                if self._buffer:
                    value |= STATUS_OBF
                if self._control & CTR_SYS:
                    value |= STATUS_SYS
                if self._last_was_command:
                    value |= STATUS_CMD
            else:
                value = 0
        data[0] = value
        _fill_tail(data)
        if rising:
            self._irq.trigger()

    def write(self, offset: int, data: memoryview) -> None:
        """Guest write of ``data[0]``: a command at offset 4, data at offset 0."""
        if not data:
            return
        value = data[0]
        with self._lock:
            if offset == COMMAND:
                reset = self._command(value)
            elif offset == DATA:
                reset = self._data(value)
            else:
                return
            rising = self._update_irq()
        if rising:
            self._irq.trigger()
        if reset:
            self._on_reset()

    # --- the host side --------------------------------------------------------

    def trigger_ctrl_alt_del(self) -> bool:
        """Type Ctrl-Alt-Del (press and release); False if the buffer is too full.

        The scancode set follows the command byte's translate bit, so the
        guest sees what a real keyboard behind this controller would send.
        """
        with self._lock:
            translate = self._control & CTR_TRANSLATE
        return self.send_scancodes(CTRL_ALT_DEL_SET1 if translate else CTRL_ALT_DEL_SET2)

    def send_scancodes(self, codes: bytes) -> bool:
        """Queue raw keyboard bytes, all or nothing; False if they do not fit.

        All-or-nothing because half a key sequence (a press without its
        release) would leave a key stuck down in the guest.
        """
        with self._lock:
            if len(self._buffer) + len(codes) > BUFFER_SIZE:
                return False
            self._buffer += codes
            rising = self._update_irq()
        if rising:
            self._irq.trigger()
        return True

    # --- snapshots --------------------------------------------------------------

    def save(self) -> I8042State:
        with self._lock:
            return I8042State(
                control=self._control,
                output_port=self._output_port,
                mode=self._mode,
                last_write_was_command=self._last_was_command,
                pending_command=self._pending_command,
                pending_kbd_command=self._pending_kbd_command,
                output_buffer=bytes(self._buffer),
            )

    def restore(self, state: I8042State) -> None:
        """Load ``state`` (from :meth:`save`); raises ValueError if it is invalid.

        No interrupt is triggered: the interrupt controller's own snapshot
        already holds any edge delivered before the save.
        """
        for name in ("control", "output_port", "mode"):
            value = getattr(state, name)
            if not isinstance(value, int) or not 0 <= value <= 0xFF:
                raise ValueError(f"i8042 state: {name}={value!r} is not a byte")
        if state.pending_command not in _CMDS_WITH_ARGUMENT | {0}:
            raise ValueError(f"i8042 state: pending_command={state.pending_command!r}")
        if state.pending_kbd_command not in _KBD_CMDS_WITH_ARGUMENT | {0}:
            raise ValueError(f"i8042 state: pending_kbd_command={state.pending_kbd_command!r}")
        if len(state.output_buffer) > BUFFER_SIZE:
            raise ValueError(f"i8042 state: output buffer longer than {BUFFER_SIZE}")
        with self._lock:
            self._control = state.control
            self._output_port = state.output_port
            self._mode = state.mode
            self._last_was_command = bool(state.last_write_was_command)
            self._pending_command = state.pending_command
            self._pending_kbd_command = state.pending_kbd_command
            self._buffer = bytearray(state.output_buffer)
            self._irq_level = self._level()

    # --- internals (call with the lock held) -----------------------------------

    def _command(self, cmd: int) -> bool:
        """A controller command; returns True if it pulses the reset line."""
        self._last_was_command = True
        self._pending_command = 0  # a new command abandons a missing argument
        if cmd in _CMDS_WITH_ARGUMENT:
            self._pending_command = cmd
        elif cmd == CMD_READ_CTR:
            self._reply(self._control)
        elif cmd == CMD_SELF_TEST:
            self._reply(SELF_TEST_PASSED)
        elif cmd == CMD_KBD_TEST:
            self._reply(INTERFACE_TEST_PASSED)
        elif cmd == CMD_DISABLE_KBD:
            self._control |= CTR_KBD_DISABLED
        elif cmd == CMD_ENABLE_KBD:
            self._control &= ~CTR_KBD_DISABLED
        elif cmd == CMD_DISABLE_AUX:
            self._control |= CTR_AUX_DISABLED
        elif cmd == CMD_ENABLE_AUX:
            self._control &= ~CTR_AUX_DISABLED
        elif cmd == CMD_READ_MODE:
            self._reply(self._mode)
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._reply(self._output_port)
        elif cmd >= CMD_PULSE_FIRST:
            # Low nibble: a 0 bit pulses that output line; line 0 is reset.
            return not cmd & OUTPUT_PORT_RESET
        # Anything else (AUX tests, password, ...) is ignored: no reply, so
        # a driver probing for a mouse times out and decides there is none.
        return False

    def _data(self, value: int) -> bool:
        """A data-port write; returns True if it pulls the reset line."""
        self._last_was_command = False
        pending = self._pending_command
        self._pending_command = 0
        if pending == CMD_WRITE_CTR:
            self._control = value
        elif pending == CMD_WRITE_MODE:
            self._mode = value
        elif pending == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            return not value & OUTPUT_PORT_RESET
        elif pending == CMD_WRITE_KBD_BUFFER:
            self._reply(value)  # appears as if the keyboard had sent it
        elif pending in (CMD_WRITE_AUX_BUFFER, CMD_WRITE_AUX):
            pass  # no mouse: the byte goes nowhere
        else:
            self._keyboard_command(value)
        return False

    def _keyboard_command(self, value: int) -> None:
        """A byte for the keyboard itself: answer like an MF2 keyboard."""
        expecting = self._pending_kbd_command
        self._pending_kbd_command = 0
        if expecting == KBD_SCANCODE_SET and value == 0:
            self._reply(KBD_ACK, 2)  # "which set?": set 2
        elif expecting:
            self._reply(KBD_ACK)  # the argument of LEDs/scancode set/typematic
        elif value == KBD_RESET:
            self._reply(KBD_ACK, KBD_BAT_PASSED)
        elif value == KBD_GET_ID:
            self._reply(KBD_ACK, *KBD_ID)
        elif value == KBD_ECHO:
            self._reply(KBD_ECHO)
        else:
            if value in _KBD_CMDS_WITH_ARGUMENT:
                self._pending_kbd_command = value
            self._reply(KBD_ACK)

    def _reply(self, *values: int) -> None:
        """Replace unread output with a reply (see the module docstring)."""
        self._buffer.clear()
        self._buffer.extend(values)

    def _level(self) -> bool:
        return bool(self._buffer) and bool(self._control & CTR_KBD_INT)

    def _update_irq(self) -> bool:
        """Recompute the IRQ 1 level; True if it just went from low to high."""
        level = self._level()
        rising = level and not self._irq_level
        self._irq_level = level
        return rising
