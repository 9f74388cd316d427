"""Installs a compiled BPF program on the calling thread, and reads what a thread has.

``seccomp(SECCOMP_SET_MODE_FILTER, 0, prog)`` with no flags: the filter
applies to the calling thread and to the threads it starts afterwards,
never to its siblings (no ``SECCOMP_FILTER_FLAG_TSYNC``), which is what lets
each thread role carry its own filter and lets a library caller's threads
stay unfiltered. ``no_new_privs`` must be set first (the kernel demands it
of a process without ``CAP_SYS_ADMIN``, and we want it anyway: an ``execve``
of a set-uid program must not gain privileges).

Filters stack: a thread that installs a filter while one is inherited is
bound by both (the strictest action wins), so a thread must be started by
one whose filter allows everything the new role needs (see
:mod:`pyvmm.jail.thread_setup`).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

from pyvmm.errors import HostError

_PR_SET_NAME = 15
_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP = 317  # x86_64
_SECCOMP_SET_MODE_FILTER = 1
_SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
_BPF_MAXINSNS = 4096


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    ulong = ctypes.c_ulong
    libc.prctl.argtypes = (ctypes.c_int, ulong, ulong, ulong, ulong)
    libc.syscall.restype = ctypes.c_long
    return libc


def check_program(program: bytes, where: str) -> None:
    """A BPF program the kernel can take: whole instructions, 1 to 4096 of them."""
    count, rest = divmod(len(program), _SOCK_FILTER_SIZE)
    if rest or not 0 < count <= _BPF_MAXINSNS:
        raise HostError(
            f"{where}: {len(program)} bytes is not a BPF program of 1-4096 instructions"
        )


def set_no_new_privs() -> None:
    """``prctl(PR_SET_NO_NEW_PRIVS, 1)``: for the whole process, and irreversible."""
    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise HostError(f"PR_SET_NO_NEW_PRIVS failed: {os.strerror(ctypes.get_errno())}")


def install_on_this_thread(program: bytes, where: str) -> None:
    """Load ``program`` on the calling thread only (see the module docstring)."""
    check_program(program, where)
    set_no_new_privs()
    buffer = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // _SOCK_FILTER_SIZE, ctypes.addressof(buffer))
    libc = _libc()
    result = libc.syscall(
        ctypes.c_long(_SYS_SECCOMP),
        ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(0),
        ctypes.byref(prog),
    )
    if result != 0:
        raise HostError(f"{where}: the kernel refused the seccomp filter: "
                        f"{os.strerror(ctypes.get_errno())}")  # fmt: skip


def set_thread_name(name: str) -> None:
    """Name the calling thread for the kernel (``/proc/PID/task/TID/comm``, 15 bytes).

    Python 3.11 does not do it; with it, ``ps -L``, the seccomp fault line
    and the tests see ``vcpu0``, ``api``, ``io`` instead of ``python3``.
    """
    buffer = ctypes.create_string_buffer(name.encode(errors="replace")[:15])
    _libc().prctl(_PR_SET_NAME, ctypes.addressof(buffer), 0, 0, 0)


def seccomp_mode(pid: int | str = "self", tid: int | str | None = None) -> int:
    """The ``Seccomp:`` field of a thread's status: 0 none, 1 strict, 2 filter."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    with open(path, encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    raise HostError(f"{path} has no Seccomp field")
