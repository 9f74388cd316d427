"""Cgroup placement as Firecracker's jailer does it: paths and writes, without a cgroupfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.jail import cgroups
from pyvmm.jail.spec import parse_jail_spec

# This host's /proc/mounts (hybrid: v1 controllers, v2 without controllers).
HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
proc /proc proc rw 0 0
"""


def spec(**changes: object):
    base = {"id": "vm1", "exec_file": "/bin/pyvmm-firecracker", "uid": "1", "gid": "1"}
    return parse_jail_spec(**{**base, **changes})


def test_mounts_map_each_v1_controller_and_the_v2_root() -> None:
    mounts = cgroups.parse_mounts(HYBRID)
    assert mounts.v1["cpu"] == mounts.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert mounts.v1["cpuset"] == Path("/sys/fs/cgroup/cpuset")
    assert mounts.v2 == Path("/sys/fs/cgroup/unified")
    assert "rw" in mounts.v1  # mount options are harmless extra keys


def test_v1_plan_one_cgroup_per_hierarchy() -> None:
    plan = cgroups.plan(
        spec(cgroups=("cpu.shares=2", "cpuacct.usage=0", "cpuset.cpus=0")),
        cgroups.parse_mounts(HYBRID),
    )
    base = Path("/sys/fs/cgroup")
    assert plan.cgroups == (
        base / "cpu,cpuacct/pyvmm-firecracker/vm1",
        base / "cpuset/pyvmm-firecracker/vm1",
    )
    assert plan.settings[2] == (base / "cpuset/pyvmm-firecracker/vm1/cpuset.cpus", "0")
    assert plan.join_file == "tasks"


def test_v1_unknown_controller_and_parent_alone() -> None:
    mounts = cgroups.parse_mounts(HYBRID)
    with pytest.raises(ConfigError, match="no cgroup v1 hierarchy has the 'memory' controller"):
        cgroups.plan(spec(cgroups=("memory.limit_in_bytes=1",)), mounts)
    assert cgroups.plan(spec(parent_cgroup="a/b"), mounts) is None
    assert cgroups.plan(spec(), mounts) is None


def test_v2_plan_enables_controllers_from_the_root_down() -> None:
    plan = cgroups.plan(
        spec(cgroup_version="2", cgroups=("cpu.weight=2", "pids.max=9"), parent_cgroup="a/b"),
        cgroups.parse_mounts(HYBRID),
    )
    root = Path("/sys/fs/cgroup/unified")
    assert plan.cgroups == (root / "a/b/vm1",)
    assert [str(p.parent.relative_to(root)) for p, _ in plan.subtree_control] == [
        ".", ".", "a", "a", "a/b", "a/b"
    ]  # fmt: skip
    assert [value for _, value in plan.subtree_control[:2]] == ["+cpu", "+pids"]
    assert plan.join_file == "cgroup.procs"


def test_v2_parent_without_cgroups_joins_the_parent() -> None:
    plan = cgroups.plan(spec(cgroup_version="2", parent_cgroup="a/b"), cgroups.parse_mounts(HYBRID))
    assert plan.cgroups == (Path("/sys/fs/cgroup/unified/a/b"),)
    assert plan.settings == () and plan.subtree_control == ()
    with pytest.raises(ConfigError, match="no cgroup2 filesystem is mounted"):
        cgroups.plan(spec(cgroup_version="2", parent_cgroup="a"), cgroups.CgroupMounts({}, None))


def test_apply_inherits_empty_files_and_joins(tmp_path: Path) -> None:
    """A directory tree stands in for cgroupfs: the writes are what matter here."""
    root = tmp_path / "cpuset"
    root.mkdir()
    (root / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset.mems").write_text("0\n")
    parent = root / "pyvmm-firecracker"
    parent.mkdir()
    (parent / "cpuset.cpus").write_text("")
    (parent / "cpuset.mems").write_text("")
    mounts = cgroups.CgroupMounts({"cpuset": root}, None)
    plan = cgroups.plan(spec(cgroups=("cpuset.mems=0",)), mounts)
    # cgroupfs creates the files with the directory; here the test does.
    (parent / "vm1").mkdir()
    for name in ("cpuset.cpus", "cpuset.mems", "tasks"):
        (parent / "vm1" / name).write_text("")
    cgroups.apply(plan, 4242)
    assert (parent / "cpuset.mems").read_text() == "0"  # copied down from the root
    assert (parent / "vm1" / "cpuset.mems").read_text() == "0"
    assert (parent / "vm1" / "tasks").read_text() == "4242"


def test_apply_reports_a_missing_parent(tmp_path: Path) -> None:
    mounts = cgroups.CgroupMounts({}, tmp_path)
    plan = cgroups.plan(spec(cgroup_version="2", parent_cgroup="nope"), mounts)
    with pytest.raises(ConfigError, match=r"--parent-cgroup: .*nope does not exist"):
        cgroups.apply(plan, 1)
