"""The default sandbox guest: Debian's cloud kernel and a busybox initramfs with the agent.

Built here, in the guest kit, because building guest images is tooling: the
sandbox runtime (:mod:`pyvmm.sandbox.guest`) never imports the guest kit; it
runs this module as a program (``python -m pyvmm.guestkit.sandbox_guest``),
once per process, and reads the JSON line it prints: the two paths, or why
not. Its progress lines (a download, a build) go to stderr as they come.

The kernel is fetched and the agent compiled on first use (both cached);
the initramfs is named by a hash of its content, so finding it means
building it in memory (3.5 MB through gzip: 0.3 s here, seconds in a
nested host) and writing it only when it is new.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyvmm.errors import PyvmmError
from pyvmm.guestkit.agent_tool import GUEST_MODULES

#: Modules the default initramfs loads: the agent's vsock transport, and the drivers
#: of the devices a sandbox may have (disks, a root disk, network, entropy).
SANDBOX_MODULES: tuple[str, ...] = (*GUEST_MODULES, "virtio_blk", "virtio_net", "virtio-rng")


def build_sandbox_guest(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """The kernel and the initramfs (with ``/bin/pyvmm-agent``), built if needed."""
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.initramfs import build_initramfs

    package = fetch_kernel("cloud", cache_dir)
    initrd = build_initramfs(package, SANDBOX_MODULES, cache_dir=cache_dir, agent=True)
    return package.vmlinuz, initrd


def main(argv: list[str] | None = None) -> int:
    """Print ``{"kernel": ..., "initrd": ...}``, or ``{"error": ...}`` and exit 1."""
    parser = argparse.ArgumentParser(prog="python -m pyvmm.guestkit.sandbox_guest")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        kernel, initrd = build_sandbox_guest(args.cache_dir)
    except (PyvmmError, OSError) as exc:  # OSError: e.g. a read-only cache (a nested host's)
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps({"kernel": str(kernel), "initrd": str(initrd)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
