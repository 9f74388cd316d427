"""``pyvmm-jailer``: Firecracker's jailer, for pyvmm-firecracker (and static binaries).

Same flags, meaning, jail layout and order of operations as Firecracker's
``jailer`` (its ``docs/jailer.md``), so an orchestrator written for it -
Kata Containers runs ``jailer --id ID --exec-file FC --uid U --gid G
--chroot-base-dir DIR --daemonize [--netns P] -- --config-file
/fcConfig.json`` and polls ``<jail root>/run/firecracker.socket`` - works
with ``pyvmm-jailer --exec-file $(which pyvmm-firecracker)``.

Order: check every flag; close inherited fds; clear the environment; (for
pyvmm) import the whole VMM; create the jail directory (a static binary is
copied in); set rlimits (``no-file`` 2048 unless given); join the cgroups;
join ``--netns``; open ``/dev/null`` for ``--daemonize``; new mount
namespace and ``pivot_root`` into the jail; device nodes and directories
owned by uid:gid; ``setsid`` and std streams to ``/dev/null``; with
``--new-pid-ns`` fork into a new pid namespace (the parent writes the
child's pid to ``<exec name>.pid`` and exits); drop privileges (groups,
gid, uid, every capability, ``no_new_privs``); run the VMM with ``--id``,
``--start-time-us``, ``--start-time-cpu-us`` and the arguments after ``--``.

The VMM is an interpreter plus packages, not one static binary. When the
exec file is pyvmm's ``pyvmm-firecracker`` the jailer runs it *in its own
process* after pivoting (everything imported beforehand, see
:mod:`pyvmm.jail.preload`), which exposes nothing of the host's files and
costs no second interpreter start. Any other exec file is copied into the
jail and exec'ed, as Firecracker's jailer does (which works for static
binaries).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from pathlib import Path

import click

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.jail import cgroups, chroot, system
from pyvmm.jail.process import (
    close_inherited_fds,
    daemonize,
    drop_privileges,
    join_netns,
    open_netns,
    set_rlimits,
)
from pyvmm.jail.spec import DEFAULT_CHROOT_BASE, JailSpec, parse_jail_spec

#: A console script for pyvmm-firecracker says this; a larger file is not one.
_PYVMM_ENTRY = b"pyvmm.firecracker_cli"
_SCRIPT_PEEK = 4096


def is_pyvmm_vmm(path: Path) -> bool:
    """True if ``path`` is pyvmm's ``pyvmm-firecracker`` script (run in-process)."""
    with open(path, "rb") as file:
        head = file.read(_SCRIPT_PEEK)
    return head.startswith(b"#!") and _PYVMM_ENTRY in head


def resolve_exec_file(spec: JailSpec) -> Path:
    path = Path(spec.exec_file)
    try:
        path = path.resolve(strict=True)
        info = path.stat()
    except OSError as error:
        raise ConfigError(f"--exec-file {spec.exec_file!r}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"--exec-file {spec.exec_file!r} is not a regular file")
    return path


def run_vmm(exec_path: Path, in_process: bool, args: list[str]) -> int:
    if in_process:
        from pyvmm.firecracker_cli import firecracker

        try:
            firecracker.main(args=args, prog_name=exec_path.name)
        except SystemExit as done:
            code = done.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        return 0
    os.execv(f"/{exec_path.name}", [exec_path.name, *args])
    return 127  # not reached


def jail(spec: JailSpec) -> int:
    """Build the jail and run the VMM in it; returns the VMM's exit status."""
    start_us = time.monotonic_ns() // 1000
    start_cpu_us = time.process_time_ns() // 1000
    exec_path = resolve_exec_file(spec)
    in_process = is_pyvmm_vmm(exec_path)
    close_inherited_fds()
    netns_fd = open_netns(spec.netns) if spec.netns is not None else -1
    os.environ.clear()
    if in_process:
        from pyvmm.jail.preload import preload

        preload()
    mounts = cgroups.read_mounts()
    cgroup_plan = cgroups.plan(spec, mounts)
    root = chroot.create(spec)
    if not in_process:
        shutil.copy2(exec_path, root / exec_path.name)
    set_rlimits(spec)
    if cgroup_plan is not None:
        cgroups.apply(cgroup_plan, os.getpid())
    if spec.netns is not None:
        join_netns(netns_fd, spec.netns)
    dev_null = os.open("/dev/null", os.O_RDWR) if spec.daemonize else -1
    system.last_capability()  # read from /proc while there is one
    chroot.enter(root)
    chroot.populate(spec.uid, spec.gid)
    if spec.daemonize:
        daemonize(dev_null)
    if spec.new_pid_ns:
        system.unshare(system.CLONE_NEWPID)
        child = os.fork()
        if child:
            chroot.write_pid_file(spec.exec_name, child)
            os._exit(0)
    else:
        chroot.write_pid_file(spec.exec_name, os.getpid())
    drop_privileges(spec.uid, spec.gid)
    args = [
        "--id",
        spec.id,
        "--start-time-us",
        str(start_us),
        "--start-time-cpu-us",
        str(time.process_time_ns() // 1000 - start_cpu_us),
        *spec.vmm_args,
    ]
    return run_vmm(exec_path, in_process, args)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--id", "id_", required=True, help="The microVM's id: letters, digits, '-'.")
@click.option("--exec-file", required=True, help="The VMM to run (pyvmm-firecracker).")
@click.option("--uid", required=True, help="The uid the VMM runs as.")
@click.option("--gid", required=True, help="The gid the VMM runs as.")
@click.option("--chroot-base-dir", default=DEFAULT_CHROOT_BASE, show_default=True)
@click.option("--netns", default=None, help="Network namespace to join (a path).")
@click.option("--cgroup-version", default="1", show_default=True, help="1 or 2.")
@click.option("--cgroup", "cgroups_", multiple=True, help="FILE=VALUE, e.g. cpu.weight=100.")
@click.option("--parent-cgroup", default=None, help="Relative path of the parent cgroup.")
@click.option("--resource-limit", multiple=True, help="fsize=N or no-file=N.")
@click.option("--daemonize", is_flag=True, help="setsid and std streams to /dev/null.")
@click.option("--new-pid-ns", is_flag=True, help="Run the VMM as pid 1 of a new pid namespace.")
@click.argument("vmm_args", nargs=-1, type=click.UNPROCESSED)
def jailer(**flags: object) -> None:
    """Build a Firecracker-style jail and run the VMM in it (arguments after -- go to it)."""
    try:
        spec = parse_jail_spec(
            id=flags["id_"],
            exec_file=flags["exec_file"],
            uid=flags["uid"],
            gid=flags["gid"],
            chroot_base=flags["chroot_base_dir"],
            netns=flags["netns"],
            cgroup_version=flags["cgroup_version"],
            cgroups=flags["cgroups_"],
            parent_cgroup=flags["parent_cgroup"],
            resource_limits=flags["resource_limit"],
            daemonize=flags["daemonize"],
            new_pid_ns=flags["new_pid_ns"],
            vmm_args=flags["vmm_args"],
        )
        code = jail(spec)
    except ConfigError as error:
        print(f"pyvmm-jailer: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (PyvmmError, OSError) as error:
        print(f"pyvmm-jailer: error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def main() -> None:
    jailer(prog_name="pyvmm-jailer")


if __name__ == "__main__":
    main()
