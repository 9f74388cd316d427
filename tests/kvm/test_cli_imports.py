"""What ``pyvmm run`` imports: only what the boot uses (start-up time is import time).

Each module costs its import at every start of every VM; these tests keep the
heavy ones (the snapshot code, the API, virtio devices the config does not
have, the guest kit, the nested host, third-party parsers) off the boot path,
so a change that pulls one back in fails here rather than showing up only as
a slower benchmark. Nothing here is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_kvm

pytestmark = requires_kvm

#: Run ``pyvmm run`` in this interpreter, then write the names of every module
#: it imported (stdout belongs to the guest's console).
RUN_AND_LIST = """
import json, sys
sys.argv = ["pyvmm", "run", *sys.argv[2:]]
from pyvmm.cli import main
try:
    main()
except SystemExit:
    pass
with open(sys.argv_out, "w") as out:
    json.dump(sorted(sys.modules), out)
"""

#: Never on the path of a plain boot.
HEAVY = (
    "pyvmm.snapshot",
    "pyvmm.api",
    "pyvmm.serve",
    "pyvmm.firecracker_cli",
    "pyvmm.metrics",
    "pyvmm.jail.cgroups",  # seccomp is on by default; the jail's other steps are asked for
    "pyvmm.jail.chroot",
    "pyvmm.jail.landlock",
    "pyvmm.jail.preload",
    "pyvmm.sandbox",
    "pyvmm.microvm",
    "pyvmm.nested.command",
    "pyvmm.nested.host",
    "pyvmm.devices.rate_limiter",
    "pyvmm.devices.virtio.mmio",
    "pyvmm.devices.virtio.queue",
    "elftools",
    "json",
    "hashlib",
    "http",
    "email",
)


def imported_by_run(tmp_path: Path, *args: str) -> set[str]:
    listing = tmp_path / "modules.json"
    script = RUN_AND_LIST.replace("sys.argv_out", repr(str(listing)))
    result = subprocess.run(
        [sys.executable, "-c", script, "-", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert listing.exists(), result.stderr
    modules = set(json.loads(listing.read_text()))
    assert "pyvmm.vmm.machine" in modules, result.stderr  # the VM really was built
    return modules - {"json", "json.decoder", "json.scanner", "json.encoder"}  # the lister's


def heavy_ones(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_a_plain_boot_imports_no_snapshot_api_virtio_or_tooling(
    tmp_path: Path, probe_elf: Path
) -> None:
    modules = imported_by_run(
        tmp_path, "--kernel", str(probe_elf), "--memory", "32", "--cmdline", "hello"
    )
    assert heavy_ones(modules) == []
    virtio = sorted(m for m in modules if m.startswith("pyvmm.devices.virtio."))
    assert virtio == ["pyvmm.devices.virtio.ids"]


@pytest.mark.parametrize(
    ("flags", "needed", "absent"),
    [
        (
            ["--drive", "{disk}"],
            "pyvmm.devices.virtio.block",
            ("pyvmm.devices.virtio.net", "pyvmm.devices.virtio.vsock"),
        ),
        (
            ["--rng"],
            "pyvmm.devices.virtio.rng",
            ("pyvmm.devices.virtio.block", "pyvmm.devices.virtio.balloon"),
        ),
    ],
)
def test_a_device_brings_its_own_code_and_no_other(
    tmp_path: Path, probe_elf: Path, flags: list[str], needed: str, absent: tuple[str, ...]
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    args = [flag.format(disk=disk) for flag in flags]
    modules = imported_by_run(
        tmp_path, "--kernel", str(probe_elf), "--memory", "32", "--cmdline", "hello", *args
    )
    assert needed in modules
    assert not set(absent) & modules
    assert "pyvmm.snapshot" not in modules
