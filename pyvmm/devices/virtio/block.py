"""virtio-blk (virtio 1.2, section 5.2): a disk for the guest, backed by an executor.

One request queue. Each chain is one request::

    readable:  struct virtio_blk_req header { le32 type; le32 reserved; le64 sector; }
               then the payload of OUT / DISCARD / WRITE_ZEROES
    writable:  the buffers IN / GET_ID fill, then one status byte (the last byte)

The work is split in three, so the guest-facing parsing is pure and testable
without a file (the first two in
:mod:`pyvmm.devices.virtio.block_request`):

1. :func:`parse_request` (pure: reads the chain and the small header/segment
   structs from guest memory, no I/O) turns a chain into a :class:`Request`,
   or into one carrying the status to answer at once;
2. :func:`check_request` (pure) checks it against the drive: capacity,
   read-only, supported operations;
3. :class:`VirtioBlock` runs what is left on the injected executor
   (:class:`BlockBackend`, normally ``pyvmm.host.block_file.BlockFile``),
   with zero-copy views of guest RAM, then writes the status byte.

A guest mistake fails only its request: a chain without a status byte comes
back with used length 0; a short header, a payload in the wrong direction or
of a bad size gets VIRTIO_BLK_S_IOERR; an unknown type VIRTIO_BLK_S_UNSUPP.
A chain the queue itself rejects (``QueueError`` with a head) is returned
with length 0. Only a broken *ring* (no head to return: a bad ``avail.idx``)
raises ``QueueError``, which the transport turns into DEVICE_NEEDS_RESET, as
no later request could be popped anyway. Host errors (``OSError``) answer
IOERR, are logged and counted, and never propagate.

Used length is what the device wrote into the writable buffers: the payload
plus the status byte on success, 1 (the status byte) on failure.

Threads: ``process_queue`` runs the I/O synchronously on the caller's thread
(the event loop in the VMM). A slow disk therefore stalls that loop; moving
the executor to its own thread is a later step that needs no parser change.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from pyvmm.devices.rate_limiter import RateLimiter, RateLimiterState, restore_limiter
from pyvmm.devices.virtio.block_request import (
    BLOCK_QUEUE_SIZE,
    DISCARD_SECTOR_ALIGNMENT,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SEG_MAX,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockBackend,
    Request,
    check_request,
    parse_request,
)
from pyvmm.devices.virtio.device import VirtioDevice, copy_config
from pyvmm.devices.virtio.ids import VIRTIO_ID_BLOCK
from pyvmm.devices.virtio.queue import DescriptorChain, QueueError
from pyvmm.errors import GuestError

if TYPE_CHECKING:
    from pyvmm.memory import GuestMemory

_logger = logging.getLogger("pyvmm.devices.virtio.block")

#: The most bytes one merged read or write moves (see ``VirtioBlock._serve_batch``);
#: 32 requests of 64 KiB, the depth and size Linux's sequential I/O reaches.
MAX_MERGE_BYTES = 2 << 20
#: The most buffers one merged transfer takes: Linux's IOV_MAX, one syscall's worth.
MAX_MERGE_BUFFERS = 1024


# --- feature bits (5.2.3) -------------------------------------------------------
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# --- byte layouts, declared once -------------------------------------------------------
#: struct virtio_blk_config (5.2.4), up to and including the secure-erase fields.
CONFIG = struct.Struct(
    "<Q"  # capacity (512-byte sectors)
    "I"  # size_max
    "I"  # seg_max
    "HBB"  # geometry: cylinders, heads, sectors
    "I"  # blk_size
    "BBHI"  # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BB"  # writeback, unused0
    "H"  # num_queues
    "III"  # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"  # max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"  # write_zeroes_may_unmap, unused1[3]
    "III"  # max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
)


# --- the device -------------------------------------------------------------------------
@dataclass
class BlockStats:
    """Counters for metrics; ``errors`` counts every request not answered OK."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    get_ids: int = 0
    errors: int = 0


@dataclass(frozen=True)
class VirtioBlockState:
    capacity: int
    read_only: bool
    stats: dict[str, int] = field(default_factory=dict)
    rate_limiter: RateLimiterState | None = None


class VirtioBlock(VirtioDevice):
    """The virtio block device; see the module docstring."""

    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (BLOCK_QUEUE_SIZE,)

    def __init__(
        self,
        backend: BlockBackend,
        serial: str = "",
        read_only: bool | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__()
        self.rate_limiter = rate_limiter
        # Set when the rate limiter held requests back: the owner calls
        # process_queue again after ``retry_after`` seconds.
        self.throttled = False
        self.retry_after = 0.0
        if read_only is None:
            read_only = backend.read_only
        elif not read_only and backend.read_only:
            raise ValueError("a read-only backend cannot serve a writable drive")
        serial_bytes = serial.encode()
        if len(serial_bytes) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.backend = backend
        self.read_only = read_only
        self.serial = serial_bytes.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.stats = BlockStats()

        features = 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
        discard = not read_only and backend.supports_discard
        write_zeroes = not read_only and backend.supports_write_zeroes
        if read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        if discard:
            features |= 1 << VIRTIO_BLK_F_DISCARD
        if write_zeroes:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        self.avail_features = features
        self._discard = discard
        self._write_zeroes = write_zeroes
        self._config = self._pack_config()

    def _pack_config(self) -> bytes:
        discard, write_zeroes = self._discard, self._write_zeroes
        return CONFIG.pack(
            self.backend.sectors,
            0,  # size_max: not offered
            SEG_MAX,
            0,
            0,
            0,  # geometry: not offered
            SECTOR_SIZE,
            0,
            0,
            0,
            0,  # topology: not offered
            0,
            0,  # writeback (needs CONFIG_WCE), unused0
            1,  # num_queues (meaningful with MQ only)
            MAX_DISCARD_SECTORS if discard else 0,
            MAX_DISCARD_SEG if discard else 0,
            DISCARD_SECTOR_ALIGNMENT if discard else 0,
            MAX_WRITE_ZEROES_SECTORS if write_zeroes else 0,
            MAX_WRITE_ZEROES_SEG if write_zeroes else 0,
            1 if write_zeroes else 0,  # write_zeroes_may_unmap: the host may punch a hole
            0,
            0,
            0,  # secure erase: not offered
        )

    def replace_backend(self, backend: BlockBackend) -> BlockBackend:
        """Serve from ``backend`` from now on (Firecracker's ``PATCH /drives``); return the old one.

        The negotiated features stay (a read-only drive stays read-only, and
        the new file must be writable if the drive is); the capacity follows
        the new file, and an active driver is told with a config-change
        interrupt so it re-reads it. Call with the transport lock held, so
        no request is in flight.
        """
        if not self.read_only and backend.read_only:
            raise ValueError("a read-only backend cannot serve a writable drive")
        old, self.backend = self.backend, backend
        self._config = self._pack_config()
        if self.interrupt is not None:
            self.interrupt.signal_config_change()
        return old

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return self.backend.sectors

    # --- config space -------------------------------------------------------------------
    def read_config(self, offset: int, data: memoryview) -> None:
        copy_config(self._config, offset, data)

    # --- requests -----------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """Serve every available request; raises only QueueError for a broken ring."""
        if self.mem is None or self.interrupt is None or index != 0:
            return
        self.throttled = False
        self.serve_batches(0, self._serve_batch)

    def _serve_batch(self, batch: list[DescriptorChain | QueueError]) -> int:
        """Serve one batch of chains in ring order; returns how many at its end
        the rate limiter held back.

        Reads (or writes) that follow each other in the batch and on the
        disk are merged into one ``preadv`` (``pwritev``), as QEMU does: a
        sequential stream at queue depth 32 costs one system call per batch
        instead of one per request. Only neighbours in ring order merge, so
        no request is reordered; the merge is a syscall detail, each request
        still gets its own status (see :meth:`_run_merged`). Everything else
        (flush, get-id, discard, write-zeroes) runs alone, after the merged
        run before it has completed: a FLUSH covers every write the device
        completed before it.
        """
        mem = self.mem
        assert mem is not None
        used = self.queues[0].add_used
        limiter = self.rate_limiter
        run: list[tuple[int, Request]] = []  # the merge being built
        run_type = run_end = run_iovs = run_bytes = 0
        for position, chain in enumerate(batch):
            if type(chain) is not DescriptorChain:
                self._drop_malformed(chain)
                used(mem, chain.head_index, 0)
                continue
            if limiter is not None and not self._admit(chain):
                if run:
                    self._run_merged(run)
                return len(batch) - position
            head = chain.head_index
            request = self._runnable(mem, chain)
            if request is None:
                continue  # answered already
            req_type = request.type
            if req_type != VIRTIO_BLK_T_IN and req_type != VIRTIO_BLK_T_OUT:
                if run:
                    self._run_merged(run)
                    run = []
                self._finish(head, request, *self._execute_one(mem, request))
                continue
            iovs, length = len(request.data), request.data_len
            if (
                run
                and req_type == run_type
                and request.sector == run_end
                and run_iovs + iovs <= MAX_MERGE_BUFFERS
                and run_bytes + length <= MAX_MERGE_BYTES
            ):
                run.append((head, request))
                run_iovs += iovs
                run_bytes += length
            else:
                if run:
                    self._run_merged(run)
                run = [(head, request)]
                run_type, run_iovs, run_bytes = req_type, iovs, length
            run_end = request.sector + (length >> SECTOR_SHIFT)
        if run:
            self._run_merged(run)
        return 0

    def _runnable(self, mem: GuestMemory, chain: DescriptorChain) -> Request | None:
        """The request in ``chain`` if it is to run; else None, and it is answered already
        (no status byte: used length 0; a bad or refused request: its status)."""
        head = chain.head_index
        request = parse_request(mem, chain)
        if request.status_addr is None:
            _logger.debug("virtio-blk: chain %d has no status byte", head)
            self.stats.errors += 1
            self.queues[0].add_used(mem, head, 0)
            return None
        if request.status is not None:
            self._finish(head, request, request.status, request.reason)
            return None
        status, reason = check_request(request, self.backend, self.read_only)
        if status != VIRTIO_BLK_S_OK:
            self._finish(head, request, status, reason)
            return None
        return request

    def _drop_malformed(self, exc: QueueError) -> None:
        _logger.debug("virtio-blk: dropping malformed chain: %s", exc)
        self.stats.errors += 1

    def _admit(self, chain: DescriptorChain) -> bool:
        """Charge one request to the rate limiter (bytes: its data, not header/status)."""
        assert self.rate_limiter is not None
        data = max(chain.readable_bytes - 16, 0) + max(chain.writable_bytes - 1, 0)
        if self.rate_limiter.consume(data, 1):
            return True
        self.throttled = True
        self.retry_after = self.rate_limiter.retry_after(data, 1)
        return False

    def _run_merged(self, run: list[tuple[int, Request]]) -> None:
        """One ``preadv``/``pwritev`` for checked, disk-contiguous requests of one type.

        On success every request is answered OK and the run is returned to
        the driver with one ``used.idx`` update. If the merged transfer
        fails, each request is retried on its own, so an error (a bad
        sector, ENOSPC) fails exactly the requests it hits: a read fills
        the same bytes again, a write writes the same bytes again.
        """
        mem = self.mem
        assert mem is not None
        first = run[0][1]
        is_read = first.type == VIRTIO_BLK_T_IN
        try:
            done = self._transfer(mem, is_read, first.sector, [r for _, r in run])
        except (OSError, GuestError, ValueError, OverflowError) as exc:
            if len(run) == 1:
                head, request = run[0]
                self._finish(head, request, *self._failure(request, exc))
                return
            for head, request in run:
                self._finish(head, request, *self._execute_one(mem, request))
            return
        stats = self.stats
        locate = mem.locate
        for _head, request in run:
            buf, offset = locate(request.status_addr, 1)
            buf[offset] = VIRTIO_BLK_S_OK
        if is_read:
            stats.reads += len(run)
            stats.bytes_read += done
            answers = [(head, request.data_len + 1) for head, request in run]
        else:
            stats.writes += len(run)
            stats.bytes_written += done
            answers = [(head, 1) for head, _request in run]
        self.queues[0].add_used_batch(mem, answers)

    def _transfer(
        self, mem: GuestMemory, is_read: bool, sector: int, requests: list[Request]
    ) -> int:
        """Move the data of ``requests`` (contiguous from ``sector``); returns the bytes."""
        view = mem.view
        views = [
            view(addr, length)
            for request in requests
            for addr, length, _flags in request.data
            if length
        ]
        try:
            offset = sector << SECTOR_SHIFT
            if is_read:
                return self.backend.read_into(offset, views)
            return self.backend.write_from(offset, views)
        finally:
            for v in views:
                v.release()

    def _execute_one(self, mem: GuestMemory, request: Request) -> tuple[int, str, int]:
        """Run one checked request; (status, reason, payload bytes written to the guest)."""
        try:
            return VIRTIO_BLK_S_OK, "", self._execute(mem, request)
        except (OSError, GuestError, ValueError, OverflowError) as exc:
            return self._failure(request, exc)

    def _failure(self, request: Request, exc: Exception) -> tuple[int, str, int]:
        """The answer to a request whose execution raised ``exc``."""
        if not isinstance(exc, OSError):
            return VIRTIO_BLK_S_IOERR, str(exc), 0
        _logger.warning(
            "virtio-blk: request type %d sector %d: %s", request.type, request.sector, exc
        )
        unsupported = exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP)
        return (VIRTIO_BLK_S_UNSUPP if unsupported else VIRTIO_BLK_S_IOERR), f"host: {exc}", 0

    def _finish(
        self, head: int, request: Request, status: int, reason: str, written: int = 0
    ) -> None:
        """Write the status byte and return chain ``head`` (payload ``written`` + status)."""
        mem = self.mem
        assert mem is not None and request.status_addr is not None
        if status != VIRTIO_BLK_S_OK:
            _logger.debug(
                "virtio-blk: request type %d sector %d: status %d (%s)",
                request.type,
                request.sector,
                status,
                reason,
            )
            self.stats.errors += 1
            written = 0
        mem.write_u8(request.status_addr, status)
        self.queues[0].add_used(mem, head, written + 1)

    def _execute(self, mem: GuestMemory, request: Request) -> int:
        """Run a checked request on the backend; returns payload bytes written to the guest."""
        backend = self.backend
        stats = self.stats
        req_type = request.type
        if req_type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            done = self._transfer(mem, req_type == VIRTIO_BLK_T_IN, request.sector, [request])
            if req_type == VIRTIO_BLK_T_IN:
                stats.reads += 1
                stats.bytes_read += done
                return done
            stats.writes += 1
            stats.bytes_written += done
            return 0
        if req_type == VIRTIO_BLK_T_FLUSH:
            if not self.read_only:
                backend.flush()
            stats.flushes += 1
            return 0
        if req_type == VIRTIO_BLK_T_GET_ID:
            remaining = self.serial
            for addr, length, _flags in request.data:
                if not remaining:
                    break
                mem.write(addr, remaining[:length])
                remaining = remaining[length:]
            stats.get_ids += 1
            return min(request.data_len, VIRTIO_BLK_ID_BYTES)
        if req_type in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            discard = req_type == VIRTIO_BLK_T_DISCARD
            for sector, num, _flags in request.ranges:
                offset, length = sector << SECTOR_SHIFT, num << SECTOR_SHIFT
                if discard:
                    backend.discard(offset, length)
                else:
                    backend.write_zeroes(offset, length)
            if discard:
                stats.discards += 1
            else:
                stats.write_zeroes += 1
            return 0
        raise ValueError(f"unchecked request type {request.type}")  # pragma: no cover

    # --- persistence --------------------------------------------------------------------
    def save(self) -> VirtioBlockState:
        limiter = self.rate_limiter.save() if self.rate_limiter is not None else None
        return VirtioBlockState(self.capacity, self.read_only, asdict(self.stats), limiter)

    def restore(self, state: VirtioBlockState) -> None:
        """Load a :meth:`save` result; the drive must be the same size and mode."""
        if state.capacity != self.capacity or state.read_only != self.read_only:
            raise ValueError(
                f"virtio-blk state is for {state.capacity} sectors "
                f"{'ro' if state.read_only else 'rw'}, drive has {self.capacity} "
                f"{'ro' if self.read_only else 'rw'}"
            )
        stats = BlockStats()
        for name, value in state.stats.items():
            if not hasattr(stats, name) or not isinstance(value, int) or value < 0:
                raise ValueError(f"virtio-blk state: stats {name}={value!r}")
            setattr(stats, name, value)
        self.stats = stats
        self.rate_limiter = restore_limiter(state.rate_limiter)
