"""Everything a jailed VMM will need from the host file system, taken before pivoting.

The honest Python problem: the VMM is an interpreter plus packages, not one
static binary to copy into the jail. pyvmm's answer (measured in the
report of issue 11, and documented in ``jailer.py``) is to start the VMM
*in the jailer's own process*: import every module it can use, read the
few host facts it looks up lazily, then pivot into the empty jail and call
the VMM's entry point. The jail then holds nothing but ``/dev/kvm``,
``/dev/net/tun``, ``/run`` and what the user hard-links in; the
interpreter's files stay outside.

What "everything" is: every module of the runtime packages (not the
tooling and the other front ends: ``guestkit``, ``nested``, ``sandbox``,
``cli``, ``doctor``, ``microvm``), the third-party
modules pyvmm imports inside functions (kernel decompressors, the ELF
reader), the libseccomp shared library, and two lazy host facts: the package version (read from its
metadata files) and whether ``/dev/kvm`` is PVM (``/sys/module/kvm_pvm``).
A module missed here fails in the jail with an ImportError naming it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import pkgutil

import pyvmm

#: Imported inside functions somewhere in pyvmm's runtime (grep of indented imports).
LAZY_THIRD_PARTY = (
    "lz4.block",
    "lz4.frame",
    "zstandard",
    "ctypes",
    "json",
    "logging.handlers",
)
#: Never run inside a jailed pyvmm-firecracker: tooling and the other front ends.
_NOT_IN_A_JAILED_VMM = (
    "pyvmm.guestkit",
    "pyvmm.nested",
    "pyvmm.sandbox",
    "pyvmm.jail.learn",
    "pyvmm.__main__",
    "pyvmm.cli",
    "pyvmm.doctor",
    "pyvmm.microvm",
)


def runtime_modules() -> list[str]:
    """Names of the modules a jailed ``pyvmm-firecracker`` may import."""
    names = []
    for info in pkgutil.walk_packages(pyvmm.__path__, "pyvmm."):
        if not info.name.startswith(_NOT_IN_A_JAILED_VMM):
            names.append(info.name)
    return sorted(names)


def preload() -> int:
    """Import the VMM and prime its lazy host look-ups; returns the number of modules."""
    names = runtime_modules()
    for name in (*names, *LAZY_THIRD_PARTY):
        importlib.import_module(name)
    _freeze_version()
    _freeze_pvm_check()
    _load_libseccomp()
    return len(names)


def _freeze_version() -> None:
    """Answer ``importlib.metadata.version("pyvmm")`` from the value read now.

    In the jail the package's metadata files are out of reach; without this
    ``GET /`` and every snapshot would claim version 0.0.0.
    """
    known = {"pyvmm": importlib.metadata.version("pyvmm")}
    original = importlib.metadata.version

    @functools.wraps(original)
    def version(name: str) -> str:
        return known[name] if name in known else original(name)

    importlib.metadata.version = version


def _load_libseccomp() -> None:
    """dlopen libseccomp now: the seccomp filters are compiled after pivoting."""
    from pyvmm.jail.libseccomp import syscall_name

    syscall_name(0)


def _freeze_pvm_check() -> None:
    """``host_is_pvm()`` reads /sys, which the jail has not got: ask now (it remembers)."""
    from pyvmm.vmm.cpuid import host_is_pvm

    host_is_pvm()
