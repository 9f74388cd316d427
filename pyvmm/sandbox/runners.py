"""How a sandbox's VMM runs, confined by default.

A sandbox is for code nobody trusts, so its VMM is confined unless the
caller opts out (``confine=False``, ``pyvmm exec --no-confine``):

- **always**: every pyvmm thread of the VMM (vCPUs, the device loop, the
  watcher) runs under its role's seccomp filter (:mod:`pyvmm.jail`'s
  defaults). In a library process the fault policy is ``stop-vm``: a denied
  call stops that sandbox's VM, never the caller's process;
- **as root**, in addition: the VMM is a process of its own, started by
  ``pyvmm-jailer`` in a jail (new mount namespace, ``pivot_root`` into the
  sandbox's directory, a non-root uid and gid, no capabilities,
  ``no_new_privs``, rlimits) and a cgroup whose limits come from the
  sandbox's config: CPU time (its vCPUs' worth), memory (guest RAM plus the
  VMM's own overhead) and pids, so that one runaway sandbox cannot starve
  the others. It is driven over Firecracker's API
  (:class:`~pyvmm.sandbox.jailed.JailedRunner`).

Without root there is no uid to drop to and no cgroup to create, so a
non-root caller gets the seccomp layer only (:class:`InProcessRunner`).

A runner makes :class:`~pyvmm.sandbox.vm.SandboxVm` objects two ways: by
booting a machine config, or by restoring a cache entry as a clone with
its own drives, TAPs and vsock socket.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from pyvmm.config import MachineConfig
from pyvmm.sandbox.cache import CacheEntry
from pyvmm.sandbox.config import SandboxConfig
from pyvmm.sandbox.identity import Identity
from pyvmm.sandbox.vm import InProcessVm, SandboxVm
from pyvmm.sandbox.workdir import Workdir
from pyvmm.snapshot.overrides import CloneOverrides
from pyvmm.vmm.threads import NO_SETUP, ThreadSetup


class Runner(Protocol):
    """Makes the VMs of sandboxes (see the module docstring)."""

    #: Part of the cache key: snapshots of different runners name files differently.
    kind: str

    def boot(self, config: MachineConfig, workdir: Workdir, identity: Identity) -> SandboxVm:
        """Boot ``config`` (host paths; its vsock socket is ``workdir.vsock_uds``)."""

    def restore(
        self,
        entry: CacheEntry,
        workdir: Workdir,
        identity: Identity,
        drives: Mapping[str, Path],
        *,
        resume: bool,
    ) -> SandboxVm:
        """A clone of ``entry``: ``drives`` are host paths for every drive id (a
        writable drive's own copy, a read-only drive's image)."""


class InProcessRunner:
    """The VMM in this process, its threads under ``setup`` (seccomp, or nothing)."""

    def __init__(self, setup: ThreadSetup = NO_SETUP, *, confined: bool = False) -> None:
        self.setup = setup
        self.kind = "in-process"
        self.confined = confined

    def boot(self, config: MachineConfig, workdir: Workdir, identity: Identity) -> SandboxVm:
        return InProcessVm.boot(config, self.setup)

    def restore(
        self,
        entry: CacheEntry,
        workdir: Workdir,
        identity: Identity,
        drives: Mapping[str, Path],
        *,
        resume: bool,
    ) -> SandboxVm:
        writable = {drive_id: drives[drive_id] for drive_id in entry.meta.disks}
        return InProcessVm.restore(
            entry.state_file,
            entry.mem_file,
            vsock_uds=workdir.vsock_uds,
            clone=CloneOverrides(drives=writable, vsock_cid=identity.cid),
            net_overrides=dict(zip(entry.meta.taps, identity.taps, strict=True)),
            setup=self.setup,
            resume=resume,
        )


def choose_runner(config: SandboxConfig) -> Runner:
    """The runner ``config`` asks for: see the module docstring."""
    if not config.confine:
        return InProcessRunner()
    if os.geteuid() == 0:
        from pyvmm.sandbox.jailed import JailedRunner

        return JailedRunner(config)
    return InProcessRunner(seccomp_setup(), confined=True)


@functools.cache
def seccomp_setup() -> ThreadSetup:
    """pyvmm's default filters, compiled once per process, faults stopping only their VM."""
    from pyvmm.jail.seccomp import FaultPolicy, make_setup

    return make_setup(None, FaultPolicy.STOP_VM)
