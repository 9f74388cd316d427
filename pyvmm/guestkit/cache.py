"""The guest-kit cache: where fetched and built guest artifacts live.

Everything the guest kit makes (unpacked Debian packages, extracted vmlinux
files, initramfs images) goes under one root, ``$PYVMM_CACHE`` or
``~/.cache/pyvmm``. Each artifact is written into a temporary name beside its
final path and renamed into place, so a reader never sees half an artifact,
an interrupted build leaves only a ``.tmp-*`` entry that the next build
ignores, and two processes building the same thing both end with one
complete copy. A per-artifact lock (``flock``) keeps two processes from
downloading the same 30-70 MB package at the same time.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from pyvmm.errors import HostError


def default_cache_dir() -> Path:
    """Return the cache root: ``$PYVMM_CACHE``, else ``~/.cache/pyvmm``."""
    env = os.environ.get("PYVMM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pyvmm"


def cache_root(cache_dir: Path | None) -> Path:
    """``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def ensure_dir(path: Path) -> Path:
    """``mkdir -p``; a failure is the host's (read-only home, full disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HostError(f"cannot create the cache directory {path}: {exc.strerror}") from exc
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(Path(tmp))
        raise HostError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty directory beside ``final``; rename it to ``final`` on success.

    If the body raises, the directory is removed. If ``final`` appeared in
    the meantime (another process finished first), ours is discarded: both
    are built from the same inputs.
    """
    ensure_dir(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
    except OSError as exc:
        raise HostError(f"cannot create a build directory in {final.parent}: {exc}") from exc
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if not final.is_dir():
                raise HostError(f"cannot store {final}: {exc.strerror or exc}") from exc
    finally:
        _remove(tmp)


@contextmanager
def cache_lock(root: Path, name: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<root>/.locks/<name>.lock`` for the body."""
    lock_dir = ensure_dir(root / ".locks")
    try:
        fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise HostError(f"cannot open a lock file in {lock_dir}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def discard(path: Path) -> None:
    """Remove a stale or incomplete cache entry: renamed aside first, then deleted."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        aside = Path(tempfile.mkdtemp(prefix=f".stale-{path.name}-", dir=path.parent))
        os.rename(path, aside / "old")
    except OSError as exc:
        raise HostError(f"cannot remove the stale cache entry {path}: {exc}") from exc
    _remove(aside)


def read_pointer(path: Path) -> str | None:
    """The one-line content of a pointer file, or None if it is missing or empty."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()
