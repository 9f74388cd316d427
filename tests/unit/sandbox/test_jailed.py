"""The cgroup limits a jailed sandbox gets, from its config and the host's cgroup mounts."""

from __future__ import annotations

from pathlib import Path

from pyvmm.jail.cgroups import CgroupMounts
from pyvmm.sandbox import jailed
from pyvmm.sandbox.config import sandbox_config


def test_v2_limits_cover_cpu_memory_and_pids(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    flags = jailed.cgroup_flags(sandbox_config(cpus=2, memory="512M"), CgroupMounts({}, tmp_path))
    assert flags == [
        "--cgroup-version", "2",
        "--cgroup", "cpu.max=225000 100000",
        "--cgroup", f"memory.max={(512 << 20) + jailed.VMM_OVERHEAD}",
        "--cgroup", f"pids.max={jailed.PIDS_MAX}",
    ]  # fmt: skip


def test_v1_is_used_where_v2_lacks_the_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("")
    v1 = {name: Path(f"/sys/fs/cgroup/{name}") for name in ("cpu", "memory", "pids")}
    flags = jailed.cgroup_flags(sandbox_config(), CgroupMounts(v1, tmp_path))
    assert flags[:2] == ["--cgroup-version", "1"]
    assert "cpu.cfs_quota_us=125000" in flags and f"pids.max={jailed.PIDS_MAX}" in flags


def test_no_controllers_no_limits() -> None:
    assert jailed.cgroup_flags(sandbox_config(), CgroupMounts({}, None)) == []


def test_uids_are_not_root_and_differ() -> None:
    uids = {jailed.sandbox_uid() for _ in range(100)}
    assert len(uids) > 90 and min(uids) >= jailed.UID_BASE
