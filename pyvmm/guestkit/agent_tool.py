"""Build ``pyvmm-agent``, the guest agent sandboxes talk to (``guest/agent``).

The agent runs commands and moves files for the host over AF_VSOCK (the
protocol is ``guest/agent/PROTOCOL.md``; the host side is
:mod:`pyvmm.sandbox`). A guest gets it as ``/bin/pyvmm-agent`` and starts it
from its init once the vsock transport module is loaded.

Like ``pyvmm-vsock`` (:mod:`pyvmm.guestkit.vsock_tool`) it is compiled on
first use with the host's gcc, statically against glibc, so that it runs in
any guest (a bare busybox initramfs has no dynamic loader). It is cached
under ``<cache>/agent/<key>/pyvmm-agent``, where ``key`` hashes every source
file's name and content and the flags: an unchanged source is never rebuilt,
an edited one always is.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from pyvmm.errors import ConfigError, HostError
from pyvmm.guestkit.cache import cache_root, staging_dir

AGENT_NAME = "pyvmm-agent"
#: Where a guest image carries it (busybox's /bin is on every PATH the guest kit sets).
GUEST_PATH = "bin/pyvmm-agent"
#: Kernel modules a Debian guest must load before starting it (virtio-mmio devices
#: are found through ACPI; the vsock transport brings vsock and its common part).
GUEST_MODULES: tuple[str, ...] = ("virtio_mmio", "vmw_vsock_virtio_transport")
#: Bumped when the build procedure changes in a way the flags do not show.
_BUILD_FORMAT = "1"
CFLAGS: tuple[str, ...] = ("-std=gnu11", "-O2", "-Wall", "-Wextra", "-static", "-s")
_BUILD_TIMEOUT_S = 180
_STDERR_TAIL_CHARS = 3000


def agent_source_dir() -> Path:
    """``guest/agent`` in a repository checkout."""
    src = Path(__file__).resolve().parents[2] / "guest" / "agent"
    if not (src / "main.c").is_file():
        raise HostError(f"{src}/main.c not found: build_agent() needs a pyvmm repository checkout")
    return src


def agent_sources(src: Path) -> list[Path]:
    """The files the agent is built from: every ``.c`` and ``.h``, in name order."""
    return sorted(p for p in src.iterdir() if p.suffix in (".c", ".h") and p.is_file())


def _cache_key(sources: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"format={_BUILD_FORMAT}\n".encode())
    h.update(("\0".join(CFLAGS) + "\n").encode())
    for path in sources:
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def build_agent(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build ``pyvmm-agent`` if needed and return the path of the static executable.

    Raises :class:`HostError` when gcc (or glibc's static ``libc.a``) is
    missing or the build fails, with gcc's message.
    """
    src = agent_source_dir()
    sources = agent_sources(src)
    final = cache_root(cache_dir) / "agent" / _cache_key(sources)
    binary = final / AGENT_NAME
    if binary.is_file() and not force:
        return binary
    gcc = shutil.which("gcc")
    if gcc is None:
        raise HostError(
            f"gcc not found on PATH: it is needed to build {AGENT_NAME} from {src} "
            "(Debian: apt-get install gcc libc6-dev)"
        )
    if force and final.exists():
        shutil.rmtree(final, ignore_errors=True)
    with staging_dir(final) as tmp:
        units = [str(p) for p in sources if p.suffix == ".c"]
        cmd = [gcc, *CFLAGS, f"-I{src}", *units, "-o", str(tmp / AGENT_NAME)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostError(f"could not run gcc to build {AGENT_NAME}: {exc}") from exc
        if proc.returncode != 0 or not (tmp / AGENT_NAME).is_file():
            tail = (proc.stderr or proc.stdout).strip()[-_STDERR_TAIL_CHARS:]
            raise HostError(
                f"building {AGENT_NAME} failed (gcc exit status {proc.returncode}):\n{tail}"
            )
    return binary


def agent_bytes(agent: Path | bool, cache_dir: Path | None = None) -> bytes | None:
    """What a guest image carries as ``/bin/pyvmm-agent`` (the builders' ``agent`` argument).

    True: the agent built by :func:`build_agent` (gcc and a static libc
    needed); a path: that binary (an ELF executable); False: none (None).
    """
    if agent is False:
        return None
    path = build_agent(cache_dir) if agent is True else Path(agent)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HostError(f"cannot read the guest agent {path}: {exc.strerror}") from None
    if not data.startswith(b"\x7fELF"):
        raise ConfigError(f"the guest agent {path} is not an ELF executable")
    return data
