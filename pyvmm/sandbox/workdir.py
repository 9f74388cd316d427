"""A sandbox's private directory: its vsock socket, its disk copies, its jail.

One directory per sandbox, ``<tmp>/pyvmm-<name>`` (mode 0700), removed with
the sandbox. It lives in the temporary directory (``$TMPDIR``, else
``/tmp``) rather than the cache because Unix sockets need a local
filesystem and a short path (107 bytes), and because nothing in it
outlives the sandbox. In a nested host ``$TMPDIR`` is L1's tmpfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from pyvmm.errors import HostError

VSOCK_SOCKET = "v.sock"
DISKS = "disks"


class Workdir:
    """The directory of one sandbox (see the module docstring)."""

    def __init__(self, name: str, base: Path | None = None) -> None:
        root = Path(base) if base is not None else Path(tempfile.gettempdir())
        self.path = root / f"pyvmm-{name}"
        try:
            self.path.mkdir(mode=0o700)
            (self.path / DISKS).mkdir(mode=0o700)
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise HostError(
                f"cannot create the sandbox directory {self.path}: {exc.strerror}"
            ) from None

    @property
    def vsock_uds(self) -> Path:
        return self.path / VSOCK_SOCKET

    def disk(self, drive_id: str) -> Path:
        return self.path / DISKS / f"{drive_id}.img"

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self.path)
        if self.path.exists():  # a jail's leftovers owned by another uid: try harder
            shutil.rmtree(self.path, ignore_errors=True)


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give ``path`` and everything under it to ``uid:gid`` (for a jailed VMM)."""
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
