"""Process-level steps of confinement, shared by ``pyvmm-jailer`` and :func:`confine`.

Each step is one function with one error line: closing inherited fds,
rlimits, joining a network namespace, daemonizing, dropping privileges.
"""

from __future__ import annotations

import os
import resource
import signal

from pyvmm.errors import ConfigError, HostError
from pyvmm.jail import system
from pyvmm.jail.install import set_no_new_privs
from pyvmm.jail.spec import JailSpec


def close_inherited_fds() -> None:
    """Close every fd but 0, 1 and 2 (Firecracker's jailer does, from /proc/self/fd)."""
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def set_rlimits(spec: JailSpec) -> None:
    """``no-file`` (2048 unless given) and ``fsize``, soft and hard alike.

    With ``fsize`` the kernel's ``SIGXFSZ`` is restored to its default
    action (CPython ignores it at start-up): a write past the limit ends
    the VMM, as it ends Firecracker, instead of failing with EFBIG.
    """
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec.no_file, spec.no_file))
    if spec.fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec.fsize, spec.fsize))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def open_netns(path: str) -> int:
    """Open ``--netns`` first, so a bad path fails before anything is created."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"--netns {path!r}: {error.strerror}") from None


def join_netns(fd: int, path: str) -> None:
    """``setns`` into the namespace ``open_netns`` opened, and close it."""
    try:
        system.setns(fd, system.CLONE_NEWNET, f"joining the network namespace {path}")
    finally:
        os.close(fd)


def daemonize(dev_null: int) -> None:
    try:
        os.setsid()
    except PermissionError:
        raise HostError(
            "--daemonize: setsid failed because the jailer leads its process group; "
            "start it from a process that is not a group leader (as Firecracker's jailer needs)"
        ) from None
    for fd in (0, 1, 2):
        os.dup2(dev_null, fd)
    os.close(dev_null)


def drop_privileges(uid: int, gid: int) -> None:
    """Groups, gid, uid, every capability, then ``no_new_privs``: nothing to gain back."""
    system.drop_bounding_set()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # a non-zero uid loses every capability here
    system.clear_capabilities()  # and uid 0 here
    set_no_new_privs()
