"""Opening the user's kernel and initrd files, with one-line errors.

Why a module of its own: every way a path can be wrong (missing, a
directory, a FIFO, no permission) must become a :class:`KernelImageError`
that names the file, never a traceback. Boot setup opens each file once, up
front, and reads from that handle later, so a file cannot be swapped or lose
its permissions between validation and loading.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from pyvmm.errors import KernelImageError


def open_input(path: str | os.PathLike[str], what: str) -> BinaryIO:
    """Open ``path`` for reading; ``what`` ("kernel image", "initrd") names it in errors."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise KernelImageError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise KernelImageError(f"{what} {path} is not accessible (permission denied)") from None
    except OSError as exc:
        raise KernelImageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise KernelImageError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO would block open(); a device has no meaningful size.
        raise KernelImageError(f"{what} {path} is not a regular file")
    try:
        return open(path, "rb")  # the caller owns (and closes) the handle
    except PermissionError:
        raise KernelImageError(f"{what} {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise KernelImageError(f"cannot read {what} {path}: {exc.strerror}") from None


def file_size(f: BinaryIO) -> int:
    """Size in bytes of an open regular file."""
    return os.fstat(f.fileno()).st_size


def read_at(f: BinaryIO, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``offset`` (fewer only at end of file)."""
    f.seek(offset)
    return f.read(length)


def copy_to_guest(f: BinaryIO, offset: int, length: int, dest: memoryview) -> int:
    """Read ``length`` file bytes at ``offset`` straight into ``dest``.

    Returns how many bytes were copied: less than ``length`` only if the file
    ended early (it shrank after it was checked), which the caller reports.
    Reading into the guest view avoids a second copy of a large image.
    """
    f.seek(offset)
    done = 0
    while done < length:
        count = f.readinto(dest[done:length])
        if not count:
            break
        done += count
    return done
