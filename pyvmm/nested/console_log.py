"""Reading L1's console log: its last line (boot progress) and its tail (errors).

Why: QEMU writes L1's serial console to a file in the work directory. Its
last line is the best progress report an L1 boot gives (and what a stalled
boot stopped at); its tail is the best explanation when L1 fails. Both
leave out QEMU's noise about CPU features TCG lacks, which says nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

#: QEMU warns about every CPU feature TCG lacks, twice; not worth a tail line.
QEMU_NOISE = "TCG doesn't support requested feature"
TAIL_LINES = 20
#: A kernel console line's time stamp, left out of the progress line.
KERNEL_TIME = re.compile(r"^\[\s*\d+\.\d+\]\s*")
_LAST_LINE_WINDOW = 4096


def last_line(path: Path) -> str:
    """The last non-empty line of a log, stripped (reads only its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _LAST_LINE_WINDOW))
            data = f.read()
    except OSError:
        return ""
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        if line.strip() and QEMU_NOISE not in line:
            return line.strip()
    return ""


def progress_line(path: Path) -> str:
    """The log's last line without its kernel time stamp: what L1 is doing now."""
    return KERNEL_TIME.sub("", last_line(path))


def tails(paths: Sequence[Path], lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of each log that has any, each under a header."""
    parts = []
    for path in paths:
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        tail = [line for line in text.splitlines() if line.strip() and QEMU_NOISE not in line][
            -lines:
        ]
        if tail:
            parts.append(f"--- {path.name} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    return "\n".join(parts)
