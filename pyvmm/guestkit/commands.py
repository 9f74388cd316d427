"""``pyvmm guest kernel|initramfs|rootfs|command-arg``: fetch or build guest artifacts.

Each command prints one path (or one kernel argument) on stdout, so shells
and tests can write ``pyvmm run --kernel "$(pyvmm guest kernel)"``. A problem
ends with one ``pyvmm: error: ...`` line and exit status 2, as in
:mod:`pyvmm.cli`. Register them on the ``guest`` group with
:func:`register`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pyvmm.errors import ConfigError, PyvmmError

EXIT_USAGE = 2

_FLAVOR = click.option(
    "--flavor",
    type=click.Choice(["cloud", "generic"]),
    default="cloud",
    show_default=True,
    help="Debian kernel flavor: cloud (small, no 9p) or generic (every module).",
)


def _fail(message: str) -> None:
    click.echo(f"pyvmm: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


@click.command("kernel")
@_FLAVOR
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["bzimage", "vmlinux"]),
    default="bzimage",
    show_default=True,
    help="bzimage: Debian's vmlinuz; vmlinux: the ELF inside it (PVH-bootable).",
)
@click.option("--refresh", is_flag=True, help="Ask apt for the current kernel version again.")
def kernel_command(flavor: str, fmt: str, refresh: bool) -> None:
    """Fetch Debian's kernel (when needed) and print the path of its image."""
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.vmlinux import kernel_vmlinux

    try:
        pkg = fetch_kernel(flavor, refresh=refresh)
        click.echo(str(kernel_vmlinux(pkg) if fmt == "vmlinux" else pkg.vmlinuz))
    except PyvmmError as error:
        _fail(str(error))


@click.command("initramfs")
@_FLAVOR
@click.option(
    "--module",
    "modules",
    multiple=True,
    metavar="NAME",
    help="Kernel module to load at boot, with its dependencies (repeatable).",
)
@click.option(
    "--init",
    "init_file",
    default=None,
    metavar="FILE",
    help="Shell script to use as /init instead of pyvmm's default.",
)
@click.option("--no-compress", is_flag=True, help="Write a plain cpio instead of cpio.gz.")
def initramfs_command(
    flavor: str, modules: tuple[str, ...], init_file: str | None, no_compress: bool
) -> None:
    """Build a busybox initramfs (when needed) and print its path.

    The kernel is fetched only when modules are requested; the default /init
    runs the script given as pyvmm.cmd=BASE64 on the kernel command line
    (see `pyvmm guest command-arg`). The image holds the guest agent,
    /bin/pyvmm-agent (built with gcc on first use), not started: a sandbox
    starts it with pyvmm.cmd (exec pyvmm-agent), after the modules
    virtio_mmio and vmw_vsock_virtio_transport.
    """
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.initramfs import DEFAULT_INIT, build_initramfs

    try:
        init_script = DEFAULT_INIT if init_file is None else _read_text(init_file)
        kernel = fetch_kernel(flavor) if modules else None
        path = build_initramfs(kernel, modules, init_script, agent=True, compress=not no_compress)
        click.echo(str(path))
    except PyvmmError as error:
        _fail(str(error))


@click.command("rootfs")
@click.option(
    "--from",
    "source",
    default=None,
    metavar="DIR_OR_TAR",
    help="Directory or tar file (e.g. from docker export) to copy; default: busybox.",
)
@click.option(
    "--size",
    "size_mib",
    type=click.IntRange(min=1),
    default=None,
    metavar="MiB",
    help="Image size in MiB (default: content * 1.5 + 32 MiB).",
)
@click.option(
    "--init",
    "init_file",
    default=None,
    metavar="FILE",
    help="Shell script to install as /sbin/init instead of the tree's or pyvmm's.",
)
def rootfs_command(source: str | None, size_mib: int | None, init_file: str | None) -> None:
    """Build an ext4 root filesystem image (when needed) and print its path.

    Needs e2fsprogs (mkfs.ext4 -d, debugfs), no root. The default /sbin/init
    prints PYVMM-ROOTFS-OK and runs pyvmm.cmd=BASE64 like the initramfs's.
    """
    from pyvmm.guestkit.rootfs import build_rootfs

    try:
        init_script = None if init_file is None else _read_text(init_file)
        if source is not None and not Path(source).exists():
            raise ConfigError(f"rootfs source {source} does not exist")
        path = build_rootfs(
            Path(source) if source is not None else None, size_mib, init_script=init_script
        )
        click.echo(str(path))
    except PyvmmError as error:
        _fail(str(error))


@click.command("command-arg")
@click.argument("script")
def command_arg_command(script: str) -> None:
    """Print the kernel argument (pyvmm.cmd=BASE64) that makes /init run SCRIPT."""
    from pyvmm.guestkit.initramfs import command_arg

    try:
        click.echo(command_arg(script))
    except PyvmmError as error:
        _fail(str(error))


COMMANDS: tuple[click.Command, ...] = (
    kernel_command,
    initramfs_command,
    rootfs_command,
    command_arg_command,
)


def register(group: click.Group) -> None:
    """Add the guest-kit commands to ``group`` (the CLI's ``guest`` group)."""
    for command in COMMANDS:
        group.add_command(command)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"init script {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read init script {path}: {exc}") from None
