"""The 16550A model: registers, interrupt rules and edges, input cap, snapshots."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from pyvmm.devices.legacy import serial as uart
from pyvmm.devices.legacy.serial import Serial, SerialState
from tests.support.device_harness import CountingIrq, RegisterAccess


class Harness(RegisterAccess):
    """A UART plus fakes, and one-line register access for the tests."""

    def __init__(self, capacity: int = 64) -> None:
        self.irq = CountingIrq()
        self.sent = bytearray()
        self.drained = 0
        self.dev = Serial(self.irq, self.sent.extend, capacity, on_input_ready=self._drained)

    def _drained(self) -> None:
        self.drained += 1


@pytest.fixture
def h() -> Harness:
    return Harness()


# --- power-on state and plain registers ----------------------------------------


def test_power_on_values(h: Harness) -> None:
    assert h.rd(uart.IER) == 0
    assert h.rd(uart.IIR) == uart.IIR_NONE
    assert h.rd(uart.LCR) == 0x03
    assert h.rd(uart.MCR) == uart.MCR_OUT2
    assert h.rd(uart.LSR) == uart.LSR_THRE | uart.LSR_TEMT
    assert h.rd(uart.MSR) == uart.MSR_CTS | uart.MSR_DSR | uart.MSR_DCD
    assert h.rd(uart.SCR) == 0
    assert h.irq.count == 0


def test_scratch_register_stores_a_byte(h: Harness) -> None:
    h.wr(uart.SCR, 0xA5)
    assert h.rd(uart.SCR) == 0xA5
    h.wr(uart.SCR, 0x00)
    assert h.rd(uart.SCR) == 0


def test_lcr_stores_all_bits(h: Harness) -> None:
    h.wr(uart.LCR, 0x5B)
    assert h.rd(uart.LCR) == 0x5B


def test_ier_keeps_only_low_nibble(h: Harness) -> None:
    h.wr(uart.IER, 0xF5)
    assert h.rd(uart.IER) == 0x05


def test_mcr_keeps_only_low_five_bits(h: Harness) -> None:
    h.wr(uart.MCR, 0xEB)
    assert h.rd(uart.MCR) == 0x0B


def test_lsr_and_msr_writes_are_ignored(h: Harness) -> None:
    h.wr(uart.LSR, 0x00)
    h.wr(uart.MSR, 0x00)
    assert h.rd(uart.LSR) == uart.LSR_THRE | uart.LSR_TEMT
    assert h.rd(uart.MSR) == uart.MSR_CONNECTED


def test_rbr_read_when_empty_returns_zero(h: Harness) -> None:
    assert h.rd(uart.DATA) == 0


# --- divisor latch ------------------------------------------------------------------


def test_dlab_maps_divisor_latch_over_data_and_ier(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_RDA)
    h.wr(uart.LCR, 0x80 | 0x03)
    assert h.rd(uart.DATA) == 12  # power-on divisor: 9600 baud
    assert h.rd(uart.IER) == 0
    h.wr(uart.DATA, 0x01)
    h.wr(uart.IER, 0x02)
    assert (h.rd(uart.DATA), h.rd(uart.IER)) == (0x01, 0x02)
    h.wr(uart.LCR, 0x03)
    assert h.rd(uart.IER) == uart.IER_RDA
    h.wr(uart.LCR, 0x83)
    assert (h.rd(uart.DATA), h.rd(uart.IER)) == (0x01, 0x02)


def test_divisor_writes_do_not_transmit(h: Harness) -> None:
    h.wr(uart.LCR, 0x80)
    h.wr(uart.DATA, ord("A"))
    assert h.sent == b""
    h.wr(uart.LCR, 0x03)
    h.wr(uart.DATA, ord("A"))
    assert h.sent == b"A"


def test_dlab_does_not_hide_rx_data(h: Harness) -> None:
    h.dev.enqueue_input(b"z")
    h.wr(uart.LCR, 0x80)
    assert h.rd(uart.DATA) == 12
    h.wr(uart.LCR, 0x03)
    assert h.rd(uart.DATA) == ord("z")


# --- transmit ------------------------------------------------------------------------


def test_thr_write_sends_each_byte(h: Harness) -> None:
    for ch in b"hi\n":
        h.wr(uart.DATA, ch)
    assert h.sent == b"hi\n"
    assert h.rd(uart.LSR) & (uart.LSR_THRE | uart.LSR_TEMT) == uart.LSR_THRE | uart.LSR_TEMT


def test_out_receives_bytes_objects() -> None:
    got: list[object] = []
    dev = Serial(CountingIrq(), got.append)
    dev.write(uart.DATA, memoryview(b"\xff"))
    assert got == [b"\xff"]
    assert type(got[0]) is bytes


# --- receive and the input cap ----------------------------------------------------


def test_input_is_read_in_order_and_sets_dr(h: Harness) -> None:
    assert h.dev.enqueue_input(b"ab") == 2
    assert h.rd(uart.LSR) & uart.LSR_DR
    assert h.rd(uart.DATA) == ord("a")
    assert h.rd(uart.LSR) & uart.LSR_DR
    assert h.rd(uart.DATA) == ord("b")
    assert not h.rd(uart.LSR) & uart.LSR_DR


def test_input_is_capped_and_space_reported() -> None:
    h = Harness(capacity=4)
    assert h.dev.input_space() == 4
    assert h.dev.enqueue_input(b"abcdef") == 4
    assert h.dev.input_space() == 0
    assert h.dev.enqueue_input(b"x") == 0
    assert h.rd(uart.DATA) == ord("a")
    assert h.dev.input_space() == 1
    assert h.dev.enqueue_input(b"xy") == 1
    assert bytes(h.rd(uart.DATA) for _ in range(4)) == b"bcdx"


def test_enqueue_accepts_any_bytes_like(h: Harness) -> None:
    assert h.dev.enqueue_input(bytearray(b"q")) == 1
    assert h.dev.enqueue_input(memoryview(b"r")) == 1
    assert h.dev.enqueue_input(b"") == 0
    assert (h.rd(uart.DATA), h.rd(uart.DATA)) == (ord("q"), ord("r"))


def test_invalid_capacity_rejected() -> None:
    with pytest.raises(ValueError):
        Serial(CountingIrq(), print, 0)


def test_input_listener_fires_when_buffer_empties(h: Harness) -> None:
    h.dev.enqueue_input(b"ab")
    h.rd(uart.DATA)
    assert h.drained == 0
    h.rd(uart.DATA)
    assert h.drained == 1
    h.rd(uart.DATA)  # already empty: no second notice
    assert h.drained == 1


# --- readiness for host input (flow control) -----------------------------------------


def test_not_ready_until_the_guest_looks_at_the_line(h: Harness) -> None:
    assert not h.dev.ready_for_input
    h.wr(uart.LCR, 0x03)
    h.wr(uart.IER, 0)
    assert not h.dev.ready_for_input
    h.rd(uart.LSR)  # a polling driver (the probe's) starts looking for data
    assert h.dev.ready_for_input
    assert h.drained == 1  # the listener heard it once
    h.rd(uart.LSR)
    assert h.drained == 1


def test_a_driver_that_drives_the_modem_lines_is_ready_once_rts_is_up(h: Harness) -> None:
    # What Linux does (traced from a real boot): console setup writes MCR=DTR and
    # then polls LSR while printing; opening the port resets the FIFO, enables
    # the receive interrupt and the FIFO, and raises RTS last.
    h.wr(uart.MCR, uart.MCR_DTR)
    h.rd(uart.LSR)
    assert not h.dev.ready_for_input
    h.wr(uart.FCR, uart.FCR_ENABLE | uart.FCR_CLEAR_RX)
    h.wr(uart.IER, uart.IER_RDA | uart.IER_RLS)
    h.wr(uart.MCR, uart.MCR_DTR | uart.MCR_OUT2)
    assert not h.dev.ready_for_input
    assert h.drained == 0
    h.wr(uart.MCR, uart.MCR_DTR | uart.MCR_RTS | uart.MCR_OUT2)
    assert h.dev.ready_for_input
    assert h.drained == 1
    h.wr(uart.MCR, uart.MCR_DTR | uart.MCR_OUT2)  # port closed (hang-up drops RTS)
    assert not h.dev.ready_for_input


def test_loopback_is_never_ready(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_LOOP | uart.MCR_RTS)
    h.rd(uart.LSR)
    assert not h.dev.ready_for_input
    h.wr(uart.MCR, uart.MCR_RTS)
    assert h.dev.ready_for_input


def test_readiness_is_advice_the_wire_still_takes_bytes(h: Harness) -> None:
    assert not h.dev.ready_for_input
    assert h.dev.enqueue_input(b"x") == 1
    assert h.rd(uart.DATA) == ord("x")


def test_listener_can_be_replaced_after_construction() -> None:
    dev = Serial(CountingIrq(), print)
    calls: list[str] = []
    dev.set_input_listener(lambda: calls.append("ready"))
    dev.read(uart.LSR, memoryview(bytearray(1)))
    assert calls == ["ready"]
    dev.set_input_listener(None)
    dev.enqueue_input(b"a")
    dev.read(uart.DATA, memoryview(bytearray(1)))  # drained, nobody listening
    assert calls == ["ready"]


def test_readiness_survives_save_and_restore(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_DTR | uart.MCR_RTS)
    state = h.dev.save()
    assert (state.modem_driven, state.line_polled) == (True, False)
    other = Harness()
    other.dev.restore(state)
    assert other.dev.ready_for_input
    other.wr(uart.MCR, uart.MCR_DTR)
    assert not other.dev.ready_for_input  # still a modem-driving driver
    old = dataclasses.replace(state)
    legacy = SerialState(
        **{
            k: v
            for k, v in dataclasses.asdict(old).items()
            if k not in ("modem_driven", "line_polled")
        }
    )
    fresh = Harness()
    fresh.dev.restore(legacy)  # a snapshot from before readiness existed accepts input
    fresh.wr(uart.MCR, 0)
    assert fresh.dev.ready_for_input


# --- FIFO control and IIR FIFO bits -------------------------------------------------


def test_fcr_enable_sets_iir_fifo_bits(h: Harness) -> None:
    h.wr(uart.FCR, uart.FCR_ENABLE)
    assert h.rd(uart.IIR) == 0xC0 | uart.IIR_NONE
    h.wr(uart.FCR, 0)
    assert h.rd(uart.IIR) == uart.IIR_NONE


def test_fcr_rx_reset_clears_input(h: Harness) -> None:
    h.wr(uart.FCR, uart.FCR_ENABLE)
    h.dev.enqueue_input(b"abc")
    h.wr(uart.FCR, uart.FCR_ENABLE | uart.FCR_CLEAR_RX)
    assert h.drained == 1
    assert not h.rd(uart.LSR) & uart.LSR_DR
    assert h.dev.input_space() == 64


def test_fcr_tx_reset_alone_keeps_input(h: Harness) -> None:
    h.wr(uart.FCR, uart.FCR_ENABLE)
    h.dev.enqueue_input(b"abc")
    h.wr(uart.FCR, uart.FCR_ENABLE | uart.FCR_CLEAR_TX)
    assert h.rd(uart.DATA) == ord("a")


def test_enabling_or_disabling_fifos_resets_them(h: Harness) -> None:
    h.dev.enqueue_input(b"a")
    h.wr(uart.FCR, uart.FCR_ENABLE)
    assert not h.rd(uart.LSR) & uart.LSR_DR
    h.dev.enqueue_input(b"b")
    h.wr(uart.FCR, 0)
    assert not h.rd(uart.LSR) & uart.LSR_DR


def test_fcr_other_bits_ignored_without_enable(h: Harness) -> None:
    h.wr(uart.FCR, 0xC0)
    assert h.dev.save().fifo_control == 0
    h.wr(uart.FCR, 0xC7)
    assert h.dev.save().fifo_control == 0xC1  # reset bits self-clear


# --- interrupt identification and clearing --------------------------------------------


def test_thre_interrupt_on_enable_and_cleared_by_iir_read(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_THRE)
    assert h.irq.count == 1
    assert h.rd(uart.IIR) == uart.IIR_THRE
    assert h.rd(uart.IIR) == uart.IIR_NONE


def test_thre_interrupt_cleared_by_thr_write_then_reasserted(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_THRE)
    h.wr(uart.DATA, ord("x"))  # acknowledged, then THR empties again at once
    assert h.rd(uart.IIR) == uart.IIR_THRE
    assert h.rd(uart.IIR) == uart.IIR_NONE


def test_thre_reasserted_when_reenabled(h: Harness) -> None:
    # Linux's UART_BUG_THRE probe: enable, read IIR, disable, enable, read IIR.
    h.wr(uart.IER, uart.IER_THRE)
    assert h.rd(uart.IIR) == uart.IIR_THRE
    h.wr(uart.IER, 0)
    h.wr(uart.IER, uart.IER_THRE)
    assert h.rd(uart.IIR) == uart.IIR_THRE


def test_rewriting_ier_with_thre_already_set_does_not_reassert(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_THRE)
    h.rd(uart.IIR)
    h.wr(uart.IER, uart.IER_THRE | uart.IER_RDA)
    assert h.rd(uart.IIR) == uart.IIR_NONE


def test_rda_interrupt_cleared_by_reading_data(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_RDA)
    h.dev.enqueue_input(b"ab")
    assert h.rd(uart.IIR) == uart.IIR_RDA
    assert h.rd(uart.IIR) == uart.IIR_RDA  # IIR read does not clear RDA
    h.rd(uart.DATA)
    assert h.rd(uart.IIR) == uart.IIR_RDA
    h.rd(uart.DATA)
    assert h.rd(uart.IIR) == uart.IIR_NONE


def test_rda_without_enable_raises_nothing(h: Harness) -> None:
    h.dev.enqueue_input(b"a")
    assert h.rd(uart.IIR) == uart.IIR_NONE
    assert h.irq.count == 0


def test_rda_has_priority_over_thre(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_RDA | uart.IER_THRE)
    h.dev.enqueue_input(b"a")
    assert h.rd(uart.IIR) == uart.IIR_RDA
    h.rd(uart.DATA)
    assert h.rd(uart.IIR) == uart.IIR_THRE
    assert h.rd(uart.IIR) == uart.IIR_NONE


def test_iir_read_does_not_clear_thre_when_not_reported(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_RDA | uart.IER_THRE)
    h.dev.enqueue_input(b"a")
    h.rd(uart.IIR)  # reports RDA; THRE stays pending behind it
    h.rd(uart.DATA)
    assert h.rd(uart.IIR) == uart.IIR_THRE


def test_modem_status_interrupt_lowest_priority_cleared_by_msr_read(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_MS | uart.IER_THRE)
    h.wr(uart.MCR, uart.MCR_LOOP | uart.MCR_RTS)  # CTS drops and comes back: deltas
    assert h.rd(uart.IIR) == uart.IIR_THRE
    assert h.rd(uart.IIR) == uart.IIR_MS
    h.rd(uart.MSR)
    assert h.rd(uart.IIR) == uart.IIR_NONE


def test_line_status_interrupt_on_overrun_has_top_priority(h: Harness) -> None:
    small = Harness(capacity=1)
    small.wr(uart.MCR, uart.MCR_LOOP)
    small.wr(uart.IER, uart.IER_RLS | uart.IER_RDA | uart.IER_THRE)
    small.wr(uart.DATA, 1)
    small.wr(uart.DATA, 2)  # buffer full: overrun, byte lost
    assert small.rd(uart.IIR) == uart.IIR_RLS
    lsr = small.rd(uart.LSR)
    assert lsr & uart.LSR_OE and lsr & uart.LSR_DR
    assert not small.rd(uart.LSR) & uart.LSR_OE  # cleared by the read
    assert small.rd(uart.IIR) == uart.IIR_RDA
    assert small.rd(uart.DATA) == 1


def test_wide_reads_fill_the_tail_with_zero(h: Harness) -> None:
    buf = bytearray(b"\xaa" * 4)
    h.dev.read(uart.LSR, memoryview(buf))
    assert buf == bytes((uart.LSR_THRE | uart.LSR_TEMT, 0, 0, 0))


def test_wide_write_uses_first_byte_only(h: Harness) -> None:
    h.dev.write(uart.DATA, memoryview(b"AB"))
    assert h.sent == b"A"


def test_empty_access_is_ignored(h: Harness) -> None:
    h.dev.read(uart.DATA, memoryview(bytearray()))
    h.dev.write(uart.DATA, memoryview(b""))
    assert h.sent == b""


def test_offsets_outside_the_window_are_harmless(h: Harness) -> None:
    h.wr(8, 1)
    assert h.rd(8) == 0


# --- interrupt edges ------------------------------------------------------------------


def test_each_thr_write_is_a_new_thre_edge(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_THRE)
    assert h.irq.count == 1
    for n, ch in enumerate(b"abc", start=2):
        h.wr(uart.DATA, ch)
        assert h.irq.count == n


def test_thr_write_after_iir_ack_is_an_edge(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_THRE)
    h.rd(uart.IIR)
    h.wr(uart.DATA, ord("a"))
    assert h.irq.count == 2


def test_thr_write_without_thre_enable_raises_nothing(h: Harness) -> None:
    h.wr(uart.DATA, ord("a"))
    h.wr(uart.IER, uart.IER_RDA)
    h.wr(uart.DATA, ord("b"))
    assert h.irq.count == 0


def test_no_edge_while_level_stays_high(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_RDA)
    h.dev.enqueue_input(b"a")
    h.dev.enqueue_input(b"b")
    assert h.irq.count == 1
    h.rd(uart.DATA)
    h.dev.enqueue_input(b"c")  # level never dropped
    assert h.irq.count == 1
    h.rd(uart.DATA)
    h.rd(uart.DATA)
    h.dev.enqueue_input(b"d")  # dropped to low, now rises again
    assert h.irq.count == 2


def test_thr_write_behind_pending_rda_gives_no_extra_edge(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_RDA | uart.IER_THRE)
    assert h.irq.count == 1
    h.dev.enqueue_input(b"a")
    h.wr(uart.DATA, ord("x"))  # RDA keeps the level high throughout
    assert h.irq.count == 1


def test_enabling_a_pending_source_is_an_edge(h: Harness) -> None:
    h.dev.enqueue_input(b"a")
    assert h.irq.count == 0
    h.wr(uart.IER, uart.IER_RDA)
    assert h.irq.count == 1


def test_disable_then_enable_is_a_new_edge(h: Harness) -> None:
    h.dev.enqueue_input(b"a")
    h.wr(uart.IER, uart.IER_RDA)
    h.wr(uart.IER, 0)
    h.wr(uart.IER, uart.IER_RDA)
    assert h.irq.count == 2


def test_modem_delta_edge(h: Harness) -> None:
    h.wr(uart.IER, uart.IER_MS)
    # Loopback with DTR, RTS and OUT2 reproduces the "connected" lines: no change.
    h.wr(uart.MCR, uart.MCR_LOOP | uart.MCR_DTR | uart.MCR_RTS | uart.MCR_OUT2)
    assert h.irq.count == 0
    h.wr(uart.MCR, uart.MCR_LOOP | uart.MCR_DTR | uart.MCR_OUT2)  # CTS falls
    assert h.irq.count == 1


# --- loopback and modem status ----------------------------------------------------------


def test_loopback_thr_goes_to_receiver_not_output(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_LOOP)
    h.wr(uart.DATA, ord("L"))
    assert h.sent == b""
    assert h.rd(uart.LSR) & uart.LSR_DR
    assert h.rd(uart.DATA) == ord("L")
    h.wr(uart.MCR, uart.MCR_OUT2)
    h.wr(uart.DATA, ord("M"))
    assert h.sent == b"M"


def test_loopback_rx_interrupt(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_LOOP)
    h.wr(uart.IER, uart.IER_RDA)
    h.wr(uart.DATA, 0x55)
    assert h.irq.count == 1
    assert h.rd(uart.IIR) == uart.IIR_RDA


def test_loopback_drops_host_input(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_LOOP)
    assert h.dev.enqueue_input(b"abc") == 3
    assert not h.rd(uart.LSR) & uart.LSR_DR


@pytest.mark.parametrize(
    ("mcr_bit", "msr_bit"),
    [
        (uart.MCR_RTS, uart.MSR_CTS),
        (uart.MCR_DTR, uart.MSR_DSR),
        (uart.MCR_OUT1, uart.MSR_RI),
        (uart.MCR_OUT2, uart.MSR_DCD),
    ],
)
def test_loopback_msr_mirrors_mcr(h: Harness, mcr_bit: int, msr_bit: int) -> None:
    h.wr(uart.MCR, uart.MCR_LOOP)
    h.rd(uart.MSR)  # clear the deltas of entering loopback
    h.wr(uart.MCR, uart.MCR_LOOP | mcr_bit)
    assert h.rd(uart.MSR) & 0xF0 == msr_bit


def test_linux_loopback_probe_value(h: Harness) -> None:
    # 8250 autoconfig: MCR = LOOP | OUT2 | RTS expects MSR & 0xF0 == DCD | CTS.
    h.wr(uart.MCR, uart.MCR_LOOP | 0x0A)
    assert h.rd(uart.MSR) & 0xF0 == 0x90


def test_msr_delta_bits_set_on_change_and_cleared_by_read(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_LOOP | uart.MCR_RTS | uart.MCR_DTR | uart.MCR_OUT2)
    h.rd(uart.MSR)
    h.wr(uart.MCR, uart.MCR_LOOP | uart.MCR_DTR | uart.MCR_OUT2)  # CTS falls
    assert h.rd(uart.MSR) == uart.MSR_DSR | uart.MSR_DCD | uart.MSR_DCTS
    assert h.rd(uart.MSR) == uart.MSR_DSR | uart.MSR_DCD


def test_ri_delta_only_on_trailing_edge(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_LOOP)
    h.rd(uart.MSR)
    h.wr(uart.MCR, uart.MCR_LOOP | uart.MCR_OUT1)  # RI rises: no TERI
    assert h.rd(uart.MSR) == uart.MSR_RI
    h.wr(uart.MCR, uart.MCR_LOOP)  # RI falls: TERI
    assert h.rd(uart.MSR) == uart.MSR_TERI


def test_entering_and_leaving_loopback_sets_deltas(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_LOOP)  # CTS, DSR, DCD all drop
    assert h.rd(uart.MSR) == uart.MSR_DCTS | uart.MSR_DDSR | uart.MSR_DDCD
    h.wr(uart.MCR, 0)  # and come back
    assert h.rd(uart.MSR) == uart.MSR_CONNECTED | uart.MSR_DCTS | uart.MSR_DDSR | uart.MSR_DDCD


def test_mcr_changes_outside_loopback_leave_msr_alone(h: Harness) -> None:
    h.wr(uart.MCR, uart.MCR_DTR | uart.MCR_RTS)
    h.wr(uart.MCR, 0)
    assert h.rd(uart.MSR) == uart.MSR_CONNECTED


# --- snapshots ----------------------------------------------------------------------------


def test_save_restore_round_trip_mid_interaction() -> None:
    a = Harness(capacity=8)
    a.wr(uart.LCR, 0x83)
    a.wr(uart.DATA, 0x01)
    a.wr(uart.IER, 0x00)
    a.wr(uart.LCR, 0x1B)
    a.wr(uart.FCR, 0xC7)
    a.wr(uart.SCR, 0x42)
    a.wr(uart.IER, uart.IER_RDA | uart.IER_THRE | uart.IER_MS)
    a.wr(uart.MCR, uart.MCR_LOOP | uart.MCR_RTS)
    a.wr(uart.DATA, ord("x"))
    a.wr(uart.MCR, uart.MCR_OUT2)
    a.dev.enqueue_input(b"yz")
    state = a.dev.save()
    assert state == SerialState(**dataclasses.asdict(state))
    assert state.receive_buffer == b"xyz"

    b = Harness(capacity=8)
    b.dev.restore(state)
    assert b.dev.save() == state
    assert b.irq.count == 0  # restoring raises no interrupt
    # Both devices now behave identically.
    for dev in (a, b):
        seen = [dev.rd(uart.IIR), dev.rd(uart.DATA), dev.rd(uart.DATA), dev.rd(uart.DATA)]
        seen += [dev.rd(uart.IIR), dev.rd(uart.IIR), dev.rd(uart.MSR), dev.rd(uart.IIR)]
        seen += [dev.rd(uart.LCR), dev.rd(uart.SCR)]
        dev.wr(uart.LCR, 0x9B)
        seen += [dev.rd(uart.DATA), dev.rd(uart.IER)]
        dev.seen = seen  # type: ignore[attr-defined]
    assert a.seen == b.seen  # type: ignore[attr-defined]
    assert b.seen[:4] == [0xC0 | uart.IIR_RDA, ord("x"), ord("y"), ord("z")]  # type: ignore[attr-defined]


def test_restored_level_allows_next_edge() -> None:
    a = Harness()
    a.wr(uart.IER, uart.IER_RDA)
    a.dev.enqueue_input(b"a")
    b = Harness()
    b.dev.restore(a.dev.save())
    b.dev.enqueue_input(b"b")  # level was already high: no new edge
    assert b.irq.count == 0
    b.rd(uart.DATA)
    b.rd(uart.DATA)
    b.dev.enqueue_input(b"c")
    assert b.irq.count == 1


def test_state_is_plain_data(h: Harness) -> None:
    h.dev.enqueue_input(b"q")
    fields = dataclasses.asdict(h.dev.save())
    assert all(isinstance(v, int | bytes) for v in fields.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.dev.save().scratch = 1  # type: ignore[misc]


def test_restore_rejects_oversized_buffer(h: Harness) -> None:
    state = dataclasses.replace(h.dev.save(), receive_buffer=bytes(65))
    with pytest.raises(ValueError, match="capacity"):
        h.dev.restore(state)


@pytest.mark.parametrize(
    ("field", "value"),
    [("scratch", 256), ("interrupt_enable", 0x10), ("modem_control", 0x20), ("line_control", -1)],
)
def test_restore_rejects_invalid_registers(h: Harness, field: str, value: int) -> None:
    state = dataclasses.replace(h.dev.save(), **{field: value})
    with pytest.raises(ValueError, match=field):
        h.dev.restore(state)


# --- threads -----------------------------------------------------------------------------


def test_concurrent_input_and_reads_lose_nothing() -> None:
    h = Harness(capacity=16)
    payload = bytes(range(256)) * 20
    received = bytearray()

    def feeder() -> None:
        pos = 0
        while pos < len(payload):
            pos += h.dev.enqueue_input(payload[pos : pos + 7])

    thread = threading.Thread(target=feeder)
    thread.start()
    while len(received) < len(payload):
        if h.rd(uart.LSR) & uart.LSR_DR:
            received.append(h.rd(uart.DATA))
    thread.join()
    assert received == payload


def test_callbacks_may_reenter_the_device() -> None:
    # ``out`` and ``trigger`` run outside the lock, so this must not deadlock.
    holder: list[Serial] = []

    class ReadingIrq:
        def trigger(self) -> None:
            buf = bytearray(1)
            holder[0].read(uart.IIR, memoryview(buf))

    dev = Serial(ReadingIrq(), lambda b: holder[0].input_space())
    holder.append(dev)
    dev.write(uart.IER, memoryview(bytes((uart.IER_THRE,))))
    dev.write(uart.DATA, memoryview(b"a"))
