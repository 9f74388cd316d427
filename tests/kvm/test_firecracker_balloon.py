"""The balloon end to end: ``PATCH /balloon`` on a running VM gives guest memory back to the
host, measured as the VMM process's resident memory (the probe's ``balloon=N`` program
is the guest driver: it touches N MiB, then inflates towards the target it reads)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import requires_kvm
from tests.kvm.test_api_server import Vmm

pytestmark = requires_kvm

MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_inflating_the_balloon_gives_memory_back_to_the_host(
    tmp_path: Path, probe_elf: Path
) -> None:
    vmm = Vmm(tmp_path)
    try:
        vmm.ok(
            "PUT", "/boot-source", {"kernel_image_path": str(probe_elf), "boot_args": "balloon=48"}
        )
        vmm.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        vmm.ok("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": True})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        vmm.wait_serial(r"balloon: touched 48 MiB")
        before = rss_bytes(vmm.process.pid)
        vmm.ok("PATCH", "/balloon", {"amount_mib": 40})
        vmm.wait_serial(r"balloon: inflated 10240 pages")
        time.sleep(0.2)  # the last buffer's release and the used-ring write are done
        after = rss_bytes(vmm.process.pid)
        released = before - after
        print(
            f"balloon: RSS {before / MIB:.1f} MiB -> {after / MIB:.1f} MiB "
            f"({released / MIB:.1f} MiB given back for 40 MiB inflated)"
        )
        assert released >= 36 * MIB, (before, after)
        stats = vmm.ok("GET", "/balloon")
        assert stats["amount_mib"] == 40
        assert (
            "statistics are not enabled"
            in vmm.request("GET", "/balloon/statistics")[1]["fault_message"]
        )
    finally:
        vmm.close()
