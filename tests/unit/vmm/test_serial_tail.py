from __future__ import annotations

from pyvmm.vmm.serial_tail import SerialTail


def test_forwards_and_keeps_the_end() -> None:
    seen = bytearray()
    tail = SerialTail(seen.extend, size=16)
    for chunk in (b"first line\n", b"x" * 100, b"\nlast words\n\n"):
        tail(chunk)
    assert bytes(seen).endswith(b"last words\n\n")
    assert len(seen) == 11 + 100 + 13
    assert tail.last_line() == "last words"
    assert len(tail.text()) <= 16


def test_panic_line_found() -> None:
    tail = SerialTail(lambda data: None)
    assert tail.panic_line() is None
    tail(b"[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n[ 1.1] Rebooting")
    assert tail.panic_line() == "Kernel panic - not syncing: VFS: Unable to mount root fs"


def test_empty_output() -> None:
    assert SerialTail(lambda data: None).last_line() == ""
