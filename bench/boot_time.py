#!/usr/bin/env python3
"""Boot time of a real Linux guest: pyvmm vs QEMU ``-M microvm``, same kernel and initramfs.

Measures, from the moment the VMM process is spawned:

* ``to_init``: until the guest's /init prints its marker (``PYVMM-INIT-OK``);
* ``to_first_run`` (pyvmm only): until vCPU 0 first enters ``KVM_RUN``, the
  part of the boot that is the VMM's own doing (Python start, imports,
  loading the kernel, building tables and vCPUs).

Both VMMs boot Debian's cloud bzImage with the guest kit's default
initramfs, whose /init powers off at once. Guest kernel code must run at
hardware speed for these numbers to mean anything: on PVM hosts run this
inside the nested host (``pyvmm nested -- python3 bench/boot_time.py``).
Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from report import write_report

from pyvmm.guestkit.debian import fetch_kernel
from pyvmm.guestkit.initramfs import MARKER_INIT_OK, build_initramfs

CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
FIRST_RUN_LINE = "vcpu0: entering the guest"
QEMU_CPUS = ("host", "host,-arch-capabilities")


def timed_run(argv: list[str], markers: dict[str, str], timeout: float) -> dict[str, float]:
    """Spawn ``argv``; return seconds from spawn to the first line containing each marker."""
    seen: dict[str, float] = {}
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    tails: list[bytes] = []

    def watch(stream) -> None:
        for raw in stream:
            now = time.perf_counter() - start
            tails.append(raw)
            line = raw.decode(errors="replace")
            for name, marker in markers.items():
                if name not in seen and marker in line:
                    seen[name] = now

    readers = [threading.Thread(target=watch, args=(s,)) for s in (process.stdout, process.stderr)]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for reader in readers:
        reader.join()
    seen["total"] = time.perf_counter() - start
    missing = set(markers) - set(seen)
    if missing:
        tail = b"".join(tails[-30:]).decode(errors="replace")
        raise RuntimeError(f"{argv[0]}: never printed {sorted(missing)}; output tail:\n{tail}")
    return seen


def pyvmm_argv(kernel: Path, initrd: Path) -> list[str]:
    return [
        sys.executable, "-m", "pyvmm", "run", "--kernel", str(kernel), "--initrd", str(initrd),
        "--cmdline", CMDLINE, "--memory", "256", "--log-level", "debug", "--timeout", "600",
    ]  # fmt: skip


def qemu_argv(kernel: Path, initrd: Path, cpu: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-M", "microvm,acpi=on", "-enable-kvm", "-cpu", cpu, "-m", "256",
        "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE,
    ]  # fmt: skip


def working_qemu_cpu(kernel: Path, initrd: Path) -> str:
    """QEMU's ``-cpu host`` fails on some hosts (MSR 0x10a): find a model that boots."""
    for cpu in QEMU_CPUS:
        try:
            timed_run(qemu_argv(kernel, initrd, cpu), {"to_init": MARKER_INIT_OK}, 600)
            return cpu
        except RuntimeError:
            continue
    raise RuntimeError("QEMU could not boot the guest with any of " + ", ".join(QEMU_CPUS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench/results/boot_time.json"))
    args = parser.parse_args()

    package = fetch_kernel("cloud")
    kernel, initrd = package.vmlinuz, build_initramfs(package)
    markers = {"to_first_run": FIRST_RUN_LINE, "to_init": MARKER_INIT_OK}
    pyvmm_runs = [timed_run(pyvmm_argv(kernel, initrd), markers, 900) for _ in range(args.repeat)]
    results = {
        "pyvmm": {key: statistics.median(run[key] for run in pyvmm_runs) for key in pyvmm_runs[0]}
    }
    if shutil.which("qemu-system-x86_64"):
        cpu = working_qemu_cpu(kernel, initrd)
        qemu_runs = [
            timed_run(qemu_argv(kernel, initrd, cpu), {"to_init": MARKER_INIT_OK}, 900)
            for _ in range(args.repeat)
        ]
        results["qemu"] = {
            key: statistics.median(run[key] for run in qemu_runs) for key in qemu_runs[0]
        }
    else:
        print("qemu-system-x86_64 not installed: QEMU column left out", file=sys.stderr)

    print(f"{'measure':<28}{'pyvmm (s)':>12}{'qemu (s)':>12}{'pyvmm/qemu':>12}")
    rows = (("start -> first KVM_RUN", "to_first_run"), ("start -> /init", "to_init"))
    for label, key in (*rows, ("start -> exit", "total")):
        mine = results["pyvmm"].get(key)
        theirs = results.get("qemu", {}).get(key)
        ratio = f"{mine / theirs:>12.2f}" if mine and theirs else f"{'':>12}"
        print(
            f"{label:<28}{mine:>12.3f}" + (f"{theirs:>12.3f}" if theirs else f"{'-':>12}") + ratio
        )

    write_report(
        args.json,
        "boot_time",
        results,
        unit="seconds from process spawn",
        kernel=str(kernel),
        kernel_version=package.version,
        repeat=args.repeat,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
