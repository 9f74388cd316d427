"""Puts the jailed process in its cgroups, v1 or v2, the way Firecracker's jailer does.

Where: ``/proc/mounts`` says where each v1 controller is mounted (several
controllers may share one mount) and where the v2 unified hierarchy is.
The VM's cgroup is ``<mount>/<parent cgroup>/<id>`` (the parent defaults to
the exec file's name).

v1: for each ``--cgroup FILE=VALUE``, create the cgroup in its controller's
hierarchy, copy a still-empty ``FILE`` (and ``cpuset.cpus``/``cpuset.mems``)
down from the nearest ancestor that has a value (they are empty in a new
cpuset cgroup, and no task may join it then), write ``VALUE``, and write
the pid to ``tasks``.

v2: enable each named controller in every ancestor's
``cgroup.subtree_control`` from the root down, create the cgroup, copy
empty ``cpuset.cpus``/``cpuset.mems`` from the parent, write the values,
then the pid to ``cgroup.procs``. With ``--parent-cgroup`` and no
``--cgroup``, no cgroup is created: the process moves into the existing
parent (Firecracker's behaviour for v2).

The pure part (parsing mounts, computing paths) is separate from the part
that writes, so it is unit-tested without a cgroup filesystem.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import ConfigError, HostError
from pyvmm.jail.spec import CgroupSetting, JailSpec

MAX_MOUNTS_BYTES = 1 << 20
_CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")


@dataclass(frozen=True)
class CgroupMounts:
    v1: dict[str, Path]  # controller -> mount point
    v2: Path | None


def parse_mounts(text: str) -> CgroupMounts:
    """The cgroup mount points in ``/proc/mounts`` text."""
    v1: dict[str, Path] = {}
    v2 = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        _, where, fstype, options = fields[:4]
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(where)
        elif fstype == "cgroup":
            for option in options.split(","):
                v1.setdefault(option, Path(where))
    return CgroupMounts(v1, v2)


def read_mounts(path: str = "/proc/mounts") -> CgroupMounts:
    with open(path, encoding="utf-8", errors="replace") as mounts:
        return parse_mounts(mounts.read(MAX_MOUNTS_BYTES))


@dataclass(frozen=True)
class CgroupPlan:
    """Directories to create and files to write, in order (the jailer's cgroup step)."""

    version: int
    cgroups: tuple[Path, ...]  # the VM's cgroup (v2: one; v1: one per hierarchy)
    settings: tuple[tuple[Path, str], ...]  # (file, value)
    subtree_control: tuple[tuple[Path, str], ...]  # v2: (cgroup.subtree_control, "+ctrl")
    join_file: str  # tasks (v1) or cgroup.procs (v2)


def plan(spec: JailSpec, mounts: CgroupMounts) -> CgroupPlan | None:
    """What :func:`apply` will do for ``spec``; None when no cgroup is asked for."""
    if not spec.cgroups and spec.parent_cgroup is None:
        return None
    if spec.cgroup_version == 1:
        return _plan_v1(spec, mounts)
    return _plan_v2(spec, mounts)


def _plan_v1(spec: JailSpec, mounts: CgroupMounts) -> CgroupPlan | None:
    if not spec.cgroups:
        return None  # v1 with only --parent-cgroup: nothing names a controller
    cgroups: list[Path] = []
    settings = []
    for setting in spec.cgroups:
        mount = mounts.v1.get(setting.controller)
        if mount is None:
            raise ConfigError(
                f"--cgroup {setting.file}: no cgroup v1 hierarchy has the "
                f"{setting.controller!r} controller mounted"
            )
        cgroup = mount / spec.parent_cgroup_path / spec.id
        if cgroup not in cgroups:
            cgroups.append(cgroup)
        settings.append((cgroup / setting.file, setting.value))
    return CgroupPlan(1, tuple(cgroups), tuple(settings), (), "tasks")


def _plan_v2(spec: JailSpec, mounts: CgroupMounts) -> CgroupPlan:
    root = mounts.v2
    if root is None:
        raise ConfigError("--cgroup-version 2: no cgroup2 filesystem is mounted")
    parent = root / spec.parent_cgroup_path
    if not spec.cgroups:  # only --parent-cgroup: join it as it is
        return CgroupPlan(2, (parent,), (), (), "cgroup.procs")
    cgroup = parent / spec.id
    controllers = _unique(setting.controller for setting in spec.cgroups)
    subtree = []
    parts = cgroup.relative_to(root).parts
    # The root and every cgroup above the VM's, from the top down.
    for ancestor in (root.joinpath(*parts[:depth]) for depth in range(len(parts))):
        for controller in controllers:
            subtree.append((ancestor / "cgroup.subtree_control", f"+{controller}"))
    settings = tuple((cgroup / s.file, s.value) for s in spec.cgroups)
    return CgroupPlan(2, (cgroup,), settings, tuple(subtree), "cgroup.procs")


def _unique(items: object) -> list[str]:
    seen: list[str] = []
    for item in items:  # type: ignore[attr-defined]
        if item not in seen:
            seen.append(item)
    return seen


# --- writing ------------------------------------------------------------------------------
def apply(cgroup_plan: CgroupPlan, pid: int) -> None:
    """Carry out ``cgroup_plan`` and move ``pid`` into the cgroup(s).

    All or nothing: if a step fails (a file the controller does not have, a
    value it refuses), the directories made here are removed again.
    """
    made: list[Path] = []
    try:
        _apply(cgroup_plan, pid, made)
    except BaseException:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _apply(cgroup_plan: CgroupPlan, pid: int, made: list[Path]) -> None:
    joining_a_parent = not cgroup_plan.settings
    for cgroup in cgroup_plan.cgroups:
        if not joining_a_parent:  # a parent joined as it is must exist already
            made.extend(_make_dirs(cgroup))
    for path, value in cgroup_plan.subtree_control:  # root first, once the tree exists
        _write(path, value)
    for cgroup in cgroup_plan.cgroups:
        if joining_a_parent:
            continue
        # No task may join a cpuset cgroup whose cpus or mems are empty (ENOSPC).
        inherited = {p.name for p, _ in cgroup_plan.settings if p.parent == cgroup}
        inherited.update(_CPUSET_FILES)
        for file in sorted(inherited):
            if (cgroup / file).exists():
                _inherit(cgroup, file)
    for path, value in cgroup_plan.settings:
        _write(path, value)
    for cgroup in cgroup_plan.cgroups:
        if not cgroup.is_dir():
            raise ConfigError(f"--parent-cgroup: {cgroup} does not exist")
        _write(cgroup / cgroup_plan.join_file, str(pid))


def _inherit(cgroup: Path, file: str) -> None:
    """Copy ``file`` from the nearest ancestor where it is set, down to ``cgroup``.

    The v2 root has no ``cpuset.cpus``, only ``cpuset.cpus.effective``: that
    is what an ancestor chain of empty files inherits from.
    """
    if _read(cgroup / file):
        return
    parent = cgroup.parent
    source = parent / file
    if not source.exists():
        effective = parent / f"{file}.effective"
        if not effective.exists():
            return  # not a file a child inherits (e.g. cpu.shares has a default)
        source = effective
    elif not _read(source):
        _inherit(parent, file)
    value = _read(source)
    if value:
        _write(cgroup / file, value)


def _make_dirs(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents; the directories made, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HostError(f"cannot create cgroup {path}: {error.strerror}") from None
    return missing


def _read(path: Path) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read(65536).strip()
    except OSError as error:
        raise HostError(f"cannot read {path}: {error.strerror}") from None


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as error:
        raise HostError(f"cannot open {path}: {error.strerror}") from None
    try:
        os.write(fd, value.encode())
    except OSError as error:
        raise HostError(f"cannot write {value!r} to {path}: {error.strerror}") from None
    finally:
        os.close(fd)


__all__ = ["CgroupMounts", "CgroupPlan", "CgroupSetting", "apply", "parse_mounts", "plan"]
