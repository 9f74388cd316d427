"""virtio-blk behind the virtio-mmio transport, with a real image file on the host."""

from __future__ import annotations

import errno
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio.block import (
    CONFIG,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    BlockStats,
    VirtioBlock,
    VirtioBlockState,
)
from pyvmm.devices.virtio.block_request import (
    BLOCK_QUEUE_SIZE,
    DISCARD_SEGMENT,
    REQ_HEADER,
    SEG_MAX,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)
from pyvmm.devices.virtio.ids import VIRTIO_ID_BLOCK
from pyvmm.devices.virtio.mmio import (
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    MmioTransport,
    Reg,
)
from pyvmm.errors import ConfigError
from pyvmm.host.block_file import SECTOR_SIZE, BlockFile
from pyvmm.memory import GuestMemory
from tests.support.device_harness import CountingIrq
from tests.support.virtio_driver import Buffer, MockDriver, TransportAccess, bring_up

VERSION_1 = 1 << VIRTIO_F_VERSION_1
SECTORS = 128  # 64 KiB image


def pattern(sector: int, count: int = 1) -> bytes:
    """Recognisable content: each sector filled with its own number."""
    return b"".join(bytes([(sector + i) & 0xFF]) * SECTOR_SIZE for i in range(count))


def make_image(path, sectors: int = SECTORS) -> str:
    with open(path, "wb") as f:
        f.write(pattern(0, sectors))
    return str(path)


def read_image(path, sector: int, count: int = 1) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * SECTOR_SIZE)
        return f.read(count * SECTOR_SIZE)


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "disk.img")


class Guest(TransportAccess):
    """A transport around a VirtioBlock, brought up through the registers, and a driver."""

    def __init__(self, mem, backend, *, size=16, **kwargs) -> None:
        self.mem = mem
        self.irq = CountingIrq()
        self.blk = VirtioBlock(backend, **kwargs)
        self.mmio = MmioTransport(self.blk, self.irq, mem)
        self.driver = MockDriver(mem, size)
        self.used = 0
        self.bring_up(size)

    def bring_up(self, size: int) -> None:
        features = self.device_features() & ~(1 << 29)  # everything but EVENT_IDX
        bring_up(self.mmio, [self.driver], features, size, BLOCK_QUEUE_SIZE)

    def config(self) -> tuple:
        raw = bytearray()
        for offset in range(0, CONFIG.size, 4):
            raw += self.rd(Reg.CONFIG + offset).to_bytes(4, "little")
        return CONFIG.unpack(bytes(raw))

    # --- requests ---------------------------------------------------------------------
    def header(self, req_type: int, sector: int = 0) -> Buffer:
        return self.driver.readable(REQ_HEADER.pack(req_type, 0, sector))

    def submit(self, buffers: list[Buffer]) -> tuple[int, int]:
        """Send one chain, notify, and return its used element (head, length)."""
        head = self.driver.send(buffers)
        self.wr(Reg.QUEUE_NOTIFY, 0)
        assert self.driver.used_idx() == (self.used + 1) & 0xFFFF
        elem = self.driver.used_elem(self.used)
        self.used += 1
        assert elem[0] == head
        return elem

    def request(self, req_type: int, sector: int = 0, *, out: bytes = b"", read: int = 0):
        """A well-formed request: returns (status, used length, data read)."""
        buffers = [self.header(req_type, sector)]
        if out:
            buffers.append(self.driver.readable(out))
        data = self.driver.writable(read) if read else None
        if data:
            buffers.append(data)
        status = self.driver.writable(1)
        buffers.append(status)
        _, length = self.submit(buffers)
        got = self.mem.read(data.addr, read) if data else b""
        return self.mem.read_u8(status.addr), length, got

    def segments(self, req_type: int, *ranges: tuple[int, int, int]) -> tuple[int, int]:
        payload = b"".join(DISCARD_SEGMENT.pack(*r) for r in ranges)
        status, length, _ = self.request(req_type, out=payload)
        return status, length


@pytest.fixture
def guest(mem, image):
    with BlockFile(image) as backend:
        yield Guest(mem, backend, serial="pyvmm-disk-0")


# --- identity and configuration ---------------------------------------------------------
def test_identity_features_and_config(guest):
    assert guest.rd(Reg.DEVICE_ID) == VIRTIO_ID_BLOCK
    features = guest.device_features()
    for bit in (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH):
        assert features >> bit & 1
    assert features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    assert not features >> VIRTIO_BLK_F_RO & 1
    config = guest.config()
    capacity, _size_max, seg_max = config[:3]
    assert (capacity, seg_max, config[6]) == (SECTORS, SEG_MAX, 512)
    # odd-sized and past-the-end config reads
    buf = bytearray(2)
    guest.mmio.read(Reg.CONFIG + 1, memoryview(buf))
    assert bytes(buf) == struct.pack("<Q", SECTORS)[1:3]
    assert guest.rd(Reg.CONFIG + 200) == 0


def test_read_only_advertises_ro_and_no_discard(mem, image):
    with BlockFile(image, read_only=True) as backend:
        g = Guest(mem, backend)
        features = g.device_features()
        assert features >> VIRTIO_BLK_F_RO & 1
        assert not features >> VIRTIO_BLK_F_DISCARD & 1
        assert not features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    with BlockFile(image) as backend:
        assert VirtioBlock(backend, read_only=True).avail_features >> VIRTIO_BLK_F_RO & 1
    with BlockFile(image, read_only=True) as backend, pytest.raises(ValueError):
        VirtioBlock(backend, read_only=False)


# --- the driver flow ------------------------------------------------------------------
def test_read_a_sector_written_by_the_host(guest, image):
    with open(image, "r+b") as f:
        f.seek(5 * SECTOR_SIZE)
        f.write(b"hello from the host".ljust(SECTOR_SIZE, b"."))
    status, length, data = guest.request(VIRTIO_BLK_T_IN, 5, read=2 * SECTOR_SIZE)
    assert status == VIRTIO_BLK_S_OK
    assert length == 2 * SECTOR_SIZE + 1
    assert data[:19] == b"hello from the host"
    assert data[SECTOR_SIZE:] == pattern(6)
    assert guest.irq.count == 1
    assert guest.blk.stats.reads == 1 and guest.blk.stats.bytes_read == 1024


def test_write_then_flush_reaches_the_file(guest, image):
    payload = os.urandom(3 * SECTOR_SIZE)
    status, length, _ = guest.request(VIRTIO_BLK_T_OUT, 10, out=payload)
    assert (status, length) == (VIRTIO_BLK_S_OK, 1)
    status, length, _ = guest.request(VIRTIO_BLK_T_FLUSH)
    assert (status, length) == (VIRTIO_BLK_S_OK, 1)
    assert read_image(image, 10, 3) == payload
    assert read_image(image, 9) == pattern(9) and read_image(image, 13) == pattern(13)
    assert os.path.getsize(image) == SECTORS * SECTOR_SIZE
    stats = guest.blk.stats
    assert (stats.writes, stats.bytes_written, stats.flushes, stats.errors) == (1, 1536, 1, 0)


def test_get_id(guest):
    status, length, data = guest.request(VIRTIO_BLK_T_GET_ID, read=20)
    assert (status, length) == (VIRTIO_BLK_S_OK, 21)
    assert data == b"pyvmm-disk-0".ljust(20, b"\0")
    with pytest.raises(ValueError):
        VirtioBlock(guest.blk.backend, serial="x" * 21)


def test_read_only_refuses_writes(mem, image):
    with BlockFile(image, read_only=True) as backend:
        g = Guest(mem, backend)
        status, length, _ = g.request(VIRTIO_BLK_T_OUT, 0, out=b"x" * SECTOR_SIZE)
        assert (status, length) == (VIRTIO_BLK_S_IOERR, 1)
        assert g.segments(VIRTIO_BLK_T_WRITE_ZEROES, (0, 1, 0))[0] == VIRTIO_BLK_S_IOERR
        assert g.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
        assert g.request(VIRTIO_BLK_T_IN, 3, read=SECTOR_SIZE)[2] == pattern(3)
    assert read_image(image, 0) == pattern(0)


def test_out_of_range_is_ioerr(guest):
    assert guest.request(VIRTIO_BLK_T_IN, SECTORS, read=SECTOR_SIZE)[:2] == (VIRTIO_BLK_S_IOERR, 1)
    assert guest.request(VIRTIO_BLK_T_IN, SECTORS - 1, read=2 * SECTOR_SIZE)[0] == 1
    assert guest.request(VIRTIO_BLK_T_OUT, 2**64 - 1, out=bytes(SECTOR_SIZE))[0] == 1
    # the last sector is fine
    assert guest.request(VIRTIO_BLK_T_IN, SECTORS - 1, read=SECTOR_SIZE)[2] == pattern(127)
    assert guest.blk.stats.errors == 3


def test_unknown_type_is_unsupp(guest):
    for req_type in (2, 10, 14, 0xFFFF_FFFF):
        assert guest.request(req_type, read=SECTOR_SIZE)[:2] == (VIRTIO_BLK_S_UNSUPP, 1)


def test_wrong_direction_or_partial_sector_is_ioerr(guest):
    assert guest.request(VIRTIO_BLK_T_IN, out=bytes(SECTOR_SIZE))[0] == VIRTIO_BLK_S_IOERR
    assert guest.request(VIRTIO_BLK_T_OUT, read=SECTOR_SIZE)[0] == VIRTIO_BLK_S_IOERR
    assert guest.request(VIRTIO_BLK_T_IN, read=100)[0] == VIRTIO_BLK_S_IOERR
    assert guest.request(VIRTIO_BLK_T_FLUSH, read=4)[0] == VIRTIO_BLK_S_IOERR


def _fallocate_or_skip(guest, flag: int) -> None:
    if not guest.blk.avail_features >> flag & 1:
        pytest.skip(f"the tmp file system refuses fallocate (feature bit {flag} not offered)")


def test_discard(guest, image):
    _fallocate_or_skip(guest, VIRTIO_BLK_F_DISCARD)
    config = guest.config()
    assert config[14:17] == (0x3F_FFFF, 32, 8)
    assert guest.segments(VIRTIO_BLK_T_DISCARD, (8, 8, 0), (32, 1, 0)) == (VIRTIO_BLK_S_OK, 1)
    assert read_image(image, 8, 8) == bytes(8 * SECTOR_SIZE)
    assert read_image(image, 32) == bytes(SECTOR_SIZE)
    assert read_image(image, 16) == pattern(16)
    assert os.path.getsize(image) == SECTORS * SECTOR_SIZE
    # the unmap flag is not allowed on discard; out of range; malformed segment list
    assert guest.segments(VIRTIO_BLK_T_DISCARD, (0, 1, 1))[0] == VIRTIO_BLK_S_UNSUPP
    assert guest.segments(VIRTIO_BLK_T_DISCARD, (SECTORS - 1, 2, 0))[0] == VIRTIO_BLK_S_IOERR
    assert guest.request(VIRTIO_BLK_T_DISCARD, out=b"x" * 15)[0] == VIRTIO_BLK_S_IOERR
    assert guest.blk.stats.discards == 1


def test_write_zeroes(guest, image):
    _fallocate_or_skip(guest, VIRTIO_BLK_F_WRITE_ZEROES)
    unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    assert guest.segments(VIRTIO_BLK_T_WRITE_ZEROES, (3, 2, 0), (100, 28, unmap))[0] == 0
    assert read_image(image, 3, 2) == bytes(2 * SECTOR_SIZE)
    assert read_image(image, 100, 28) == bytes(28 * SECTOR_SIZE)
    assert read_image(image, 5) == pattern(5)
    assert os.path.getsize(image) == SECTORS * SECTOR_SIZE
    assert guest.segments(VIRTIO_BLK_T_WRITE_ZEROES, (0, 1, 2))[0] == VIRTIO_BLK_S_UNSUPP
    assert guest.blk.stats.write_zeroes == 1


def test_write_zeroes_falls_back_to_writing(image, monkeypatch):
    from pyvmm.host import block_file as block_io

    def refuse(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "nope")

    with BlockFile(image) as backend:
        monkeypatch.setattr(block_io, "fallocate", refuse)
        backend.write_zeroes(SECTOR_SIZE, 3 * SECTOR_SIZE)
        assert backend._zero_modes == []
    assert read_image(image, 1, 3) == bytes(3 * SECTOR_SIZE)
    assert read_image(image, 4) == pattern(4)


# --- malformed chains -------------------------------------------------------------------
def test_malformed_chains_fail_alone(guest):
    d = guest.driver
    # no status byte: returned with length 0, nothing written
    _, length = guest.submit([guest.header(VIRTIO_BLK_T_IN)])
    assert length == 0
    # a header of 8 bytes: IOERR
    status = d.writable(1)
    assert guest.submit([d.readable(bytes(8)), status])[1] == 1
    assert guest.mem.read_u8(status.addr) == VIRTIO_BLK_S_IOERR
    # a header split over two descriptors is fine
    raw = REQ_HEADER.pack(VIRTIO_BLK_T_IN, 0, 7)
    data, status = d.writable(SECTOR_SIZE), d.writable(1)
    assert guest.submit([d.readable(raw[:5]), d.readable(raw[5:]), data, status])[1] == 513
    assert guest.mem.read(data.addr, SECTOR_SIZE) == pattern(7)
    # the status inside a bigger last descriptor: its last byte
    buf = d.writable(SECTOR_SIZE + 1)
    assert guest.submit([guest.header(VIRTIO_BLK_T_IN, 9), buf])[1] == 513
    assert guest.mem.read(buf.addr, SECTOR_SIZE + 1) == pattern(9) + b"\0"
    # a chain the queue rejects (buffer outside RAM) comes back with length 0
    d.write_desc(0, 0x1_0000_0000, 16)
    d.publish(0)
    guest.wr(Reg.QUEUE_NOTIFY, 0)
    assert d.used_elem(guest.used) == (0, 0)
    guest.used += 1
    assert not guest.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    # later requests still work
    assert guest.request(VIRTIO_BLK_T_IN, 2, read=SECTOR_SIZE) == (0, 513, pattern(2))
    assert guest.blk.stats.errors == 3


def test_broken_ring_needs_reset(guest):
    guest.driver.set_avail_idx(100)  # more entries than the queue holds
    guest.wr(Reg.QUEUE_NOTIFY, 0)
    assert guest.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET


def test_scatter_gather_across_three_buffers(guest, image):
    d = guest.driver
    payload = os.urandom(4 * SECTOR_SIZE)
    parts = [payload[:100], payload[100:1500], payload[1500:]]
    status = d.writable(1)
    head = d.add_indirect_chain(
        [guest.header(VIRTIO_BLK_T_OUT, 20), *(d.readable(p) for p in parts), status]
    )
    d.publish(head)
    guest.wr(Reg.QUEUE_NOTIFY, 0)
    assert d.used_elem(0) == (head, 1)
    guest.used += 1
    assert guest.mem.read_u8(status.addr) == VIRTIO_BLK_S_OK
    assert read_image(image, 20, 4) == payload

    bufs = [d.writable(n) for n in (7, 2000, 41)]
    status = d.writable(1)
    assert guest.submit([guest.header(VIRTIO_BLK_T_IN, 20), *bufs, status])[1] == 2049
    assert b"".join(guest.mem.read(b.addr, b.length) for b in bufs) == payload


# --- host errors ------------------------------------------------------------------------
class FailingBackend:
    read_only = False
    sectors = SECTORS
    supports_discard = True
    supports_write_zeroes = True

    def __init__(self, err: int) -> None:
        self.err = err

    def _fail(self, *args):
        raise OSError(self.err, os.strerror(self.err))

    read_into = write_from = flush = discard = write_zeroes = _fail


def test_host_errors_answer_ioerr(mem, caplog):
    g = Guest(mem, FailingBackend(errno.EIO))
    assert g.request(VIRTIO_BLK_T_IN, read=SECTOR_SIZE)[:2] == (VIRTIO_BLK_S_IOERR, 1)
    assert g.request(VIRTIO_BLK_T_OUT, out=bytes(SECTOR_SIZE))[0] == VIRTIO_BLK_S_IOERR
    assert g.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_IOERR
    assert g.blk.stats.errors == 3
    assert "Input/output error" in caplog.text
    g = Guest(mem, FailingBackend(errno.EOPNOTSUPP))
    assert g.segments(VIRTIO_BLK_T_DISCARD, (0, 1, 0))[0] == VIRTIO_BLK_S_UNSUPP


# --- executor ---------------------------------------------------------------------------
def test_block_file(tmp_path, image):
    with BlockFile(image) as f:
        assert f.sectors == SECTORS and f.size_bytes == SECTORS * SECTOR_SIZE
        with pytest.raises(ConfigError, match="in use"):
            BlockFile(image)
        bufs = [memoryview(bytearray(n)) for n in (0, 10, 502, 512)]
        assert f.read_into(SECTOR_SIZE, bufs) == 1024
        assert b"".join(bufs) == pattern(1, 2)
        with pytest.raises(OSError) as exc:
            f.read_into((SECTORS - 1) * SECTOR_SIZE, [memoryview(bytearray(1024))])
        assert exc.value.errno == errno.EIO
    assert f.closed
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    with BlockFile(odd, read_only=True) as f:
        assert f.sectors == 1 and not f.supports_discard and not f.supports_write_zeroes
        with pytest.raises(OSError):
            f.write_from(0, [memoryview(bytes(512))])
    with pytest.raises(ConfigError):
        BlockFile(tmp_path / "missing.img")
    with pytest.raises(ConfigError):
        BlockFile(tmp_path)


def test_many_buffers_beyond_iov_max(image, monkeypatch):
    from pyvmm.host import block_file as block_io

    monkeypatch.setattr(block_io, "IOV_MAX", 3)
    with BlockFile(image) as f:
        bufs = [memoryview(bytearray(64)) for _ in range(16)]  # two sectors
        assert f.read_into(0, bufs) == 1024
        assert b"".join(bufs) == pattern(0, 2)


# --- persistence ------------------------------------------------------------------------
def test_save_restore(mem, image, guest):
    guest.request(VIRTIO_BLK_T_IN, read=SECTOR_SIZE)
    state = guest.mmio.save()
    assert isinstance(state.device, VirtioBlockState)
    assert state.device.stats["reads"] == 1

    blk = VirtioBlock(guest.blk.backend)
    restored = MmioTransport(blk, CountingIrq(), mem)
    restored.restore(state)
    assert blk.activated and blk.stats == BlockStats(reads=1, bytes_read=512)
    head = guest.driver.send([guest.header(VIRTIO_BLK_T_IN, 4), guest.driver.writable(1)])
    restored.write(Reg.QUEUE_NOTIFY, memoryview(bytes(4)))
    assert guest.driver.used_elem(1) == (head, 1)
    with pytest.raises(ValueError):
        blk.restore(VirtioBlockState(capacity=SECTORS + 1, read_only=False))
    with pytest.raises(ValueError):
        blk.restore(VirtioBlockState(SECTORS, False, {"reads": -1}))


# --- random requests --------------------------------------------------------------------
REQ_TYPES = st.sampled_from(
    [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ]
) | st.integers(0, 2**32 - 1)
SECTOR_VALUES = st.integers(0, SECTORS + 4) | st.integers(0, 2**64 - 1)
LENGTHS = st.sampled_from([0, 1, 16, 32, 511, 512, 1024, 4096]) | st.integers(0, 5000)

random_request = st.fixed_dictionaries(
    {
        "type": REQ_TYPES,
        "sector": SECTOR_VALUES,
        "header_len": st.sampled_from([16, 16, 16, 0, 8, 24]),
        "readable": st.lists(LENGTHS, max_size=3),
        "writable": st.lists(LENGTHS, max_size=3),
        "segments": st.lists(
            st.tuples(SECTOR_VALUES, st.integers(0, SECTORS + 4), st.integers(0, 3)), max_size=3
        ),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(random_request, min_size=1, max_size=6), st.booleans())
def test_random_requests_never_raise(requests, read_only):
    with tempfile.TemporaryDirectory() as tmp, GuestMemory([(0, 0x80_0000)]) as mem:
        path = make_image(os.path.join(tmp, "disk.img"), 16)
        with BlockFile(path, read_only=read_only) as backend:
            blk = VirtioBlock(backend, serial="fuzz")
            driver = MockDriver(mem, 32)
            queue = driver.queue()
            blk.activate(mem, [queue], _Interrupt(), VERSION_1)
            sent = 0
            for req in requests:
                header = REQ_HEADER.pack(req["type"], 0, req["sector"])
                header = (header * 2)[: req["header_len"]]
                buffers = [driver.readable(header)] if header else []
                if req["type"] in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                    payload = b"".join(
                        DISCARD_SEGMENT.pack(s % 2**64, c, f) for s, c, f in req["segments"]
                    )
                    if payload:
                        buffers.append(driver.readable(payload))
                buffers += [driver.readable(os.urandom(n)) for n in req["readable"] if n]
                buffers += [driver.writable(n) for n in req["writable"]]
                if not buffers:
                    continue
                driver.send(buffers)
                sent += 1
                blk.process_queue(0)  # straight to the device: nothing may escape
                assert driver.used_idx() == sent
        assert os.path.getsize(path) == 16 * SECTOR_SIZE
        if read_only:
            assert read_image(path, 0, 16) == pattern(0, 16)


class _Interrupt:
    def signal_used_queue(self) -> None:
        pass


def test_rate_limiter_holds_requests_until_the_budget_refills(mem, image):
    from pyvmm.devices.rate_limiter import RateLimiter, TokenBucket

    now = [0]
    ops = TokenBucket(size=1, refill_time_ms=1000, clock=lambda: now[0])
    with BlockFile(image) as backend:
        guest = Guest(mem, backend, rate_limiter=RateLimiter(ops=ops))
        assert guest.request(VIRTIO_BLK_T_IN, 0, read=SECTOR_SIZE)[0] == VIRTIO_BLK_S_OK
        # The second request stays in the ring: the bucket is empty.
        status = guest.driver.writable(1)
        guest.driver.send([guest.header(VIRTIO_BLK_T_IN, 1), guest.driver.writable(512), status])
        guest.wr(Reg.QUEUE_NOTIFY, 0)
        assert guest.driver.used_idx() == 1
        assert guest.blk.throttled
        assert guest.blk.retry_after == pytest.approx(1.0)
        now[0] = 1_000_000_000  # one second later the owner retries
        guest.mmio.process_queue(0)
        assert guest.driver.used_idx() == 2
        assert not guest.blk.throttled
        assert mem.read_u8(status.addr) == VIRTIO_BLK_S_OK


# --- one serve pass: merged transfers, ordering, errors -----------------------------------
class RecordingFile(BlockFile):
    """A BlockFile that logs each transfer (kind, offset, bytes) and can fail some."""

    def __init__(self, path, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.log: list[tuple[str, int, int]] = []
        self.fail_at: set[int] = set()  # byte offsets inside which a transfer fails

    def _hits(self, offset: int, buffers) -> bool:
        end = offset + sum(len(b) for b in buffers)
        return any(offset <= bad < end for bad in self.fail_at)

    def read_into(self, offset, buffers):
        self.log.append(("read", offset, sum(len(b) for b in buffers)))
        if self._hits(offset, buffers):
            raise OSError(errno.EIO, "bad sector")
        return super().read_into(offset, buffers)

    def write_from(self, offset, buffers):
        self.log.append(("write", offset, sum(len(b) for b in buffers)))
        if self._hits(offset, buffers):
            raise OSError(errno.ENOSPC, "disk full")
        return super().write_from(offset, buffers)

    def flush(self):
        self.log.append(("flush", 0, 0))
        super().flush()


def post_all(g: Guest, requests: list[tuple]) -> list[tuple[Buffer | None, Buffer]]:
    """Publish (type, sector, payload-or-read-length) requests, then kick once."""
    posted = []
    for req_type, sector, arg in requests:
        buffers = [g.header(req_type, sector)]
        data = None
        if isinstance(arg, bytes):
            buffers.append(g.driver.readable(arg))
        elif arg:
            data = g.driver.writable(arg)
            buffers.append(data)
        status = g.driver.writable(1)
        g.driver.send([*buffers, status])
        posted.append((data, status))
    g.wr(Reg.QUEUE_NOTIFY, 0)
    assert g.driver.used_idx() == len(requests)
    return posted


@pytest.fixture
def recorded(mem, image):
    with RecordingFile(image) as backend:
        yield Guest(mem, backend, size=64), backend


def test_adjacent_reads_merge_into_one_transfer(recorded):
    g, backend = recorded
    posted = post_all(g, [(VIRTIO_BLK_T_IN, 4 * i, 4 * SECTOR_SIZE) for i in range(4)])
    assert backend.log == [("read", 0, 16 * SECTOR_SIZE)]
    for i, (data, status) in enumerate(posted):
        assert g.mem.read_u8(status.addr) == VIRTIO_BLK_S_OK
        assert g.mem.read(data.addr, 4 * SECTOR_SIZE) == pattern(4 * i, 4)
    assert sorted(g.driver.used_elem(i)[1] for i in range(4)) == [4 * SECTOR_SIZE + 1] * 4
    assert g.blk.stats.reads == 4 and g.blk.stats.bytes_read == 16 * SECTOR_SIZE
    assert g.irq.count == 1


def test_only_neighbours_on_disk_and_in_the_ring_merge(recorded):
    g, backend = recorded
    post_all(
        g,
        [
            (VIRTIO_BLK_T_IN, 0, SECTOR_SIZE),
            (VIRTIO_BLK_T_IN, 2, SECTOR_SIZE),  # a gap: not merged
            (VIRTIO_BLK_T_IN, 3, SECTOR_SIZE),
            (VIRTIO_BLK_T_OUT, 4, b"w" * SECTOR_SIZE),  # adjacent but a write
            (VIRTIO_BLK_T_OUT, 5, b"x" * SECTOR_SIZE),
            (VIRTIO_BLK_T_IN, 6, SECTOR_SIZE),
            (VIRTIO_BLK_T_IN, 1, SECTOR_SIZE),  # behind: never reordered
        ],
    )
    assert backend.log == [
        ("read", 0, 512),
        ("read", 1024, 1024),
        ("write", 2048, 1024),
        ("read", 3072, 512),
        ("read", 512, 512),
    ]


def test_flush_waits_for_the_writes_before_it(recorded, image):
    g, backend = recorded
    posted = post_all(
        g,
        [
            (VIRTIO_BLK_T_OUT, 0, b"a" * SECTOR_SIZE),
            (VIRTIO_BLK_T_OUT, 1, b"b" * SECTOR_SIZE),
            (VIRTIO_BLK_T_FLUSH, 0, 0),
            (VIRTIO_BLK_T_OUT, 2, b"c" * SECTOR_SIZE),  # after the flush: not merged over it
        ],
    )
    assert backend.log == [("write", 0, 1024), ("flush", 0, 0), ("write", 1024, 512)]
    # The flush was completed after the writes it covers.
    order = [g.driver.used_elem(i)[0] for i in range(4)]
    heads = [0, 3, 6, 9]  # 3 descriptors per request
    assert order.index(heads[2]) > max(order.index(heads[0]), order.index(heads[1]))
    assert all(g.mem.read_u8(s.addr) == VIRTIO_BLK_S_OK for _, s in posted)
    assert read_image(image, 0, 3) == b"a" * 512 + b"b" * 512 + b"c" * 512


def test_an_error_in_a_merged_run_fails_only_its_request(recorded):
    g, backend = recorded
    backend.fail_at = {2 * SECTOR_SIZE + 7}
    posted = post_all(g, [(VIRTIO_BLK_T_IN, i, SECTOR_SIZE) for i in range(4)])
    statuses = [g.mem.read_u8(s.addr) for _, s in posted]
    assert statuses == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
    for i, (data, _) in enumerate(posted):
        if i != 2:
            assert g.mem.read(data.addr, SECTOR_SIZE) == pattern(i)
    lengths = dict(g.driver.used_elem(i) for i in range(4))
    assert lengths == {0: 513, 3: 513, 6: 1, 9: 513}
    assert g.blk.stats.errors == 1 and g.blk.stats.reads == 3
    # One merged attempt, then each request alone.
    assert backend.log[0] == ("read", 0, 4 * SECTOR_SIZE) and len(backend.log) == 5

    backend.fail_at = {SECTOR_SIZE}
    backend.log.clear()
    posted = post_all_more(g, [(VIRTIO_BLK_T_OUT, i, b"z" * SECTOR_SIZE) for i in (0, 1, 2)])
    statuses = [g.mem.read_u8(s.addr) for _, s in posted]
    assert statuses == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]


def post_all_more(g: Guest, requests: list[tuple]) -> list[tuple[Buffer | None, Buffer]]:
    """:func:`post_all` on a ring that already ran."""
    before = g.driver.used_idx()
    posted = []
    for req_type, sector, arg in requests:
        buffers = [g.header(req_type, sector)]
        if isinstance(arg, bytes):
            buffers.append(g.driver.readable(arg))
        status = g.driver.writable(1)
        g.driver.send([*buffers, status])
        posted.append((None, status))
    g.wr(Reg.QUEUE_NOTIFY, 0)
    assert g.driver.used_idx() == before + len(requests)
    return posted


def test_bad_requests_in_a_run_split_it_and_fail_alone(recorded):
    g, backend = recorded
    posted = post_all(
        g,
        [
            (VIRTIO_BLK_T_IN, 0, SECTOR_SIZE),
            (VIRTIO_BLK_T_IN, 1, 100),  # not whole sectors
            (VIRTIO_BLK_T_IN, SECTORS, SECTOR_SIZE),  # beyond the end
            (VIRTIO_BLK_T_IN, 1, SECTOR_SIZE),
        ],
    )
    statuses = [g.mem.read_u8(s.addr) for _, s in posted]
    assert statuses == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
    assert backend.log == [("read", 0, 1024)]  # the good ones still merged


def test_read_only_drive_fails_writes_in_a_batch(mem, image):
    with RecordingFile(image, read_only=True) as backend:
        g = Guest(mem, backend, size=64)
        posted = post_all(
            g,
            [
                (VIRTIO_BLK_T_IN, 0, SECTOR_SIZE),
                (VIRTIO_BLK_T_OUT, 1, b"w" * SECTOR_SIZE),
                (VIRTIO_BLK_T_IN, 1, SECTOR_SIZE),
            ],
        )
        statuses = [g.mem.read_u8(s.addr) for _, s in posted]
        assert statuses == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
        assert [kind for kind, _, _ in backend.log] == ["read"]
    assert read_image(image, 1) == pattern(1)


def test_merges_stop_at_the_buffer_limit(recorded, monkeypatch):
    import pyvmm.devices.virtio.block as block

    monkeypatch.setattr(block, "MAX_MERGE_BUFFERS", 2)
    g, backend = recorded
    post_all(g, [(VIRTIO_BLK_T_IN, i, SECTOR_SIZE) for i in range(5)])
    assert [n for _, _, n in backend.log] == [1024, 1024, 512]


def test_notifications_are_off_while_the_device_is_busy(recorded):
    """The driver sees NO_NOTIFY while requests are served; on again once the ring is empty."""
    from pyvmm.devices.virtio.queue import VIRTQ_USED_F_NO_NOTIFY

    g, backend = recorded
    seen: list[int] = []
    read_into = backend.read_into

    def spy(offset, buffers):
        seen.append(g.driver.used_flags() & VIRTQ_USED_F_NO_NOTIFY)
        return read_into(offset, buffers)

    backend.read_into = spy
    post_all(g, [(VIRTIO_BLK_T_IN, 0, SECTOR_SIZE)])
    assert seen == [VIRTQ_USED_F_NO_NOTIFY]
    assert not g.driver.used_flags() & VIRTQ_USED_F_NO_NOTIFY


def test_a_request_published_during_service_is_served_without_a_kick(recorded):
    g, backend = recorded
    read_into = backend.read_into
    extra: list[Buffer] = []

    def publish_more(offset, buffers):
        if not extra:  # the driver adds one more while the device works, and does not kick
            status = g.driver.writable(1)
            g.driver.send([g.header(VIRTIO_BLK_T_IN, 9), g.driver.writable(SECTOR_SIZE), status])
            extra.append(status)
        return read_into(offset, buffers)

    backend.read_into = publish_more
    head = g.driver.send(
        [g.header(VIRTIO_BLK_T_IN, 0), g.driver.writable(512), g.driver.writable(1)]
    )
    g.wr(Reg.QUEUE_NOTIFY, 0)
    assert g.driver.used_idx() == 2
    assert g.driver.used_elem(0)[0] == head
    assert g.mem.read_u8(extra[0].addr) == VIRTIO_BLK_S_OK
    assert g.irq.count == 1


def test_replacing_the_backend_serves_the_new_file_and_tells_the_driver(mem, tmp_path):
    """PATCH /drives: the new image's size and data, a config-change interrupt."""
    first = BlockFile(make_image(tmp_path / "a.img"))
    second_path = tmp_path / "b.img"
    with open(second_path, "wb") as f:
        for sector in range(2 * SECTORS):
            f.write(pattern(sector + 1000))
    guest = Guest(mem, first)
    generation = guest.rd(Reg.CONFIG_GENERATION)
    edges = guest.irq.count
    old = guest.blk.replace_backend(BlockFile(str(second_path)))
    assert old is first
    first.close()
    assert guest.config()[0] == 2 * SECTORS
    assert guest.rd(Reg.CONFIG_GENERATION) != generation
    assert guest.rd(Reg.INTERRUPT_STATUS) & 2 and guest.irq.count == edges + 1
    status, _, data = guest.request(VIRTIO_BLK_T_IN, 5, read=SECTOR_SIZE)
    assert status == VIRTIO_BLK_S_OK and data == pattern(1005)
    guest.blk.backend.close()


def test_a_writable_drive_refuses_a_read_only_replacement(mem, image, tmp_path):
    backend = BlockFile(image)
    guest = Guest(mem, backend)
    read_only = BlockFile(make_image(tmp_path / "ro.img"), read_only=True)
    with pytest.raises(ValueError, match="read-only backend"):
        guest.blk.replace_backend(read_only)
    assert guest.blk.backend is backend
    read_only.close()
    backend.close()
