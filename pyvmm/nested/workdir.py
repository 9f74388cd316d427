"""Temporary work directories of nested hosts, and the ones killed runs left behind.

A nested host's work directory (``<tmp>/pyvmm-nested-*``) holds L1's console
log, the agent's files and the console socket. :class:`~pyvmm.nested.host.NestedHost`
removes it on every way out it controls (normal end, errors, timeouts, and
the SIGINT/SIGTERM that front ends turn into exceptions). A process killed
with SIGKILL cannot clean up, so every directory records its owner (pid and
the process's start time, which tells a reused pid apart) in ``owner``, and
each new nested host first removes the directories whose owner is gone.
Directories without an owner file (from older versions, or a process killed
before it wrote one) are removed only when no process mentions them on its
command line (QEMU's has the path) and they have not changed for
:data:`ORPHAN_AGE_S`.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

PREFIX = "pyvmm-nested-"
OWNER_FILE = "owner"
ORPHAN_AGE_S = 600.0
_OWNER_MAX_BYTES = 64


def create(parent: Path | None = None) -> Path:
    """A new work directory under ``parent`` (default: the temp dir), owned by us."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent)).resolve()
    (path / OWNER_FILE).write_text(owner_record(os.getpid()))
    return path


def owner_record(pid: int) -> str:
    return f"{pid} {process_start_time(pid)}\n"


def process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or "" if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may contain spaces.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def owner_alive(record: str) -> bool:
    """Whether the process an ``owner`` file names still runs (same pid, same start)."""
    parts = record.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return False
    return process_start_time(int(parts[0])) == parts[1]


def remove_stale(parent: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the work directories under ``parent`` that nobody owns; return them."""
    root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
    except OSError:
        return []
    if not candidates:
        return []
    now = time.time() if now is None else now
    mentioned: str | None = None
    removed = []
    for path in candidates:
        try:
            record = _read_owner(path / OWNER_FILE)
        except FileNotFoundError:
            record = None
        except OSError:
            continue
        if record is not None:
            if owner_alive(record):
                continue
        else:
            try:
                if now - path.stat().st_mtime < ORPHAN_AGE_S:
                    continue
            except OSError:
                continue
            if mentioned is None:
                mentioned = _all_command_lines()
            if str(path) in mentioned:
                continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _read_owner(path: Path) -> str:
    """An owner file's text; OSError for anything but a small regular file.

    Anyone can create ``pyvmm-nested-*`` in /tmp: a FIFO or a huge file there
    must not hang or bloat the next nested host.
    """
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode) or info.st_size > _OWNER_MAX_BYTES:
        raise OSError(f"{path} is not an owner file")
    return path.read_text(errors="replace")


def _all_command_lines() -> str:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (OSError, UnicodeDecodeError):
                continue
    return "\n".join(lines)
