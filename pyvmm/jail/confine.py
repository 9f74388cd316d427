"""``confine()``: the jailer's confinement for a process that already is the VMM.

``pyvmm run`` is one process that parses its flags and then runs the VM; it
can confine itself without the jailer's syntax or a second process::

    from pyvmm.jail.confine import Confinement, confine
    setup = confine(Confinement(jail=Path("/srv/vm1"), uid=10001, gid=10001,
                                cgroups=("cpu.weight=50",), cgroup_version=2))
    # ... from here on: paths are inside /srv/vm1, the uid is 10001, no
    # capabilities, no_new_privs, rlimits set, the cgroup joined;
    # ``setup`` (seccomp, exit-148 policy) goes to Machine(thread_setup=setup)
    # and the main thread has already entered the vmm role.

The jail directory is the caller's: unlike ``pyvmm-jailer`` (which makes
``<base>/<exec>/<id>/root``), ``confine`` uses the given directory as it is,
adding ``dev/kvm``, ``dev/net/tun`` and ``run`` - the kernel, disks and
sockets the VM names must be in it, at the paths the config gives
relative to it. Everything is checked (a :class:`~pyvmm.errors.ConfigError`
naming the option) before the first change to the process.

A library caller's process must not be confined like this (it would move
the caller's own threads into the jail): a :class:`~pyvmm.microvm.MicroVM`
gets in-process seccomp only, or runs its VMM as a jailed child process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pyvmm.errors import ConfigError
from pyvmm.jail.process import drop_privileges, join_netns, open_netns, set_rlimits
from pyvmm.jail.spec import DEFAULT_NO_FILE, JailSpec, parse_jail_spec

if TYPE_CHECKING:
    from pyvmm.jail.thread_setup import SeccompSetup


class LandlockPaths(NamedTuple):
    """What a Landlock-restricted VMM may still open (see :mod:`pyvmm.jail.landlock`)."""

    read_only: tuple[Path, ...] = ()  # kernel, initrd, read-only drives
    read_write: tuple[Path, ...] = ()  # writable drives, socket and snapshot directories
    devices: tuple[Path, ...] = (Path("/dev/kvm"), Path("/dev/net/tun"))


class Confinement(NamedTuple):
    """What ``pyvmm run --jail DIR --uid U --gid G ...`` asks for (see :func:`confine`)."""

    jail: Path | None = None  # None: stay in the host's file system
    uid: int | None = None  # None: keep the current ids (and capabilities, unless jailed)
    gid: int | None = None
    vm_id: str = "pyvmm"  # names the cgroup
    cgroups: tuple[str, ...] = ()  # "cpu.weight=50", as --cgroup
    cgroup_version: int = 1
    parent_cgroup: str | None = None
    netns: str | None = None
    no_file: int = DEFAULT_NO_FILE
    fsize: int | None = None
    seccomp: bool = True
    seccomp_filter: Path | None = None
    landlock: LandlockPaths | None = None  # paths as seen after the pivot, if jailed


def confine(options: Confinement) -> SeccompSetup | None:
    """Confine this process as ``options`` say; returns the seccomp setup for its threads.

    Order (the jailer's): compile the seccomp filters and import the VMM,
    rlimits, cgroups, network namespace, pivot into the jail, device nodes,
    drop privileges, Landlock, then the main thread enters the ``vmm`` role.
    Call it before any other thread starts: Landlock and seccomp reach only
    the threads started after them.
    """
    spec = _checked_spec(options)
    apply_cgroups = _cgroup_step(spec)
    netns_fd = open_netns(spec.netns) if spec.netns is not None else -1
    setup = None
    if options.seccomp:
        from pyvmm.jail.seccomp import FaultPolicy, make_setup

        setup = make_setup(options.seccomp_filter, FaultPolicy.EXIT)
    if options.jail is not None or options.landlock is not None:
        # Nothing can be imported once the files are out of reach: the VMM imports
        # its device models when a config needs them (start-up), so all of them now.
        from pyvmm.jail.preload import preload

        preload()
    set_rlimits(spec)
    apply_cgroups()
    if spec.netns is not None:
        join_netns(netns_fd, spec.netns)
    if options.jail is not None:
        from pyvmm.jail import chroot, system

        system.last_capability()
        chroot.enter(options.jail.resolve())
        chroot.populate(spec.uid, spec.gid)
    if options.uid is not None or options.jail is not None:
        drop_privileges(spec.uid, spec.gid)
    if options.landlock is not None:
        from pyvmm.jail import landlock

        paths = options.landlock
        landlock.restrict(paths.read_only, paths.read_write, paths.devices)
    if setup is not None:
        from pyvmm.vmm.threads import ThreadRole

        setup.enter(ThreadRole.VMM)
    return setup


def _checked_spec(options: Confinement) -> JailSpec:
    """The options as the jailer's spec, every flag checked (ConfigError names the bad one)."""
    if (options.uid is None) != (options.gid is None):
        raise ConfigError("--uid and --gid go together")
    if options.jail is not None and not options.jail.is_dir():
        raise ConfigError(f"--jail {str(options.jail)!r} is not a directory")
    limits = [f"no-file={options.no_file}"]
    if options.fsize is not None:
        limits.append(f"fsize={options.fsize}")
    return parse_jail_spec(
        id=options.vm_id,
        exec_file="pyvmm-firecracker",  # names the default parent cgroup, as the jailer's
        uid=str(os.getuid() if options.uid is None else options.uid),
        gid=str(os.getgid() if options.gid is None else options.gid),
        netns=options.netns,
        cgroup_version=str(options.cgroup_version),
        cgroups=options.cgroups,
        parent_cgroup=options.parent_cgroup,
        resource_limits=tuple(limits),
    )


def _cgroup_step(spec: JailSpec) -> Callable[[], None]:
    """Plan the cgroups now (errors before any change); the returned step joins them."""
    if not spec.cgroups and spec.parent_cgroup is None:
        return lambda: None  # no cgroup asked for: not even the mounts are read
    from pyvmm.jail import cgroups

    plan = cgroups.plan(spec, cgroups.read_mounts())
    return (lambda: None) if plan is None else (lambda: cgroups.apply(plan, os.getpid()))
