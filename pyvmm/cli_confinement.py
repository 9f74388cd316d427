"""``pyvmm run``'s confinement flags: the jailer's protections for a VMM that is one process.

Firecracker needs two binaries for this (the jailer sets up, then execs the
VMM); ``pyvmm run`` parses its flags, confines itself with
:func:`pyvmm.jail.confine.confine` and runs the VM in the same process. The
flags mirror the jailer's (``--uid``, ``--gid``, ``--cgroup``,
``--cgroup-version``, ``--parent-cgroup``, ``--netns``, ``--resource-limit``)
plus Firecracker's ``--no-seccomp``/``--seccomp-filter``, a ``--jail``
directory to pivot into, and ``--landlock`` (Cloud Hypervisor's: the VMM
may open only the files its config names).

Seccomp is on by default, as in Firecracker: every thread runs under its
role's filter, and a denied system call ends the process with status 148
and one line naming the call. Everything else is opt-in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from pyvmm.config import MachineConfig
    from pyvmm.jail.confine import Confinement

F = TypeVar("F", bound=Callable[..., Any])

#: The flags, in the order ``--help`` lists them: (decls, click keyword arguments).
_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--no-seccomp",), {"is_flag": True, "help": "Run without seccomp filters."}),
    (
        ("--seccomp-filter",),
        {"metavar": "FILE", "help": "Seccomp filters in Firecracker's JSON format."},
    ),
    (
        ("--jail",),
        {
            "metavar": "DIR",
            "help": "Pivot into DIR before booting (it must hold the kernel, disks and "
            "sockets at the paths given, relative to it); needs root.",
        },
    ),
    (("--uid",), {"type": int, "help": "Run as this user id (with --gid); needs root."}),
    (("--gid",), {"type": int, "help": "Run as this group id (with --uid)."}),
    (
        ("--cgroup", "cgroups"),
        {
            "multiple": True,
            "metavar": "FILE=VALUE",
            "help": "Write VALUE to FILE of the VM's own cgroup, e.g. cpu.max=50000 "
            "(repeatable; the cgroup stays after exit, as the jailer's).",
        },
    ),
    (
        ("--cgroup-version",),
        {
            "type": click.Choice(["1", "2"]),
            "default": None,
            "help": "cgroup hierarchy for --cgroup (default: 2 where it is mounted).",
        },
    ),
    (("--parent-cgroup",), {"help": "Parent of the VM's cgroup (default: pyvmm-firecracker)."}),
    (("--netns",), {"metavar": "PATH", "help": "Join the network namespace at PATH."}),
    (
        ("--resource-limit", "resource_limits"),
        {
            "multiple": True,
            "metavar": "no-file=N|fsize=N",
            "help": "Set an rlimit (repeatable; no-file defaults to 2048, as Firecracker's).",
        },
    ),
    (
        ("--landlock",),
        {"is_flag": True, "help": "Open only the files the VM's config names (Landlock)."},
    ),
)

#: The keyword arguments the options add to the command function.
FLAG_NAMES = tuple((decls[-1] if len(decls) > 1 else decls[0]).lstrip("-").replace("-", "_")
                   for decls, _ in _OPTIONS)  # fmt: skip


def confinement_options(command: F) -> F:
    """Add the confinement flags to a click command (see the module docstring)."""
    for decls, kwargs in reversed(_OPTIONS):
        command = click.option(*decls, **kwargs)(command)
    return command


def pop_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Take the confinement flags out of a command's keyword arguments."""
    return {name: flags.pop(name) for name in FLAG_NAMES}


def confinement(flags: dict[str, Any], config: MachineConfig) -> tuple[Confinement, MachineConfig]:
    """The :class:`~pyvmm.jail.confine.Confinement` the flags ask for, and ``config`` as
    the confined VMM sees it (paths inside ``--jail``); ConfigError if anything is bad."""
    from pyvmm.errors import ConfigError
    from pyvmm.jail.confine import Confinement
    from pyvmm.jail.spec import parse_resource_limits

    if flags["no_seccomp"] and flags["seccomp_filter"] is not None:
        raise ConfigError("--no-seccomp and --seccomp-filter exclude each other")
    fsize, no_file = parse_resource_limits(tuple(flags["resource_limits"]))
    version = flags["cgroup_version"] or _mounted_cgroup_version()
    jail = Path(flags["jail"]).resolve() if flags["jail"] is not None else None
    if jail is not None:
        if not jail.is_dir():
            raise ConfigError(f"--jail {flags['jail']!r} is not a directory")
        config = in_jail(config, jail)
    options = Confinement(
        jail=jail,
        uid=flags["uid"],
        gid=flags["gid"],
        vm_id=f"pyvmm-{os.getpid()}",
        cgroups=tuple(flags["cgroups"]),
        cgroup_version=int(version),
        parent_cgroup=flags["parent_cgroup"],
        netns=flags["netns"],
        no_file=no_file,
        fsize=fsize,
        seccomp=not flags["no_seccomp"],
        seccomp_filter=Path(flags["seccomp_filter"]) if flags["seccomp_filter"] else None,
        landlock=landlock_paths(config) if flags["landlock"] else None,
    )
    return options, config


def in_jail(config: MachineConfig, jail: Path) -> MachineConfig:
    """``config`` with its host paths (which must lie in ``jail``) as seen from inside it.

    The user names files as they are on the host (``--kernel /srv/vm1/vmlinux``,
    checked before anything changes); the VMM, pivoted into ``/srv/vm1``,
    opens ``/vmlinux``.
    """
    import dataclasses

    from pyvmm.errors import ConfigError

    def inside(path: Path | str, flag: str) -> Path:
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(jail):
            raise ConfigError(f"{flag} {str(path)!r} is outside the jail {str(jail)!r}")
        return Path("/") / resolved.relative_to(jail)

    changes: dict[str, Any] = {"kernel": inside(config.kernel, "--kernel")}
    if config.initrd is not None:
        changes["initrd"] = inside(config.initrd, "--initrd")
    if config.serial_out is not None:
        changes["serial_out"] = inside(config.serial_out, "--serial-out")
    changes["drives"] = tuple(
        dataclasses.replace(drive, path=inside(drive.path, "--drive")) for drive in config.drives
    )
    if config.vsock is not None:
        changes["vsock"] = dataclasses.replace(
            config.vsock, uds_path=inside(config.vsock.uds_path, "--vsock")
        )
    return dataclasses.replace(config, **changes)


def landlock_paths(config: MachineConfig) -> Any:
    """What a VM with ``config`` opens: its files, and the directories it creates files in
    (paths as the VMM sees them: inside the jail when there is one)."""
    from pyvmm.jail.confine import LandlockPaths

    read_only = [config.kernel, *([config.initrd] if config.initrd else [])]
    read_write: list[Path] = []
    for drive in config.drives:
        (read_only if drive.read_only else read_write).append(Path(drive.path))
    if config.serial_out is not None:
        read_write.append(Path(config.serial_out).parent)  # it may not exist yet
    if config.vsock is not None:
        read_write.append(Path(config.vsock.uds_path).parent)  # the socket is made there
    devices = [Path("/dev/kvm")] + ([Path("/dev/net/tun")] if config.nets else [])
    return LandlockPaths(
        read_only=tuple(Path(p) for p in read_only),
        read_write=tuple(read_write),
        devices=tuple(devices),
    )


def _mounted_cgroup_version() -> str:
    return "2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "1"
