"""Where the guest's serial output goes when the user names a file (``--serial-out``).

Opening a user's path for writing is where a typo hurts most, so the file is
checked first: a directory, a socket or a drive image the same VM uses is
refused with one line (truncating a disk image would destroy it); a FIFO
without a reader is refused instead of blocking the open forever.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from pyvmm.errors import ConfigError


def open_serial_output(path: Path, *, append: bool, drives: Iterable[Path] = ()) -> int:
    """An fd to write the guest's output to (truncated unless ``append``)."""
    shown = str(path)[:120]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ConfigError(f"serial output {shown}: {exc.strerror}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"serial output {shown} is a directory")
        if stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"serial output {shown} is a socket, not a file")
        for drive in drives:
            try:
                other = os.stat(drive)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                raise ConfigError(
                    f"serial output {shown} is the drive image {str(drive)[:120]}: "
                    "writing the console there would destroy the disk"
                )
    truncate = 0 if append or (st is not None and not stat.S_ISREG(st.st_mode)) else os.O_TRUNC
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | truncate
    flags |= os.O_APPEND if append else 0
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise ConfigError(f"serial output {shown} is a FIFO nobody reads") from None
        raise ConfigError(f"cannot open serial output {shown}: {exc.strerror}") from None
    os.set_blocking(fd, True)
    return fd


def fd_writer(fd: int) -> Callable[[bytes], object]:
    """A serial sink writing all of each chunk to ``fd``."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write
