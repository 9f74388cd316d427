"""The guest a sandbox boots: the default one, and the kernel command line that starts its agent.

The default guest is the guest kit's: Debian's cloud kernel (bzImage) and a
busybox initramfs holding ``/bin/pyvmm-agent`` and the modules it and the
sandbox's devices need (:data:`SANDBOX_MODULES`). Both are fetched and
built on first use and cached (:mod:`pyvmm.guestkit`).

The agent is started by the guest's init, which reads its orders from the
kernel command line (the guest kit's init contract): :func:`agent_cmdline`
adds ``pyvmm.cmd=<base64 of "exec pyvmm-agent">``, which pyvmm's initramfs
and ``pyvmm guest rootfs`` images both honour (after ``switch_root`` to a
``root`` drive too). A kernel of the user's own with ``cmdline`` None gets
the same arguments; a ``cmdline`` given by the user is used as it is and must
start the agent itself.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pyvmm.config import DEFAULT_LINUX_CMDLINE
from pyvmm.errors import HostError
from pyvmm.guestkit.agent_tool import GUEST_MODULES
from pyvmm.sandbox.config import SandboxConfig

#: Modules the default initramfs loads: the agent's vsock transport, and the drivers
#: of the devices a sandbox may have (disks, a root disk, network, entropy).
SANDBOX_MODULES: tuple[str, ...] = (*GUEST_MODULES, "virtio_blk", "virtio_net", "virtio-rng")
#: ``loglevel=3``: only critical kernel messages reach the console (and so the
#: sandbox's console tail stays readable); ``panic=-1`` resets at once, which
#: ends the VM with a stop reason instead of a hung guest.
_KERNEL_ARGS = "loglevel=3 panic=-1"
AGENT_SCRIPT = "exec pyvmm-agent"


def agent_cmdline(extra: str = "") -> str:
    """The kernel command line of a guest whose init follows the guest kit's contract."""
    from pyvmm.guestkit.initramfs import command_arg

    base = DEFAULT_LINUX_CMDLINE.replace("panic=1", "").split()
    words = [*base, *_KERNEL_ARGS.split(), *extra.split(), command_arg(AGENT_SCRIPT)]
    return " ".join(words)


def resolve_guest(config: SandboxConfig) -> tuple[Path, Path | None, str]:
    """The kernel, initrd and command line ``config`` boots (the default guest if no kernel).

    Fetches and builds the default guest on first use (raises
    :class:`~pyvmm.errors.HostError` with the guest kit's reason when it cannot).
    """
    cmdline = config.cmdline if config.cmdline is not None else agent_cmdline()
    if config.kernel is not None:
        return config.kernel, config.initrd, cmdline
    kernel, initrd = default_guest()
    return kernel, initrd, cmdline


@functools.lru_cache(maxsize=4)
def default_guest(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Debian's cloud kernel and the sandbox initramfs (with the agent), built if needed.

    Remembered for the life of the process: the guest kit names an initramfs by
    a hash of its content, so finding it means building it in memory (3.5 MB
    through gzip: 0.3 s here, seconds in a nested host), once per process
    rather than once per sandbox.
    """
    from pyvmm.guestkit.agent_tool import GUEST_PATH, build_agent
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.initramfs import build_initramfs

    try:
        package = fetch_kernel("cloud", cache_dir)
        agent = build_agent(cache_dir)
        initrd = build_initramfs(
            package,
            SANDBOX_MODULES,
            cache_dir=cache_dir,
            extra_files={GUEST_PATH: agent.read_bytes()},
        )
    except OSError as exc:  # e.g. a read-only cache (a nested host sees the host's read-only)
        raise HostError(f"cannot build the default sandbox guest: {exc}") from None
    return package.vmlinuz, initrd
