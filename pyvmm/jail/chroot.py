"""Builds the jail directory and moves the process into it (a new mount namespace).

Layout, as Firecracker's jailer makes it (``<base>/<exec name>/<id>/root``)::

    /               0700 uid:gid   the API socket's directory is /run
    /dev            0700 uid:gid
    /dev/kvm        char 10:232, 0600 uid:gid
    /dev/net        0700 uid:gid
    /dev/net/tun    char 10:200, 0600 uid:gid
    /run            0700 uid:gid
    /<exec name>.pid                the VMM's pid as the host sees it

:func:`enter` unshares the mount namespace, makes every mount private (so
nothing we do propagates back to the host), bind-mounts the jail on itself
(``pivot_root`` needs a mount point), pivots, detaches the old root and
``chroot``\\ s into the new one. After that the host file system is gone for
this process, not merely hidden: no ``..`` or open directory fd leads back.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyvmm.errors import HostError
from pyvmm.jail import system
from pyvmm.jail.spec import JailSpec

DIR_MODE = 0o700
DEVICE_MODE = 0o600
KVM_DEVICE = ("/dev/kvm", 10, 232)
TUN_DEVICE = ("/dev/net/tun", 10, 200)
JAIL_DIRS = ("/", "/dev", "/dev/net", "/run")


def chroot_dir(spec: JailSpec) -> Path:
    return Path(spec.chroot_base) / spec.exec_name / spec.id / "root"


def create(spec: JailSpec) -> Path:
    """Create the (empty) jail directory; an existing one is reused, as Firecracker does."""
    root = chroot_dir(spec)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HostError(f"cannot create the jail {root}: {error.strerror}") from None
    return root


def enter(root: Path) -> None:
    """Pivot into ``root`` in a new, private mount namespace (see the module docstring)."""
    system.unshare(system.CLONE_NEWNS)
    system.mount(None, "/", None, system.MS_PRIVATE | system.MS_REC)
    system.mount(str(root), str(root), None, system.MS_BIND | system.MS_REC)
    os.chdir(root)
    os.makedirs("old_root", exist_ok=True)
    system.pivot_root(".", "old_root")
    os.chdir("/")
    system.umount2("/old_root", system.MNT_DETACH)
    os.rmdir("/old_root")
    os.chroot(".")


def populate(uid: int, gid: int) -> None:
    """Inside the jail: the directories and device nodes, owned by ``uid:gid``."""
    for path in JAIL_DIRS:
        os.makedirs(path, exist_ok=True)
        os.chmod(path, DIR_MODE)
        os.chown(path, uid, gid)
    for path, major, minor in (KVM_DEVICE, TUN_DEVICE):
        try:
            os.mknod(path, 0o020000 | DEVICE_MODE, os.makedev(major, minor))
        except FileExistsError:
            pass  # a reused jail
        except OSError as error:
            raise HostError(f"mknod {path} failed: {error.strerror}") from None
        os.chmod(path, DEVICE_MODE)
        os.chown(path, uid, gid)


def write_pid_file(exec_name: str, pid: int) -> Path:
    """``/<exec name>.pid`` in the jail root (the host sees it in the jail directory)."""
    path = Path("/") / f"{exec_name}.pid"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)
    return path
