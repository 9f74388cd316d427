"""The split virtqueue against a mock driver: rules, wrapping, notifications, fuzzing."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio.queue import (
    DESC,
    MAX_INDIRECT_DESCRIPTORS,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Descriptor,
    Queue,
    QueueError,
    QueueState,
    vring_need_event,
)
from pyvmm.errors import GuestError
from pyvmm.memory import GuestMemory
from tests.support.virtio_driver import Buffer, MockDriver

MEM_SIZE = 64 << 20
RAM_END = MEM_SIZE


@pytest.fixture(scope="module")
def module_mem() -> GuestMemory:
    with GuestMemory.with_size(MEM_SIZE) as memory:
        yield memory


@pytest.fixture
def mem(module_mem: GuestMemory) -> GuestMemory:
    module_mem.fill(0, 0x900_000)
    return module_mem


@pytest.fixture
def driver(mem: GuestMemory) -> MockDriver:
    return MockDriver(mem, 16)


# --- configuration ----------------------------------------------------------------
def test_max_size_must_be_power_of_two() -> None:
    for bad in (0, 3, 100, 65536):
        with pytest.raises(ValueError):
            Queue(bad)
    assert Queue(32768).size == 32768


def test_is_valid(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue(max_size=256)
    assert q.is_valid(mem)
    for field, value in [
        ("size", 0),
        ("size", 12),
        ("size", 512),
        ("desc_table", driver.desc_table + 8),
        ("avail_ring", driver.avail_ring + 1),
        ("used_ring", driver.used_ring + 2),
        ("desc_table", RAM_END - 16),
        ("avail_ring", RAM_END - 4),
        ("used_ring", RAM_END - 8 * 16),
        ("used_ring", 1 << 40),
    ]:
        bad = driver.queue(max_size=256)
        setattr(bad, field, value)
        assert not bad.is_valid(mem), (field, value)


def test_not_ready_pops_nothing(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.send([driver.readable(b"x")])
    q.ready = False
    assert q.pop(mem) is None
    q.ready = True
    assert q.pop(mem) is not None


# --- the happy path ---------------------------------------------------------------
def test_pop_direct_chain_and_add_used(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    assert q.pop(mem) is None
    req, resp = driver.readable(b"hello"), driver.writable(64)
    head = driver.send([req, resp])
    chain = q.pop(mem)
    assert chain is not None and chain.head_index == head
    assert chain.readable() == [Descriptor(req.addr, 5, VIRTQ_DESC_F_NEXT)]
    assert chain.writable() == [Descriptor(resp.addr, 64, VIRTQ_DESC_F_WRITE)]
    assert chain.readable_bytes == 5 and chain.writable_bytes == 64
    assert chain.writable()[0].is_write_only and not chain.readable()[0].is_write_only
    assert mem.read(chain.readable()[0].addr, 5) == b"hello"
    assert q.pop(mem) is None
    q.add_used(mem, head, 7)
    assert driver.used_idx() == 1 and q.next_used == 1
    assert driver.used_elem(0) == (head, 7)


def test_zero_length_buffer_allowed(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.send([Buffer(driver.alloc(0), 0, False), driver.writable(0)])
    chain = q.pop(mem)
    assert chain is not None and [d.length for d in chain.descriptors] == [0, 0]


def test_pop_several_in_order(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    heads = [driver.send([driver.readable(bytes([i]))]) for i in range(5)]
    assert [q.pop(mem).head_index for _ in range(5)] == heads
    assert q.pop(mem) is None


def test_indirect_chain(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    bufs = [driver.readable(b"a"), driver.readable(b"bc"), driver.writable(8), driver.writable(9)]
    head = driver.add_indirect_chain(bufs)
    driver.publish(head)
    chain = q.pop(mem)
    assert chain is not None and chain.head_index == head
    assert [(d.addr, d.length, d.is_write_only) for d in chain.descriptors] == [
        (b.addr, b.length, b.writable) for b in bufs
    ]


def test_direct_descriptors_then_indirect_table(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    direct = [driver.readable(b"hdr")]
    table = [driver.readable(b"data"), driver.writable(1)]
    driver.publish(driver.add_indirect_chain(table, direct))
    chain = q.pop(mem)
    assert [d.length for d in chain.descriptors] == [3, 4, 1]


def test_indirect_table_write_flag_is_ignored(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    table, length = driver.write_indirect_table([driver.readable(b"r")])
    driver.write_desc(0, table, length, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)
    driver.publish(0)
    assert q.pop(mem).readable_bytes == 1


def test_indirect_table_at_cap(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    buf = driver.writable(1)
    driver.publish(driver.add_indirect_chain([buf] * MAX_INDIRECT_DESCRIPTORS))
    assert len(q.pop(mem).descriptors) == MAX_INDIRECT_DESCRIPTORS


def test_full_length_direct_chain(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.send([driver.readable(b"z")] * 16)
    assert len(q.pop(mem).descriptors) == 16


# --- malformed rings and chains ---------------------------------------------------------
def test_avail_idx_too_far_ahead(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.set_avail_idx(17)
    with pytest.raises(QueueError) as info:
        q.pop(mem)
    assert info.value.head_index is None and q.next_avail == 0
    driver.set_avail_idx(16)  # exactly a full ring is fine
    for i in range(16):
        driver.write_desc(i, driver.alloc(1), 1)
        driver.write_avail_entry(i, i)
    assert [q.pop(mem).head_index for _ in range(16)] == list(range(16))


def test_head_out_of_range(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.write_avail_entry(0, 16)
    driver.set_avail_idx(1)
    with pytest.raises(QueueError) as info:
        q.pop(mem)
    assert info.value.head_index is None
    assert q.next_avail == 1  # skipped, not retried forever
    assert q.pop(mem) is None


def _publish_raw(driver: MockDriver, head: int = 0) -> None:
    driver.write_avail_entry(driver.avail_idx % driver.size, head)
    driver.set_avail_idx(driver.avail_idx + 1)


def _assert_bad_chain(driver: MockDriver, mem: GuestMemory, q: Queue, head: int = 0) -> None:
    """The chain at ``head`` is rejected, reported with its head, and the queue goes on."""
    before = q.next_avail
    with pytest.raises(QueueError) as info:
        q.pop(mem)
    assert info.value.head_index == head
    assert q.next_avail == (before + 1) & 0xFFFF
    q.add_used(mem, head, 0)
    assert driver.used_elem(q.next_used - 1) == (head, 0)


def test_loop_in_chain(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    addr = driver.alloc(4)
    driver.write_desc(0, addr, 4, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(1, addr, 4, VIRTQ_DESC_F_NEXT, 0)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


def test_self_loop(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.write_desc(3, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 3)
    _publish_raw(driver, 3)
    _assert_bad_chain(driver, mem, q, 3)


def test_next_out_of_range(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.write_desc(0, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 16)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


@pytest.mark.parametrize(
    ("addr", "length"),
    [(RAM_END, 1), (RAM_END - 4, 8), (1 << 63, 16), ((1 << 64) - 1, 0xFFFF_FFFF), (RAM_END, 0)],
)
def test_buffer_outside_ram(driver: MockDriver, mem: GuestMemory, addr: int, length: int) -> None:
    q = driver.queue()
    driver.write_desc(0, addr, length)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


def test_buffer_at_end_of_ram_is_fine(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.write_desc(0, RAM_END - 8, 8)
    _publish_raw(driver)
    assert q.pop(mem).descriptors == [Descriptor(RAM_END - 8, 8, 0)]


def test_readable_after_writable(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.send([driver.writable(4), driver.readable(b"late")])
    _assert_bad_chain(driver, mem, q)


def test_readable_after_writable_inside_indirect(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.publish(driver.add_indirect_chain([driver.readable(b"x")], [driver.writable(2)]))
    _assert_bad_chain(driver, mem, q)


@pytest.mark.parametrize("length", [0, 8, 24, 16 * (MAX_INDIRECT_DESCRIPTORS + 1)])
def test_bad_indirect_table_length(driver: MockDriver, mem: GuestMemory, length: int) -> None:
    q = driver.queue()
    driver.write_desc(0, driver.alloc(max(length, 16)), length, VIRTQ_DESC_F_INDIRECT)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


def test_indirect_table_outside_ram(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.write_desc(0, RAM_END - 16, 32, VIRTQ_DESC_F_INDIRECT)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


def test_indirect_with_next(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    table, length = driver.write_indirect_table([driver.readable(b"x")])
    driver.write_desc(0, table, length, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(1, driver.alloc(1), 1)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


def test_nested_indirect(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    inner, inner_len = driver.write_indirect_table([driver.readable(b"x")])
    outer = driver.alloc(16)
    mem.write_struct(DESC, outer, inner, inner_len, VIRTQ_DESC_F_INDIRECT, 0)
    driver.write_desc(0, outer, 16, VIRTQ_DESC_F_INDIRECT)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


def test_loop_inside_indirect_table(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    table, buf = driver.alloc(32), driver.alloc(4)
    mem.write_struct(DESC, table, buf, 4, VIRTQ_DESC_F_NEXT, 1)
    mem.write_struct(DESC, table + 16, buf, 4, VIRTQ_DESC_F_NEXT, 0)
    driver.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


def test_next_beyond_indirect_table(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    table = driver.alloc(32)
    mem.write_struct(DESC, table, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 2)
    driver.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    _publish_raw(driver)
    _assert_bad_chain(driver, mem, q)


def test_total_length_overflow(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    # Every buffer is inside RAM, but one 48 MiB buffer listed 86 times sums past 4 GiB.
    big = 48 << 20
    buf = Buffer(0x1000, big, True)
    driver.publish(driver.add_indirect_chain([buf] * 86))
    _assert_bad_chain(driver, mem, q)
    driver.publish(driver.add_indirect_chain([buf] * 85))
    assert q.pop(mem).writable_bytes == 85 * big


def test_rings_outside_ram_raise_queue_error(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    q.avail_ring = RAM_END + 0x1000
    with pytest.raises(QueueError):
        q.pop(mem)
    q = driver.queue()
    q.used_ring = RAM_END
    with pytest.raises(QueueError):
        q.add_used(mem, 0, 0)
    with pytest.raises(QueueError):
        q.set_notification(mem, False)
    q = driver.queue()
    q.desc_table = RAM_END
    driver.send([driver.readable(b"x")])
    with pytest.raises(QueueError):
        q.pop(mem)


def test_bad_size_at_pop(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.send([driver.readable(b"x")])
    for size in (0, 5):
        q.size = size
        with pytest.raises(QueueError):
            q.pop(mem)


def test_add_used_rejects_bad_arguments(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    with pytest.raises(QueueError):
        q.add_used(mem, 16, 0)
    with pytest.raises(ValueError):
        q.add_used(mem, 0, 1 << 32)
    assert q.next_used == 0 and driver.used_idx() == 0


def test_queue_error_is_a_guest_error() -> None:
    assert issubclass(QueueError, GuestError)


# --- wrapping u16 indices ----------------------------------------------------------
def test_indices_wrap_around_65535(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    start = 65530
    driver.start_at(start)
    q.next_avail = q.next_used = start
    seen = []
    for round_ in range(3):
        heads = [driver.send([driver.readable(bytes([round_, i]))]) for i in range(5)]
        for head in heads:
            chain = q.pop(mem)
            assert chain.head_index == head
            seen.append(mem.read(chain.descriptors[0].addr, 2))
            q.add_used(mem, head, 2)
        assert q.pop(mem) is None
    assert q.next_avail == q.next_used == (start + 15) & 0xFFFF == 9
    assert driver.used_idx() == 9
    assert driver.used_elem(8) == (heads[-1], 2)
    assert len(set(seen)) == 15


def test_full_ring_across_wrap(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.start_at(65535 - 7)
    q.next_avail = 65535 - 7
    for _ in range(16):
        driver.send([driver.readable(b"q")])
    assert driver.avail_idx == 8
    assert sum(1 for _ in iter(lambda: q.pop(mem), None)) == 16


# --- notifications ----------------------------------------------------------------------
def test_vring_need_event() -> None:
    assert vring_need_event(0, 1, 0)  # event at old: crossed
    assert not vring_need_event(1, 1, 0)  # wants a notification after idx 2
    assert vring_need_event(5, 10, 0)
    assert not vring_need_event(10, 10, 0)
    assert not vring_need_event(3, 10, 5)  # already notified past it
    assert vring_need_event(65535, 2, 65534)  # across the wrap
    assert vring_need_event(0, 2, 65534)
    assert not vring_need_event(2, 2, 65534)
    assert not vring_need_event(7, 5, 5)  # nothing new


def test_no_interrupt_flag(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.send([driver.readable(b"x")])
    q.add_used(mem, q.pop(mem).head_index, 0)
    assert q.needs_notification(mem)
    assert not q.needs_notification(mem)  # nothing new since
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    driver.send([driver.readable(b"y")])
    q.add_used(mem, q.pop(mem).head_index, 0)
    assert not q.needs_notification(mem)
    driver.set_avail_flags(0)
    driver.send([driver.readable(b"z")])
    q.add_used(mem, q.pop(mem).head_index, 0)
    assert q.needs_notification(mem)


def test_event_idx_notification(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue(event_idx=True)
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX

    def complete(n: int) -> None:
        for _ in range(n):
            driver.send([driver.readable(b"x")])
            q.add_used(mem, q.pop(mem).head_index, 0)

    driver.set_used_event(2)  # interrupt me once used.idx passes 2, i.e. reaches 3
    complete(1)
    assert q.needs_notification(mem)  # the first question after reset always says yes
    complete(1)  # used.idx 2
    assert not q.needs_notification(mem)
    complete(1)  # used.idx 3: crossed used_event 2
    assert q.needs_notification(mem)
    complete(2)  # used.idx 5; used_event still 2, already notified
    assert not q.needs_notification(mem)
    driver.set_used_event(5)
    complete(3)  # 5 -> 8 passes 5
    assert q.needs_notification(mem)
    assert not q.needs_notification(mem)


def test_event_idx_notification_across_wrap(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue(event_idx=True)
    driver.start_at(65534)
    q.next_avail = q.next_used = 65534
    q.signalled_used, q.signalled_used_valid = 65534, True
    driver.set_used_event(65535)
    driver.send([driver.readable(b"x")])
    q.add_used(mem, q.pop(mem).head_index, 0)  # used.idx 65535
    assert not q.needs_notification(mem)
    driver.send([driver.readable(b"x")])
    q.add_used(mem, q.pop(mem).head_index, 0)  # used.idx 0, past 65535
    assert q.next_used == 0
    assert q.needs_notification(mem)


def test_set_notification_flag(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    mem.write_u16(driver.used_ring, 0x8000)  # other bits are kept
    q.set_notification(mem, False)
    assert driver.used_flags() == 0x8000 | VIRTQ_USED_F_NO_NOTIFY
    q.set_notification(mem, True)
    assert driver.used_flags() == 0x8000


def test_set_notification_event_idx(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue(event_idx=True)
    for _ in range(3):
        driver.send([driver.readable(b"x")])
        q.pop(mem)
    q.set_notification(mem, True)
    assert driver.avail_event() == 3
    assert driver.used_flags() == 0
    driver.send([driver.readable(b"x")])
    q.pop(mem)
    q.set_notification(mem, False)
    assert driver.avail_event() == 3  # left stale: no kicks until the driver passes it


# --- reset, save, restore ---------------------------------------------------------------
def test_reset(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue(max_size=64)
    driver.send([driver.readable(b"x")])
    q.add_used(mem, q.pop(mem).head_index, 0)
    q.needs_notification(mem)
    q.reset()
    assert q.save() == Queue(64).save()
    assert q.size == 64 and not q.ready and q.next_avail == q.next_used == 0


def test_save_restore_round_trip(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue(max_size=32, event_idx=True)
    for _ in range(3):
        driver.send([driver.readable(b"x"), driver.writable(4)])
    q.add_used(mem, q.pop(mem).head_index, 4)
    q.needs_notification(mem)
    state = q.save()
    assert dataclasses.is_dataclass(state) and isinstance(state, QueueState)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.size = 1  # type: ignore[misc]
    assert all(isinstance(v, int | bool) for v in dataclasses.astuple(state))
    fresh = Queue(32)
    fresh.restore(state)
    assert fresh.save() == state
    # The restored queue carries on where the old one stopped.
    assert fresh.pop(mem).head_index == q.pop(mem).head_index
    with pytest.raises(ValueError):
        Queue(64).restore(state)
    with pytest.raises(ValueError):
        Queue(32).restore(dataclasses.replace(state, next_avail=70000))


# --- property tests ------------------------------------------------------------------------
FUZZ_MEM = 1 << 20  # small RAM so random addresses often miss it
FUZZ_DESC_TABLE = 0x1000
FUZZ_AREA = 0x8000  # where random indirect tables live
FUZZ_AREA_SLOTS = 24


@pytest.fixture(scope="module")
def fuzz_mem() -> GuestMemory:
    with GuestMemory.with_size(FUZZ_MEM) as memory:
        yield memory


addresses = st.one_of(
    st.integers(0, FUZZ_MEM - 1),
    st.integers(FUZZ_MEM - 64, FUZZ_MEM + 64),
    st.sampled_from([FUZZ_AREA + 16 * i for i in range(0, FUZZ_AREA_SLOTS, 2)]),
    st.integers(0, (1 << 64) - 1),
)
lengths = st.one_of(
    st.integers(0, 64),
    st.sampled_from([16, 32, 48, 64, 16 * 1024, 16 * 1025]),
    st.integers(0, 0xFFFF_FFFF),
)
flag_values = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
wild_descriptors = st.tuples(addresses, lengths, flag_values, st.integers(0, 40))
# Mostly well-formed entries, so that long and indirect chains get built too.
plausible_descriptors = st.tuples(
    st.integers(0, 0xF000), st.integers(0, 256), st.sampled_from([0, 1, 2, 3]), st.integers(0, 3)
)
indirect_descriptors = st.tuples(
    st.sampled_from([FUZZ_AREA + 16 * i for i in range(0, FUZZ_AREA_SLOTS, 2)]),
    st.sampled_from([16, 32, 64, 128]),
    st.just(VIRTQ_DESC_F_INDIRECT),
    st.integers(0, 7),
)
descriptors = st.one_of(wild_descriptors, plausible_descriptors, indirect_descriptors)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.sampled_from([1, 2, 4, 8, 8, 16, 16, 32]),
    table=st.lists(descriptors, max_size=32),
    area=st.lists(descriptors, max_size=FUZZ_AREA_SLOTS),
    ring=st.lists(st.one_of(st.integers(0, 3), st.integers(0, 40)), max_size=32),
    next_avail=st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFF0, 0xFFFF)),
    ahead=st.one_of(st.integers(1, 4), st.integers(0, 33), st.integers(0, 0xFFFF)),
)
def test_pop_never_misbehaves_on_random_rings(
    fuzz_mem: GuestMemory,
    size: int,
    table: list,
    area: list,
    ring: list,
    next_avail: int,
    ahead: int,
) -> None:
    mem = fuzz_mem
    driver = MockDriver(mem, size, desc_table=FUZZ_DESC_TABLE)
    # Missing entries read as zero: a 0-byte readable buffer at 0 that ends its chain.
    for i, entry in enumerate(table[:size]):
        driver.write_desc(i, *entry)
    mem.fill(FUZZ_AREA, 16 * FUZZ_AREA_SLOTS)
    for i, entry in enumerate(area):
        mem.write_struct(DESC, FUZZ_AREA + 16 * i, *entry)
    for slot, head in enumerate(ring[:size]):
        driver.write_avail_entry(slot, head)
    q = driver.queue()
    q.next_avail = next_avail
    driver.set_avail_idx(next_avail + ahead)

    popped = 0
    for _ in range(size + 3):
        before = q.next_avail
        try:
            chain = q.pop(mem)
        except QueueError as exc:
            assert q.next_avail in (before, (before + 1) & 0xFFFF)
            event("QueueError: " + re.sub(r"0x[0-9a-f]+|\d+", "N", str(exc)))
            continue
        if chain is None:
            assert q.next_avail == before
            break
        popped += 1
        event(f"chain of {min(len(chain.descriptors), 4)}{'+' * (len(chain.descriptors) >= 4)}")
        assert q.next_avail == (before + 1) & 0xFFFF
        assert 0 <= chain.head_index < size
        assert 1 <= len(chain.descriptors) <= size - 1 + MAX_INDIRECT_DESCRIPTORS
        kinds = [d.is_write_only for d in chain.descriptors]
        assert kinds == sorted(kinds), "readable after writable"
        for d in chain.descriptors:
            assert mem.is_valid(d.addr, d.length)
            assert not d.flags & VIRTQ_DESC_F_INDIRECT
        assert chain.readable_bytes <= 0xFFFF_FFFF
        assert chain.writable_bytes <= 0xFFFF_FFFF
        q.add_used(mem, chain.head_index, 0)
    assert popped <= min(size, ahead)


buffer_specs = st.lists(st.tuples(st.integers(0, 300), st.booleans()), min_size=1, max_size=12).map(
    lambda specs: sorted(specs, key=lambda s: s[1])
)  # readable first


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    start=st.integers(0, 0xFFFF),
    requests=st.lists(st.tuples(buffer_specs, st.booleans(), st.integers(0, 3)), max_size=20),
)
def test_well_formed_chains_come_back_exactly(mem: GuestMemory, start: int, requests: list) -> None:
    driver = MockDriver(mem, 16)
    driver.start_at(start)
    q = driver.queue(max_size=16)
    q.next_avail = q.next_used = start
    for specs, indirect, n_direct in requests:
        bufs = [
            driver.writable(n) if writable else driver.readable(bytes(n)) for n, writable in specs
        ]
        if indirect:
            direct, table = bufs[:n_direct], bufs[n_direct:]
            if not table:
                direct, table = bufs[:-1], bufs[-1:]
            head = driver.add_indirect_chain(table, direct)
        else:
            head = driver.add_chain(bufs)
        driver.publish(head)
        chain = q.pop(mem)
        assert chain.head_index == head
        assert [(d.addr, d.length, d.is_write_only) for d in chain.descriptors] == [
            (b.addr, b.length, b.writable) for b in bufs
        ]
        assert chain.writable_bytes == sum(b.length for b in bufs if b.writable)
        q.add_used(mem, head, chain.writable_bytes)
        assert driver.used_elem(q.next_used - 1) == (head, chain.writable_bytes)
        assert driver.used_idx() == q.next_used
        assert q.pop(mem) is None
    assert q.next_avail == q.next_used == (start + len(requests)) & 0xFFFF


# --- batches ------------------------------------------------------------------------------
def test_pop_batch_returns_chains_and_errors_in_ring_order(
    driver: MockDriver, mem: GuestMemory
) -> None:
    q = driver.queue()
    assert q.pop_batch(mem) == []
    first = driver.send([driver.readable(b"abc"), driver.writable(4)])
    bad = driver.add_chain([driver.readable(b"x")])
    driver.write_desc(bad, RAM_END - 4, 8)  # runs past the end of RAM
    driver.publish(bad)
    third = driver.send([driver.writable(2)])
    batch = q.pop_batch(mem)
    assert [type(item).__name__ for item in batch] == [
        "DescriptorChain",
        "QueueError",
        "DescriptorChain",
    ]
    assert batch[0].head_index == first and batch[2].head_index == third
    assert batch[1].head_index == bad
    chain = batch[0]
    assert (chain.readable_count, chain.readable_bytes, chain.writable_bytes) == (1, 3, 4)
    assert chain.readable() == [Descriptor(chain.descriptors[0].addr, 3, VIRTQ_DESC_F_NEXT)]
    assert q.next_avail == 3 and q.pop_batch(mem) == []


def test_pop_batch_stops_before_a_head_out_of_range(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.send([driver.readable(b"ok")])
    driver.write_avail_entry(1, 99)
    driver.set_avail_idx(2)
    assert len(q.pop_batch(mem)) == 1 and q.next_avail == 1
    with pytest.raises(QueueError) as info:
        q.pop_batch(mem)
    assert info.value.head_index is None


def test_pop_batch_rejects_an_index_jump(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.set_avail_idx(17)
    with pytest.raises(QueueError):
        q.pop_batch(mem)
    assert q.next_avail == 0


def test_add_used_batch_publishes_once(driver: MockDriver, mem: GuestMemory) -> None:
    q = driver.queue()
    driver.start_at(0xFFFE)
    q.next_avail = q.next_used = 0xFFFE
    q.add_used_batch(mem, [(3, 10), (5, 0), (7, 1)])
    assert q.next_used == 1 and driver.used_idx() == 1
    assert [driver.used_elem(0xFFFE + i) for i in range(3)] == [(3, 10), (5, 0), (7, 1)]
    with pytest.raises(QueueError):
        q.add_used_batch(mem, [(1, 0), (16, 0)])
    assert q.next_used == 1  # nothing written when one entry is bad
