"""Thread roles: every thread pyvmm starts has one, and starts the same way.

A VMM process has four kinds of threads (Firecracker has the same split,
and confines each with its own seccomp filter):

========  ==============================================================
``vmm``   the process's main thread: front end, lifecycle, signals
``api``   the API server: the accept loop and one thread per client
``vcpu``  one per vCPU: ``KVM_RUN`` and exit dispatch to the buses
``io``    the event loop: queue kicks, back ends (TAP, vsock, console), timers
========  ==============================================================

:func:`spawn` is the only way pyvmm starts a thread. The thread first
calls ``setup.enter(role)`` on itself - where confinement (a seccomp filter
per role) is installed, before the thread touches anything a guest or a
client controls - and then runs its target. An exception that escapes the
target is never lost: it goes to ``on_error`` with a one-line description
that names the thread, and the owner stops the VM with it.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class ThreadRole(enum.Enum):
    """What a thread does; confinement is chosen per role."""

    VMM = "vmm"
    API = "api"
    VCPU = "vcpu"
    IO = "io"


class ThreadSetup(Protocol):
    """Runs on a new thread, before its target (e.g. installs its seccomp filter)."""

    def enter(self, role: ThreadRole) -> None: ...

    def failure_note(self) -> str | None:
        """Why this thread's last call failed, if the setup knows (a denied syscall)."""
        ...


class NoSetup:
    """Threads run as they are started (library use without confinement, tests)."""

    def enter(self, role: ThreadRole) -> None:
        return None

    def failure_note(self) -> str | None:
        return None


NO_SETUP = NoSetup()

ErrorSink = Callable[[str], None]


def describe_failure(thread_name: str, role: ThreadRole, error: BaseException) -> str:
    """``thread 'vcpu0' (vcpu) failed: ValueError: bad``: the stop reason's message."""
    detail = str(error) or "(no message)"
    return f"thread {thread_name!r} ({role.value}) failed: {type(error).__name__}: {detail}"


def spawn(
    role: ThreadRole,
    name: str,
    target: Callable[[], object],
    *,
    on_error: ErrorSink,
    setup: ThreadSetup = NO_SETUP,
    start: bool = True,
) -> threading.Thread:
    """A daemon thread called ``name`` that enters ``role``, then runs ``target``.

    Whatever ``target`` or the setup raises is logged with its traceback and
    reported once to ``on_error`` (see :func:`describe_failure`).
    """

    def run() -> None:
        try:
            setup.enter(role)
            target()
        except BaseException as error:
            log.exception("thread %s (%s) failed", name, role.value)
            message = describe_failure(name, role, error)
            note = setup.failure_note()  # e.g. the system call a filter denied
            on_error(f"{message} ({note})" if note else message)

    thread = threading.Thread(target=run, name=name, daemon=True)
    if start:
        thread.start()
    return thread
