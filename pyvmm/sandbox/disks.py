"""Per-sandbox copies of disk images, so that nothing one sandbox writes reaches the next.

A sandbox never writes the image it was given. A read-only drive is
shared as it is (the block device opens it read-only, under a shared lock);
a writable one is copied for each sandbox, and the copy thrown away with
the sandbox. The cached snapshot keeps its own copy, taken when the
snapshot was (the guest's page cache in the snapshot holds that copy's
blocks, so each restored sandbox starts from exactly it).

:func:`clone_file` copies as cheaply as the filesystem allows: a reflink
(``FICLONE``: btrfs, XFS, bcachefs, OCFS2 - constant time, blocks shared
until written), else a sparse copy that reads only the file's data extents
(``SEEK_DATA``/``SEEK_HOLE``) and moves them with ``copy_file_range``
(in-kernel; server-side on NFS). Measured on this host's ext4 (no
reflink), see the sandbox benchmark.

Every copy is written under a temporary name and renamed into place: an
interrupted copy leaves no half image behind.

Network filesystems (9p) cannot say where a file's holes are: for them
:func:`scan_extents` reads the file once and finds its all-zero blocks, and
:func:`clone_file` takes such a list so that a copy moves only the data (a
256 MiB guest's memory file holds about 97 MiB of it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from pyvmm.errors import ConfigError, HostError

#: ``FICLONE`` = ``_IOW(0x94, 9, int)``.
FICLONE = 0x40049409
_CHUNK = 64 << 20
#: What ``FICLONE`` fails with where reflinks do not exist or cannot be made.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


Extents = list[tuple[int, int]]
#: Granularity of :func:`scan_extents` (the memory file's own block size).
SCAN_BLOCK = 64 * 1024


def clone_file(
    source: Path, dest: Path, extents: Extents | None = None, *, mode: int = 0o600
) -> str:
    """Copy ``source`` to ``dest`` (which must not exist); returns ``reflink`` or ``copy``.

    ``extents`` ((start, end) pairs) lists where the data is; without it the
    source filesystem is asked (``SEEK_DATA``).

    Raises :class:`ConfigError` if ``source`` is not a regular file and
    :class:`HostError` if the copy fails (``dest`` is then not left behind).
    """
    tmp = dest.with_name(f".tmp-{dest.name}")
    try:
        src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # FIFOs: no hang
    except OSError as exc:
        raise ConfigError(f"cannot open drive image {source}: {exc.strerror}") from None
    try:
        info = os.fstat(src_fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"drive image {source} is not a regular file")
        dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            how = _reflink(src_fd, dst_fd) or _sparse_copy(src_fd, dst_fd, info.st_size, extents)
        finally:
            os.close(dst_fd)
        os.chmod(tmp, mode)  # whatever the umask took away
        os.rename(tmp, dest)
        return how
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise HostError(f"cannot copy drive image {source} to {dest}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(src_fd)


def _reflink(src_fd: int, dst_fd: int) -> str | None:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return None
        raise
    return "reflink"


def _sparse_copy(src_fd: int, dst_fd: int, size: int, extents: Extents | None) -> str:
    """Copy the data extents; holes stay holes (the size is set first)."""
    os.ftruncate(dst_fd, size)
    for start, end in extents if extents is not None else _data_extents(src_fd, size):
        if not 0 <= start <= end <= size:
            raise OSError(errno.EINVAL, f"extent {start}-{end} is outside the file")
        offset = start
        while offset < end:
            moved = _copy_range(src_fd, dst_fd, offset, min(_CHUNK, end - offset))
            if moved == 0:
                raise OSError(errno.EIO, "the drive image shrank while being copied")
            offset += moved
    return "copy"


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    try:
        return os.copy_file_range(src_fd, dst_fd, count, offset, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    data = os.pread(src_fd, count, offset)
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.pwrite(dst_fd, view[written:], offset + written)
    return len(data)


def data_extents(path: Path) -> Extents:
    """Where ``path`` holds data, as its filesystem reports it (``SEEK_DATA``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return _data_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the parts of the file that hold data; all of it if holes are unknown."""
    extents = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end))
            offset = end
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    return extents


def scan_extents(path: Path) -> Extents:
    """Where ``path`` holds data, found by reading it: blocks of :data:`SCAN_BLOCK`
    that are not all zero, runs merged (for filesystems that cannot say)."""
    zero = bytes(SCAN_BLOCK)
    extents: Extents = []
    try:
        with open(path, "rb", buffering=0) as f:
            offset = 0
            while chunk := f.read(16 * SCAN_BLOCK):
                for at in range(0, len(chunk), SCAN_BLOCK):
                    block = chunk[at : at + SCAN_BLOCK]
                    if block == zero[: len(block)]:
                        continue
                    start, end = offset + at, offset + at + len(block)
                    if extents and extents[-1][1] == start:
                        extents[-1] = (extents[-1][0], end)
                    else:
                        extents.append((start, end))
                offset += len(chunk)
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc.strerror}") from None
    return extents
