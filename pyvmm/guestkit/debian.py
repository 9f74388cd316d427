"""Fetch Debian's kernel and busybox packages into the guest-kit cache.

Why Debian's packages: they are real, maintained kernels (``CONFIG_PVH=y``,
virtio and 9p as modules) that the host's own package manager can fetch by
name, with no toolchain and no kernel build. ``apt-get download`` fetches a
``.deb`` without installing it, ``dpkg-deb -x`` unpacks it anywhere, so
nothing here touches the host's installed system.

Which package: the metapackage (``linux-image-cloud-amd64`` or
``linux-image-amd64``) depends on the current versioned image, e.g.
``linux-image-6.1.0-56-cloud-amd64``; we fetch its ``-unsigned`` twin (the
same kernel without the Secure Boot signature, and without the dependency
on the signed template) when the archive has one.

Cache layout under the root (see :mod:`pyvmm.guestkit.cache`)::

    kernels/<flavor>.current          name of the package last fetched for it
    kernels/<package>/boot/vmlinuz-<release>
    kernels/<package>/lib/modules/<release>/   (with a generated modules.dep)
    kernels/<package>/pyvmm-package.json       what was fetched, written last
    busybox/current                   directory name of the busybox in use
    busybox/<deb version>/bin/busybox

A later call reads the pointer and makes no apt call at all; ``refresh=True``
asks apt again (the archive's kernel version moves with security updates).
``apt-get update`` runs only when apt cannot find or download the package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import ConfigError, HostError
from pyvmm.guestkit.cache import (
    cache_lock,
    cache_root,
    discard,
    ensure_dir,
    read_pointer,
    staging_dir,
    write_atomic,
)
from pyvmm.guestkit.progress import task

#: Kernel flavors and the metapackage that names each one's current image.
FLAVORS: dict[str, str] = {
    "cloud": "linux-image-cloud-amd64",
    "generic": "linux-image-amd64",
}
BUSYBOX_PACKAGE = "busybox-static"
METADATA_NAME = "pyvmm-package.json"

_APT_TIMEOUT_S = 900  # a 70 MB download on a slow mirror
_QUERY_TIMEOUT_S = 120
_UNPACK_TIMEOUT_S = 300
_PROGRESS_POLL_S = 0.2


@dataclass(frozen=True)
class KernelPackage:
    """An unpacked Debian kernel package in the cache."""

    flavor: str  #: "cloud" or "generic"
    package: str  #: Debian package name, e.g. linux-image-6.1.0-56-cloud-amd64-unsigned
    deb_version: str  #: Debian package version, e.g. 6.1.192-2
    version: str  #: kernel release (``uname -r``), e.g. 6.1.0-56-cloud-amd64
    root: Path  #: where the package was unpacked
    vmlinuz: Path  #: the bzImage, ``<root>/boot/vmlinuz-<version>``
    modules_dir: Path  #: ``<root>/lib/modules/<version>``


class _AptMiss(Exception):
    """apt could not resolve or download a package; an update may help."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- public API ---------------------------------------------------------------


def fetch_kernel(
    flavor: str = "cloud", cache_dir: Path | None = None, refresh: bool = False
) -> KernelPackage:
    """Return the cached kernel of ``flavor``, fetching and unpacking it if needed.

    The first call resolves the current version through the flavor's
    metapackage, downloads the ``.deb`` (about 27 MB for cloud, 70 MB for
    generic) and unpacks it; later calls only read the cache. ``refresh``
    resolves the version again and fetches it if it changed.
    """
    if flavor not in FLAVORS:
        raise ConfigError(
            f"unknown kernel flavor {flavor!r}: choose one of {', '.join(sorted(FLAVORS))}"
        )
    root = cache_root(cache_dir)
    kernels = root / "kernels"
    pointer = kernels / f"{flavor}.current"
    if not refresh:
        cached = _cached_kernel(kernels, read_pointer(pointer))
        if cached is not None:
            return cached
    ensure_dir(kernels)
    with cache_lock(root, f"kernel-{flavor}"):
        if not refresh:  # another process may have fetched it while we waited
            cached = _cached_kernel(kernels, read_pointer(pointer))
            if cached is not None:
                return cached

        def attempt() -> Path:
            package = _resolve_kernel_package(flavor)
            final = kernels / package
            if not (final / METADATA_NAME).is_file():
                discard(final)  # an entry without metadata is incomplete
                with staging_dir(final) as tmp:
                    _fetch_kernel_into(package, flavor, tmp)
            return final

        final = _with_update_retry(attempt)
        write_atomic(pointer, (final.name + "\n").encode())
    pkg = _cached_kernel(kernels, final.name)
    if pkg is None:
        raise HostError(f"the kernel unpacked in {final} is incomplete; remove it and retry")
    return pkg


def fetch_busybox(cache_dir: Path | None = None, refresh: bool = False) -> Path:
    """Return the path of a static busybox from Debian's ``busybox-static`` package.

    The ``.deb`` (under 1 MB) is fetched and unpacked into the cache, so the
    host needs apt but not the package installed. On a host without apt, a
    statically linked ``/bin/busybox`` is used if there is one.
    """
    root = cache_root(cache_dir)
    bdir = root / "busybox"
    pointer = bdir / "current"
    if not refresh:
        cached = _cached_busybox(bdir, read_pointer(pointer))
        if cached is not None:
            return cached
    if shutil.which("apt-get") is None:
        host = _host_static_busybox()
        if host is not None:
            return host
    ensure_dir(bdir)
    with cache_lock(root, "busybox"):
        if not refresh:
            cached = _cached_busybox(bdir, read_pointer(pointer))
            if cached is not None:
                return cached

        def attempt() -> Path:
            version = _candidate_version(BUSYBOX_PACKAGE)
            final = bdir / _safe_name(version)
            if not (final / "bin" / "busybox").is_file():
                discard(final)
                with staging_dir(final) as tmp:
                    deb = _apt_download(BUSYBOX_PACKAGE, tmp)
                    _unpack(deb, tmp)
                    deb.unlink()
                    if not (tmp / "bin" / "busybox").is_file():
                        raise HostError(f"{deb.name} has no bin/busybox")
            return final

        final = _with_update_retry(attempt)
        write_atomic(pointer, (final.name + "\n").encode())
    return final / "bin" / "busybox"


def kernel_package_at(root: Path) -> KernelPackage:
    """Describe a kernel unpacked by :func:`fetch_kernel` (reads its metadata file)."""
    pkg = _load_kernel(root)
    if pkg is None:
        raise HostError(f"{root} is not a complete unpacked kernel package")
    return pkg


# --- the cache ----------------------------------------------------------------


def _cached_kernel(kernels: Path, name: str | None) -> KernelPackage | None:
    if not name or "/" in name:
        return None
    return _load_kernel(kernels / name)


def _load_kernel(root: Path) -> KernelPackage | None:
    try:
        meta = json.loads((root / METADATA_NAME).read_text(encoding="utf-8"))
        release = meta["version"]
        pkg = KernelPackage(
            flavor=meta["flavor"],
            package=meta["package"],
            deb_version=meta["deb_version"],
            version=release,
            root=root,
            vmlinuz=root / "boot" / f"vmlinuz-{release}",
            modules_dir=root / "lib" / "modules" / release,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not pkg.vmlinuz.is_file() or not pkg.modules_dir.is_dir():
        return None
    return pkg


def _cached_busybox(bdir: Path, name: str | None) -> Path | None:
    if not name or "/" in name:
        return None
    path = bdir / name / "bin" / "busybox"
    return path if path.is_file() else None


def _fetch_kernel_into(package: str, flavor: str, tmp: Path) -> None:
    """Download and unpack ``package`` into ``tmp``; write its metadata last."""
    deb = _apt_download(package, tmp)
    deb_version = _deb_field(deb, "Version")
    _unpack(deb, tmp)
    deb.unlink()
    images = sorted((tmp / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise HostError(
            f"{package}: expected one boot/vmlinuz-* in the package, found {len(images)}"
        )
    release = images[0].name.removeprefix("vmlinuz-")
    modules_dir = tmp / "lib" / "modules" / release
    if not modules_dir.is_dir():
        raise HostError(f"{package}: the package has no lib/modules/{release}")
    from pyvmm.guestkit.initramfs import write_modules_dep

    if not (modules_dir / "modules.dep").is_file():
        write_modules_dep(modules_dir)  # depmod would do this on install
    meta = {"package": package, "deb_version": deb_version, "version": release, "flavor": flavor}
    write_atomic(tmp / METADATA_NAME, (json.dumps(meta, indent=2) + "\n").encode())


# --- apt and dpkg ---------------------------------------------------------------


def _resolve_kernel_package(flavor: str) -> str:
    """Metapackage -> versioned image -> its ``-unsigned`` twin when available."""
    meta = FLAVORS[flavor]
    proc = _run(["apt-cache", "depends", meta], _QUERY_TIMEOUT_S)
    suffix = "-cloud-amd64" if flavor == "cloud" else "-amd64"
    pattern = re.compile(r"^linux-image-(\d[0-9A-Za-z.+~-]*)$")
    images = []
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        name = value.strip()
        if key.strip() != "Depends" or not pattern.match(name) or not name.endswith(suffix):
            continue
        if flavor != "cloud" and name.endswith("-cloud-amd64"):
            continue
        images.append(name)
    if proc.returncode != 0 or not images:
        raise _AptMiss(f"apt-cache found no kernel image behind {meta}: {_last_line(proc.stderr)}")
    image = max(images, key=_natural_key)
    unsigned = f"{image}-unsigned"
    if _apt_knows(unsigned):
        return unsigned
    return image


def _apt_knows(package: str) -> bool:
    proc = _run(["apt-cache", "show", "--no-all-versions", package], _QUERY_TIMEOUT_S)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _candidate_version(package: str) -> str:
    proc = _run(["apt-cache", "policy", package], _QUERY_TIMEOUT_S)
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() not in ("", "(none)"):
            return value.strip()
    raise _AptMiss(f"apt has no candidate version of {package}: {_last_line(proc.stderr)}")


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download package`` into ``dest``, with a progress line; the .deb's path."""
    cmd = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # As root apt drops to the _apt user, who cannot write our 0700 directory.
        cmd += ["-o", "APT::Sandbox::User=root"]
    with task(f"downloading {package}", total=_download_size(package, dest)) as progress:
        proc = _run(
            [*cmd, package], _APT_TIMEOUT_S, cwd=dest,
            while_running=lambda: progress.advance_to(_bytes_in(dest)),
        )  # fmt: skip
    debs = sorted(dest.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise _AptMiss(f"apt-get download {package} failed: {_last_line(proc.stderr)}")
    return debs[0]


def _download_size(package: str, dest: Path) -> int | None:
    """The .deb's size from ``apt-get download --print-uris`` (None if apt does not say)."""
    proc = _run(["apt-get", "download", "--print-uris", package], _QUERY_TIMEOUT_S, cwd=dest)
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].isdigit():
            return int(fields[2])
    return None


def _bytes_in(directory: Path) -> int:
    """Bytes in the files under ``directory`` (apt's partial download included)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _apt_update(reason: str) -> None:
    if os.geteuid() != 0:
        raise HostError(
            f"{reason}; the package lists may be missing or stale, and updating them "
            "needs root: run `apt-get update` and retry"
        )
    proc = _run(["apt-get", "update", "-q"], _APT_TIMEOUT_S)
    if proc.returncode != 0:
        raise HostError(f"{reason}; apt-get update failed too: {_last_line(proc.stderr)}")


def _with_update_retry(attempt: Callable[[], Path]) -> Path:
    """Run ``attempt``; if apt misses, update the package lists once and retry."""
    try:
        return attempt()
    except _AptMiss as miss:
        _apt_update(miss.message)
    try:
        return attempt()
    except _AptMiss as miss:
        raise HostError(f"{miss.message} (after apt-get update)") from None


def _unpack(deb: Path, dest: Path) -> None:
    with task(f"unpacking {deb.name.split('_')[0]}"):
        proc = _run(["dpkg-deb", "-x", str(deb), str(dest)], _UNPACK_TIMEOUT_S)
    if proc.returncode != 0:
        raise HostError(f"dpkg-deb -x {deb.name} failed: {_last_line(proc.stderr)}")


def _deb_field(deb: Path, field: str) -> str:
    proc = _run(["dpkg-deb", "-f", str(deb), field], _QUERY_TIMEOUT_S)
    value = proc.stdout.strip()
    if proc.returncode != 0 or not value:
        raise HostError(f"dpkg-deb -f {deb.name} {field} failed: {_last_line(proc.stderr)}")
    return value


def _run(
    cmd: list[str],
    timeout: float,
    cwd: Path | None = None,
    while_running: Callable[[], object] | None = None,
) -> subprocess.CompletedProcess:
    """Run an apt or dpkg tool with captured text output; ``while_running`` is called
    every 0.2 s until it ends (for progress lines)."""
    tool = shutil.which(cmd[0])
    if tool is None:
        raise HostError(
            f"{cmd[0]} not found on PATH: fetching Debian packages needs apt and dpkg "
            "(a Debian or Ubuntu host)"
        )
    try:
        with subprocess.Popen(
            [tool, *cmd[1:]],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"},
        ) as proc:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    out, err = proc.communicate(timeout=_PROGRESS_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        proc.kill()
                        proc.communicate()
                        raise HostError(
                            f"{' '.join(cmd)} did not finish within {timeout:.0f} s"
                        ) from None
                    if while_running is not None:
                        while_running()
    except OSError as exc:
        raise HostError(f"cannot run {cmd[0]}: {exc}") from exc
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _last_line(stderr: str) -> str:
    """The most telling stderr line: the last ``E:`` error, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "no error message"


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _safe_name(version: str) -> str:
    """A Debian version as a directory name (the epoch's ``:`` becomes ``_``)."""
    return re.sub(r"[^0-9A-Za-z.+~-]", "_", version)


# --- a host busybox, when apt is absent -----------------------------------------

_PT_INTERP = 3


def _host_static_busybox() -> Path | None:
    """``/bin/busybox`` if it is a statically linked x86_64 ELF (no PT_INTERP)."""
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        try:
            data = candidate.read_bytes()
        except OSError:
            continue
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            continue
        (phoff,) = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        types = [
            struct.unpack_from("<I", data, phoff + i * phentsize)[0]
            for i in range(phnum)
            if phoff + (i + 1) * phentsize <= len(data)
        ]
        if _PT_INTERP not in types:
            return candidate
    return None
