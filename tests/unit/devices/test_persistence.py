"""Persistence is a contract: every device saves and restores itself, through the state file.

The test enumerates the device classes themselves (every ``VirtioDevice``
subclass, every legacy device), so a new device without a ``save`` /
``restore`` - or without a factory here - fails it. Each state goes
through the snapshot codec (JSON and back) and into a fresh device, which
must then save the same state again.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable

import pytest

import pyvmm.devices.virtio as virtio_package
from pyvmm import layout
from pyvmm.config import parse_rate_limit
from pyvmm.devices.base import NoIrq
from pyvmm.devices.legacy.acpi_pm import AcpiPm, PvPanic
from pyvmm.devices.legacy.boot_timer import BootTimer
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.serial import Serial
from pyvmm.devices.legacy.vmgenid import VmGenId
from pyvmm.devices.rate_limiter import RateLimiter
from pyvmm.devices.virtio.balloon import VirtioBalloon
from pyvmm.devices.virtio.block import VirtioBlock
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.vsock import VirtioVsock
from pyvmm.snapshot import codec
from pyvmm.snapshot.device_states import DEVICE_STATE_TYPES


class FakeBlock:
    read_only = False
    sectors = 2048
    supports_discard = True
    supports_write_zeroes = True


class FakeTap:
    vnet_hdr = True


class FakeVsockBackend:
    def take_events(self) -> list:
        return []


class FakeGuestMemory:
    def write(self, addr: int, data: bytes) -> None:
        pass


def limited(text: str) -> RateLimiter:
    limiter = RateLimiter.from_spec(parse_rate_limit(text))
    assert limiter is not None
    limiter.consume(300, 1)  # a budget that is not full: it must survive the round trip
    return limiter


#: One way to make each device, as the VMM would (with fakes for host back ends).
FACTORIES: dict[type, Callable[[], object]] = {
    VirtioBlock: lambda: VirtioBlock(FakeBlock(), serial="d", rate_limiter=limited("bw=1K")),
    VirtioNet: lambda: VirtioNet(FakeTap(), bytes(6), limited("ops=5"), limited("bw=2K")),
    VirtioRng: lambda: VirtioRng(os.getrandom, rate_limiter=limited("bw=1K,ops=9")),
    VirtioVsock: lambda: VirtioVsock(3, FakeVsockBackend()),
    VirtioBalloon: lambda: VirtioBalloon(512, deflate_on_oom=True, stats_interval_s=1),
    Serial: lambda: Serial(NoIrq(), lambda data: None),
    I8042: lambda: I8042(NoIrq(), lambda: None),
    AcpiPm: lambda: AcpiPm(lambda: None, lambda: None),
    PvPanic: lambda: PvPanic(lambda: None),
    BootTimer: lambda: BootTimer(0),
    VmGenId: lambda: VmGenId(FakeGuestMemory(), layout.VMGENID_ADDR, NoIrq(), os.urandom),
}


def _walk(value: object, budget: Callable[[dict], object]) -> object:
    if dataclasses.is_dataclass(value):
        fields = {f.name: _walk(getattr(value, f.name), budget) for f in dataclasses.fields(value)}
        return budget(fields) if "scaled_budget" in fields else fields
    return value


def without_budgets(state: object) -> object:
    return _walk(state, lambda fields: {k: v for k, v in fields.items() if k != "scaled_budget"})


def budgets(state: object) -> list[int]:
    """Each token bucket's budget in whole tokens (the scaled budget per refill period)."""
    found: list[int] = []
    _walk(
        state,
        lambda f: found.append(f["scaled_budget"] // (f["refill_time_ms"] * 1_000_000)) or f,
    )
    return found


def all_virtio_device_classes() -> set[type]:
    for module in pkgutil.iter_modules(virtio_package.__path__):
        importlib.import_module(f"{virtio_package.__name__}.{module.name}")
    found: set[type] = set()
    pending = list(VirtioDevice.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("pyvmm."):  # test fakes are not devices
            found.add(cls)
        pending += cls.__subclasses__()
    return found


def test_every_device_class_has_a_factory_here() -> None:
    missing = all_virtio_device_classes() - set(FACTORIES)
    assert not missing, f"add a factory (and so a persistence check) for {missing}"


@pytest.mark.parametrize("cls", list(FACTORIES), ids=lambda cls: cls.__name__)
def test_state_round_trips_through_the_state_file_codec(cls: type) -> None:
    device = FACTORIES[cls]()
    state = device.save()
    assert state is not None, f"{cls.__name__}.save() returned None"
    assert type(state).__name__ in DEVICE_STATE_TYPES, "the state file must be able to name it"
    decoded = codec.decode(codec.encode_tagged(state), object, DEVICE_STATE_TYPES)
    fresh = FACTORIES[cls]()
    fresh.restore(decoded)
    again = fresh.save()
    assert without_budgets(again) == without_budgets(state)
    for before, after in zip(budgets(state), budgets(again), strict=True):
        # A restored bucket refills from now: a few microseconds' worth, never more.
        assert before <= after <= before + 1


def test_a_device_that_cannot_save_fails_loudly() -> None:
    class Forgetful(VirtioDevice):
        pass

    with pytest.raises(NotImplementedError, match="Forgetful cannot be saved"):
        Forgetful().save()
    with pytest.raises(NotImplementedError, match="cannot be restored"):
        Forgetful().restore(object())
