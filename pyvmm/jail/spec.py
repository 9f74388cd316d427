"""What a jail is made of, parsed and checked before anything is touched.

:class:`JailSpec` is the jailer's command line (Firecracker's flags, with
their meaning) as values: every check that needs no system call happens in
:func:`parse_jail_spec`, so a mistake is one line naming the flag, and no
directory, cgroup or namespace is created for a command that would fail.
"""

from __future__ import annotations

import re
from dataclasses import field
from pathlib import PurePosixPath
from typing import NamedTuple

from pyvmm.errors import ConfigError

DEFAULT_CHROOT_BASE = "/srv/jailer"
#: Firecracker's default when ``--resource-limit no-file`` is not given.
DEFAULT_NO_FILE = 2048
_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_CGROUP_FILE = re.compile(r"[a-z_0-9]+\.[a-z_0-9.]+")
_MAX_ID = 2**32 - 1
#: The jailed process needs its std streams and a few fds of its own; fewer cannot work.
MIN_NO_FILE = 16


class CgroupSetting(NamedTuple):
    """``--cgroup cpu.weight=2``: ``file`` in the controller ``controller``."""

    file: str
    value: str

    @property
    def controller(self) -> str:
        return self.file.split(".", 1)[0]


class JailSpec(NamedTuple):
    id: str
    exec_file: str  # as given; resolved by the jailer
    uid: int
    gid: int
    chroot_base: str = DEFAULT_CHROOT_BASE
    netns: str | None = None
    cgroup_version: int = 1
    cgroups: tuple[CgroupSetting, ...] = ()
    parent_cgroup: str | None = None
    fsize: int | None = None  # RLIMIT_FSIZE; None: unlimited (unchanged)
    no_file: int = DEFAULT_NO_FILE
    daemonize: bool = False
    new_pid_ns: bool = False
    vmm_args: tuple[str, ...] = field(default=())

    @property
    def exec_name(self) -> str:
        return PurePosixPath(self.exec_file).name

    @property
    def parent_cgroup_path(self) -> str:
        """Where the VM's cgroup goes: ``--parent-cgroup``, else the exec file's name."""
        return self.parent_cgroup or self.exec_name


def parse_jail_spec(
    *,
    id: str,
    exec_file: str,
    uid: str,
    gid: str,
    chroot_base: str = DEFAULT_CHROOT_BASE,
    netns: str | None = None,
    cgroup_version: str = "1",
    cgroups: tuple[str, ...] = (),
    parent_cgroup: str | None = None,
    resource_limits: tuple[str, ...] = (),
    daemonize: bool = False,
    new_pid_ns: bool = False,
    vmm_args: tuple[str, ...] = (),
) -> JailSpec:
    """Check every flag; ConfigError names the first bad one."""
    if not _ID.fullmatch(id):
        raise ConfigError(
            f"--id {id!r}: use 1 to 64 letters, digits and '-' (it names the jail directory)"
        )
    name = PurePosixPath(exec_file).name
    if "firecracker" not in name:
        raise ConfigError(
            f"--exec-file {exec_file!r}: the file name must contain 'firecracker' "
            "(as Firecracker's jailer demands; e.g. pyvmm-firecracker)"
        )
    if not chroot_base or not PurePosixPath(chroot_base).is_absolute():
        raise ConfigError(f"--chroot-base-dir {chroot_base!r}: must be an absolute path")
    if cgroup_version not in ("1", "2"):
        raise ConfigError(f"--cgroup-version {cgroup_version!r}: must be 1 or 2")
    if parent_cgroup is not None:
        parts = PurePosixPath(parent_cgroup).parts
        if not parts or parent_cgroup.startswith("/") or any(p in (".", "..") for p in parts):
            raise ConfigError(
                f"--parent-cgroup {parent_cgroup!r}: must be a relative path without '.' or '..'"
            )
    fsize, no_file = parse_resource_limits(resource_limits)
    return JailSpec(
        id=id,
        exec_file=exec_file,
        uid=_id_number(uid, "--uid"),
        gid=_id_number(gid, "--gid"),
        chroot_base=chroot_base,
        netns=netns,
        cgroup_version=int(cgroup_version),
        cgroups=tuple(_cgroup(text) for text in cgroups),
        parent_cgroup=parent_cgroup,
        fsize=fsize,
        no_file=no_file,
        daemonize=daemonize,
        new_pid_ns=new_pid_ns,
        vmm_args=tuple(vmm_args),
    )


def _id_number(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) > _MAX_ID:
        raise ConfigError(f"{flag} {text!r}: expected a number from 0 to {_MAX_ID}")
    return int(text)


def _cgroup(text: str) -> CgroupSetting:
    file, sep, value = text.partition("=")
    if not sep or not value or not _CGROUP_FILE.fullmatch(file) or "\n" in value:
        raise ConfigError(
            f"--cgroup {text!r}: expected <controller>.<file>=<value>, e.g. cpu.weight=100"
        )
    return CgroupSetting(file, value)


def parse_resource_limits(texts: tuple[str, ...]) -> tuple[int | None, int]:
    """``--resource-limit`` values as (RLIMIT_FSIZE or None, RLIMIT_NOFILE); ConfigError if bad."""
    fsize, no_file = None, DEFAULT_NO_FILE
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not value.isdigit():
            raise ConfigError(f"--resource-limit {text!r}: expected fsize=N or no-file=N")
        if name == "fsize":
            fsize = int(value)
        elif name == "no-file":
            no_file = int(value)
            if no_file < MIN_NO_FILE:
                raise ConfigError(
                    f"--resource-limit no-file={no_file}: the VMM cannot run with fewer "
                    f"than {MIN_NO_FILE} file descriptors"
                )
        else:
            raise ConfigError(f"--resource-limit {text!r}: unknown resource {name!r}")
    return fsize, no_file
