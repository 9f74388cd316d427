"""Write several files so that each appears complete or not at all.

Each file is written to a temporary name in its final directory, fsynced,
and renamed into place only when all of them were written; on any error
the temporaries are removed and existing files are left untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_files(*paths: str | Path) -> Iterator[list[int]]:
    """Yield one writable fd per path; on a clean exit, each replaces its path."""
    targets = [Path(path) for path in paths]
    temps: list[tuple[int, str]] = []
    try:
        for target in targets:
            fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            temps.append((fd, temp))
        yield [fd for fd, _ in temps]
        for fd, _ in temps:
            os.fsync(fd)
        for (_, temp), target in zip(temps, targets, strict=True):
            os.replace(temp, target)
        for directory in {target.parent for target in targets}:
            _fsync_dir(directory)
        temps_left: list[str] = []
    except BaseException:
        temps_left = [temp for _, temp in temps]
        raise
    finally:
        for fd, _ in temps:
            os.close(fd)
        for temp in temps_left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


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
