"""Clones of one Linux snapshot get new VM generation ids, and their RNGs part ways.

A real guest: Debian's generic kernel (``CONFIG_VMGENID=y``; the cloud
kernel has no vmgenid driver: it leaves ``CONFIG_VIRT_DRIVERS`` out) with a
busybox initramfs, inside the nested host on PVM machines. One process in
the nested host boots the guest, snapshots it while it waits for a console
line, and restores it twice; each clone gets a new generation id, reads it
(``/dev/mem`` at the address the DSDT's ``VGEN`` gives), sees its driver
reseed the RNG, and prints 32 bytes of ``/dev/urandom``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvmm import layout
from pyvmm.guestkit.initramfs import COMMAND_FILE

pytestmark = pytest.mark.linux

RUN_TIMEOUT = 1800  # seconds of wall time for the whole driver in the nested host

# The guest's part. Before the snapshot: the evidence that the driver bound
# and the id it reads; then it waits for a console line. After a restore
# (the line arrives), it waits for the driver's reseed and reads the RNG.
GUEST_SCRIPT = f"""
echo VMGENID-BOUND $(ls /sys/bus/acpi/drivers/vmgenid | grep QEMUVGID)
echo VMGENID-PATH $(cat /sys/bus/acpi/devices/QEMUVGID:00/path)
echo GED-IRQ $(grep -c 'ACPI:Ged' /proc/interrupts)
dmesg | grep -i -E 'ACPI (BIOS )?(error|warning)|ACPI Exception' | sed 's/^/ACPI-PROBLEM /'
guid() {{
    dd if=/dev/mem bs=16 skip=$(({layout.VMGENID_ADDR} / 16)) count=1 2>/dev/null \\
        | od -An -tx1 | tr -d ' \\n'
}}
echo GUEST-GUID-BOOT $(guid)
echo URANDOM-BOOT $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')
echo SNAPSHOT-NOW
read line
i=0
while [ $i -lt 200 ] && ! dmesg | grep -q 'virtual machine fork'; do
    i=$((i+1)); sleep 0.05
done
dmesg | grep 'virtual machine fork' | sed 's/^/FORK /'
echo GED-COUNT $(grep 'ACPI:Ged' /proc/interrupts | awk '{{print $2}}')
echo GUEST-GUID-NOW $(guid)
echo URANDOM-NOW $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')
"""

DRIVER = r'''
"""Runs in the nested host: boot, snapshot at SNAPSHOT-NOW, restore two clones."""
import sys, time
from pyvmm import MicroVM

kernel, initrd, cmdline, state, memory = sys.argv[1:]
with MicroVM(kernel=kernel, initrd=initrd, cmdline=cmdline, memory=256) as vm:
    vm.start()
    vm.console.wait_for(r"SNAPSHOT-NOW", timeout=1200)
    vm.pause()
    print("HOST-GUID-BOOT", vm.machine.devices.vmgenid.generation.hex(), flush=True)
    vm.snapshot(state, memory)
    for line in vm.console.output.splitlines():
        print("BOOT |", line, flush=True)
for clone in range(2):
    started = time.monotonic()
    with MicroVM.restore(state, memory) as vm:
        print(f"CLONE{clone} RESTORE-MS {(time.monotonic() - started) * 1000:.1f}", flush=True)
        print(f"CLONE{clone} HOST-GUID", vm.machine.devices.vmgenid.generation.hex(), flush=True)
        vm.console.write("go\n")
        vm.console.wait_for(r"URANDOM-NOW [0-9a-f]{64}", timeout=300)
        for line in vm.console.output.splitlines():
            print(f"CLONE{clone} |", line, flush=True)
'''


@dataclass(frozen=True)
class GenericGuest:
    vmlinux: Path
    initramfs: Path


@pytest.fixture(scope="module")
def generic_guest() -> GenericGuest:
    """Debian's generic kernel (it has the vmgenid driver) and an initramfs running
    :data:`GUEST_SCRIPT`."""
    from pyvmm.guestkit.debian import fetch_kernel
    from pyvmm.guestkit.initramfs import build_initramfs
    from pyvmm.guestkit.vmlinux import kernel_vmlinux

    package = fetch_kernel("generic")
    config = (package.root / "boot" / f"config-{package.version}").read_text()
    assert "CONFIG_VMGENID=y" in config, "this kernel has no built-in vmgenid driver"
    initramfs = build_initramfs(package, extra_files={COMMAND_FILE: GUEST_SCRIPT.encode()})
    return GenericGuest(kernel_vmlinux(package), initramfs)


def values(lines: list[str], prefix: str) -> list[str]:
    """The rest of each line that starts with ``prefix`` (console lines end in CR)."""
    found = []
    for line in lines:
        line = line.rstrip("\r")
        if line.startswith(prefix):
            found.append(line[len(prefix) :].strip())
    return found


def test_clones_get_new_generations_and_different_randomness(
    linux_host, generic_guest: GenericGuest, tmp_path: Path
) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmdline = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
    argv = [
        sys.executable, str(driver), str(generic_guest.vmlinux), str(generic_guest.initramfs),
        cmdline, str(tmp_path / "vm.state"), str(tmp_path / "vm.mem"),
    ]  # fmt: skip
    result = linux_host.run(argv, timeout=RUN_TIMEOUT)
    context = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, context
    lines = result.stdout.splitlines()

    # Before the snapshot: the driver bound to VGEN, the GED has its interrupt,
    # and the guest reads the host's id at the address from the DSDT.
    assert values(lines, "BOOT | VMGENID-BOUND") == ["QEMUVGID:00"], context
    assert values(lines, "BOOT | VMGENID-PATH") == ["\\_SB_.VGEN"], context
    assert values(lines, "BOOT | GED-IRQ") == ["1"], context
    assert values(lines, "BOOT | ACPI-PROBLEM") == [], context
    (host_boot,) = values(lines, "HOST-GUID-BOOT")
    assert values(lines, "BOOT | GUEST-GUID-BOOT") == [host_boot], context

    seen_guids = [host_boot]
    randomness = values(lines, "BOOT | URANDOM-BOOT")
    for clone in ("CLONE0", "CLONE1"):
        (host_guid,) = values(lines, f"{clone} HOST-GUID")
        assert host_guid not in seen_guids, context
        seen_guids.append(host_guid)
        # The guest reads the new id, took one GED interrupt, and its driver reseeded.
        assert values(lines, f"{clone} | GUEST-GUID-NOW") == [host_guid], context
        assert values(lines, f"{clone} | GED-COUNT") == ["1"], context
        fork = values(lines, f"{clone} | FORK")
        assert len(fork) == 1 and "crng reseeded due to virtual machine fork" in fork[0], context
        (now,) = values(lines, f"{clone} | URANDOM-NOW")
        assert re.fullmatch(r"[0-9a-f]{64}", now), context
        randomness.append(now)
    assert len(set(randomness)) == 3, f"two clones read the same random bytes: {randomness}"
    restore_ms = [float(v) for v in values(lines, "CLONE0 RESTORE-MS")]
    print(f"restores in the nested host: {restore_ms} ms; guids {seen_guids}")
