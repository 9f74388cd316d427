"""The VM generation id model: what lands in guest memory, when the guest is told, persistence.

Guest memory is real (the ``mem`` fixture); randomness comes from a seeded
source so the expected bytes are known; the interrupt line counts edges.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from pyvmm import layout
from pyvmm.devices.legacy.vmgenid import GUID_SIZE, VmGenId, VmGenIdState
from pyvmm.memory import GuestMemory, GuestMemoryError
from tests.support.device_harness import CountingIrq

ADDR = layout.VMGENID_ADDR


def seeded(seed: int = 1) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def make(
    mem: GuestMemory, entropy: Callable[[int], bytes] | None = None
) -> tuple[VmGenId, CountingIrq]:
    irq = CountingIrq()
    return VmGenId(mem, ADDR, irq, entropy or seeded()), irq


def test_the_first_id_reaches_guest_memory_only_when_published(mem: GuestMemory) -> None:
    device, irq = make(mem)
    assert device.generation == seeded()(GUID_SIZE)
    assert mem.read(ADDR, GUID_SIZE) == bytes(GUID_SIZE), "a restore must not overwrite memory"
    device.publish()
    assert mem.read(ADDR, GUID_SIZE) == device.generation
    assert irq.count == 0, "a boot is no new generation"


def test_new_generation_writes_new_bytes_and_interrupts_once(mem: GuestMemory) -> None:
    device, irq = make(mem, os.urandom)
    device.publish()
    first = device.generation
    second = device.new_generation()
    assert second != first
    assert mem.read(ADDR, GUID_SIZE) == second == device.generation
    assert irq.count == 1
    assert device.changes == 1
    assert mem.read(ADDR + GUID_SIZE, 64) == bytes(64), "nothing past the 16 bytes"


def test_successive_generations_differ(mem: GuestMemory) -> None:
    device, _ = make(mem, os.urandom)
    seen = {device.generation} | {device.new_generation() for _ in range(50)}
    assert len(seen) == 51


@pytest.mark.parametrize(
    ("entropy", "message"),
    [
        (lambda n: bytes(n - 1), "gave 15 bytes"),
        (lambda n: bytes(n + 1), "gave 17 bytes"),
        (lambda n: b"\x01" * n, "repeated"),
    ],
    ids=["short", "long", "constant"],
)
def test_a_broken_entropy_source_is_refused_and_memory_kept(
    mem: GuestMemory, entropy: Callable[[int], bytes], message: str
) -> None:
    calls = iter([b"\x01" * GUID_SIZE])
    device, irq = make(mem, lambda n: next(calls, None) or entropy(n))
    device.publish()
    with pytest.raises(RuntimeError, match=message):
        device.new_generation()
    assert mem.read(ADDR, GUID_SIZE) == b"\x01" * GUID_SIZE
    assert device.generation == b"\x01" * GUID_SIZE
    assert irq.count == 0


def test_the_address_must_be_8_byte_aligned(mem: GuestMemory) -> None:
    with pytest.raises(ValueError, match="8-byte aligned"):
        VmGenId(mem, ADDR + 4, CountingIrq(), os.urandom)


def test_outside_guest_ram_the_write_fails_and_nothing_changes() -> None:
    with GuestMemory([(0, 0x10_0000)]) as small:
        device = VmGenId(small, 0x20_0000, CountingIrq(), os.urandom)
        before = device.generation
        with pytest.raises(GuestMemoryError, match="outside guest RAM"):
            device.new_generation()
        assert device.generation == before


def test_save_and_restore(mem: GuestMemory) -> None:
    device, _ = make(mem, os.urandom)
    device.publish()
    state = device.save()
    assert state == VmGenIdState(generation=device.generation, address=ADDR)
    other, irq = make(mem, os.urandom)
    other.restore(state)
    assert other.generation == device.generation
    assert irq.count == 0


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (VmGenIdState(generation=bytes(15), address=ADDR), "not 16 bytes"),
        (VmGenIdState(generation="x" * 16, address=ADDR), "not 16 bytes"),  # type: ignore[arg-type]
        (VmGenIdState(generation=bytes(16), address=ADDR + 8), "at 0xa0008"),
        (VmGenIdState(generation=bytes(16), address=True), "at True"),  # type: ignore[arg-type]
        (VmGenIdState(generation=bytes(16), address="0xa0000"), "at '0xa0000'"),  # type: ignore[arg-type]
    ],
    ids=["short", "str", "moved", "bool", "text"],
)
def test_restore_refuses_a_state_that_cannot_be_ours(
    mem: GuestMemory, state: VmGenIdState, message: str
) -> None:
    device, _ = make(mem)
    before = device.generation
    with pytest.raises(ValueError, match=message):
        device.restore(state)
    assert device.generation == before
