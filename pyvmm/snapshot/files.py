"""Snapshot files on disk: opened for reading only if they are what they claim, written whole.

Reading: :func:`open_regular` opens without blocking (a FIFO given as a
snapshot file would otherwise hang ``open`` until some writer shows up) and
refuses anything but a regular file, so ``/dev/zero`` or a FIFO is one line
of error instead of a hang or a read that grows until ``MemoryError``;
the caller then checks the size before it reads anything.

Writing: :func:`atomic_files` writes each file to a temporary name in its
final directory, fsyncs it and renames it into place only when all of them
were written; on an error the temporaries are removed and existing files
are left untouched. No set of renames is atomic, so a process killed
between two of them leaves a mix of new and old files: the snapshot format
ties the files together (a shared id, see :mod:`pyvmm.snapshot.memory_file`)
so that such a mix is refused, never restored.

A killed writer cannot remove its temporaries. Each one therefore holds an
exclusive ``flock`` on its temporary for as long as it lives, and every
:func:`atomic_files` first removes the temporaries in its directories that
nobody holds a lock on: left-overs of dead writers. A lock, unlike a pid in
the name, needs no ``/proc``, is not fooled by a recycled pid or by a writer
in another pid namespace, and is released by the kernel however its owner
dies. A writer checks, once it holds its lock, that its file is still
linked, so a cleaner that got there between ``open`` and ``flock`` costs
only a retry. Where ``flock`` fails, nothing is removed; where it is
accepted but not enforced across processes (QEMU's 9p server, NFS mounted
``nolock``), a concurrent writer in the same directory can lose its
temporaries: its rename then fails with a clear error and its old files
stay as they were.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from pyvmm.errors import ConfigError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".pyvmm-tmp"
_TEMP_ATTEMPTS = 5


class SnapshotError(ConfigError):
    """A snapshot cannot be written or loaded; the message says which file and why."""


def open_regular(path: str | Path, what: str, *, writable: bool = False) -> int:
    """Open ``path`` (``what`` names it in errors) if it is a regular file; returns the fd.

    ``O_NONBLOCK`` keeps ``open`` from waiting for a FIFO's writer; it means
    nothing for regular files, the only kind kept.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SnapshotError(f"cannot open {what} {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SnapshotError(f"{what} {path} is not a regular file (it is {_kind(mode)})")
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file"


def pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    """``length`` bytes at ``offset``; a short read means the file shrank under us."""
    parts = []
    while length:
        data = os.pread(fd, length, offset)
        if not data:
            raise SnapshotError(f"{what} ended early, at offset {offset:#x} (was it truncated?)")
        parts.append(data)
        length -= len(data)
        offset += len(data)
    return b"".join(parts)


@contextlib.contextmanager
def atomic_files(*paths: str | Path) -> Iterator[list[int]]:
    """Yield one writable fd per path; on a clean exit, each replaces its path.

    Errors of pyvmm's own file operations (create, fsync, rename) become a
    :class:`SnapshotError` naming the file; what the body raises goes
    through unchanged.
    """
    targets = [Path(path) for path in paths]
    if len({(os.path.realpath(t.parent), t.name) for t in targets}) != len(targets):
        names = " and ".join(str(target) for target in targets)
        raise SnapshotError(f"snapshot files {names} are one file: give each its own path")
    for directory in {target.parent for target in targets}:
        remove_stale_temps(directory)
    temps: list[tuple[int, Path]] = []
    done = False
    try:
        for target in targets:
            temps.append(_create_temp(target))
        yield [fd for fd, _ in temps]
        for (fd, _), target in zip(temps, targets, strict=True):
            _as_snapshot_error(os.fsync, fd, target=target)
        for (_, temp), target in zip(temps, targets, strict=True):
            _as_snapshot_error(os.replace, temp, target, target=target)
        for directory in {target.parent for target in targets}:
            _as_snapshot_error(_fsync_dir, directory, target=directory)
        done = True
    finally:
        for fd, temp in temps:
            if not done:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
            os.close(fd)  # last: it releases the lock that marks the temporary as alive


def _as_snapshot_error(call: Callable[..., object], *args: object, target: Path) -> None:
    try:
        call(*args)
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot file {target}: {exc.strerror}") from None


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new, locked temporary file next to ``target``."""
    for _ in range(_TEMP_ATTEMPTS):
        temp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SnapshotError(f"cannot write snapshot file {target}: {exc.strerror}") from None
        with contextlib.suppress(OSError):  # no flock here: cleaners cannot lock it either
            fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return fd, temp
        os.close(fd)  # a cleaner removed it before we held the lock: take another name
    raise SnapshotError(f"cannot write snapshot file {target}: no free temporary name")


def remove_stale_temps(directory: Path) -> list[str]:
    """Remove the temporaries of dead writers in ``directory``; returns their names.

    Best effort: what cannot be listed, opened or locked is left alone.
    """
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(".") and n.endswith(TEMP_SUFFIX)]
    except OSError:
        return removed
    for name in names:
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its writer is alive
            opened, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if stat.S_ISREG(opened.st_mode) and (opened.st_dev, opened.st_ino) == (
                named.st_dev,
                named.st_ino,
            ):
                os.unlink(path)
                removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.info(
            "removed %d temporary file(s) of killed snapshot writers in %s", len(removed), directory
        )
    return removed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
