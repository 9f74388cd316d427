"""The guest a sandbox boots: the default one, and the kernel command line that starts its agent.

The default guest is the guest kit's: Debian's cloud kernel (bzImage) and a
busybox initramfs holding ``/bin/pyvmm-agent`` and the modules it and the
sandbox's devices need. Both are fetched and built on first use and cached
by :mod:`pyvmm.guestkit.sandbox_guest`, which this runtime runs as a program
rather than importing it: the guest kit is tooling (image builders,
downloads), never part of a VMM process.

The agent is started by the guest's init, which reads its orders from the
kernel command line (the guest kit's init contract): :func:`agent_cmdline`
adds ``pyvmm.cmd=<base64 of "exec pyvmm-agent">``, which pyvmm's initramfs
and ``pyvmm guest rootfs`` images both honour (after ``switch_root`` to a
``root`` drive too). A kernel of the user's own with ``cmdline`` None gets
the same arguments; a ``cmdline`` given by the user is used as it is and must
start the agent itself.
"""

from __future__ import annotations

import base64
import functools
import json
import subprocess
import sys
from pathlib import Path

from pyvmm.config import DEFAULT_LINUX_CMDLINE
from pyvmm.errors import HostError
from pyvmm.sandbox.config import SandboxConfig

#: ``loglevel=3``: only critical kernel messages reach the console (and so the
#: sandbox's console tail stays readable); ``panic=-1`` resets at once, which
#: ends the VM with a stop reason instead of a hung guest.
_KERNEL_ARGS = "loglevel=3 panic=-1"
AGENT_SCRIPT = "exec pyvmm-agent"
#: The guest kit's init contract: /init runs the base64 script of this kernel argument
#: (``pyvmm.guestkit.initramfs.command_arg``; a unit test keeps the two equal).
COMMAND_PARAM = "pyvmm.cmd"


def agent_cmdline(extra: str = "") -> str:
    """The kernel command line of a guest whose init follows the guest kit's contract."""
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


def command_arg(script: str) -> str:
    """``pyvmm.cmd=<base64>``: the kernel argument that makes the guest's /init run ``script``."""
    return f"{COMMAND_PARAM}={base64.b64encode(script.encode()).decode('ascii')}"


@functools.lru_cache(maxsize=4)
def default_guest(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Debian's cloud kernel and the sandbox initramfs (with the agent), built if needed.

    Runs :mod:`pyvmm.guestkit.sandbox_guest` in a child Python and remembers
    its answer for the life of the process (finding the initramfs means
    building it in memory: once per process rather than once per sandbox).
    Raises :class:`~pyvmm.errors.HostError` with the guest kit's reason when
    it cannot.
    """
    argv = [sys.executable, "-m", "pyvmm.guestkit.sandbox_guest"]
    argv += ["--cache-dir", str(cache_dir)] if cache_dir is not None else []
    try:  # stderr is the caller's: the guest kit's progress lines (a download, a build)
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    except OSError as exc:
        raise HostError(f"cannot build the default sandbox guest: {exc}") from None
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        if done.returncode == 0:
            return Path(answer["kernel"]), Path(answer["initrd"])
        reason = str(answer["error"])
    except (IndexError, ValueError, KeyError, TypeError):
        reason = f"the guest kit exited {done.returncode}: {done.stdout[-200:]!r}"
    raise HostError(f"cannot build the default sandbox guest: {reason}")
