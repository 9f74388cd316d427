"""A 16550A UART (the guest's COM1 console) as a sans-IO register file.

The guest sees eight byte-wide registers at offsets 0..7 of its port window
(COM1 is ``layout.COM1_PORT``). What the host sees:

* every byte the guest transmits is handed to the injected ``out`` callable
  at once: transmission is instantaneous, so LSR.THRE and LSR.TEMT are always
  set and a transmitter-empty interrupt is due again right after each THR
  write;
* bytes typed on the host go in through :meth:`Serial.enqueue_input`, into a
  receive buffer capped at ``input_capacity`` so a guest that never reads
  cannot make the host buffer grow;
* the host side is told when the guest is ready for input
  (:attr:`Serial.ready_for_input`, and the input listener), the way a
  terminal with hardware flow control waits for RTS (see below);
* interrupts leave through an :class:`~pyvmm.devices.base.IrqTrigger`.

Why the interrupt is modelled as a level with edge detection: ISA IRQ 4 is
edge-triggered and reaches the guest through an irqfd, which can only send
edges. The 16550's INTR pin is a level (any enabled, pending source), and a
guest driver relies on that: its handler reads IIR until it says "no
interrupt", so the pin is low when the handler returns and the next event
produces a fresh edge. We therefore recompute the level after every state
change and call ``irq.trigger()`` exactly on each rising edge. A THR write
clears the THRE source and the (instant) transmission sets it again, so a
THR write with IER.THRE enabled and no other source pending produces a new
edge, as the real chip does once its transmitter drains.

Why input waits for the guest's driver: Linux's 8250 driver resets the
receive FIFO (and reads the data register) while it opens the port, and
again when it enables the FIFO, so bytes pushed in earlier are lost: a
command piped into ``pyvmm run`` would vanish during boot. A real terminal
with RTS/CTS flow control never sends before the UART raises RTS, and Linux
raises RTS exactly once the port is open and configured ("ready to
respond", serial_core.c), after the last FIFO reset. So a driver that drives
the modem lines (writes DTR or RTS to MCR, as Linux does when it sets up its
console) is ready once RTS is up and not in loopback. A driver that never
touches MCR (a minimal polling driver such as the probe guest's) is ready as
soon as it first reads LSR, i.e. starts looking for data. Nothing is
enforced: :meth:`Serial.enqueue_input` still takes bytes at any time, as the
wire would; the host side (:mod:`pyvmm.host.console_input`) holds them.

Threads: the vCPU thread calls :meth:`read`/:meth:`write` while an input
thread calls :meth:`enqueue_input`; every state access is under one
``threading.Lock``. The injected callables (``out``, ``irq.trigger``,
the input listener) are called *after* the lock is released, so a slow
output sink never blocks input, and a callable may call back into the
device without deadlocking. They must be safe to call from the vCPU thread
(and ``irq.trigger`` also from the input thread).

Simplifications (none of which a Linux or BIOS driver can tell apart from a
real 16550A): the line never reports parity, framing or break errors (only
overrun, which loopback can cause); the divisor and line settings are stored
but have no effect on timing; the receive buffer holds ``input_capacity``
bytes whether or not FIFOs are enabled; IIR reports "received data available"
(0x04) rather than the FIFO character-timeout id (0x0C); and the interrupt
output is not gated by MCR.OUT2 (as in QEMU and vm-superio).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.base import IrqTrigger

# --- register offsets -------------------------------------------------------
DATA = 0  # read: RBR, write: THR; DLL while LCR.DLAB
IER = 1  # DLM while LCR.DLAB
IIR = 2  # read: IIR, write: FCR
FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# --- IER: interrupt enables -------------------------------------------------
IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_RLS = 0x04  # receiver line status (errors)
IER_MS = 0x08  # modem status (MSR delta bits)
IER_MASK = 0x0F  # bits 4..7 read as zero on a 16550A

# --- IIR: interrupt identification, highest priority first ----------------
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_THRE = 0x02
IIR_MS = 0x00
IIR_NONE = 0x01
IIR_FIFO_ENABLED = 0xC0

# --- FCR: FIFO control (write only) ---------------------------------------
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_STICKY = 0xC9  # enable, DMA mode select, RX trigger level: the bits that stay

# --- LCR / MCR ----------------------------------------------------------------
LCR_DLAB = 0x80
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F  # bits 5..7 read as zero on a 16550A

# --- LSR: line status -------------------------------------------------------
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI  # cleared by reading LSR

# --- MSR: modem status --------------------------------------------------------
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
# Outside loopback the "modem" is the host terminal, always present and ready.
MSR_CONNECTED = MSR_CTS | MSR_DSR | MSR_DCD

# --- power-on values ----------------------------------------------------------
DEFAULT_DIVISOR = 12  # 115200 / 12 = 9600 baud
DEFAULT_LCR = 0x03  # 8 data bits, no parity, 1 stop bit
DEFAULT_MCR = MCR_OUT2  # PC boards route INTR to the PIC through OUT2
DEFAULT_INPUT_CAPACITY = 64

# One-byte ``bytes`` objects, built once, so transmitting allocates nothing.
_BYTE = tuple(bytes((i,)) for i in range(256))
# Zero fills for the unused tail of a multi-byte read, by length.
_ZEROS = tuple(bytes(n) for n in range(9))


def _modem_lines(mcr: int) -> int:
    """MSR bits 4..7 for a given MCR.

    In loopback the 16550A wires its own outputs back to its inputs:
    RTS -> CTS, DTR -> DSR, OUT1 -> RI, OUT2 -> DCD.
    """
    if not mcr & MCR_LOOP:
        return MSR_CONNECTED
    lines = 0
    if mcr & MCR_RTS:
        lines |= MSR_CTS
    if mcr & MCR_DTR:
        lines |= MSR_DSR
    if mcr & MCR_OUT1:
        lines |= MSR_RI
    if mcr & MCR_OUT2:
        lines |= MSR_DCD
    return lines


def _modem_deltas(old: int, new: int) -> int:
    """MSR delta bits raised by the modem lines changing from ``old`` to ``new``.

    CTS, DSR and DCD flag any change; RI flags only its trailing edge (1 -> 0).
    Each status bit sits exactly four bits above its delta bit.
    """
    changed = old ^ new
    return ((changed & (MSR_CTS | MSR_DSR | MSR_DCD)) | (old & ~new & MSR_RI)) >> 4


def _fill_tail(data: memoryview) -> None:
    """Zero everything after the first byte (wide accesses to byte registers)."""
    size = len(data)
    if size > 1:
        data[1:] = _ZEROS[size - 1] if size <= 9 else bytes(size - 1)


@dataclass(frozen=True)
class SerialState:
    """Everything the guest can observe of a :class:`Serial`, as plain values."""

    divisor_latch_low: int
    divisor_latch_high: int
    interrupt_enable: int
    line_control: int
    modem_control: int
    fifo_control: int
    scratch: int
    line_status_errors: int
    modem_status_deltas: int
    thre_interrupt_pending: bool
    receive_buffer: bytes
    # Input readiness (see the module docstring). The defaults describe a
    # snapshot taken before they existed: a UART that accepts input at once.
    modem_driven: bool = False
    line_polled: bool = True


class Serial:
    """A 16550A UART; see the module docstring for the model and threading."""

    def __init__(
        self,
        irq: IrqTrigger,
        out: Callable[[bytes], object],
        input_capacity: int = DEFAULT_INPUT_CAPACITY,
        *,
        on_input_ready: Callable[[], object] | None = None,
    ) -> None:
        """Create a UART in its power-on state.

        ``out`` receives each transmitted byte as a 1-byte ``bytes``.
        ``on_input_ready`` is the input listener (see :meth:`set_input_listener`).
        """
        if input_capacity < 1:
            raise ValueError(f"input_capacity must be at least 1, not {input_capacity}")
        self._irq = irq
        self._out = out
        self._on_input_ready = on_input_ready
        self._capacity = input_capacity
        self._lock = threading.Lock()
        self._rx = bytearray()
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._ier = 0
        self._lcr = DEFAULT_LCR
        self._mcr = DEFAULT_MCR
        self._fcr = 0
        self._scr = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._thre_pending = False
        self._irq_level = False
        self._modem_driven = False
        self._line_polled = False

    # --- the guest side -----------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:  # noqa: C901 - the register map
        """Guest read of the register at ``offset`` (first byte; the rest reads 0)."""
        if not data:
            return
        wake = False
        with self._lock:
            if offset == DATA:
                if self._lcr & LCR_DLAB:
                    value = self._dll
                else:
                    rx = self._rx
                    if rx:
                        value = rx[0]
                        del rx[0]
                        wake = not rx
                    else:
                        value = 0
            elif offset == IER:
                value = self._dlm if self._lcr & LCR_DLAB else self._ier
            elif offset == IIR:
                value = self._interrupt_id()
                # Reading IIR acknowledges a THRE interrupt, but only when it
                # is the one being reported (16550A datasheet).
                if value == IIR_THRE:
                    self._thre_pending = False
                if self._fcr & FCR_ENABLE:
                    value |= IIR_FIFO_ENABLED
            elif offset == LCR:
                value = self._lcr
            elif offset == MCR:
                value = self._mcr
            elif offset == LSR:
                value = LSR_THRE | LSR_TEMT | self._lsr_errors
                if self._rx:
                    value |= LSR_DR
                self._lsr_errors = 0
                if not self._line_polled:
                    was_ready = self._ready()
                    self._line_polled = True
                    wake = self._ready() and not was_ready
            elif offset == MSR:
                value = _modem_lines(self._mcr) | self._msr_deltas
                self._msr_deltas = 0
            elif offset == SCR:
                value = self._scr
            else:
                value = 0
            # Reads only ever clear sources, but keep the level exact.
            rising = self._update_irq()
        data[0] = value
        _fill_tail(data)
        if rising:
            self._irq.trigger()
        if wake:
            self._wake_input()

    def write(self, offset: int, data: memoryview) -> None:  # noqa: C901 - the register map
        """Guest write of ``data[0]`` to the register at ``offset``."""
        if not data:
            return
        value = data[0]
        send = -1
        wake = False
        with self._lock:
            if offset == DATA:
                if self._lcr & LCR_DLAB:
                    self._dll = value
                    return
                if self._mcr & MCR_LOOP:
                    if len(self._rx) < self._capacity:
                        self._rx.append(value)
                    else:
                        self._lsr_errors |= LSR_OE
                else:
                    send = value
                # The write acknowledges THRE (the level may drop here) and
                # the instant transmission empties THR again (and may rise).
                self._thre_pending = False
                rising = self._update_irq()
                self._thre_pending = True
                rising = self._update_irq() or rising
            elif offset == IER:
                if self._lcr & LCR_DLAB:
                    self._dlm = value
                    return
                value &= IER_MASK
                # Enabling THRE while THR is empty (always, here) raises it.
                if value & IER_THRE and not self._ier & IER_THRE:
                    self._thre_pending = True
                self._ier = value
                rising = self._update_irq()
            elif offset == FCR:
                had_input = bool(self._rx)
                if value & FCR_ENABLE:
                    # Turning FIFOs on resets them, as does the RX reset bit.
                    if value & FCR_CLEAR_RX or not self._fcr & FCR_ENABLE:
                        self._rx.clear()
                    self._fcr = value & FCR_STICKY
                else:
                    # With FCR0 clear the other bits are not written, and
                    # turning the FIFOs off resets them.
                    if self._fcr & FCR_ENABLE:
                        self._rx.clear()
                    self._fcr = 0
                wake = had_input and not self._rx
                rising = self._update_irq()
            elif offset == LCR:
                self._lcr = value
                return
            elif offset == MCR:
                value &= MCR_MASK
                self._msr_deltas |= _modem_deltas(_modem_lines(self._mcr), _modem_lines(value))
                was_ready = self._ready()
                self._mcr = value
                self._modem_driven = self._modem_driven or bool(value & (MCR_DTR | MCR_RTS))
                wake = self._ready() and not was_ready
                rising = self._update_irq()
            elif offset == SCR:
                self._scr = value
                return
            else:
                # LSR and MSR writes (factory test only on real parts): ignored.
                return
        if send >= 0:
            self._out(_BYTE[send])
        if rising:
            self._irq.trigger()
        if wake:
            self._wake_input()

    # --- the host side --------------------------------------------------------

    def enqueue_input(self, data: bytes | bytearray | memoryview) -> int:
        """Queue host input for the guest; returns how many bytes were taken.

        At most :meth:`input_space` bytes are accepted; the caller keeps the
        rest and retries when the input listener is called. In
        loopback mode the receiver is cut off from the line, so the bytes are
        consumed and dropped, as on the wire of a real port.
        """
        size = len(data)
        if size == 0:
            return 0
        with self._lock:
            if self._mcr & MCR_LOOP:
                return size
            taken = min(size, self._capacity - len(self._rx))
            if taken <= 0:
                return 0
            self._rx += memoryview(data)[:taken]
            rising = self._update_irq()
        if rising:
            self._irq.trigger()
        return taken

    def input_space(self) -> int:
        """How many bytes :meth:`enqueue_input` would accept right now."""
        with self._lock:
            return self._capacity - len(self._rx)

    @property
    def input_capacity(self) -> int:
        return self._capacity

    @property
    def ready_for_input(self) -> bool:
        """Whether the guest's driver is ready for host input (module docstring)."""
        with self._lock:
            return self._ready()

    def set_input_listener(self, listener: Callable[[], object] | None) -> None:
        """Call ``listener`` whenever the UART can take host input again.

        That is when a guest read or a FIFO reset empties the receive buffer,
        and when :attr:`ready_for_input` turns true, so a host input pump that
        stopped waits without polling. It runs on the vCPU thread, outside
        the device lock.
        """
        self._on_input_ready = listener

    # --- snapshots --------------------------------------------------------------

    def save(self) -> SerialState:
        """The device state, consistent even while other threads use it."""
        with self._lock:
            return SerialState(
                divisor_latch_low=self._dll,
                divisor_latch_high=self._dlm,
                interrupt_enable=self._ier,
                line_control=self._lcr,
                modem_control=self._mcr,
                fifo_control=self._fcr,
                scratch=self._scr,
                line_status_errors=self._lsr_errors,
                modem_status_deltas=self._msr_deltas,
                thre_interrupt_pending=self._thre_pending,
                receive_buffer=bytes(self._rx),
                modem_driven=self._modem_driven,
                line_polled=self._line_polled,
            )

    def restore(self, state: SerialState) -> None:
        """Load ``state`` (from :meth:`save`); raises ValueError if it is invalid.

        No interrupt is triggered: the interrupt controller's own snapshot
        already holds any edge that was delivered before the save.
        """
        registers = {
            "divisor_latch_low": (state.divisor_latch_low, 0xFF),
            "divisor_latch_high": (state.divisor_latch_high, 0xFF),
            "interrupt_enable": (state.interrupt_enable, IER_MASK),
            "line_control": (state.line_control, 0xFF),
            "modem_control": (state.modem_control, MCR_MASK),
            "fifo_control": (state.fifo_control, FCR_STICKY),
            "scratch": (state.scratch, 0xFF),
            "line_status_errors": (state.line_status_errors, LSR_ERRORS),
            "modem_status_deltas": (state.modem_status_deltas, MSR_DELTAS),
        }
        for name, (value, mask) in registers.items():
            if not isinstance(value, int) or value < 0 or value & ~mask:
                raise ValueError(f"serial state: {name}={value!r} is not valid")
        if len(state.receive_buffer) > self._capacity:
            raise ValueError(
                f"serial state: {len(state.receive_buffer)} buffered input bytes "
                f"exceed the capacity of {self._capacity}"
            )
        with self._lock:
            self._dll = state.divisor_latch_low
            self._dlm = state.divisor_latch_high
            self._ier = state.interrupt_enable
            self._lcr = state.line_control
            self._mcr = state.modem_control
            self._fcr = state.fifo_control
            self._scr = state.scratch
            self._lsr_errors = state.line_status_errors
            self._msr_deltas = state.modem_status_deltas
            self._thre_pending = bool(state.thre_interrupt_pending)
            self._rx = bytearray(state.receive_buffer)
            self._modem_driven = bool(state.modem_driven)
            self._line_polled = bool(state.line_polled)
            self._irq_level = self._interrupt_id() != IIR_NONE

    # --- internals (call with the lock held) -----------------------------------

    def _ready(self) -> bool:
        if self._mcr & MCR_LOOP:
            return False
        if self._modem_driven:
            return bool(self._mcr & MCR_RTS)
        return self._line_polled

    def _wake_input(self) -> None:
        """Tell the host input pump it may send (called without the lock)."""
        listener = self._on_input_ready
        if listener is not None:
            listener()

    def _interrupt_id(self) -> int:
        """The IIR id of the highest-priority enabled pending source."""
        ier = self._ier
        if ier & IER_RLS and self._lsr_errors:
            return IIR_RLS
        if ier & IER_RDA and self._rx:
            return IIR_RDA
        if ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        if ier & IER_MS and self._msr_deltas:
            return IIR_MS
        return IIR_NONE

    def _update_irq(self) -> bool:
        """Recompute the INTR level; True if it just went from low to high."""
        level = self._interrupt_id() != IIR_NONE
        rising = level and not self._irq_level
        self._irq_level = level
        return rising
