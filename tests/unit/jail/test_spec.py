"""The jailer's flags: Firecracker's meaning and checks, before anything is touched."""

from __future__ import annotations

import pytest

from pyvmm.errors import ConfigError
from pyvmm.jail.spec import DEFAULT_NO_FILE, CgroupSetting, parse_jail_spec

BASE = {"id": "vm-1", "exec_file": "/usr/bin/pyvmm-firecracker", "uid": "123", "gid": "100"}


def spec(**changes: object):
    return parse_jail_spec(**{**BASE, **changes})


def test_defaults_are_firecrackers() -> None:
    jail = spec()
    assert jail.chroot_base == "/srv/jailer"
    assert jail.no_file == DEFAULT_NO_FILE == 2048
    assert jail.fsize is None
    assert jail.cgroup_version == 1
    assert jail.exec_name == "pyvmm-firecracker"
    assert jail.parent_cgroup_path == "pyvmm-firecracker"
    assert (jail.uid, jail.gid) == (123, 100)


def test_every_flag_is_carried() -> None:
    jail = spec(
        chroot_base="/jails",
        netns="/var/run/netns/n",
        cgroup_version="2",
        cgroups=("cpu.weight=2", "cpuset.cpus=0-1"),
        parent_cgroup="uvms/external",
        resource_limits=("fsize=1048576", "no-file=1024"),
        daemonize=True,
        new_pid_ns=True,
        vmm_args=("--config-file", "/c.json"),
    )
    assert jail.cgroups == (CgroupSetting("cpu.weight", "2"), CgroupSetting("cpuset.cpus", "0-1"))
    assert jail.cgroups[1].controller == "cpuset"
    assert jail.parent_cgroup_path == "uvms/external"
    assert (jail.fsize, jail.no_file) == (1048576, 1024)
    assert jail.vmm_args == ("--config-file", "/c.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": ""}, "--id '': use 1 to 64 letters, digits and '-'"),
        ({"id": "a" * 65}, "use 1 to 64"),
        ({"id": "a/b"}, "use 1 to 64"),
        ({"id": "a_b"}, "use 1 to 64"),
        ({"exec_file": "/usr/bin/vmm"}, "the file name must contain 'firecracker'"),
        ({"uid": "-1"}, "--uid '-1': expected a number from 0 to 4294967295"),
        ({"gid": "x"}, "--gid 'x': expected a number"),
        ({"gid": str(1 << 32)}, "--gid"),
        ({"chroot_base": "jails"}, "--chroot-base-dir 'jails': must be an absolute path"),
        ({"cgroup_version": "3"}, "--cgroup-version '3': must be 1 or 2"),
        ({"cgroups": ("cpu.weight",)}, "--cgroup 'cpu.weight': expected <controller>.<file>="),
        ({"cgroups": ("cpu.weight=",)}, "expected <controller>.<file>=<value>"),
        ({"cgroups": ("../x=1",)}, "expected <controller>.<file>=<value>"),
        ({"cgroups": ("cpu.weight=1\n2",)}, "expected <controller>.<file>=<value>"),
        ({"parent_cgroup": "/abs"}, "--parent-cgroup '/abs': must be a relative path"),
        ({"parent_cgroup": "a/../b"}, "without '.' or '..'"),
        ({"resource_limits": ("fsize",)}, "--resource-limit 'fsize': expected fsize=N"),
        ({"resource_limits": ("fsize=-1",)}, "expected fsize=N or no-file=N"),
        ({"resource_limits": ("cpu=1",)}, "unknown resource 'cpu'"),
        ({"resource_limits": ("no-file=3",)}, "cannot run with fewer than 16 file descriptors"),
    ],
)
def test_bad_flags_are_one_line_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        spec(**changes)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
