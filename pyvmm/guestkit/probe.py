"""Build the probe guest: a tiny PVH-bootable x86_64 test kernel (``guest/probe``).

Why a build step in Python: tests and benchmarks need the probe ELF, and the
sources are small enough (a few hundred lines of C and assembly) to compile on
first use with the host's gcc in about a second. The result is cached under a
key derived from the sources and the compiler flags, so every later call is a
directory lookup, and editing the sources is enough to get a fresh build.

The probe itself is described in ``guest/probe/README.md``: it boots through
the PVH entry point, drops to CPL3 and runs the programs named on its command
line, then prints ``PROBE RESULT: PASS`` or ``PROBE RESULT: FAIL <reason>``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pyvmm.errors import HostError
from pyvmm.guestkit.progress import task

#: Name of the built image inside its cache directory.
PROBE_ELF_NAME = "probe.elf"

#: Bumped when the build procedure changes in a way the flags do not show.
_BUILD_FORMAT = "1"

#: File suffixes that are inputs to the build (hashed into the cache key).
_SOURCE_SUFFIXES = (".S", ".c", ".h", ".ld")
_LINKER_SCRIPT = "probe.ld"

# Freestanding, static, non-PIC code at a fixed address (the linker script puts
# it at 1 MiB). -mgeneral-regs-only: the probe never enables SSE, so gcc must
# not use it. -fno-zero-initialized-in-bss: zeroed globals go to .data, so the
# probe does not depend on the loader clearing .bss.
CFLAGS: tuple[str, ...] = (
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-zero-initialized-in-bss",
)
LDFLAGS: tuple[str, ...] = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,-z,noexecstack",
)

_BUILD_TIMEOUT_S = 120
_STDERR_TAIL_CHARS = 3000


def probe_source_dir() -> Path:
    """Return the directory with the probe's sources (``guest/probe``).

    The sources live next to the package in a repository checkout, not inside
    it: they are C and assembly, not Python. Raises :class:`HostError` when
    they are not there (for example, pyvmm installed without its checkout).
    """
    src = Path(__file__).resolve().parents[2] / "guest" / "probe"
    if not (src / _LINKER_SCRIPT).is_file():
        raise HostError(
            f"probe guest sources not found in {src}: build_probe() needs a pyvmm "
            "repository checkout"
        )
    return src


def default_cache_dir() -> Path:
    """Return the cache root: ``$PYVMM_CACHE``, else ``~/.cache/pyvmm``."""
    env = os.environ.get("PYVMM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pyvmm"


def _source_files(src: Path) -> list[Path]:
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in _SOURCE_SUFFIXES)
    if not files:
        raise HostError(f"no probe sources in {src}")
    return files


def _cache_key(files: list[Path]) -> str:
    """Short sha256 over the build format, the flags and every source file.

    The compiler version is deliberately not part of the key: asking gcc for
    it would cost a process start on every call, and any gcc that builds the
    sources builds an equivalent probe.
    """
    h = hashlib.sha256()
    h.update(f"format={_BUILD_FORMAT}\n".encode())
    h.update(("\0".join(CFLAGS + LDFLAGS) + "\n").encode())
    for path in files:
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _compile(gcc: str, src: Path, files: list[Path], out_dir: Path) -> None:
    """Compile and link every source in one gcc run; raise HostError on failure."""
    elf = out_dir / PROBE_ELF_NAME
    units = [str(p) for p in files if p.suffix in (".S", ".c")]
    cmd = [
        gcc,
        *CFLAGS,
        *LDFLAGS,
        f"-Wl,-T,{src / _LINKER_SCRIPT}",
        f"-Wl,-Map={out_dir / 'probe.map'}",
        *units,
        "-o",
        str(elf),
    ]
    try:
        proc = subprocess.run(
            cmd,
            cwd=out_dir,
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"could not run gcc to build the probe guest: {exc}") from exc
    (out_dir / "build.log").write_text(
        "$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr, encoding="utf-8"
    )
    if proc.returncode != 0 or not elf.is_file():
        tail = (proc.stderr or proc.stdout).strip()[-_STDERR_TAIL_CHARS:]
        raise HostError(
            f"building the probe guest failed (gcc exit status {proc.returncode}):\n{tail}"
        )


def build_probe(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build the probe guest if needed and return the path of its ELF image.

    The image lands in ``<cache>/probe/<key>/probe.elf``, where ``key`` is a
    short sha256 of the sources and flags, so a cached image is reused exactly
    as long as it is current, and gcc is needed only when it is not. The build
    runs in a temporary directory that is renamed into place, so concurrent
    callers and interrupted builds never leave a half-written image behind.
    ``force`` rebuilds even when a cached image exists.
    """
    src = probe_source_dir()
    files = _source_files(src)
    root = (cache_dir if cache_dir is not None else default_cache_dir()) / "probe"
    final = root / _cache_key(files)
    elf = final / PROBE_ELF_NAME
    if elf.is_file() and not force:
        return elf

    gcc = shutil.which("gcc")
    if gcc is None:
        raise HostError(
            "gcc not found on PATH: it is needed to build the probe guest from "
            f"{src} (Debian: apt-get install gcc)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    except OSError as exc:
        raise HostError(f"cannot create the probe build directory in {root}: {exc}") from exc
    try:
        with task("building the probe guest (gcc)"):
            _compile(gcc, src, files, tmp)
        if force and final.exists():
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=root))
            os.rename(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its identical build into place first.
            if not elf.is_file():
                raise
    except OSError as exc:
        raise HostError(f"cannot store the probe build in {final}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return elf
