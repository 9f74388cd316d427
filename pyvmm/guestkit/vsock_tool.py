"""Build ``pyvmm-vsock``, the AF_VSOCK tool test guests run (``guest/vsock``).

Busybox's ``nc`` speaks no AF_VSOCK, so a guest that tests virtio-vsock gets
this small static C program in its initramfs (see the usage at the top of
``guest/vsock/pyvmm-vsock.c``): ``listen PORT`` echoes every connection,
``connect CID PORT`` copies stdin to the socket and the socket to stdout.

Like the probe guest (:mod:`pyvmm.guestkit.probe`) it is compiled on first
use with the host's gcc, statically against glibc, and cached under
``<cache>/vsock-tool/<key>/pyvmm-vsock``, where ``key`` hashes the source and
the flags: an unchanged source is never rebuilt, an edited one always is.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from pyvmm.errors import HostError
from pyvmm.guestkit.cache import cache_root, staging_dir

TOOL_NAME = "pyvmm-vsock"
_SOURCE = "pyvmm-vsock.c"
#: Bumped when the build procedure changes in a way the flags do not show.
_BUILD_FORMAT = "1"
CFLAGS: tuple[str, ...] = ("-std=gnu11", "-O2", "-Wall", "-Wextra", "-static", "-s")
_BUILD_TIMEOUT_S = 120
_STDERR_TAIL_CHARS = 3000


def vsock_tool_source() -> Path:
    """The C source (``guest/vsock/pyvmm-vsock.c`` in a repository checkout)."""
    src = Path(__file__).resolve().parents[2] / "guest" / "vsock" / _SOURCE
    if not src.is_file():
        raise HostError(f"{src} not found: build_vsock_tool() needs a pyvmm repository checkout")
    return src


def _cache_key(source: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"format={_BUILD_FORMAT}\n".encode())
    h.update(("\0".join(CFLAGS) + "\n").encode())
    h.update(source)
    return h.hexdigest()[:16]


def build_vsock_tool(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build ``pyvmm-vsock`` if needed and return the path of the static executable.

    Raises :class:`HostError` when gcc (or glibc's static ``libc.a``) is
    missing or the build fails, with gcc's message.
    """
    src = vsock_tool_source()
    final = cache_root(cache_dir) / "vsock-tool" / _cache_key(src.read_bytes())
    tool = final / TOOL_NAME
    if tool.is_file() and not force:
        return tool
    gcc = shutil.which("gcc")
    if gcc is None:
        raise HostError(
            f"gcc not found on PATH: it is needed to build {TOOL_NAME} from {src} "
            "(Debian: apt-get install gcc libc6-dev)"
        )
    if force and final.exists():
        shutil.rmtree(final, ignore_errors=True)
    with staging_dir(final) as tmp:
        cmd = [gcc, *CFLAGS, str(src), "-o", str(tmp / TOOL_NAME)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostError(f"could not run gcc to build {TOOL_NAME}: {exc}") from exc
        if proc.returncode != 0 or not (tmp / TOOL_NAME).is_file():
            tail = (proc.stderr or proc.stdout).strip()[-_STDERR_TAIL_CHARS:]
            raise HostError(
                f"building {TOOL_NAME} failed (gcc exit status {proc.returncode}):\n{tail}"
            )
    return tool
