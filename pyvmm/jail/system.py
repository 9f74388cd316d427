"""The Linux calls the jailer needs that Python 3.11's ``os`` lacks, through libc.

``unshare``, ``setns``, ``mount``, ``umount2``, ``pivot_root`` and
``capset``: each raises :class:`~pyvmm.errors.HostError` naming the call
and the errno, so the jailer's one-line error says which step failed.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

from pyvmm.errors import HostError

CLONE_NEWNS = 0x0002_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
_SYS_PIVOT_ROOT = 155
_SYS_CAPSET = 126
_LINUX_CAPABILITY_VERSION_3 = 0x2008_0522
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise HostError(f"{what} failed: {os.strerror(error)}")


def unshare(flags: int) -> None:
    _check(_libc().unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int, what: str) -> None:
    _check(_libc().setns(ctypes.c_int(fd), ctypes.c_int(nstype)), what)


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    result = _libc().mount(
        encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), None
    )
    _check(result, f"mount of {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc().umount2(target.encode(), ctypes.c_int(flags)), f"umount of {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), new_root.encode(), put_old.encode())
    _check(result, "pivot_root")


@cache
def last_capability() -> int:
    """The highest capability number this kernel knows (read once: /proc is not in the jail)."""
    with open(_CAP_LAST_CAP_FILE, encoding="ascii") as file:
        return int(file.read(16))


def drop_bounding_set() -> None:
    """Empty the bounding and ambient sets (needs CAP_SETPCAP: do it while still root).

    Not even an ``execve`` of a file with capabilities can then bring one back.
    """
    libc = _libc()
    for cap in range(last_capability() + 1):
        _check(libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0), "PR_CAPBSET_DROP")
    _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT")


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (``--uid 0`` keeps them otherwise)."""
    libc = _libc()
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two empty {effective, permitted, inheritable}
    libc.syscall.restype = ctypes.c_long
    _check(libc.syscall(ctypes.c_long(_SYS_CAPSET), header, data), "capset")
