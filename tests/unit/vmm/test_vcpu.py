"""handle_exit is pure: decoded exits in, bus accesses and stop reasons out."""

from __future__ import annotations

from pyvmm.kvm import exits
from pyvmm.kvm._kvm_cffi import lib
from pyvmm.vmm.bus import Bus
from pyvmm.vmm.stop_reason import StopKind
from pyvmm.vmm.vcpu import handle_exit


class Recorder:
    def __init__(self) -> None:
        self.accesses: list[tuple[str, int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        self.accesses.append(("r", offset, bytes(data)))
        data[:] = bytes([0x42]) * len(data)

    def write(self, offset: int, data: memoryview) -> None:
        self.accesses.append(("w", offset, bytes(data)))


def buses() -> tuple[Bus, Bus, Recorder, Recorder]:
    pio, mmio = Bus("pio"), Bus("mmio")
    port_device, mmio_device = Recorder(), Recorder()
    pio.add(0x3F8, 8, port_device)
    mmio.add(0xD000_0000, 0x1000, mmio_device)
    return pio, mmio, port_device, mmio_device


def test_port_io_dispatch() -> None:
    pio, mmio, device, _ = buses()
    assert handle_exit(exits.IoOut(0x3F8, 1, 1, memoryview(b"A")), pio, mmio) is None
    data = memoryview(bytearray(1))
    assert handle_exit(exits.IoIn(0x3FD, 1, 1, data), pio, mmio) is None
    assert data[0] == 0x42
    assert device.accesses == [("w", 0, b"A"), ("r", 5, b"\0")]


def test_string_io_is_split_into_items() -> None:
    pio, mmio, device, _ = buses()
    handle_exit(exits.IoOut(0x3F8, 1, 3, memoryview(b"abc")), pio, mmio)
    assert [access[2] for access in device.accesses] == [b"a", b"b", b"c"]
    data = memoryview(bytearray(4))
    handle_exit(exits.IoIn(0x3F8, 2, 2, data), pio, mmio)
    assert bytes(data) == b"\x42" * 4


def test_mmio_dispatch_and_holes() -> None:
    pio, mmio, _, device = buses()
    handle_exit(exits.MmioWrite(0xD000_0008, memoryview(b"\1\0\0\0")), pio, mmio)
    data = memoryview(bytearray(8))
    handle_exit(exits.MmioRead(0xE000_0000, data), pio, mmio)  # a hole
    assert bytes(data) == b"\xff" * 8
    assert device.accesses == [("w", 8, b"\1\0\0\0")]
    assert mmio.unhandled_reads == 1


def test_stop_reasons() -> None:
    pio, mmio, _, _ = buses()
    assert handle_exit(exits.Shutdown(), pio, mmio).kind is StopKind.TRIPLE_FAULT
    reset = handle_exit(exits.SystemEvent(lib.KVM_SYSTEM_EVENT_RESET), pio, mmio)
    assert reset.kind is StopKind.RESET and reset.exit_code == 0
    off = handle_exit(exits.SystemEvent(lib.KVM_SYSTEM_EVENT_SHUTDOWN), pio, mmio)
    assert off.kind is StopKind.POWEROFF
    internal = handle_exit(exits.InternalError(1, (0x10, 0x20)), pio, mmio)
    assert internal.kind is StopKind.INTERNAL_ERROR and "0x10 0x20" in internal.message
    assert internal.exit_code == 1
    assert handle_exit(exits.FailEntry(0x80000021, 0), pio, mmio).kind is StopKind.INTERNAL_ERROR
    assert handle_exit(exits.Unknown(99), pio, mmio).kind is StopKind.INTERNAL_ERROR
    assert handle_exit(exits.Interrupted(), pio, mmio) is None
