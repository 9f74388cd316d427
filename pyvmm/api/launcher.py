"""Build pyvmm's ``firecracker`` launcher (``launcher.c``): the API socket in a millisecond.

A Firecracker client may connect about 20 ms after spawning the binary and
not retry; a Python process needs longer than that to start (60-140 ms on
a loaded host, measured). The launcher, a small C program, binds and
listens on the API socket, then execs ``python -m pyvmm.firecracker_cli``
with the socket as fd 3; the kernel queues the client's connection
meanwhile. Install it where clients look for ``firecracker``::

    python -m pyvmm.api.launcher /usr/local/bin/firecracker

It is built with the host's C compiler against this interpreter (its path
is compiled in), and rebuilt only when the source or the interpreter
changes (a hash in the file name of the cached build).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pyvmm.errors import HostError

SOURCE = Path(__file__).with_name("launcher.c")


def build_launcher(cache_dir: Path, python: str = sys.executable) -> Path:
    """The launcher built for ``python``, cached in ``cache_dir`` (HostError without a cc)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + python.encode()).hexdigest()[:16]
    target = cache_dir / f"pyvmm-firecracker-launcher-{key}"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise HostError("building the firecracker launcher needs a C compiler (cc or gcc)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    temp = target.with_suffix(f".tmp{os.getpid()}")
    define = '-DPYTHON="' + python.replace("\\", "\\\\").replace('"', '\\"') + '"'
    result = subprocess.run(
        [compiler, "-O2", "-Wall", "-Werror", define, "-o", str(temp), str(SOURCE)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        temp.unlink(missing_ok=True)
        raise HostError(f"building the firecracker launcher failed: {result.stderr.strip()[:400]}")
    os.replace(temp, target)
    return target


def main() -> None:
    """``python -m pyvmm.api.launcher DEST``: build and copy the launcher to DEST."""
    if len(sys.argv) != 2:
        print("usage: python -m pyvmm.api.launcher DEST", file=sys.stderr)
        sys.exit(2)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyvmm"
    try:
        built = build_launcher(cache)
    except HostError as exc:
        print(f"pyvmm: error: {exc}", file=sys.stderr)
        sys.exit(1)
    shutil.copy2(built, sys.argv[1])
    print(f"installed {sys.argv[1]} (execs {sys.executable} -m pyvmm.firecracker_cli)")


if __name__ == "__main__":
    main()
