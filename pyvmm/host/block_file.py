"""The file executor behind virtio-blk: a disk image (or block device) on the host.

:class:`BlockFile` is the only part of the block device that touches a file
descriptor; the device model (``pyvmm.devices.virtio.block``) parses requests and
hands this object plain offsets and guest-memory views. Tests can inject any
object with the same methods instead (see ``BlockBackend`` there).

Contracts:

* **Zero copy.** :meth:`BlockFile.read_into` and :meth:`BlockFile.write_from`
  take ``memoryview`` objects over guest RAM (``GuestMemory.view``) and pass
  them straight to ``preadv``/``pwritev``: the data never passes through a
  Python ``bytes`` object. Lists longer than ``IOV_MAX`` are split.
* **Short transfers** are retried on the rest of the buffers; a transfer
  that makes no progress (the file shrank under us: end of file) raises
  ``OSError(EIO)``. So a call either moves every byte or raises.
* **Durability.** Writes land in the host page cache. :meth:`BlockFile.flush`
  is ``fdatasync``: it returns only once the data written so far is on
  stable storage, and the device completes a guest FLUSH only after it
  returned. That is the write-back cache the guest is told about by
  VIRTIO_BLK_F_FLUSH.
* **Discard / write zeroes** use ``fallocate(2)`` through ctypes (Python 3.11
  has no ``os.fallocate`` with mode flags). Discard is PUNCH_HOLE|KEEP_SIZE;
  support is probed at construction by punching one byte *past the end of
  file* (which changes nothing) and reported in ``supports_discard``; an
  EOPNOTSUPP at use still reaches the caller, which answers UNSUPP. Write
  zeroes tries ZERO_RANGE, then PUNCH_HOLE|KEEP_SIZE (reads back zeros too),
  then plain writes of zeros, so it works on every writable file; the first
  mode that works is remembered.
* **Errors** are ``OSError`` from the host (EIO, ENOSPC, ...); the caller
  turns them into an I/O error status. Nothing here knows about the guest.
* The image is locked with ``flock`` (shared for read-only, exclusive
  otherwise) so two VMMs cannot write the same image by mistake.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

from pyvmm.errors import ConfigError

SECTOR_SIZE = 512

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - always defined on Linux
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024

_ZERO_CHUNK = 1 << 20
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with mode flags; raises OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BlockFile:
    """An open disk image; see the module docstring for the contracts."""

    def __init__(
        self, path: str | os.PathLike[str], read_only: bool = False, *, lock: bool = True
    ) -> None:
        """Open ``path``; ``lock=False`` only for :meth:`reopen` (the lock moves over later)."""
        self.path = os.fspath(path)
        self.read_only = read_only
        # O_NONBLOCK: a FIFO given as an image must not hang the open; it is refused below.
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise ConfigError(f"cannot open drive image {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ConfigError(f"drive image {self.path} is not a file or block device")
            os.set_blocking(fd, True)
            self._identity = (st.st_dev, st.st_ino)
            if lock:
                self._lock(fd)
            # lseek works for block devices too, where st_size is 0.
            self.size_bytes = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        #: Whole 512-byte sectors; a partial last sector is not visible to the guest.
        self.sectors = self.size_bytes // SECTOR_SIZE
        self.supports_discard = not read_only and self._probe_punch_hole()
        self.supports_write_zeroes = not read_only
        self._zero_modes = [
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        ]

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(f"drive image {self.path} is in use by another process") from exc

    def same_file(self, path: str | os.PathLike[str]) -> bool:
        """True if ``path`` names the file this image has open (same device and inode)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def reopen(self) -> BlockFile:
        """A second, unlocked handle on the same file (its size read afresh).

        For a drive pointed at the file it already uses: a new lock would
        conflict with our own. Call :meth:`take_lock` on it once this handle
        is closed.
        """
        return BlockFile(self.path, self.read_only, lock=False)

    def take_lock(self) -> None:
        """Lock the image (after :meth:`reopen`, once the old handle is closed)."""
        self._lock(self._fd)

    def subscribe(self, ops: object, wake: object) -> None:
        """Nothing to watch: requests come from the guest, never from the file."""

    def _probe_punch_hole(self) -> bool:
        """Punch one byte past the end of file: a no-op that fails if unsupported."""
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self.size_bytes, 1)
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # --- data transfer ----------------------------------------------------------------
    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill ``buffers`` in order from ``offset``; returns the bytes read (all of them)."""
        return self._transfer(os.preadv, offset, buffers)

    def write_from(self, offset: int, buffers: list[memoryview]) -> int:
        """Write ``buffers`` in order at ``offset``; returns the bytes written (all of them)."""
        if self.read_only:
            raise OSError(errno.EBADF, "drive is read-only")
        return self._transfer(os.pwritev, offset, buffers)

    def _transfer(self, op, offset: int, buffers: list[memoryview]) -> int:
        pending = [buf for buf in buffers if len(buf)]
        total = 0
        first = 0
        while first < len(pending):
            done = op(self._fd, pending[first : first + IOV_MAX], offset + total)
            if done <= 0:
                raise OSError(errno.EIO, "unexpected end of file")
            total += done
            # Skip the buffers completed; keep the unfinished tail of a partial one.
            while done:
                length = len(pending[first])
                if done >= length:
                    done -= length
                    first += 1
                else:
                    pending[first] = pending[first][done:]
                    done = 0
        return total

    def flush(self) -> None:
        """Make every completed write durable (``fdatasync``); returns when it is."""
        if not self.read_only:
            os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (reads back zeros); OSError(EOPNOTSUPP) if the host can't."""
        if self.read_only:
            raise OSError(errno.EBADF, "drive is read-only")
        if length:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read back as zeros, the cheapest way the host supports."""
        if self.read_only:
            raise OSError(errno.EBADF, "drive is read-only")
        if not length:
            return
        while self._zero_modes:
            try:
                fallocate(self._fd, self._zero_modes[0], offset, length)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._zero_modes.pop(0)
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            offset += self._transfer(os.pwritev, offset, [zeros[: end - offset]])

    # --- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # also drops the flock

    def __enter__(self) -> BlockFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"BlockFile({self.path!r}, {mode}, {self.sectors} sectors)"
