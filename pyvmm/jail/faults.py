"""What happens when a filtered thread makes a system call its filter denies.

pyvmm's default filters answer a denied call with ``trap``: the kernel does
not run the call and sends ``SIGSYS`` to the calling thread, with the
syscall number in ``siginfo``. The handler here (installed with
``sigaction(SA_SIGINFO)`` through ctypes, because Python's own signal
handlers run later, on the main thread, without ``siginfo``) runs on the
faulting thread itself and does one of two things, chosen per process:

``exit`` (a served or jailed VMM, Firecracker's behaviour)
    one log line naming the syscall and the thread, ``seccomp.num_faults``
    incremented, every registered flush hook run (the metrics file gets its
    last line), then ``_exit(148)`` - the process ends, nothing else runs.

``stop-vm`` (library mode: a :class:`~pyvmm.microvm.MicroVM` in someone's
process)
    the same log line and counter, then the call fails with ``EPERM`` (the
    handler writes ``-EPERM`` into the saved ``rax``; left alone, the kernel
    would hand back the syscall number as if the call had succeeded). The
    thread's code raises, and pyvmm's thread wrapper turns that into the
    VM's stop reason; :func:`fault_note` tells it which syscall it was. The
    harness, and every other VM in the process, go on.

The handler is Python code running inside a signal handler. That is safe
here because it only runs at a denied syscall - never inside malloc or the
GIL's own code, whose syscalls every filter allows - and because in ``exit``
mode it never returns. Its remaining hazard is a lock the faulting thread
already holds (a metrics flush that itself faulted): the flush hooks then
block, which is why a flush hook must be idempotent and short.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import threading
from collections.abc import Callable
from enum import Enum

from pyvmm.jail.libseccomp import syscall_name

log = logging.getLogger("pyvmm.seccomp")

#: Firecracker's exit status for a seccomp violation.
EXIT_STATUS = 148

_SA_SIGINFO = 0x4
_SA_ONSTACK = 0x0800_0000
_SIGINFO_SYSCALL = 24  # offset of si_syscall in siginfo_t for SIGSYS (x86_64)
_UCONTEXT_RAX = 40 + 13 * 8  # uc_mcontext.gregs[REG_RAX] (x86_64 glibc)


class FaultPolicy(Enum):
    EXIT = "exit"
    STOP_VM = "stop-vm"


class _Sigaction(ctypes.Structure):
    _fields_ = (
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ulong * 16),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    )


_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class _State:
    """Process-wide: there is one SIGSYS disposition per process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.policy: FaultPolicy | None = None
        self.num_faults = 0
        self.flush_hooks: list[Callable[[], object]] = []
        self.roles: dict[int, str] = {}  # native thread id -> role name
        self.notes: dict[int, str] = {}  # native thread id -> last denied syscall
        self.handler: object = None  # the ctypes callback, kept alive


_state = _State()


def install_handler(policy: FaultPolicy) -> None:
    """Install the SIGSYS handler for ``policy``; the first policy set stays (per process).

    A served VMM sets ``exit`` before any thread is filtered; a library
    ``MicroVM`` sets ``stop-vm``. Asking for the other policy later is an
    error, not a silent change of what a fault does.
    """
    with _state.lock:
        if _state.policy is not None:
            if _state.policy is not policy:
                raise RuntimeError(
                    f"seccomp faults already {_state.policy.value}; cannot switch to {policy.value}"
                )
            return
        callback = _HANDLER_TYPE(_on_sigsys)
        action = _Sigaction()
        action.handler = ctypes.cast(callback, ctypes.c_void_p).value
        action.flags = _SA_SIGINFO | _SA_ONSTACK
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.sigaction(signal.SIGSYS, ctypes.byref(action), None) != 0:
            raise OSError(ctypes.get_errno(), "sigaction(SIGSYS) failed")
        _state.handler = callback
        _state.policy = policy


def register_thread(role: str) -> None:
    """Remember the calling thread's role, for the fault line."""
    _state.roles[threading.get_native_id()] = role


def add_flush_hook(hook: Callable[[], object]) -> None:
    """Run ``hook`` (e.g. a metrics flush) before an ``exit``-mode fault ends the process."""
    _state.flush_hooks.append(hook)


def num_faults() -> int:
    return _state.num_faults


def metrics() -> dict[str, dict[str, int]]:
    """A metrics source: Firecracker's ``seccomp.num_faults``."""
    return {"seccomp": {"num_faults": _state.num_faults}}


def fault_note(native_id: int | None = None) -> str | None:
    """``seccomp denied ioctl (16)`` if that thread (default: this one) was denied a call."""
    return _state.notes.get(threading.get_native_id() if native_id is None else native_id)


def is_confined(native_id: int | None = None) -> bool:
    """True if that thread (default: this one) entered a role with a filter."""
    return (threading.get_native_id() if native_id is None else native_id) in _state.roles


def describe(number: int, thread_name: str, role: str) -> str:
    return (
        f"seccomp: thread {thread_name!r} ({role}) made a denied system call "
        f"{number} ({syscall_name(number)})"
    )


def _on_sigsys(signum: int, info: int, context: int) -> None:
    number = ctypes.c_int.from_address(info + _SIGINFO_SYSCALL).value
    native_id = threading.get_native_id()
    role = _state.roles.get(native_id, "unregistered")
    name = threading.current_thread().name
    _state.num_faults += 1
    if _state.policy is FaultPolicy.EXIT:
        log.error("%s; exiting with status %d", describe(number, name, role), EXIT_STATUS)
        for hook in _state.flush_hooks:
            # The process ends either way; the exit status says why.
            with contextlib.suppress(BaseException):
                hook()
        os._exit(EXIT_STATUS)
    message = describe(number, name, role)
    _state.notes[native_id] = message
    log.error("%s; the call fails with EPERM and the VM stops", message)
    ctypes.c_long.from_address(context + _UCONTEXT_RAX).value = -errno.EPERM
