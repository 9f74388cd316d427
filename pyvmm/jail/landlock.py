"""Landlock: the VMM may open only the paths it was configured with (Cloud Hypervisor's
``--landlock``), an extra layer where there is no jail (``pyvmm run``, a library VMM).

Landlock is an unprivileged Linux LSM: a process lists the file-system rights
it will handle and, per directory or file, the rights it keeps; everything
else is refused with EACCES, for the calling thread and every thread it
starts afterwards (like seccomp, it never reaches threads that already run,
so the main thread restricts itself before it starts any). Here:

- ``read_only``: kernel, initrd, read-only drives (read files; list directories);
- ``read_write``: writable drives, the directories of sockets and snapshots
  (read, write, truncate, create and remove files and sockets);
- ``devices``: ``/dev/kvm``, ``/dev/net/tun`` (read, write, and ``ioctl``
  from Landlock ABI 5 on, which would otherwise be refused).

Rights the running kernel does not know are left out (best effort, as
Landlock's own documentation recommends), so the same call works on every
ABI; :func:`abi_version` says which one this kernel has (0: none).
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from pyvmm.errors import ConfigError, HostError
from pyvmm.jail.install import set_no_new_privs

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15

#: The file-system rights each Landlock ABI version handles.
_HANDLED = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
#: The rights that make sense on a file (a rule on a file with others is EINVAL).
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

READ_ONLY = READ_FILE | READ_DIR
READ_WRITE = READ_ONLY | WRITE_FILE | TRUNCATE | MAKE_REG | MAKE_SOCK | REMOVE_FILE | MAKE_DIR
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64),)


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 if Landlock is missing or disabled."""
    version = _libc().syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
        ctypes.c_uint32(_CREATE_RULESET_VERSION),
    )  # fmt: skip
    return max(0, int(version))


def handled_rights(abi: int) -> int:
    """Every file-system right Landlock ABI ``abi`` can restrict."""
    known = [rights for version, rights in _HANDLED.items() if version <= abi]
    return max(known) if known else 0


def restrict(
    read_only: Iterable[str | os.PathLike[str]] = (),
    read_write: Iterable[str | os.PathLike[str]] = (),
    devices: Iterable[str | os.PathLike[str]] = (),
) -> int:
    """Restrict this thread, and those it starts, to the listed paths; returns the ABI used.

    Every path must exist (ConfigError naming it otherwise) - list a
    directory for files that are yet to be made (a snapshot, a socket).
    """
    abi = abi_version()
    if abi == 0:
        raise HostError("Landlock is not available in this kernel (CONFIG_SECURITY_LANDLOCK)")
    handled = handled_rights(abi)
    libc = _libc()
    ruleset = libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET),
        ctypes.byref(_RulesetAttr(handled)),
        ctypes.c_size_t(ctypes.sizeof(_RulesetAttr)),
        ctypes.c_uint32(0),
    )
    if ruleset < 0:
        raise HostError(f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        for paths, rights in ((read_only, READ_ONLY), (read_write, READ_WRITE), (devices, DEVICE)):
            for path in paths:
                _add_rule(libc, int(ruleset), Path(path), rights & handled)
        set_no_new_privs()
        result = libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), 0)
        if result != 0:
            error = os.strerror(ctypes.get_errno())
            raise HostError(f"landlock_restrict_self failed: {error}")
    finally:
        os.close(int(ruleset))
    return abi


def _add_rule(libc: ctypes.CDLL, ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"landlock: cannot allow {str(path)!r}: {error.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        attr = _PathBeneathAttr(rights, fd)
        result = libc.syscall(
            ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset),
            ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(attr), ctypes.c_uint32(0),
        )  # fmt: skip
        if result != 0:
            error = os.strerror(ctypes.get_errno())
            raise HostError(f"landlock_add_rule for {str(path)!r} failed: {error}")
    finally:
        os.close(fd)
