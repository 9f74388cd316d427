"""The virtio-mmio v2 register file, driven as a guest driver would, with a fake device."""

from __future__ import annotations

import pytest

from pyvmm.devices.virtio.device import (
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VirtioDevice,
    VirtioInterrupt,
)
from pyvmm.devices.virtio.mmio import (
    MMIO_MAGIC,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VENDOR_QEMU,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    MmioTransport,
    Reg,
)
from pyvmm.devices.virtio.queue import QueueError
from pyvmm.memory import GuestMemory
from tests.support.device_harness import CountingIrq

DEVICE_FEATURE = 1 << 3
VERSION_1 = 1 << VIRTIO_F_VERSION_1
EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX

DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


class FakeDevice(VirtioDevice):
    device_type = 42
    queue_max_sizes = (16, 8)
    avail_features = DEVICE_FEATURE

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(range(0x10, 0x20))
        self.processed: list[int] = []
        self.resets = 0
        self.activations = 0
        self.fail_with: Exception | None = None
        self.restored: object = None

    def read_config(self, offset: int, data: memoryview) -> None:
        chunk = self.config[offset : offset + len(data)]
        data[:] = chunk + bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: memoryview) -> None:
        if offset + len(data) <= len(self.config):
            self.config[offset : offset + len(data)] = data

    def activate(self, mem, queues, interrupt, acked_features=0) -> None:
        super().activate(mem, queues, interrupt, acked_features)
        self.activations += 1

    def process_queue(self, index: int) -> None:
        self.processed.append(index)
        if self.fail_with is not None:
            raise self.fail_with

    def reset(self) -> None:
        super().reset()
        self.resets += 1

    def save(self) -> object:
        return ("fake", len(self.processed))

    def restore(self, state: object) -> None:
        self.restored = state


@pytest.fixture
def mem():
    with GuestMemory([(0, 0x10000)]) as memory:
        yield memory


@pytest.fixture
def dev() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def irq() -> CountingIrq:
    return CountingIrq()


@pytest.fixture
def mmio(dev, irq, mem) -> MmioTransport:
    return MmioTransport(dev, irq, mem)


def rd(t: MmioTransport, offset: int, size: int = 4) -> int:
    buf = bytearray(size)
    t.read(offset, memoryview(buf))
    return int.from_bytes(buf, "little")


def wr(t: MmioTransport, offset: int, value: int, size: int = 4) -> None:
    t.write(offset, memoryview(value.to_bytes(size, "little")))


def negotiate(t: MmioTransport, features: int = VERSION_1) -> int:
    """ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back."""
    wr(t, Reg.STATUS, 0)
    wr(t, Reg.STATUS, STATUS_ACKNOWLEDGE)
    wr(t, Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    for sel in (0, 1):
        wr(t, Reg.DRIVER_FEATURES_SEL, sel)
        wr(t, Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
    wr(t, Reg.STATUS, rd(t, Reg.STATUS) | STATUS_FEATURES_OK)
    return rd(t, Reg.STATUS)


def setup_queue(t: MmioTransport, index: int, size: int, desc=DESC, avail=AVAIL, used=USED):
    wr(t, Reg.QUEUE_SEL, index)
    wr(t, Reg.QUEUE_NUM, size)
    for low, addr in ((Reg.QUEUE_DESC_LOW, desc), (Reg.QUEUE_DRIVER_LOW, avail)):
        wr(t, low, addr & 0xFFFF_FFFF)
        wr(t, low + 4, addr >> 32)
    wr(t, Reg.QUEUE_DEVICE_LOW, used & 0xFFFF_FFFF)
    wr(t, Reg.QUEUE_DEVICE_HIGH, used >> 32)
    wr(t, Reg.QUEUE_READY, 1)


def driver_ok(t: MmioTransport) -> int:
    wr(t, Reg.STATUS, rd(t, Reg.STATUS) | STATUS_DRIVER_OK)
    return rd(t, Reg.STATUS)


def bring_up(t: MmioTransport, features: int = VERSION_1) -> None:
    assert negotiate(t, features) & STATUS_FEATURES_OK
    setup_queue(t, 0, 16)
    assert driver_ok(t) & STATUS_DRIVER_OK


# --- identification -----------------------------------------------------------------


def test_identification_registers(mmio):
    assert rd(mmio, Reg.MAGIC_VALUE) == MMIO_MAGIC == int.from_bytes(b"virt", "little")
    assert rd(mmio, Reg.VERSION) == 2
    assert rd(mmio, Reg.DEVICE_ID) == 42
    assert rd(mmio, Reg.VENDOR_ID) == VENDOR_QEMU


def test_vendor_id_is_configurable(dev, irq, mem):
    assert rd(MmioTransport(dev, irq, mem, vendor_id=0x1234), Reg.VENDOR_ID) == 0x1234


def test_shared_memory_regions_read_as_absent(mmio):
    wr(mmio, Reg.SHM_SEL, 0)
    for reg in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
        assert rd(mmio, reg) == 0xFFFF_FFFF


def test_write_only_registers_read_zero(mmio):
    wr(mmio, Reg.QUEUE_SEL, 1)
    assert rd(mmio, Reg.QUEUE_SEL) == 0
    assert rd(mmio, Reg.QUEUE_NOTIFY) == 0
    assert mmio.invalid_accesses == 0


# --- features -------------------------------------------------------------------------


def test_device_features_include_transport_bits(mmio):
    wr(mmio, Reg.DEVICE_FEATURES_SEL, 0)
    low = rd(mmio, Reg.DEVICE_FEATURES)
    wr(mmio, Reg.DEVICE_FEATURES_SEL, 1)
    high = rd(mmio, Reg.DEVICE_FEATURES)
    wr(mmio, Reg.DEVICE_FEATURES_SEL, 2)
    assert rd(mmio, Reg.DEVICE_FEATURES) == 0
    offered = low | high << 32
    assert offered == (DEVICE_FEATURE | VERSION_1 | EVENT_IDX | 1 << VIRTIO_F_RING_INDIRECT_DESC)


def test_features_ok_accepted_for_a_subset_with_version_1(mmio):
    status = negotiate(mmio, VERSION_1 | DEVICE_FEATURE)
    assert status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    assert mmio.acked_features == VERSION_1 | DEVICE_FEATURE


def test_features_ok_refused_without_version_1(mmio):
    status = negotiate(mmio, DEVICE_FEATURE)
    assert not status & STATUS_FEATURES_OK
    # The driver gives up; DRIVER_OK without FEATURES_OK does not activate.
    wr(mmio, Reg.STATUS, status | STATUS_FAILED)
    assert rd(mmio, Reg.STATUS) & STATUS_FAILED
    assert not driver_ok(mmio) & STATUS_DRIVER_OK
    assert not mmio.device.activated


def test_features_ok_refused_for_unoffered_features(mmio):
    assert not negotiate(mmio, VERSION_1 | 1 << 5) & STATUS_FEATURES_OK


def test_driver_features_frozen_after_features_ok(mmio):
    negotiate(mmio, VERSION_1)
    wr(mmio, Reg.DRIVER_FEATURES_SEL, 0)
    wr(mmio, Reg.DRIVER_FEATURES, DEVICE_FEATURE)
    assert mmio.acked_features == VERSION_1
    assert mmio.invalid_accesses == 1


def test_driver_cannot_clear_status_bits(mmio):
    negotiate(mmio)
    wr(mmio, Reg.STATUS, STATUS_ACKNOWLEDGE)
    assert rd(mmio, Reg.STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    assert mmio.invalid_accesses == 1


# --- queues --------------------------------------------------------------------------


def test_queue_registers_read_back(mmio):
    negotiate(mmio)
    wr(mmio, Reg.QUEUE_SEL, 1)
    assert rd(mmio, Reg.QUEUE_NUM_MAX) == 8
    setup_queue(mmio, 1, 4, desc=0x1_2345_6000, avail=0x7000, used=0x8000)
    assert rd(mmio, Reg.QUEUE_NUM) == 4
    assert rd(mmio, Reg.QUEUE_READY) == 1
    assert rd(mmio, Reg.QUEUE_DESC_LOW) == 0x2345_6000
    assert rd(mmio, Reg.QUEUE_DESC_HIGH) == 1
    assert rd(mmio, Reg.QUEUE_DRIVER_LOW) == 0x7000
    assert rd(mmio, Reg.QUEUE_DEVICE_LOW) == 0x8000
    queue = mmio.queues[1]
    assert (queue.size, queue.desc_table, queue.avail_ring, queue.used_ring) == (
        4,
        0x1_2345_6000,
        0x7000,
        0x8000,
    )
    wr(mmio, Reg.QUEUE_SEL, 0)
    assert rd(mmio, Reg.QUEUE_NUM_MAX) == 16
    assert rd(mmio, Reg.QUEUE_READY) == 0


def test_queue_registers_frozen_while_ready(mmio):
    negotiate(mmio)
    setup_queue(mmio, 0, 8)
    wr(mmio, Reg.QUEUE_NUM, 4)
    wr(mmio, Reg.QUEUE_DESC_LOW, 0x5000)
    assert mmio.queues[0].size == 8
    assert mmio.queues[0].desc_table == DESC
    assert mmio.invalid_accesses == 2
    wr(mmio, Reg.QUEUE_READY, 0)  # before DRIVER_OK a driver may take a queue back
    wr(mmio, Reg.QUEUE_NUM, 4)
    assert mmio.queues[0].size == 4


def test_queue_sel_beyond_the_queues(mmio):
    wr(mmio, Reg.QUEUE_SEL, 2)
    assert rd(mmio, Reg.QUEUE_NUM_MAX) == 0
    assert rd(mmio, Reg.QUEUE_READY) == 0
    wr(mmio, Reg.QUEUE_NUM, 4)
    wr(mmio, Reg.QUEUE_READY, 1)
    assert mmio.invalid_accesses == 2


def test_driver_ok_activates_the_device(mmio, dev, mem):
    bring_up(mmio)
    assert dev.activated and dev.activations == 1
    assert dev.mem is mem
    assert dev.queues is mmio.queues
    assert dev.interrupt is mmio.interrupt
    assert dev.acked_features == VERSION_1
    assert not mmio.queues[0].event_idx
    # Queue registers are frozen once the device runs.
    wr(mmio, Reg.QUEUE_SEL, 1)
    wr(mmio, Reg.QUEUE_READY, 1)
    assert not mmio.queues[1].ready


def test_event_idx_reaches_the_queues(mmio):
    bring_up(mmio, VERSION_1 | EVENT_IDX)
    assert all(queue.event_idx for queue in mmio.queues)


@pytest.mark.parametrize(
    ("size", "used"),
    [(16, 0xF000_0000), (12, USED), (32, USED)],  # outside RAM, not a power of 2, > max
)
def test_invalid_queue_needs_reset(mmio, dev, irq, size, used):
    negotiate(mmio)
    setup_queue(mmio, 0, size, used=used)
    status = driver_ok(mmio)
    assert status & STATUS_DEVICE_NEEDS_RESET
    assert not dev.activated
    assert mmio.interrupt.status == VIRTIO_MMIO_INT_CONFIG
    assert irq.count == 1
    # A driver echoing the status it read (with NEEDS_RESET) is not refused.
    wr(mmio, Reg.STATUS, status | STATUS_FAILED)
    assert rd(mmio, Reg.STATUS) & STATUS_FAILED
    wr(mmio, Reg.STATUS, 0)
    assert rd(mmio, Reg.STATUS) == 0


def test_reset_clears_device_queues_and_interrupts(mmio, dev):
    bring_up(mmio, VERSION_1 | EVENT_IDX)
    resets = dev.resets
    mmio.interrupt.signal_used_queue()
    wr(mmio, Reg.QUEUE_SEL, 1)
    wr(mmio, Reg.STATUS, 0)
    assert rd(mmio, Reg.STATUS) == 0
    assert not dev.activated and dev.resets == resets + 1
    assert rd(mmio, Reg.INTERRUPT_STATUS) == 0
    assert mmio.acked_features == 0
    assert mmio.queue_sel == 0
    queue = mmio.queues[0]
    assert (queue.ready, queue.desc_table, queue.event_idx, queue.size) == (False, 0, False, 16)
    bring_up(mmio)  # and the device comes up again
    assert dev.activations == 2


# --- notifications and interrupts -----------------------------------------------------


def test_notify_processes_the_queue(mmio, dev):
    bring_up(mmio)
    wr(mmio, Reg.QUEUE_NOTIFY, 0)
    assert dev.processed == [0]


def test_notify_goes_to_on_notify_when_given(dev, irq, mem):
    notified: list[int] = []
    t = MmioTransport(dev, irq, mem, on_notify=notified.append)
    bring_up(t)
    wr(t, Reg.QUEUE_NOTIFY, 0)
    assert notified == [0]
    assert dev.processed == []
    t.process_queue(0)  # what the event loop then does
    assert dev.processed == [0]


def test_notify_ignored_unless_running_and_ready(mmio, dev):
    wr(mmio, Reg.QUEUE_NOTIFY, 0)  # before DRIVER_OK
    bring_up(mmio)
    wr(mmio, Reg.QUEUE_NOTIFY, 1)  # queue 1 not ready
    wr(mmio, Reg.QUEUE_NOTIFY, 7)  # no such queue
    mmio.process_queue(5)
    assert dev.processed == []
    assert mmio.invalid_accesses == 3


def test_queue_error_while_processing_needs_reset(mmio, dev, irq):
    bring_up(mmio)
    dev.fail_with = QueueError("malformed chain")
    wr(mmio, Reg.QUEUE_NOTIFY, 0)  # does not raise
    assert rd(mmio, Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert rd(mmio, Reg.INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG
    assert irq.count == 1
    wr(mmio, Reg.QUEUE_NOTIFY, 0)  # ignored until reset
    assert dev.processed == [0]


def test_host_errors_are_not_swallowed(mmio, dev):
    bring_up(mmio)
    dev.fail_with = RuntimeError("a bug in the device model")
    with pytest.raises(RuntimeError):
        wr(mmio, Reg.QUEUE_NOTIFY, 0)


def test_interrupt_status_and_ack(mmio, irq):
    bring_up(mmio)
    mmio.interrupt.signal_used_queue()
    mmio.interrupt.signal_config_change()
    assert irq.count == 2
    assert rd(mmio, Reg.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    wr(mmio, Reg.INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert rd(mmio, Reg.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    wr(mmio, Reg.INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG)
    assert rd(mmio, Reg.INTERRUPT_STATUS) == 0


# --- config space ----------------------------------------------------------------------


def test_config_generation_changes_with_config(mmio):
    before = rd(mmio, Reg.CONFIG_GENERATION)
    assert rd(mmio, Reg.CONFIG_GENERATION) == before
    mmio.interrupt.signal_config_change()
    assert rd(mmio, Reg.CONFIG_GENERATION) != before


def test_config_space_accesses(mmio, dev):
    assert rd(mmio, Reg.CONFIG, 1) == 0x10
    assert rd(mmio, Reg.CONFIG + 2, 2) == 0x1312
    assert rd(mmio, Reg.CONFIG + 4, 4) == 0x17161514
    assert rd(mmio, Reg.CONFIG + 8, 8) == 0x1F1E1D1C1B1A1918
    wr(mmio, Reg.CONFIG + 8, 0x0102030405060708, 8)
    assert dev.config[8:16] == bytes.fromhex("0807060504030201")
    wr(mmio, Reg.CONFIG + 1, 0xAA, 1)
    assert dev.config[1] == 0xAA
    assert mmio.invalid_accesses == 0
    assert rd(mmio, Reg.CONFIG, 3) == 0
    wr(mmio, Reg.CONFIG, 0x123456, 3)
    assert dev.config[0] == 0x10
    assert mmio.invalid_accesses == 2


@pytest.mark.parametrize("size", [1, 2, 8])
def test_registers_take_only_32_bit_accesses(mmio, size):
    assert rd(mmio, Reg.MAGIC_VALUE, size) == 0
    wr(mmio, Reg.STATUS, STATUS_ACKNOWLEDGE, size)
    assert rd(mmio, Reg.STATUS) == 0
    assert mmio.invalid_accesses == 2


def test_unaligned_and_unknown_registers(mmio):
    assert rd(mmio, Reg.MAGIC_VALUE + 1) == 0
    assert rd(mmio, 0x0E0) == 0
    wr(mmio, 0x0E0, 1)
    assert mmio.invalid_accesses == 3


# --- interrupt object and snapshots ------------------------------------------------------


def test_virtio_interrupt_is_independent_of_the_transport():
    irq = CountingIrq()
    interrupt = VirtioInterrupt(irq)
    interrupt.signal_used_queue()
    interrupt.signal_used_queue()
    assert (interrupt.status, irq.count) == (VIRTIO_MMIO_INT_VRING, 2)
    interrupt.reset()
    assert interrupt.status == 0


def test_save_restore_round_trip(mmio, dev, mem):
    bring_up(mmio, VERSION_1 | EVENT_IDX)
    mmio.queues[0].next_avail = 5
    mmio.interrupt.signal_used_queue()
    state = mmio.save()

    other_dev = FakeDevice()
    other = MmioTransport(other_dev, CountingIrq(), mem)
    other.restore(state)
    assert other.save() == state
    assert other_dev.activated and other_dev.queues is other.queues
    assert other_dev.restored == ("fake", 0)
    assert other.queues[0].next_avail == 5 and other.queues[0].event_idx
    assert rd(other, Reg.STATUS) == rd(mmio, Reg.STATUS)
    assert rd(other, Reg.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    wr(other, Reg.QUEUE_NOTIFY, 0)
    assert other_dev.processed == [0]


def test_restore_rejects_a_different_queue_count(mmio, mem):
    class OneQueue(FakeDevice):
        queue_max_sizes = (16,)

    with pytest.raises(ValueError):
        MmioTransport(OneQueue(), CountingIrq(), mem).restore(mmio.save())
