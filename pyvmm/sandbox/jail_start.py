"""Starting a jailed sandbox VMM: a fork of this process binds the sandbox's files, then jails.

Why a fork, not a new interpreter: a jailed VMM imports all of pyvmm's VMM
before it pivots into its empty jail (:mod:`pyvmm.jail.preload`). A new
interpreter pays for that every time: about 0.16 s on a normal host, but
30-110 s measured in a nested host under QEMU-TCG (a busy machine). So
:func:`preload_once` imports it once into this process, and each sandbox's
VMM is a ``fork()`` of it that already has everything (measured below in
the sandbox benchmark). The child is a copy of one thread of a possibly
multi-threaded process, so it touches nothing shared: it gets fresh
standard streams, does its own system calls (mounts, the jailer's steps)
and ends with ``os._exit``; forks are serialized by a lock.

The child (:func:`run_child`):

1. starts a new session (a signal to the group reaches only it and its
   threads) and makes the console log its stdout, the VMM log its stderr;
2. enters a mount namespace of its own (private: nothing propagates to the
   host; everything goes away with it), binds the jail root onto itself and
   remounts that without ``nodev`` (the jail's ``/dev/kvm`` would not open
   on a ``nodev`` filesystem, such as a nested host's ``/run``), then
   bind-mounts each file the VMM needs onto an empty file of the jail,
   read-only unless asked: snapshot files, kernel, disks. No copy: a memory
   file of any size costs nothing;
3. runs ``pyvmm-jailer`` with the given flags, in-process (the jailer pivots
   with a recursive bind, so the mounts come along).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_REMOUNT = 32

_fork_lock = threading.Lock()
_preloaded = False


def preload_once() -> None:
    """Import the jailed VMM's modules into this process (once)."""
    global _preloaded
    with _fork_lock:
        if not _preloaded:
            from pyvmm.jail.preload import preload

            preload()
            _preloaded = True


def fork_jailed(
    root: Path, binds: list[tuple[str, str, bool]], jailer_args: list[str], out: int, err: int
) -> int:
    """Fork a child that runs :func:`run_child`; its pid (the caller reaps it)."""
    preload_once()
    with _fork_lock:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            run_child(root, binds, jailer_args, out, err)
    return pid


def run_child(
    root: Path, binds: list[tuple[str, str, bool]], jailer_args: list[str], out: int, err: int
) -> None:
    """In the forked child: steps 1-3 of the module docstring; never returns."""
    code = 1
    try:
        os.setsid()
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the parent's may be locked
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        _forget_fault_policy()
        bind_files(str(root), binds)
        from pyvmm.jail.jailer import jailer

        jailer.main(args=jailer_args, prog_name="pyvmm-jailer")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException as exc:  # one line in the VMM log, no traceback
        with contextlib.suppress(Exception):
            print(f"pyvmm-sandbox-jail: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _forget_fault_policy() -> None:
    """The child is a new VMM process: its seccomp faults end it (``exit``), whatever a
    library caller's process chose for its own in-process VMs (``stop-vm``). The
    policy is per process in :mod:`pyvmm.jail.faults`, which offers no reset (a
    request for one is in the sandbox report): clear it here, before anything
    installs it."""
    from pyvmm.jail import faults

    faults._state.policy = None


def bind_files(root: str, binds: list[tuple[str, str, bool]]) -> None:
    """New private mount namespace; the jail root a mount allowing devices; each
    ``(source, target, read_only)`` bound."""
    from pyvmm.jail import system

    system.unshare(system.CLONE_NEWNS)
    system.mount(None, "/", None, system.MS_PRIVATE | system.MS_REC)
    system.mount(root, root, None, system.MS_BIND)
    system.mount(None, root, None, system.MS_BIND | MS_REMOUNT | MS_NOSUID)
    for source, target, read_only in binds:
        system.mount(source, target, None, system.MS_BIND)
        if read_only:
            system.mount(None, target, None, system.MS_BIND | MS_REMOUNT | MS_RDONLY)
